/*
 * A layer's RMSNorm, the residual addition before it, and the matrix product after it, in
 * one call: out = matmul(norm(x + delta)), and x + delta written out for the residual stream.
 *
 * Why it exists: in a decoding step of a small model, each call from Python into C costs more
 * than the norm's arithmetic (about 16 µs on a slow 2-core machine: ctypes, the output
 * tensor, the Python around it), and so does the dispatch of the residual addition. Twice
 * per layer, the norm's own call, its output tensor and that addition are overhead between
 * two products. Here they happen inside the product's call.
 *
 * The same numbers as the separate steps, bit for bit: the sum rounded to bf16 as PyTorch's
 * bf16 addition rounds it (fp32 sum, round to nearest even), the norm by the same code as
 * rms_norm.c (rms_norm.h), then the matrix kernel given as a function pointer (one of our
 * int4 or int8 kernels, ``int f(x, weights, scales, out, rows, n, k, threads)``) on the
 * normalised rows.
 *
 * Plain C (no instruction-set flags): the product's instructions are the kernel's own.
 */
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "rms_norm.h"

typedef int (*bf16_matmul_fn)(const uint16_t *x, const void *weights, const void *scales,
                              uint16_t *out, int64_t rows, int64_t n, int64_t k, int threads);

/* x, delta, sum_out: (rows, k) bf16, delta and sum_out NULL when there is no addition;
 * norm_weight: (k) bf16; out: (rows, n) bf16. 0, or -1 when out of memory (or what the
 * matrix kernel returns). */
int norm_then_matmul(bf16_matmul_fn matmul, const uint16_t *x, const uint16_t *delta,
                     uint16_t *sum_out, const uint16_t *norm_weight, float eps,
                     const void *weights, const void *scales, uint16_t *out, int64_t rows,
                     int64_t n, int64_t k, int threads) {
    uint16_t *normed = malloc((size_t)(rows * k) * sizeof(uint16_t));
    if (normed == NULL) return -1;
    const uint16_t *input = x;
    if (delta != NULL) {
        for (int64_t i = 0; i < rows * k; i++)
            sum_out[i] = float_to_bf16(bf16_to_float(x[i]) + bf16_to_float(delta[i]));
        input = sum_out;
    }
    rms_norm_rows(input, norm_weight, normed, rows, k, eps, threads);
    const int status = matmul(normed, weights, scales, out, rows, n, k, threads);
    free(normed);
    return status;
}

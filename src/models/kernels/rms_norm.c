/*
 * RMSNorm of bf16 rows, in one call: out = weight * bf16(x / sqrt(mean(x^2) + eps)).
 *
 * Why it exists: PyTorch computes an RMSNorm of a bf16 row as half a dozen operations (a
 * cast to fp32, the mean of squares, the scaling, a cast back, the weight), each a full
 * dispatch through the framework. For one decoding row of a small model those costs, not
 * the arithmetic, are the time: about 90 µs per norm on a slow 2-core machine, twice per
 * layer and token. Here it is one call of a few microseconds.
 *
 * The same steps in the same precision as Llama's RMSNorm in src/models/transformer.py: the
 * mean of squares and the scaling in fp32, the result rounded to bf16, then multiplied by the
 * bf16 weight and rounded again (as PyTorch's bf16 multiplication does). Only the order in
 * which the squares are summed can differ from PyTorch's.
 *
 * Plain C (no instruction-set flags): it builds and runs on any CPU gcc targets.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* x and out: (rows, width) bf16; weight: (width) bf16. Rows are split between threads only
 * when there are enough of them (a prompt) to pay for waking the threads. */
void rms_norm_bf16(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t rows,
                   int64_t width, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows >= 64)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = x + r * width;
        float squares = 0.0f;
        for (int64_t i = 0; i < width; i++) {
            float value = bf16_to_float(row[i]);
            squares += value * value;
        }
        const float scale = 1.0f / sqrtf(squares / (float)width + eps);
        for (int64_t i = 0; i < width; i++) {
            float normalised = bf16_to_float(float_to_bf16(bf16_to_float(row[i]) * scale));
            out[r * width + i] = float_to_bf16(normalised * bf16_to_float(weight[i]));
        }
    }
}

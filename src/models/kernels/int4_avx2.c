/*
 * y = x W^T for int4 weights and several bf16 rows of x, with AVX2 and FMA: the kernel for
 * x86-64 CPUs without AVX-512 BF16 (int4_bf16.c is the one for those with it).
 *
 * Why it exists: PyTorch's AVX2 kernel for int4 weights (_weight_int4pack_mm_for_cpu)
 * dequantises every weight, scale and offset included, before its multiply-add. Here the
 * scale and offset of a group of 32 weights are taken out of the sum, as in int4_bf16.c:
 *     sum_k x_k w_k = scale * sum_k x_k q_k + (offset - 8 scale) * sum_k x_k
 * with q_k the 4-bit code, so the inner loop only turns codes into fp32 numbers (exact) and
 * multiplies: the same numbers as dequantising first, summed in another order.
 *
 * Layout: the weights are PyTorch's own packing (aten._convert_weight_to_int4pack_for_cpu,
 * AVX2 variant), so the same buffers serve both kernels. For each block of 32 output
 * columns and each k there are 16 bytes: byte d holds the codes of columns d (low nibble)
 * and d + 16 (high nibble). Scales and offsets: (K / 32, N, 2) bf16, scale then offset,
 * w = (q - 8) * scale + offset.
 *
 * Built on first use by src/models/int4_kernel.py (gcc -O3 -mavx2 -mfma -fopenmp).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define GROUP 32   /* weights per (scale, offset) pair */
#define MAX_ROWS 4 /* rows of x multiplied per unpacked weight vector (16 registers) */

/* `rows` rows (at most MAX_ROWS) times 16 output columns: the 8 whose codes are the low
 * nibbles of 8 bytes of each k's 16 (`strip` points at them for k = 0), starting at
 * column n_low, and the 8 in their high nibbles, starting at n_low + 16. `rows` is a
 * constant at each call site, so every sum stays in a register. */
static inline __attribute__((always_inline)) void rows_times_columns(
    const int rows, const float *x, const float *x_sums, const uint8_t *strip,
    const uint16_t *scales_offsets, uint16_t *out, int64_t N, int64_t K, int64_t n_low) {
    const int64_t groups = K / GROUP;
    const int64_t n[2] = {n_low, n_low + 16};
    float total[2][MAX_ROWS][8] __attribute__((aligned(32))) = {{{0}}};
    /* Each row's sums run over k in the same order whatever the number of rows beside it,
     * so a row's result never depends on the batch it is in. */
    for (int64_t g = 0; g < groups; g++) {
        __m256 sums[2][MAX_ROWS];
        for (int v = 0; v < 2; v++)
            for (int r = 0; r < rows; r++) sums[v][r] = _mm256_setzero_ps();
        for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k++) {
            /* The weights stream from memory: ask for them 512 rows (8 KB) ahead. */
            _mm_prefetch((const char *)(strip + (k + 512) * 16), _MM_HINT_T0);
            __m256i bytes =
                _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(strip + k * 16)));
            __m256 w[2] = {_mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(15))),
                           _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4))};
            for (int r = 0; r < rows; r++) {
                __m256 x_k = _mm256_broadcast_ss(x + r * K + k);
                for (int v = 0; v < 2; v++) sums[v][r] = _mm256_fmadd_ps(w[v], x_k, sums[v][r]);
            }
        }
        /* 8 (scale, offset) bf16 pairs per vector: one 32-bit lane each, scale in the low
         * half; bf16 -> fp32 is a shift into the high half. */
        for (int v = 0; v < 2; v++) {
            __m256i pair = _mm256_loadu_si256((const __m256i *)(scales_offsets + (g * N + n[v]) * 2));
            __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
            __m256 offset = _mm256_castsi256_ps(
                _mm256_and_si256(pair, _mm256_set1_epi32((int)0xFFFF0000u)));
            __m256 weight_of_zero = _mm256_fmadd_ps(_mm256_set1_ps(-8.0f), scale, offset);
            for (int r = 0; r < rows; r++) {
                __m256 t = _mm256_fmadd_ps(sums[v][r], scale, _mm256_load_ps(total[v][r]));
                _mm256_store_ps(total[v][r], _mm256_fmadd_ps(
                    _mm256_set1_ps(x_sums[r * groups + g]), weight_of_zero, t));
            }
        }
    }
    for (int v = 0; v < 2; v++)
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < 8; c++) out[r * N + n[v] + c] = float_to_bf16(total[v][r][c]);
}

/* out (M, N) bf16 = x (M, K) bf16 @ W^T; N a multiple of 32, K of 32. Returns 0, or -1 if
 * out of memory. */
int int4_bf16_matmul(const uint16_t *x, const uint8_t *packed, const uint16_t *scales_offsets,
                     uint16_t *out, int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t groups = K / GROUP;
    float *x_float = malloc(sizeof(float) * M * K);
    float *x_sums = malloc(sizeof(float) * M * groups); /* sum of each row's group of x */
    if (x_float == NULL || x_sums == NULL) {
        free(x_float);
        free(x_sums);
        return -1;
    }
    for (int64_t i = 0; i < M * groups; i++) {
        float sum = 0.0f;
        for (int k = 0; k < GROUP; k++) sum += x_float[i * GROUP + k] = bf16_to_float(x[i * GROUP + k]);
        x_sums[i] = sum;
    }

    /* A task is half a block: columns 0-7 and 16-23 in bytes 0-7 of each k, 8-15 and
     * 24-31 in bytes 8-15; MAX_ROWS rows at a time. */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < N / 16; task++) {
        const int64_t block = task / 2, half = task % 2;
        const uint8_t *strip = packed + block * K * 16 + half * 8;
        const int64_t n_low = block * 32 + half * 8;
        for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
            const float *xr = x_float + m0 * K;
            const float *sr = x_sums + m0 * groups;
            uint16_t *o = out + m0 * N;
            switch (M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS) {
#define CASE(R) \
    case R: rows_times_columns(R, xr, sr, strip, scales_offsets, o, N, K, n_low); break;
                CASE(1) CASE(2) CASE(3) CASE(4)
#undef CASE
            }
        }
    }
    free(x_float);
    free(x_sums);
    return 0;
}

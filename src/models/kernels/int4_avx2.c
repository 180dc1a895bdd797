/*
 * y = x W^T for int4 weights and several bf16 rows of x, with AVX2 integer multiply-adds:
 * the kernel for x86-64 CPUs without AVX-512 BF16 (int4_bf16.c is the one for those with it).
 *
 * Why it exists: PyTorch's AVX2 kernel for int4 weights (_weight_int4pack_mm_for_cpu)
 * dequantises every weight, scale and offset included, before an fp32 multiply-add. Here:
 *
 * 1. The scale and offset of a group of 32 weights are taken out of the sum, as in
 *    int4_bf16.c:
 *        sum_k x_k w_k = scale * sum_k x_k q_k + (offset - 8 scale) * sum_k x_k
 *    with q_k the 4-bit code (0..15).
 * 2. Each row's group of 32 activations is written as 16-bit integers times a power of two
 *    (int16_activations.h): exact for every activation within 2^7 of the group's largest,
 *    an error below 2^-15 of the largest for smaller ones. That is the one rounding this
 *    kernel adds; the bf16 result rounds at 2^-8 of itself.
 * 3. The products of codes and 16-bit activations are summed with VPMADDWD (16 products
 *    per instruction, into 32-bit integers, with no conversion of codes to floats): a group
 *    sums at most 32 x 15 x 2^15 < 2^24, so the integer sums are exact, and so is their
 *    conversion to fp32. Integer sums do not depend on their order, and the fp32 steps per
 *    group (times scale and 2^(e - 15), plus the offset term) are the same for every row, so
 *    a row's result never depends on the rows beside it.
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
#include <string.h>

#include "bf16.h"
#include "int16_activations.h"

#define GROUP 32   /* weights per (scale, offset) pair */
#define MAX_ROWS 2 /* rows per pass over a block: 2 x 4 sums + 4 code vectors in 16 registers */

/* `rows` rows (at most MAX_ROWS) times the 32 output columns of one block (`strip` points
 * at its bytes for k = 0, column n0 first). `rows` is a constant at each call site, so
 * every sum stays in a register. */
static inline __attribute__((always_inline)) void rows_times_block(
    const int rows, const int16_t *x, const float *units, const float *x_sums,
    const uint8_t *strip, const uint16_t *scales_offsets, uint16_t *out, int64_t N, int64_t K,
    int64_t n0) {
    const int64_t groups = K / GROUP;
    const __m256i low_nibble = _mm256_set1_epi16(15);
    /* total[r][c]: row r, columns n0 + 8c .. n0 + 8c + 7 */
    float total[MAX_ROWS][4][8] __attribute__((aligned(32))) = {{{0}}};
    for (int64_t g = 0; g < groups; g++) {
        __m256i sums[MAX_ROWS][4];
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < 4; c++) sums[r][c] = _mm256_setzero_si256();
        for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k += 2) {
            /* The weights stream from memory: ask for them 512 rows (8 KB) ahead. */
            _mm_prefetch((const char *)(strip + (k + 512) * 16), _MM_HINT_T0);
            __m128i at_k = _mm_loadu_si128((const __m128i *)(strip + k * 16));
            __m128i at_next = _mm_loadu_si128((const __m128i *)(strip + (k + 1) * 16));
            /* 16-bit words pairing byte d of k with byte d of k + 1, as VPMADDWD pairs the
             * activations x_k, x_k+1: bytes 0-7 in one vector, 8-15 in the other. */
            __m256i pairs[2] = {_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(at_k, at_next)),
                                _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(at_k, at_next))};
            __m256i q[4] = {_mm256_and_si256(pairs[0], low_nibble),  /* columns 0-7 */
                            _mm256_and_si256(pairs[1], low_nibble),  /* 8-15 */
                            _mm256_srli_epi16(pairs[0], 4),          /* 16-23 */
                            _mm256_srli_epi16(pairs[1], 4)};         /* 24-31 */
            for (int r = 0; r < rows; r++) {
                int32_t x_pair; /* x[r][k], x[r][k + 1] as one 32-bit lane */
                memcpy(&x_pair, x + r * K + k, sizeof x_pair);
                __m256i x_both = _mm256_set1_epi32(x_pair);
                for (int c = 0; c < 4; c++)
                    sums[r][c] = _mm256_add_epi32(sums[r][c], _mm256_madd_epi16(q[c], x_both));
            }
        }
        /* 8 (scale, offset) bf16 pairs per vector: one 32-bit lane each, scale in the low
         * half; bf16 -> fp32 is a shift into the high half. */
        for (int c = 0; c < 4; c++) {
            __m256i pair = _mm256_loadu_si256(
                (const __m256i *)(scales_offsets + (g * N + n0 + 8 * c) * 2));
            __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
            __m256 offset = _mm256_castsi256_ps(
                _mm256_and_si256(pair, _mm256_set1_epi32((int)0xFFFF0000u)));
            __m256 weight_of_zero = _mm256_fmadd_ps(_mm256_set1_ps(-8.0f), scale, offset);
            for (int r = 0; r < rows; r++) {
                __m256 unit_scale = _mm256_mul_ps(scale, _mm256_set1_ps(units[r * groups + g]));
                __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][c]), unit_scale,
                                           _mm256_load_ps(total[r][c]));
                _mm256_store_ps(total[r][c], _mm256_fmadd_ps(
                    _mm256_set1_ps(x_sums[r * groups + g]), weight_of_zero, t));
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < 4; c++)
            for (int i = 0; i < 8; i++) out[r * N + n0 + 8 * c + i] = float_to_bf16(total[r][c][i]);
}

/* out (M, N) bf16 = x (M, K) bf16 @ W^T; N a multiple of 32, K of 32. Returns 0, or -1 if
 * out of memory. */
int int4_bf16_matmul(const uint16_t *x, const uint8_t *packed, const uint16_t *scales_offsets,
                     uint16_t *out, int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t groups = K / GROUP;
    Int16Activations a;
    if (int16_activations_alloc(&a, M, K) != 0) return -1;
#pragma omp parallel num_threads(threads)
    {
        int16_activations_fill(&a, x, M, K);
        /* A task is a block of 32 columns, MAX_ROWS rows at a time: each weight byte is loaded
         * once per pass and serves every column it holds. */
#pragma omp for schedule(static)
        for (int64_t block = 0; block < N / 32; block++) {
            const uint8_t *strip = packed + block * K * 16;
            for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
                const int16_t *xr = a.codes + m0 * K;
                const float *ur = a.units + m0 * groups, *sr = a.sums + m0 * groups;
                uint16_t *o = out + m0 * N;
                if (M - m0 >= 2)
                    rows_times_block(2, xr, ur, sr, strip, scales_offsets, o, N, K, block * 32);
                else
                    rows_times_block(1, xr, ur, sr, strip, scales_offsets, o, N, K, block * 32);
            }
        }
    }
    int16_activations_free(&a);
    return 0;
}

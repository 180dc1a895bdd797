/*
 * y = x W^T for int8 weights (one scale per output column) and several bf16 rows of x, with
 * AVX2 integer multiply-adds: the int8 layers (QUANTIZE=int8, and the output layer of every
 * quantised model) on x86-64 CPUs whose PyTorch kernels are AVX2's.
 *
 * Why it exists: PyTorch's AVX2 kernel for int8 weights (_weight_int8pack_mm) turns each
 * weight and each activation into an fp32 number before an FMA. Here each row's group of 32
 * activations is written as 16-bit integers times a power of two (int16_activations.h:
 * exact within 2^7 of the group's largest, an error below 2^-15 of it for smaller ones) and
 * multiplied by the int8 weights, widened to 16 bits, with VPMADDWD: 16 products per
 * instruction, summed exactly in 32-bit integers. Each group's integer sums then go to fp32
 * times its power of two and the column's scale. Every step is the same for a row whatever
 * rows are beside it.
 *
 * Layout: PyTorch's own, the (N, K) int8 matrix row-major and (N,) bf16 scales, so the same
 * buffers serve both kernels.
 *
 * Built on first use by src/models/int8_kernel.py (gcc -O3 -mavx2 -mfma -fopenmp).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "int16_activations.h"

#define GROUP ACTIVATION_GROUP
#define COLUMNS 8 /* output columns per task: 8 sums of 8 lanes, then one vector of 8 totals */

/* Eight vectors of 8 int32 partial sums as one vector of their 8 totals. */
static inline __m256i totals_of(const __m256i sums[COLUMNS]) {
    __m256i s01 = _mm256_hadd_epi32(sums[0], sums[1]), s23 = _mm256_hadd_epi32(sums[2], sums[3]);
    __m256i s45 = _mm256_hadd_epi32(sums[4], sums[5]), s67 = _mm256_hadd_epi32(sums[6], sums[7]);
    __m256i s0123 = _mm256_hadd_epi32(s01, s23), s4567 = _mm256_hadd_epi32(s45, s67);
    /* each 128-bit lane of s0123 holds the half sums of columns 0-3: add the two halves */
    return _mm256_add_epi32(_mm256_permute2x128_si256(s0123, s4567, 0x20),
                            _mm256_permute2x128_si256(s0123, s4567, 0x31));
}

/* One row (its int16 codes, units and sums, and bf16 values for the groups that need them)
 * times COLUMNS columns of W starting at `w` (row n0 of W), into out[n0 .. n0 + 7]. */
static inline void row_times_columns(const uint16_t *x, const int16_t *codes, const float *units,
                                     const float *x_sums, const int8_t *w,
                                     const uint16_t *scales, uint16_t *out, int64_t K) {
    const int64_t groups = K / GROUP;
    const __m256 scale = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)scales)), 16));
    __m256 total = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const int64_t k = g * GROUP;
        if (!isfinite(x_sums[g])) {
            /* An inf or NaN in the group: its products in fp32, as PyTorch's kernel does. */
            float lanes[COLUMNS] __attribute__((aligned(32)));
            _mm256_store_ps(lanes, total);
            for (int c = 0; c < COLUMNS; c++)
                for (int i = 0; i < GROUP; i++)
                    lanes[c] += bf16_to_float(x[k + i]) * ((float)w[c * K + k + i] *
                                                           bf16_to_float(scales[c]));
            total = _mm256_load_ps(lanes);
            continue;
        }
        __m256i x_low = _mm256_loadu_si256((const __m256i *)(codes + k));
        __m256i x_high = _mm256_loadu_si256((const __m256i *)(codes + k + 16));
        __m256i sums[COLUMNS];
        for (int c = 0; c < COLUMNS; c++) {
            const int8_t *column = w + c * K + k;
            /* The weights stream from memory: ask for the next task's, a line at a time. */
            if (g % 2 == 0) _mm_prefetch((const char *)(column + COLUMNS * K), _MM_HINT_T0);
            __m256i w_low = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)column));
            __m256i w_high = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(column + 16)));
            sums[c] = _mm256_add_epi32(_mm256_madd_epi16(w_low, x_low),
                                       _mm256_madd_epi16(w_high, x_high));
        }
        /* Scaled per group rather than once at the end: large activations times codes up
         * to 127 would overflow fp32 before the scale brings them back. */
        __m256 unit_scale = _mm256_mul_ps(_mm256_set1_ps(units[g]), scale);
        total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(totals_of(sums)), unit_scale, total);
    }
    float y[COLUMNS] __attribute__((aligned(32)));
    _mm256_store_ps(y, total);
    for (int c = 0; c < COLUMNS; c++) out[c] = float_to_bf16(y[c]);
}

/* out (M, N) bf16 = x (M, K) bf16 @ (W (N, K) int8 * scales (N,) bf16)^T; N a multiple of 8,
 * K of 32. Returns 0, or -1 if out of memory. */
int int8_bf16_matmul(const uint16_t *x, const int8_t *w, const uint16_t *scales, uint16_t *out,
                     int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t groups = K / GROUP;
    Int16Activations a;
    if (int16_activations_alloc(&a, M, K) != 0) return -1;
#pragma omp parallel num_threads(threads)
    {
        int16_activations_fill(&a, x, M, K);
        /* A task is COLUMNS columns for every row: their weights (COLUMNS x K bytes) come
         * from memory once and stay in the L1 cache for the rows after the first. */
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += COLUMNS)
            for (int64_t m = 0; m < M; m++)
                row_times_columns(x + m * K, a.codes + m * K, a.units + m * groups,
                                  a.sums + m * groups, w + n0 * K, scales + n0, out + m * N + n0,
                                  K);
    }
    int16_activations_free(&a);
    return 0;
}

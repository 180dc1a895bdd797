/*
 * y = x W^T for int4 weights and several bf16 rows of x, on AVX-512 BF16 dot products.
 *
 * Why it exists: PyTorch's CPU kernel for int4 weights (_weight_int4pack_mm_for_cpu) turns
 * every weight back into an fp32 number and multiplies with fp32 FMAs, re-doing that for
 * every 4 rows. One row (one chat stream) is limited by memory, so that is fine; 8 rows (a
 * batched decoding step of 8 streams) or hundreds (a prompt) are limited by arithmetic, and
 * there it is slow. This kernel does two things instead:
 *
 * 1. The scale and offset of a group of 32 weights are taken out of the sum:
 *        sum_k x_k w_k = scale * sum_k x_k (q_k - 8) + offset * sum_k x_k
 *    with q_k the 4-bit code. The codes minus 8 (-8..7) are exact small bf16 numbers, so the
 *    inner loop multiplies raw codes, and the scale and offset are applied once per group
 *    in fp32: the same numbers as dequantising first, summed in another order.
 * 2. The products run on VDPBF16PS, which multiplies 32 pairs of bf16 numbers and adds them
 *    into 16 fp32 sums in one instruction (twice the work of an fp32 FMA), for up to 8 rows
 *    per weight that is unpacked.
 *
 * Layout: the weights are PyTorch's own packing (aten._convert_weight_to_int4pack_for_cpu,
 * AVX-512 variant), so the same buffers serve both kernels. For each block of 64 output
 * columns and each k there are 32 bytes: byte d holds the codes of columns d (low nibble)
 * and d + 32 (high nibble), byte 16 + d those of columns d + 16 and d + 48. Scales and
 * offsets: (K / 32, N, 2) bf16, scale then offset, w = (q - 8) * scale + offset.
 *
 * Built on first use by src/models/int4_kernel.py (gcc -O3 -mavx512bf16 -fopenmp).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 32    /* weights per (scale, offset) pair */
#define MAX_ROWS 8  /* rows of x multiplied per unpacked weight vector */

/* The 16 + 16 bytes of two rows, k and k + 1, interleaved the way VDPBF16PS pairs numbers:
 * (k, n0), (k + 1, n0), (k, n1), ... and widened to 32 16-bit words, each 0x00HL with L
 * the code of a low-nibble column and H that of a high-nibble column. */
static inline __m512i interleaved_codes(const uint8_t *at_k) {
    __m128i a = _mm_loadu_si128((const __m128i *)at_k);
    __m128i b = _mm_loadu_si128((const __m128i *)(at_k + 32));
    return _mm512_cvtepu8_epi16(
        _mm256_set_m128i(_mm_unpackhi_epi8(a, b), _mm_unpacklo_epi8(a, b)));
}

/* A 4-bit code q as the bf16 number 16 + q, exact: bf16 has 8 significant bits, and
 * 16 + q = 2^4 (1 + 8q / 128) has the bits 0x4180 | q << 3. (The sums then hold
 * sum x (16 + q), and 24 sum x is taken off per group: see rows_times_columns.) Building
 * the number with a shift and one ternary-logic instruction, (nibble << 3 & 0x78) | 0x4180,
 * is cheaper than a table lookup. */
#define AND_THEN_OR 0xEA /* vpternlog truth table of (A & B) | C */
static inline __m512bh low_codes(__m512i words) {
    return (__m512bh)_mm512_ternarylogic_epi32(_mm512_slli_epi16(words, 3),
        _mm512_set1_epi16(0x78), _mm512_set1_epi16(0x4180), AND_THEN_OR);
}
static inline __m512bh high_codes(__m512i words) {
    return (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 1),
        _mm512_set1_epi16(0x78), _mm512_set1_epi16(0x4180), AND_THEN_OR);
}

/* Up to MAX_ROWS rows times 32 output columns: the 16 whose codes are the low nibbles of
 * 16 bytes of each k's 32 (`strip` points at them for k = 0), and the 16 in their high
 * nibbles. Each weight byte is loaded once for both. `rows` is a constant at each call
 * site, so the compiler keeps every sum in a register. */
static inline __attribute__((always_inline)) void rows_times_columns(
    const int rows, const uint16_t *x, const float *x_sums, const uint8_t *strip,
    const uint16_t *scales_offsets, uint16_t *out, int64_t N, int64_t K, int64_t n_low) {
    const int64_t groups = K / GROUP, n_high = n_low + 32;
    float total[2][MAX_ROWS][16] __attribute__((aligned(64))) = {{{0}}};
    for (int64_t g = 0; g < groups; g++) {
        __m512 low_sums[MAX_ROWS], high_sums[MAX_ROWS];
        for (int r = 0; r < rows; r++) low_sums[r] = high_sums[r] = _mm512_setzero_ps();
        for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k += 2) {
            /* The weights stream from memory: ask for them 32 rows (1 KB) ahead. */
            _mm_prefetch((const char *)(strip + (k + 512) * 32), _MM_HINT_T0);
            __m512i words = interleaved_codes(strip + k * 32);
            __m512bh w_low = low_codes(words), w_high = high_codes(words);
            for (int r = 0; r < rows; r++) {
                uint32_t x_pair;  /* x[r][k], x[r][k + 1] as one 32-bit lane */
                memcpy(&x_pair, x + r * K + k, sizeof x_pair);
                __m512bh x_both = (__m512bh)_mm512_set1_epi32((int)x_pair);
                low_sums[r] = _mm512_dpbf16_ps(low_sums[r], x_both, w_low);
                high_sums[r] = _mm512_dpbf16_ps(high_sums[r], x_both, w_high);
            }
        }
        /* 16 (scale, offset) bf16 pairs per half: one 32-bit lane each, scale in the low
         * half; bf16 -> fp32 is a shift into the high half. */
        const __m512i keep_high = _mm512_set1_epi32((int)0xFFFF0000u);
        __m512i low_pair = _mm512_loadu_si512(scales_offsets + (g * N + n_low) * 2);
        __m512i high_pair = _mm512_loadu_si512(scales_offsets + (g * N + n_high) * 2);
        __m512 low_scale = _mm512_castsi512_ps(_mm512_slli_epi32(low_pair, 16));
        __m512 high_scale = _mm512_castsi512_ps(_mm512_slli_epi32(high_pair, 16));
        /* w = (q - 8) scale + offset and the sums hold sum x (16 + q), so
         * sum x w = scale * sums + (offset - 24 scale) * sum x. */
        const __m512 minus_24 = _mm512_set1_ps(-24.0f);
        __m512 low_offset = _mm512_fmadd_ps(minus_24, low_scale,
            _mm512_castsi512_ps(_mm512_and_si512(low_pair, keep_high)));
        __m512 high_offset = _mm512_fmadd_ps(minus_24, high_scale,
            _mm512_castsi512_ps(_mm512_and_si512(high_pair, keep_high)));
        for (int r = 0; r < rows; r++) {
            __m512 x_sum = _mm512_set1_ps(x_sums[r * groups + g]);
            __m512 t = _mm512_fmadd_ps(low_sums[r], low_scale, _mm512_load_ps(total[0][r]));
            _mm512_store_ps(total[0][r], _mm512_fmadd_ps(x_sum, low_offset, t));
            t = _mm512_fmadd_ps(high_sums[r], high_scale, _mm512_load_ps(total[1][r]));
            _mm512_store_ps(total[1][r], _mm512_fmadd_ps(x_sum, high_offset, t));
        }
    }
    for (int r = 0; r < rows; r++) {
        _mm256_storeu_si256((__m256i *)(out + r * N + n_low),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(total[0][r])));
        _mm256_storeu_si256((__m256i *)(out + r * N + n_high),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(total[1][r])));
    }
}

static inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

/* out (M, N) bf16 = x (M, K) bf16 @ W^T; N a multiple of 64, K of 32. Returns 0, or -1 if
 * out of memory. */
int int4_bf16_matmul(const uint16_t *x, const uint8_t *packed, const uint16_t *scales_offsets,
                     uint16_t *out, int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t groups = K / GROUP;
    float *x_sums = malloc(sizeof(float) * M * groups);  /* sum of each row's group of x */
    if (x_sums == NULL) return -1;
    for (int64_t i = 0; i < M * groups; i++) {
        float sum = 0.0f;
        for (int k = 0; k < GROUP; k++) sum += bf16_to_float(x[i * GROUP + k]);
        x_sums[i] = sum;
    }

#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < N / 32; task++) {
        /* A 64-column block has two halves of 16 bytes per k: columns 0-15 and 32-47 in
         * bytes 0-15, columns 16-31 and 48-63 in bytes 16-31. */
        const int64_t block = task / 2, half = task % 2;
        const uint8_t *strip = packed + block * K * 32 + half * 16;
        const int64_t n_low = block * 64 + half * 16;
        for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
            const uint16_t *xr = x + m0 * K;
            const float *sr = x_sums + m0 * groups;
            uint16_t *o = out + m0 * N;
            switch (M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS) {
#define CASE(R) \
    case R: rows_times_columns(R, xr, sr, strip, scales_offsets, o, N, K, n_low); break;
                CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
            }
        }
    }
    free(x_sums);
    return 0;
}

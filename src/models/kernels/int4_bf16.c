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

/* The same for both 16-byte halves of the 32 bytes of rows k and k + 1 at once. */
static inline void interleaved_codes_of_block(const uint8_t *at_k, __m512i words[2]) {
    __m256i a = _mm256_loadu_si256((const __m256i *)at_k);
    __m256i b = _mm256_loadu_si256((const __m256i *)(at_k + 32));
    __m256i low = _mm256_unpacklo_epi8(a, b), high = _mm256_unpackhi_epi8(a, b);
    words[0] = _mm512_cvtepu8_epi16(_mm256_permute2x128_si256(low, high, 0x20));
    words[1] = _mm512_cvtepu8_epi16(_mm256_permute2x128_si256(low, high, 0x31));
}

/* `rows` rows (at most MAX_ROWS / halves) times 32 output columns per half: with one
 * half, the 16 columns whose codes are the low nibbles of 16 bytes of each k's 32 (`strip`
 * points at them for k = 0) and the 16 in their high nibbles; with two halves, all 64
 * columns of the block (`strip` at its start): each weight byte is loaded once. `halves`
 * and `rows` are constants at each call site, so every sum stays in a register. */
static inline __attribute__((always_inline)) void rows_times_columns(
    const int halves, const int rows, const uint16_t *x, const float *x_sums,
    const uint8_t *strip, const uint16_t *scales_offsets, uint16_t *out, int64_t N,
    int64_t K, int64_t n_base) {
    const int64_t groups = K / GROUP;
    const int vectors = 2 * halves;  /* 16 columns each: half h, low or high nibbles */
    int64_t n[4];
    for (int v = 0; v < vectors; v++) n[v] = n_base + (v / 2) * 16 + (v % 2) * 32;
    float total[4][MAX_ROWS][16] __attribute__((aligned(64))) = {{{0}}};
    for (int64_t g = 0; g < groups; g++) {
        __m512 sums[4][MAX_ROWS];
        for (int v = 0; v < vectors; v++)
            for (int r = 0; r < rows; r++) sums[v][r] = _mm512_setzero_ps();
        for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k += 2) {
            /* The weights stream from memory: ask for them 512 rows (16 KB) ahead. */
            _mm_prefetch((const char *)(strip + (k + 512) * 32), _MM_HINT_T0);
            __m512i words[2];
            if (halves == 2)
                interleaved_codes_of_block(strip + k * 32, words);
            else
                words[0] = interleaved_codes(strip + k * 32);
            __m512bh w[4];
            for (int h = 0; h < halves; h++) {
                w[2 * h] = low_codes(words[h]);
                w[2 * h + 1] = high_codes(words[h]);
            }
            for (int r = 0; r < rows; r++) {
                uint32_t x_pair;  /* x[r][k], x[r][k + 1] as one 32-bit lane */
                memcpy(&x_pair, x + r * K + k, sizeof x_pair);
                __m512bh x_both = (__m512bh)_mm512_set1_epi32((int)x_pair);
                for (int v = 0; v < vectors; v++)
                    sums[v][r] = _mm512_dpbf16_ps(sums[v][r], x_both, w[v]);
            }
        }
        /* 16 (scale, offset) bf16 pairs per vector: one 32-bit lane each, scale in the low
         * half; bf16 -> fp32 is a shift into the high half. w = (q - 8) scale + offset and
         * the sums hold sum x (16 + q), so sum x w = scale * sums + (offset - 24 scale) *
         * sum x. */
        for (int v = 0; v < vectors; v++) {
            __m512i pair = _mm512_loadu_si512(scales_offsets + (g * N + n[v]) * 2);
            __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
            __m512 offset = _mm512_fmadd_ps(_mm512_set1_ps(-24.0f), scale,
                _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32((int)0xFFFF0000u))));
            for (int r = 0; r < rows; r++) {
                __m512 t = _mm512_fmadd_ps(sums[v][r], scale, _mm512_load_ps(total[v][r]));
                _mm512_store_ps(total[v][r],
                                _mm512_fmadd_ps(_mm512_set1_ps(x_sums[r * groups + g]), offset, t));
            }
        }
    }
    for (int v = 0; v < vectors; v++)
        for (int r = 0; r < rows; r++)
            _mm256_storeu_si256((__m256i *)(out + r * N + n[v]),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(total[v][r])));
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

    if (M <= MAX_ROWS / 2) {
        /* Few rows (one stream decoding): a task is a whole 64-column block, so every
         * weight byte is read once, in one pass, as memory delivers it. */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t block = 0; block < N / 64; block++) {
            const uint8_t *strip = packed + block * K * 32;
            switch (M) {
#define CASE(R) \
    case R: rows_times_columns(2, R, x, x_sums, strip, scales_offsets, out, N, K, block * 64); break;
                CASE(1) CASE(2) CASE(3) CASE(4)
#undef CASE
            }
        }
    } else {
        /* More rows: a task is half a block (columns 0-15 and 32-47 in bytes 0-15, 16-31
         * and 48-63 in bytes 16-31), MAX_ROWS rows at a time. */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t task = 0; task < N / 32; task++) {
            const int64_t block = task / 2, half = task % 2;
            const uint8_t *strip = packed + block * K * 32 + half * 16;
            const int64_t n_base = block * 64 + half * 16;
            for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
                const uint16_t *xr = x + m0 * K;
                const float *sr = x_sums + m0 * groups;
                uint16_t *o = out + m0 * N;
                switch (M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS) {
#define CASE(R) \
    case R: rows_times_columns(1, R, xr, sr, strip, scales_offsets, o, N, K, n_base); break;
                    CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
                }
            }
        }
    }
    free(x_sums);
    return 0;
}

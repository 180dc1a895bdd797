/*
 * bf16 activations as 16-bit integers for our AVX2 kernels (int4_avx2.c, int8_avx2.c), which
 * multiply them with VPMADDWD: each group of 32 numbers of a row becomes int16 numbers times
 * a power of two, 2^(e - 15), e the exponent of the group's largest |x|. A bf16 number has 8
 * significant bits, so every number within 2^7 of the group's largest is exact; smaller ones
 * are rounded to a multiple of 2^(e - 15), an error below 2^-15 of the largest.
 */
#ifndef MINI_CLAUDE_INT16_ACTIVATIONS_H
#define MINI_CLAUDE_INT16_ACTIVATIONS_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define ACTIVATION_GROUP 32

/* One row's group of ACTIVATION_GROUP bf16 activations as int16 numbers `codes` times `unit`
 * (a power of two), and the group's sum `sum`. A group with an inf or a NaN gets zero codes
 * and a sum that is not finite: the kernel must carry that into its results. */
static inline void activations_as_int16(const uint16_t *x, int16_t *codes, float *unit, float *sum) {
    __m256 values[4], largest = _mm256_setzero_ps(), total = _mm256_setzero_ps();
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int v = 0; v < 4; v++) {
        __m128i bits = _mm_loadu_si128((const __m128i *)(x + 8 * v));
        values[v] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
        total = _mm256_add_ps(total, values[v]);
        largest = _mm256_max_ps(largest, _mm256_and_ps(values[v], magnitude));
    }
    float lanes[8] __attribute__((aligned(32))), most = 0.0f, added = 0.0f;
    _mm256_store_ps(lanes, total);
    for (int i = 0; i < 8; i++) added += lanes[i];
    _mm256_store_ps(lanes, largest); /* max_ps drops a NaN: the sum above keeps it */
    for (int i = 0; i < 8; i++) most = fmaxf(most, lanes[i]);
    *sum = added;
    if (!isfinite(added) || most == 0.0f) {
        /* Zeros stay zeros; an inf or NaN is left to the caller, through the sum. */
        *unit = 1.0f;
        memset(codes, 0, sizeof(int16_t) * ACTIVATION_GROUP);
        return;
    }
    int exponent;
    frexpf(most, &exponent); /* most < 2^exponent, so every |x| / unit < 2^15 */
    if (exponent < -100) {
        /* Below 2^-100, 2^(15 - exponent) is no float: scale each number on its own. */
        *unit = ldexpf(1.0f, exponent - 15);
        for (int k = 0; k < ACTIVATION_GROUP; k++)
            codes[k] = (int16_t)lrintf(ldexpf(bf16_to_float(x[k]), 15 - exponent));
        return;
    }
    *unit = ldexpf(1.0f, exponent - 15);
    /* x times 2^(15 - exponent) is exact; the conversion rounds to nearest even. */
    const __m256 up = _mm256_set1_ps(ldexpf(1.0f, 15 - exponent));
    for (int v = 0; v < 4; v += 2) {
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(values[v], up));
        __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(values[v + 1], up));
        /* packs works within 128-bit lanes: put the four quarters back in order */
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
        _mm256_storeu_si256((__m256i *)(codes + 8 * v), packed);
    }
}

/* Every row of an (M, K) bf16 matrix as int16 codes (M, K), and per group of
 * ACTIVATION_GROUP its unit and sum (M, K / ACTIVATION_GROUP). */
typedef struct {
    int16_t *codes;
    float *units;
    float *sums;
} Int16Activations;

/* Room for M rows of K activations; 0, or -1 (nothing held) if out of memory. */
static inline int int16_activations_alloc(Int16Activations *a, int64_t M, int64_t K) {
    a->codes = malloc(sizeof(int16_t) * M * K);
    a->units = malloc(sizeof(float) * M * (K / ACTIVATION_GROUP));
    a->sums = malloc(sizeof(float) * M * (K / ACTIVATION_GROUP));
    if (a->codes != NULL && a->units != NULL && a->sums != NULL) return 0;
    free(a->codes);
    free(a->units);
    free(a->sums);
    return -1;
}

static inline void int16_activations_free(Int16Activations *a) {
    free(a->codes);
    free(a->units);
    free(a->sums);
}

/* Fill `a` from x (M, K): call inside an OpenMP parallel region (its groups are shared out
 * among the threads, which wait for each other at the end). */
static inline void int16_activations_fill(Int16Activations *a, const uint16_t *x, int64_t M,
                                          int64_t K) {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M * (K / ACTIVATION_GROUP); i++)
        activations_as_int16(x + i * ACTIVATION_GROUP, a->codes + i * ACTIVATION_GROUP,
                             a->units + i, a->sums + i);
}

#endif

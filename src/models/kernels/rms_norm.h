/* RMSNorm of bf16 rows, shared by rms_norm.c (the norm alone) and norm_then_matmul.c (the
 * norm in the same call as the matrix product after it): out = weight * bf16(x /
 * sqrt(mean(x^2) + eps)).
 *
 * The same steps in the same precision as Llama's RMSNorm in src/models/transformer.py: the
 * mean of squares and the scaling in fp32, the result rounded to bf16, then multiplied by the
 * bf16 weight and rounded again (as PyTorch's bf16 multiplication does). Only the order in
 * which the squares are summed can differ from PyTorch's. */
#ifndef MINI_CLAUDE_RMS_NORM_H
#define MINI_CLAUDE_RMS_NORM_H

#include <math.h>
#include <stdint.h>

#include "bf16.h"

/* x and out: (rows, width) bf16; weight: (width) bf16. Rows are split between threads only
 * when there are enough of them (a prompt) to pay for waking the threads. */
static void rms_norm_rows(const uint16_t *x, const uint16_t *weight, uint16_t *out,
                          int64_t rows, int64_t width, float eps, int threads) {
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

#endif

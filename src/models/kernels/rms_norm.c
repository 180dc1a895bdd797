/*
 * RMSNorm of bf16 rows, in one call: out = weight * bf16(x / sqrt(mean(x^2) + eps)).
 *
 * Why it exists: PyTorch computes an RMSNorm of a bf16 row as half a dozen operations (a
 * cast to fp32, the mean of squares, the scaling, a cast back, the weight), each a full
 * dispatch through the framework. For one decoding row of a small model those costs, not
 * the arithmetic, are the time: about 90 µs per norm on a slow 2-core machine, twice per
 * layer and token. Here it is one call of a few microseconds (rms_norm.h has the steps and
 * their rounding).
 *
 * Plain C (no instruction-set flags): it builds and runs on any CPU gcc targets.
 */
#include <stdint.h>

#include "rms_norm.h"

void rms_norm_bf16(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t rows,
                   int64_t width, float eps, int threads) {
    rms_norm_rows(x, weight, out, rows, width, eps, threads);
}

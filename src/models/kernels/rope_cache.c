/*
 * The rotary embedding of a step's new positions and their keys and values written into the
 * KV cache, in one call.
 *
 * Why it exists: in PyTorch this is about fifteen operations per layer (slicing q, k and v
 * out of the qkv projection, views, transposes, the rotation's multiplications, a roll and an
 * addition, two copies into the cache), each a full dispatch through the framework. For one
 * decoding step of a small model their cost, not the arithmetic, is the time: about 120 µs
 * per layer on a slow 2-core machine. Here it is one call of a few microseconds.
 *
 * The same numbers as Attention in src/models/transformer.py (apply_rotary_rolled): each
 * rotated value is bf16(bf16(x * cos) + bf16(x_rolled * signed_sin)), every multiplication
 * and the addition computed in fp32 and rounded to bf16, as PyTorch's bf16 operations do,
 * with x_rolled[d] = x[(d + head_dim / 2) % head_dim]. Bit for bit the same.
 *
 * Plain C (no instruction-set flags): it builds and runs on any CPU gcc targets.
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

static inline uint16_t bf16_product(uint16_t a, uint16_t b) {
    return float_to_bf16(bf16_to_float(a) * bf16_to_float(b));
}

/* One head of head_dim values, rotated: (x * cos + roll(x) * signed_sin), rounded as above. */
static void rotate_head(const uint16_t *x, const uint16_t *cos, const uint16_t *sin_signed,
                        uint16_t *out, int64_t head_dim) {
    const int64_t half = head_dim / 2;
    for (int64_t d = 0; d < head_dim; d++) {
        const uint16_t straight = bf16_product(x[d], cos[d]);
        const uint16_t rolled = bf16_product(x[(d + half) % head_dim], sin_signed[d]);
        out[d] = float_to_bf16(bf16_to_float(straight) + bf16_to_float(rolled));
    }
}

/* qkv: (B, T, (n_head + 2 n_kv_head) head_dim), per position the query heads, then the key
 * heads, then the value heads. cos, sin_signed: (B, T, head_dim). Writes the rotated query
 * heads to q_out (B, n_head, T, head_dim), and for each row b, key/value head h and new
 * position t the rotated keys to keys[b, h, start + t] and the values to values[b, h,
 * start + t], keys and values being (B, n_kv_head, capacity, head_dim) with start + T <=
 * capacity. */
void rotate_into_cache(const uint16_t *qkv, const uint16_t *cos, const uint16_t *sin_signed,
                       uint16_t *q_out, uint16_t *keys, uint16_t *values, int64_t B, int64_t T,
                       int64_t n_head, int64_t n_kv_head, int64_t head_dim, int64_t start,
                       int64_t capacity) {
    const int64_t width = (n_head + 2 * n_kv_head) * head_dim;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            const uint16_t *position = qkv + (b * T + t) * width;
            const uint16_t *c = cos + (b * T + t) * head_dim;
            const uint16_t *s = sin_signed + (b * T + t) * head_dim;
            for (int64_t h = 0; h < n_head; h++)
                rotate_head(position + h * head_dim, c, s,
                            q_out + ((b * n_head + h) * T + t) * head_dim, head_dim);
            for (int64_t h = 0; h < n_kv_head; h++) {
                const int64_t slot = ((b * n_kv_head + h) * capacity + start + t) * head_dim;
                rotate_head(position + (n_head + h) * head_dim, c, s, keys + slot, head_dim);
                memcpy(values + slot, position + (n_head + n_kv_head + h) * head_dim,
                       head_dim * sizeof(uint16_t));
            }
        }
}

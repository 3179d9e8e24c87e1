/*
 * Decode attention over a paged KV cache: one new query token per sequence (peftserve, CPU).
 *
 * For every sequence b and kv head h, with its G = heads / kv_heads query heads g:
 *     s[g, t] = scale * q[b, h*G + g] . K[t]            t = 0 .. lengths[b] - 1
 *     out[b, h*G + g] = sum_t softmax_t(s[g, :]) V[t]
 * where key t of sequence b lives in block table[b, t / block_size] at offset t % block_size.
 * Pools are (blocks, block_size, kv_heads, dim), row-major; q and out are (batch, heads, dim).
 *
 * Each (b, h) pair reads its keys once and its values once, straight from the blocks: the torch
 * path must first gather every block into a dense copy, which costs more than the attention.
 * Scores and sums are float32; bf16 inputs are widened on load. Positions past lengths[b] are
 * never read, so unwritten or stale memory in a block cannot reach the output.
 *
 * Built by server/engine/attention.py with the flags of server/adapters/lowrank.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7FFF + ((bits >> 16) & 1); /* round to nearest even, as torch does */
    return (uint16_t)(bits >> 16);
}

/* A row of `dim` values as float32: the row itself for f32, else widened into `tmp`. */
static inline const float *as_f32(const void *row, int is_bf16, int dim, float *tmp) {
    if (!is_bf16) return (const float *)row;
    const uint16_t *src = (const uint16_t *)row;
    for (int d = 0; d < dim; d++) tmp[d] = bf16_to_f32(src[d]);
    return tmp;
}

static inline float dot(const float *a, const float *b, int dim) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int d = 0; d < dim; d++) s += a[d] * b[d];
    return s;
}

/* One (sequence, kv head) pair; `dim` is a constant where the caller passes one, so the row loops unroll. */
static inline __attribute__((always_inline)) void decode_pair(
    const void *q, const void *k_pool, const void *v_pool, const int32_t *blocks, int64_t n, void *out,
    int64_t b, int64_t h, int64_t heads, int64_t kv_heads, int64_t group, const int64_t dim,
    int64_t block_size, float scale, int is_bf16, float *scores, float *qf, float *acc, float *row) {
    const size_t elem = is_bf16 ? 2 : 4;
    const int64_t token_stride = kv_heads * dim; /* elements between two tokens of a block */
    for (int64_t g = 0; g < group; g++) {
        const char *qrow = (const char *)q + ((b * heads + h * group + g) * dim) * elem;
        const float *src = as_f32(qrow, is_bf16, dim, row);
        for (int64_t d = 0; d < dim; d++) qf[g * dim + d] = src[d] * scale;
    }
    float top[group];
    for (int64_t g = 0; g < group; g++) top[g] = -INFINITY;
    for (int64_t t = 0; t < n; t++) {
        const int64_t slot = (int64_t)blocks[t / block_size] * block_size + t % block_size;
        const char *krow = (const char *)k_pool + (slot * token_stride + h * dim) * elem;
        const float *k = as_f32(krow, is_bf16, dim, row);
        for (int64_t g = 0; g < group; g++) {
            const float s = dot(qf + g * dim, k, dim);
            scores[g * n + t] = s;
            top[g] = s > top[g] ? s : top[g];
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float *s = scores + g * n, total = 0.0f;
        for (int64_t t = 0; t < n; t++) total += (s[t] = expf(s[t] - top[g]));
        const float inv = 1.0f / total;
        for (int64_t t = 0; t < n; t++) s[t] *= inv;
    }
    memset(acc, 0, sizeof(float) * group * dim);
    for (int64_t t = 0; t < n; t++) {
        const int64_t slot = (int64_t)blocks[t / block_size] * block_size + t % block_size;
        const char *vrow = (const char *)v_pool + (slot * token_stride + h * dim) * elem;
        const float *v = as_f32(vrow, is_bf16, dim, row);
        for (int64_t g = 0; g < group; g++) {
            const float p = scores[g * n + t];
            float *a = acc + g * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) a[d] += p * v[d];
        }
    }
    for (int64_t g = 0; g < group; g++) {
        const int64_t at = (b * heads + h * group + g) * dim;
        if (is_bf16) {
            uint16_t *o = (uint16_t *)out + at;
            for (int64_t d = 0; d < dim; d++) o[d] = f32_to_bf16(acc[g * dim + d]);
        } else {
            memcpy((float *)out + at, acc + g * dim, sizeof(float) * dim);
        }
    }
}

/* Returns 0, 1 for bad arguments, 2 when scratch memory could not be allocated. */
int peftserve_paged_decode(const void *q, const void *k_pool, const void *v_pool, const int32_t *table,
                           const int32_t *lengths, void *out, int64_t batch, int64_t heads, int64_t kv_heads,
                           int64_t dim, int64_t block_size, int64_t max_blocks, float scale, int is_bf16,
                           int threads) {
    if (batch <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || dim <= 0 || block_size <= 0) return 1;
    const int64_t group = heads / kv_heads;
    int64_t longest = 0;
    for (int64_t b = 0; b < batch; b++) {
        if (lengths[b] <= 0 || lengths[b] > max_blocks * block_size) return 1;
        if (lengths[b] > longest) longest = lengths[b];
    }
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        /* per thread: scores (group x longest), q and accumulators (group x dim), one widened row */
        float *scratch = malloc(sizeof(float) * (size_t)(group * longest + 2 * group * dim + dim));
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            float *scores = scratch, *qf = scores + group * longest, *acc = qf + group * dim;
            float *row = acc + group * dim;
#pragma omp for schedule(dynamic, 1)
            for (int64_t pair = 0; pair < batch * kv_heads; pair++) {
                const int64_t b = pair / kv_heads, h = pair % kv_heads;
                const int32_t *blocks = table + b * max_blocks;
#define PAIR(DIM)                                                                                       \
    decode_pair(q, k_pool, v_pool, blocks, lengths[b], out, b, h, heads, kv_heads, group, DIM, block_size, \
                scale, is_bf16, scores, qf, acc, row)
                if (dim == 64)
                    PAIR(64);
                else if (dim == 128)
                    PAIR(128);
                else
                    PAIR(dim);
#undef PAIR
            }
        }
        free(scratch);
    }
    return failed ? 2 : 0;
}

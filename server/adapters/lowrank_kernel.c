/*
 * Many different low-rank adapters in one linear layer, one adapter per row (peftserve, CPU).
 *
 * For every group g of rows sharing slot s = slots[g] (rows order[starts[g] .. starts[g+1]]):
 *     u[n]  = act(A_s x[n] + a_bias_s)      shrink: A_s is (r_s, in), row-major
 *     y[n] += B_s^T u[n] + b_bias_s          expand: B_s is (r_s, out), row-major
 * accumulating in float32. Weights are reached through per-slot pointer arrays, so the caller
 * never copies them; a slot of rank 0 is skipped.
 *
 * At decode there is about one row per group, so every weight is read from memory once and
 * used once or twice. What follows from that:
 *   - Threads split the work by estimated cost (weight bytes plus per-row compute), not by
 *     rows or groups; a thread gets a run of whole groups, split only at its two ends.
 *   - Register tiles (4 rank rows x up to 4 rows for shrink, 64 outputs x up to 4 rows kept
 *     across all ranks for expand) read several short pieces of a matrix at once, which the
 *     hardware prefetcher follows badly. So each thread prefetches its *next* work item
 *     linearly into L2 while it computes the current one, at one line per line consumed.
 *   - Instruction count matters as much as bytes here: bf16 is widened by splitting even and
 *     odd elements (one shift or mask for 16 values), shrink uses vdpbf16ps where there is
 *     one, and the tiles' main loops carry no masks and no calls.
 * A barrier separates the phases: expand needs every u, and it is what makes x == y (in
 * place) safe, since every x row is read before any y row is written.
 *
 * Built by server/adapters/lowrank.py with -O3 -march=native -fopenmp; the AVX-512 paths
 * are chosen at compile time and the plain C paths compile anywhere.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LR_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define LR_AVX2 1
#include <immintrin.h>
#endif

#define LR_INLINE static inline __attribute__((always_inline))
/* The plain C paths: the only ones on some CPUs, the ragged ends on others, unused on AVX-512. */
#define LR_PLAIN static __attribute__((unused))

/* Fully unrolled small loops let the compiler keep the tiles' accumulator arrays in
 * registers; without it GCC keeps them on the stack and the tiles run at half speed. */
#if defined(__clang__)
#define LR_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define LR_UNROLL _Pragma("GCC unroll 16")
#else
#define LR_UNROLL
#endif

enum { LR_F32 = 0, LR_BF16 = 1 };
enum { ACT_NONE = 0, ACT_RELU = 1, ACT_GELU = 2, ACT_SILU = 3, ACT_TANH = 4 };
enum { LR_OK = 0, LR_EBADARG = 1, LR_ENOMEM = 2 };

/* Rows and ranks per register tile. */
#define LR_ROWS 4
#define LR_RANKS 4
/* Output columns per expand tile: 4 vectors of 16 floats. */
#define LR_VEC 16
#define LR_COLS 64
#define LR_LINE 64
/* Loading a weight element costs about as much as using it for this many rows. */
#define LR_MEM_ROWS 4
/* Chunks of work hold at least about this many weight elements (16 KiB of bf16). */
#define LR_CHUNK_ELEMS 8192
/* Below this many weight elements one thread is faster than waking a second. */
#define LR_SERIAL_ELEMS 8192

/* ---------------------------------------------------------------- scalar helpers */

LR_INLINE float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest even, keeping NaN a (quiet) NaN. */
LR_INLINE uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

LR_INLINE float act_apply(int act, float v) {
    switch (act) {
    case ACT_RELU:
        return v > 0.0f ? v : 0.0f;
    case ACT_GELU:
        return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case ACT_SILU:
        return v / (1.0f + expf(-v));
    case ACT_TANH:
        return tanhf(v);
    default:
        return v;
    }
}

/* ---------------------------------------------------------------- the job and its split */

typedef struct {
    int dtype;
    size_t es; /* element size in bytes */
    const char *x; /* row n starts at x + n * x_stride elements */
    int64_t x_stride;
    char *y;
    int64_t y_stride;
    int64_t in, out;
    const int32_t *order, *starts, *slots;
    int64_t n_groups;
    const int64_t *ptrs; /* per slot: A, B, A bias, B bias addresses, num_slots apart */
    int64_t n_slots;
    const int64_t *ranks;
    int act;
    float *u;             /* group g's u is u + u_off[g], laid out [row][rank] */
    const int64_t *u_off; /* (n_groups,) */
    const struct lr_chunk *chunks; /* the shrink chunks, then the expand chunks */
    int64_t n_shrink, n_chunks;
    atomic_llong next_chunk; /* the next chunk to claim */
} lr_job;

enum { PHASE_SHRINK = 0, PHASE_EXPAND = 1 };

enum { W_A = 0, W_B = 1, W_A_BIAS = 2, W_B_BIAS = 3 };

/* The table holds addresses as int64; converting each one keeps the types honest. */
LR_INLINE const char *weight(const lr_job *job, int which, int slot) {
    return (const char *)(uintptr_t)job->ptrs[which * job->n_slots + slot];
}

/* ---------------------------------------------------------------- chunks of work
 * A chunk is a run of units of one group: shrink units are rank rows of A, taken 4 at a time;
 * expand units are 64-column tiles of every B row. Chunks are made once per call, a group
 * cut into several when it is large, and threads claim them in order from a shared counter:
 * a fixed split would need a cost model of memory against arithmetic that this machine's
 * noise and its many shapes keep wrong, while claiming adapts to both.
 */
typedef struct lr_chunk {
    int32_t g;
    int32_t u0, u1;
} lr_chunk;

/* A group's units and what one costs: weight elements times (loading them + using them). */
static void group_units(const lr_job *job, int phase, int64_t g, int64_t *units, int64_t *cost) {
    int64_t r = job->ranks[job->slots[g]], n_rows = job->starts[g + 1] - job->starts[g];
    if (r <= 0 || n_rows <= 0) {
        *units = 0;
        *cost = 0;
        return;
    }
    int64_t elems = phase == PHASE_SHRINK ? LR_RANKS * job->in : LR_COLS * r;
    *units = phase == PHASE_SHRINK ? (r + LR_RANKS - 1) / LR_RANKS : (job->out + LR_COLS - 1) / LR_COLS;
    *cost = elems * (LR_MEM_ROWS + n_rows);
}

/* Appends the phase's chunks, each at most `target` cost unless a single unit is more. */
static int64_t make_chunks(const lr_job *job, int phase, int64_t target, lr_chunk *out) {
    int64_t n = 0;
    for (int64_t g = 0; g < job->n_groups; g++) {
        int64_t units, cost;
        group_units(job, phase, g, &units, &cost);
        if (units == 0) continue;
        int64_t per = target / cost > 1 ? target / cost : 1;
        for (int64_t u = 0; u < units; u += per)
            out[n++] = (lr_chunk){(int32_t)g, (int32_t)u, (int32_t)(u + per < units ? u + per : units)};
    }
    return n;
}

/* ---------------------------------------------------------------- prefetch of the next chunk
 * Walks the weights of the chunk a thread will do next, one cache line per line the compute
 * consumes, into L2. A shrink chunk is one contiguous stretch of A; an expand chunk is r
 * stretches of B (one contiguous stretch when it covers whole rows).
 */
typedef struct {
    const char *p, *end;       /* the stretch being prefetched */
    const char *next;          /* start of the chunk's next stretch */
    int64_t stride, len, left; /* stretches still to come: `left`, `len` bytes, `stride` apart */
} lr_prefetch;

static void pf_start(lr_prefetch *pf, const lr_job *job, int phase, const lr_chunk *c) {
    memset(pf, 0, sizeof *pf);
    if (!c) return;
    int slot = job->slots[c->g];
    int64_t r = job->ranks[slot];
    if (phase == PHASE_SHRINK) {
        int64_t k0 = (int64_t)c->u0 * LR_RANKS, k1 = (int64_t)c->u1 * LR_RANKS < r ? (int64_t)c->u1 * LR_RANKS : r;
        pf->next = weight(job, W_A, slot) + (size_t)(k0 * job->in) * job->es;
        pf->len = (k1 - k0) * job->in * (int64_t)job->es;
        pf->left = 1;
    } else {
        int64_t j0 = (int64_t)c->u0 * LR_COLS, j1 = (int64_t)c->u1 * LR_COLS < job->out ? (int64_t)c->u1 * LR_COLS : job->out;
        pf->next = weight(job, W_B, slot) + (size_t)j0 * job->es;
        pf->len = (j1 - j0) * (int64_t)job->es;
        pf->stride = job->out * (int64_t)job->es;
        pf->left = r;
        if (j0 == 0 && j1 == job->out) {
            pf->len *= r;
            pf->left = 1;
        }
    }
}

static void pf_next_stretch(lr_prefetch *pf) {
    pf->p = pf->next;
    pf->end = pf->next + pf->len;
    pf->next += pf->stride;
    pf->left--;
}

/* Prefetch two lines, inside the register-tiled loops on a local copy of pf->p: no call
 * there (it would spill every vector register) and no store on the loop's critical path.
 * The second line may lie past the stretch; a prefetch never faults. */
LR_INLINE void pf_step2(const char **p, const char *end) {
    if (*p < end) {
        __builtin_prefetch(*p, 0, 2);
        __builtin_prefetch(*p + LR_LINE, 0, 2);
        *p += 2 * LR_LINE;
    }
}

/* Between tiles: move on to the next stretch once this one is done. */
LR_INLINE void pf_top_up(lr_prefetch *pf) {
    if (pf->p >= pf->end && pf->left > 0) pf_next_stretch(pf);
}

/* ---------------------------------------------------------------- shrink tiles
 * dots[n][k] = ar[k] . xr[n] over `in` elements, for NR rows and 4 rank rows of A.
 */

/* dots[n][k] += ar[k] . xr[n] over elements [i0, in): the plain C path, and the vector paths'
 * ragged ends. */
LR_PLAIN void shrink_f32_rest(int nr, const float *const *xr, const float *const *ar, int64_t i0, int64_t in,
                            float (*dots)[LR_RANKS]) {
    for (int n = 0; n < nr; n++)
        for (int k = 0; k < LR_RANKS; k++) {
            float s = 0.0f;
            for (int64_t i = i0; i < in; i++) s += ar[k][i] * xr[n][i];
            dots[n][k] += s;
        }
}

LR_PLAIN void shrink_bf16_rest(int nr, const uint16_t *const *xr, const uint16_t *const *ar, int64_t i0, int64_t in,
                             float (*dots)[LR_RANKS]) {
    for (int n = 0; n < nr; n++)
        for (int k = 0; k < LR_RANKS; k++) {
            float s = 0.0f;
            for (int64_t i = i0; i < in; i++) s += bf16_to_f32(ar[k][i]) * bf16_to_f32(xr[n][i]);
            dots[n][k] += s;
        }
}

#ifdef LR_AVX512

LR_INLINE __mmask16 mask16(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}

LR_INLINE __mmask32 mask32(int64_t left) {
    return left >= 32 ? (__mmask32)0xffffffffu : left > 0 ? (__mmask32)((1u << left) - 1u) : 0;
}

/* 32 bf16 values in one register: lane j holds element 2j in its low half and 2j+1 in its
 * high half, so one shift or one mask turns all even or all odd elements into float32. That
 * is half the work of widening 16 at a time, and sums and per-column updates do not care
 * that the columns come in two interleaved sets. */
LR_INLINE __m512 bf16_even(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }

LR_INLINE __m512 bf16_odd(__m512i v) {
    return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
}

/* float32 -> bf16 bits in the high half of each lane, rounding to nearest even; NaN stays a
 * (quiet) NaN. */
LR_INLINE __m512i bf16_round_high(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __m512i quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x400000));
    return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), quiet);
}

/* Round the even and odd elements and interleave them back into 32 bf16 values. */
LR_INLINE __m512i bf16_pack(__m512 even, __m512 odd) {
#ifdef __AVX512BF16__
    /* The hardware rounds to nearest even too; it gives [even 0..15, odd 0..15] to interleave. */
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
#else
    __m512i lo = _mm512_srli_epi32(bf16_round_high(even), 16);
    __m512i hi = _mm512_and_si512(bf16_round_high(odd), _mm512_set1_epi32((int)0xffff0000u));
    return _mm512_or_si512(lo, hi);
#endif
}

/* [sum(a0), sum(a1), sum(a2), sum(a3)]: four horizontal sums sharing their shuffles. */
LR_INLINE __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    __m512d d01 = _mm512_castps_pd(s01), d23 = _mm512_castps_pd(s23);
    __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d01, d23)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(d01, d23)));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* acc[k][n] += ar[k][i, i+16) . xr[n][i, i+16); the mask cuts the last block short. */
LR_INLINE void shrink_f32_block(const int NR, const float *const *xr, const float *const *ar, int64_t i,
                                __mmask16 m, __m512 acc[LR_RANKS][LR_ROWS]) {
    __m512 av[LR_RANKS];
    LR_UNROLL
    for (int k = 0; k < LR_RANKS; k++) av[k] = _mm512_maskz_loadu_ps(m, ar[k] + i);
    LR_UNROLL
    for (int n = 0; n < NR; n++) {
        __m512 xv = _mm512_maskz_loadu_ps(m, xr[n] + i);
        LR_UNROLL
        for (int k = 0; k < LR_RANKS; k++) acc[k][n] = _mm512_fmadd_ps(av[k], xv, acc[k][n]);
    }
}

LR_INLINE void shrink_f32_nr(const int NR, const float *const *xr, const float *const *ar, int64_t in,
                             float dots[LR_ROWS][LR_RANKS], lr_prefetch *pf) {
    const char *pp = pf->p, *pf_end = pf->end;
    __m512 acc[LR_RANKS][LR_ROWS];
    LR_UNROLL
    for (int k = 0; k < LR_RANKS; k++)
        LR_UNROLL
        for (int n = 0; n < NR; n++) acc[k][n] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= in; i += 16) {
        pf_step2(&pp, pf_end);
        pf_step2(&pp, pf_end);
        shrink_f32_block(NR, xr, ar, i, 0xffff, acc);
    }
    if (i < in) shrink_f32_block(NR, xr, ar, i, mask16(in - i), acc);
    pf->p = pp;
    LR_UNROLL
    for (int n = 0; n < NR; n++) _mm_storeu_ps(dots[n], reduce4(acc[0][n], acc[1][n], acc[2][n], acc[3][n]));
}

/* acc[k][n] += ar[k][i, i+32) . xr[n][i, i+32); the mask cuts the last block short. */
LR_INLINE void shrink_bf16_block(const int NR, const uint16_t *const *xr, const uint16_t *const *ar, int64_t i,
                                 __mmask32 m, __m512 acc[LR_RANKS][LR_ROWS]) {
    __m512i av[LR_RANKS];
    LR_UNROLL
    for (int k = 0; k < LR_RANKS; k++) av[k] = _mm512_maskz_loadu_epi16(m, ar[k] + i);
    LR_UNROLL
    for (int n = 0; n < NR; n++) {
        __m512i xv = _mm512_maskz_loadu_epi16(m, xr[n] + i);
#ifdef __AVX512BF16__
        /* vdpbf16ps multiplies bf16 pairs exactly and adds them into float32: 32 elements per op. */
        LR_UNROLL
        for (int k = 0; k < LR_RANKS; k++) acc[k][n] = _mm512_dpbf16_ps(acc[k][n], (__m512bh)av[k], (__m512bh)xv);
#else
        __m512 x_even = bf16_even(xv), x_odd = bf16_odd(xv);
        LR_UNROLL
        for (int k = 0; k < LR_RANKS; k++) {
            acc[k][n] = _mm512_fmadd_ps(bf16_even(av[k]), x_even, acc[k][n]);
            acc[k][n] = _mm512_fmadd_ps(bf16_odd(av[k]), x_odd, acc[k][n]);
        }
#endif
    }
}

LR_INLINE void shrink_bf16_nr(const int NR, const uint16_t *const *xr, const uint16_t *const *ar, int64_t in,
                              float dots[LR_ROWS][LR_RANKS], lr_prefetch *pf) {
    const char *pp = pf->p, *pf_end = pf->end;
    __m512 acc[LR_RANKS][LR_ROWS];
    LR_UNROLL
    for (int k = 0; k < LR_RANKS; k++)
        LR_UNROLL
        for (int n = 0; n < NR; n++) acc[k][n] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= in; i += 32) {
        pf_step2(&pp, pf_end);
        pf_step2(&pp, pf_end);
        shrink_bf16_block(NR, xr, ar, i, 0xffffffffu, acc);
    }
    if (i < in) shrink_bf16_block(NR, xr, ar, i, mask32(in - i), acc);
    pf->p = pp;
    LR_UNROLL
    for (int n = 0; n < NR; n++) _mm_storeu_ps(dots[n], reduce4(acc[0][n], acc[1][n], acc[2][n], acc[3][n]));
}

#elif defined(LR_AVX2)

/* AVX2 has 16 registers of 8 floats: tiles of at most 2 rows (a 4-row tile runs as two), 4
 * rank rows, one accumulator each. bf16 is widened as on AVX-512, even and odd elements apart. */

LR_INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

LR_INLINE __m256 bf16x8_even(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }

LR_INLINE __m256 bf16x8_odd(__m256i v) {
    return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}

/* 8 (f32) or 16 (bf16) elements of 4 rank rows are 2 cache lines: one pf_step2 per block. */
LR_INLINE void shrink_f32_2(const int NR, const float *const *xr, const float *const *ar, int64_t in,
                            float (*dots)[LR_RANKS], const char **pp, const char *pf_end) {
    __m256 acc[LR_RANKS][2];
    LR_UNROLL
    for (int k = 0; k < LR_RANKS; k++)
        LR_UNROLL
        for (int n = 0; n < NR; n++) acc[k][n] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= in; i += 8) {
        pf_step2(pp, pf_end);
        __m256 xv[2];
        LR_UNROLL
        for (int n = 0; n < NR; n++) xv[n] = _mm256_loadu_ps(xr[n] + i);
        LR_UNROLL
        for (int k = 0; k < LR_RANKS; k++) {
            __m256 av = _mm256_loadu_ps(ar[k] + i);
            LR_UNROLL
            for (int n = 0; n < NR; n++) acc[k][n] = _mm256_fmadd_ps(av, xv[n], acc[k][n]);
        }
    }
    LR_UNROLL
    for (int n = 0; n < NR; n++)
        LR_UNROLL
        for (int k = 0; k < LR_RANKS; k++) dots[n][k] = hsum8(acc[k][n]);
    if (i < in) shrink_f32_rest(NR, xr, ar, i, in, dots);
}

LR_INLINE void shrink_bf16_2(const int NR, const uint16_t *const *xr, const uint16_t *const *ar, int64_t in,
                             float (*dots)[LR_RANKS], const char **pp, const char *pf_end) {
    __m256 acc[LR_RANKS][2];
    LR_UNROLL
    for (int k = 0; k < LR_RANKS; k++)
        LR_UNROLL
        for (int n = 0; n < NR; n++) acc[k][n] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= in; i += 16) {
        pf_step2(pp, pf_end);
        __m256 xe[2], xo[2];
        LR_UNROLL
        for (int n = 0; n < NR; n++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xr[n] + i));
            xe[n] = bf16x8_even(xv);
            xo[n] = bf16x8_odd(xv);
        }
        LR_UNROLL
        for (int k = 0; k < LR_RANKS; k++) {
            __m256i av = _mm256_loadu_si256((const __m256i *)(ar[k] + i));
            __m256 ae = bf16x8_even(av), ao = bf16x8_odd(av);
            LR_UNROLL
            for (int n = 0; n < NR; n++) {
                acc[k][n] = _mm256_fmadd_ps(ae, xe[n], acc[k][n]);
                acc[k][n] = _mm256_fmadd_ps(ao, xo[n], acc[k][n]);
            }
        }
    }
    LR_UNROLL
    for (int n = 0; n < NR; n++)
        LR_UNROLL
        for (int k = 0; k < LR_RANKS; k++) dots[n][k] = hsum8(acc[k][n]);
    if (i < in) shrink_bf16_rest(NR, xr, ar, i, in, dots);
}

LR_INLINE void shrink_f32_nr(const int NR, const float *const *xr, const float *const *ar, int64_t in,
                             float dots[LR_ROWS][LR_RANKS], lr_prefetch *pf) {
    const char *pp = pf->p;
    shrink_f32_2(NR < 2 ? NR : 2, xr, ar, in, dots, &pp, pf->end);
    if (NR > 2) shrink_f32_2(NR - 2, xr + 2, ar, in, dots + 2, &pp, pf->end);
    pf->p = pp;
}

LR_INLINE void shrink_bf16_nr(const int NR, const uint16_t *const *xr, const uint16_t *const *ar, int64_t in,
                              float dots[LR_ROWS][LR_RANKS], lr_prefetch *pf) {
    const char *pp = pf->p;
    shrink_bf16_2(NR < 2 ? NR : 2, xr, ar, in, dots, &pp, pf->end);
    if (NR > 2) shrink_bf16_2(NR - 2, xr + 2, ar, in, dots + 2, &pp, pf->end);
    pf->p = pp;
}

#else /* portable */

LR_INLINE void shrink_f32_nr(const int NR, const float *const *xr, const float *const *ar, int64_t in,
                             float dots[LR_ROWS][LR_RANKS], lr_prefetch *pf) {
    (void)pf;
    memset(dots, 0, sizeof(float) * LR_ROWS * LR_RANKS);
    shrink_f32_rest(NR, xr, ar, 0, in, dots);
}

LR_INLINE void shrink_bf16_nr(const int NR, const uint16_t *const *xr, const uint16_t *const *ar, int64_t in,
                              float dots[LR_ROWS][LR_RANKS], lr_prefetch *pf) {
    (void)pf;
    memset(dots, 0, sizeof(float) * LR_ROWS * LR_RANKS);
    shrink_bf16_rest(NR, xr, ar, 0, in, dots);
}

#endif

/* The switch gives every row count its own fully unrolled copy. Typed copies of the row
 * pointers, since reading a char * object as a float * is not allowed. */
static void shrink_tile(const lr_job *job, int nr, const char *const *xr, const char *const *ar,
                        float dots[LR_ROWS][LR_RANKS], lr_prefetch *pf) {
    if (job->dtype == LR_BF16) {
        const uint16_t *xh[LR_ROWS], *ah[LR_RANKS];
        for (int i = 0; i < nr; i++) xh[i] = (const uint16_t *)xr[i];
        for (int k = 0; k < LR_RANKS; k++) ah[k] = (const uint16_t *)ar[k];
        switch (nr) {
        case 1: shrink_bf16_nr(1, xh, ah, job->in, dots, pf); break;
        case 2: shrink_bf16_nr(2, xh, ah, job->in, dots, pf); break;
        case 3: shrink_bf16_nr(3, xh, ah, job->in, dots, pf); break;
        default: shrink_bf16_nr(4, xh, ah, job->in, dots, pf); break;
        }
    } else {
        const float *xf[LR_ROWS], *af[LR_RANKS];
        for (int i = 0; i < nr; i++) xf[i] = (const float *)xr[i];
        for (int k = 0; k < LR_RANKS; k++) af[k] = (const float *)ar[k];
        switch (nr) {
        case 1: shrink_f32_nr(1, xf, af, job->in, dots, pf); break;
        case 2: shrink_f32_nr(2, xf, af, job->in, dots, pf); break;
        case 3: shrink_f32_nr(3, xf, af, job->in, dots, pf); break;
        default: shrink_f32_nr(4, xf, af, job->in, dots, pf); break;
        }
    }
}

/* ---------------------------------------------------------------- expand tiles
 * For NR rows and `cols` (1..64) output columns starting at b, bias and yr[n]:
 *     yr[n][c] = round(yr[n][c] + (sum_k u[n*r + k] * b[k*out + c] + bias[c]))
 * The outputs stay in registers across all r ranks, so a B tile is read once per group and
 * reused by every row of the tile.
 */

/* The plain C path, and the vector paths' short last tiles. */
LR_PLAIN void expand_f32_plain(int NR, int64_t cols, const float *b, int64_t out, int64_t r, const float *u,
                             const float *bias, float *const *yr) {
    float acc[LR_ROWS][LR_COLS] = {{0.0f}};
    for (int64_t k = 0; k < r; k++)
        LR_UNROLL
        for (int n = 0; n < NR; n++) {
            float un = u[n * r + k];
            for (int64_t c = 0; c < cols; c++) acc[n][c] += un * b[k * out + c];
        }
    LR_UNROLL
    for (int n = 0; n < NR; n++)
        for (int64_t c = 0; c < cols; c++) yr[n][c] += acc[n][c] + (bias ? bias[c] : 0.0f);
}

LR_PLAIN void expand_bf16_plain(int NR, int64_t cols, const uint16_t *b, int64_t out, int64_t r,
                              const float *u, const uint16_t *bias, uint16_t *const *yr) {
    float acc[LR_ROWS][LR_COLS] = {{0.0f}};
    for (int64_t k = 0; k < r; k++)
        LR_UNROLL
        for (int n = 0; n < NR; n++) {
            float un = u[n * r + k];
            for (int64_t c = 0; c < cols; c++) acc[n][c] += un * bf16_to_f32(b[k * out + c]);
        }
    LR_UNROLL
    for (int n = 0; n < NR; n++)
        for (int64_t c = 0; c < cols; c++) {
            float delta = acc[n][c] + (bias ? bf16_to_f32(bias[c]) : 0.0f);
            yr[n][c] = f32_to_bf16(bf16_to_f32(yr[n][c]) + delta);
        }
}


#ifdef LR_AVX512

LR_INLINE void col_masks(int64_t cols, __mmask16 m[4]) {
    LR_UNROLL
    for (int v = 0; v < 4; v++) m[v] = cols > v * LR_VEC ? mask16(cols - v * LR_VEC) : 0;
}

LR_INLINE void expand_f32_nr(const int NR, int64_t cols, const float *b, int64_t out, int64_t r, const float *u,
                             const float *bias, float *const *yr, lr_prefetch *pf) {
    const char *pp = pf->p, *pf_end = pf->end;
    __mmask16 m[4];
    col_masks(cols, m);
    __m512 acc[LR_ROWS][4];
    LR_UNROLL
    for (int n = 0; n < NR; n++)
        LR_UNROLL
        for (int v = 0; v < 4; v++) acc[n][v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < r; k++) {
        pf_step2(&pp, pf_end);
        pf_step2(&pp, pf_end);
        __m512 bv[4];
        LR_UNROLL
        for (int v = 0; v < 4; v++) bv[v] = _mm512_maskz_loadu_ps(m[v], b + k * out + v * LR_VEC);
        LR_UNROLL
        for (int n = 0; n < NR; n++) {
            __m512 un = _mm512_set1_ps(u[n * r + k]);
            LR_UNROLL
            for (int v = 0; v < 4; v++) acc[n][v] = _mm512_fmadd_ps(bv[v], un, acc[n][v]);
        }
    }
    pf->p = pp;
    LR_UNROLL
    for (int v = 0; v < 4; v++) {
        __m512 bb = bias ? _mm512_maskz_loadu_ps(m[v], bias + v * LR_VEC) : _mm512_setzero_ps();
        LR_UNROLL
        for (int n = 0; n < NR; n++) {
            float *p = yr[n] + v * LR_VEC;
            _mm512_mask_storeu_ps(p, m[v], _mm512_add_ps(_mm512_maskz_loadu_ps(m[v], p), _mm512_add_ps(acc[n][v], bb)));
        }
    }
}

/* acc[n][2h] holds the even and acc[n][2h+1] the odd columns of half h (32 columns). */
LR_INLINE void expand_bf16_nr(const int NR, int64_t cols, const uint16_t *b, int64_t out, int64_t r,
                              const float *u, const uint16_t *bias, uint16_t *const *yr, lr_prefetch *pf) {
    const char *pp = pf->p, *pf_end = pf->end;
    __mmask32 m[2] = {mask32(cols), mask32(cols - 32)};
    __m512 acc[LR_ROWS][4];
    LR_UNROLL
    for (int n = 0; n < NR; n++)
        LR_UNROLL
        for (int v = 0; v < 4; v++) acc[n][v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < r; k++) {
        pf_step2(&pp, pf_end);
        __m512i w0 = _mm512_maskz_loadu_epi16(m[0], b + k * out), w1 = _mm512_maskz_loadu_epi16(m[1], b + k * out + 32);
        __m512 bv[4] = {bf16_even(w0), bf16_odd(w0), bf16_even(w1), bf16_odd(w1)};
        LR_UNROLL
        for (int n = 0; n < NR; n++) {
            __m512 un = _mm512_set1_ps(u[n * r + k]);
            LR_UNROLL
            for (int v = 0; v < 4; v++) acc[n][v] = _mm512_fmadd_ps(bv[v], un, acc[n][v]);
        }
    }
    pf->p = pp;
    LR_UNROLL
    for (int h = 0; h < 2; h++) {
        __m512i bb = bias ? _mm512_maskz_loadu_epi16(m[h], bias + 32 * h) : _mm512_setzero_si512();
        LR_UNROLL
        for (int n = 0; n < NR; n++) {
            uint16_t *p = yr[n] + 32 * h;
            __m512i yv = _mm512_maskz_loadu_epi16(m[h], p);
            __m512 even = _mm512_add_ps(bf16_even(yv), _mm512_add_ps(acc[n][2 * h], bf16_even(bb)));
            __m512 odd = _mm512_add_ps(bf16_odd(yv), _mm512_add_ps(acc[n][2 * h + 1], bf16_odd(bb)));
            _mm512_mask_storeu_epi16(p, m[h], bf16_pack(even, odd));
        }
    }
}

#elif defined(LR_AVX2)

/* float32 -> bf16 bits in the high half of each lane, rounding to nearest even; NaN stays a
 * (quiet) NaN. */
LR_INLINE __m256i bf16x8_round_high(__m256 v) {
    __m256i bits = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    __m256i quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x400000));
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(quiet), nan));
}

LR_INLINE __m256i bf16x8_pack(__m256 even, __m256 odd) {
    __m256i lo = _mm256_srli_epi32(bf16x8_round_high(even), 16);
    __m256i hi = _mm256_and_si256(bf16x8_round_high(odd), _mm256_set1_epi32((int)0xffff0000u));
    return _mm256_or_si256(lo, hi);
}

/* 32 columns for NR <= 2 rows: 8 accumulators; a rank's 32 columns are 2 (f32) or 1 (bf16)
 * cache lines. */
LR_INLINE void expand_f32_2(const int NR, const float *b, int64_t out, int64_t r, const float *u, int64_t u_stride,
                            const float *bias, float *const *yr, const char **pp, const char *pf_end) {
    __m256 acc[2][4];
    LR_UNROLL
    for (int n = 0; n < NR; n++)
        LR_UNROLL
        for (int v = 0; v < 4; v++) acc[n][v] = _mm256_setzero_ps();
    for (int64_t k = 0; k < r; k++) {
        pf_step2(pp, pf_end);
        __m256 un[2];
        LR_UNROLL
        for (int n = 0; n < NR; n++) un[n] = _mm256_broadcast_ss(u + n * u_stride + k);
        LR_UNROLL
        for (int v = 0; v < 4; v++) {
            __m256 bv = _mm256_loadu_ps(b + k * out + 8 * v);
            LR_UNROLL
            for (int n = 0; n < NR; n++) acc[n][v] = _mm256_fmadd_ps(bv, un[n], acc[n][v]);
        }
    }
    LR_UNROLL
    for (int v = 0; v < 4; v++) {
        __m256 bb = bias ? _mm256_loadu_ps(bias + 8 * v) : _mm256_setzero_ps();
        LR_UNROLL
        for (int n = 0; n < NR; n++) {
            float *p = yr[n] + 8 * v;
            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), _mm256_add_ps(acc[n][v], bb)));
        }
    }
}

/* acc[n][2h] holds the even and acc[n][2h+1] the odd columns of 16-column half h. */
LR_INLINE void expand_bf16_2(const int NR, const uint16_t *b, int64_t out, int64_t r, const float *u,
                             int64_t u_stride, const uint16_t *bias, uint16_t *const *yr, const char **pp,
                             const char *pf_end) {
    __m256 acc[2][4];
    LR_UNROLL
    for (int n = 0; n < NR; n++)
        LR_UNROLL
        for (int v = 0; v < 4; v++) acc[n][v] = _mm256_setzero_ps();
    for (int64_t k = 0; k < r; k++) {
        if (k & 1) pf_step2(pp, pf_end);
        __m256 un[2];
        LR_UNROLL
        for (int n = 0; n < NR; n++) un[n] = _mm256_broadcast_ss(u + n * u_stride + k);
        LR_UNROLL
        for (int h = 0; h < 2; h++) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(b + k * out + 16 * h));
            __m256 we = bf16x8_even(w), wo = bf16x8_odd(w);
            LR_UNROLL
            for (int n = 0; n < NR; n++) {
                acc[n][2 * h] = _mm256_fmadd_ps(we, un[n], acc[n][2 * h]);
                acc[n][2 * h + 1] = _mm256_fmadd_ps(wo, un[n], acc[n][2 * h + 1]);
            }
        }
    }
    LR_UNROLL
    for (int h = 0; h < 2; h++) {
        __m256i bb = bias ? _mm256_loadu_si256((const __m256i *)(bias + 16 * h)) : _mm256_setzero_si256();
        LR_UNROLL
        for (int n = 0; n < NR; n++) {
            uint16_t *p = yr[n] + 16 * h;
            __m256i yv = _mm256_loadu_si256((const __m256i *)p);
            __m256 even = _mm256_add_ps(bf16x8_even(yv), _mm256_add_ps(acc[n][2 * h], bf16x8_even(bb)));
            __m256 odd = _mm256_add_ps(bf16x8_odd(yv), _mm256_add_ps(acc[n][2 * h + 1], bf16x8_odd(bb)));
            _mm256_storeu_si256((__m256i *)p, bf16x8_pack(even, odd));
        }
    }
}

/* A full tile is two halves of 32 columns, each over pairs of rows, so half a B tile stays in
 * L1 while every row uses it; a short last tile takes the plain path. */
LR_INLINE void expand_f32_nr(const int NR, int64_t cols, const float *b, int64_t out, int64_t r, const float *u,
                             const float *bias, float *const *yr, lr_prefetch *pf) {
    if (cols != LR_COLS) {
        expand_f32_plain(NR, cols, b, out, r, u, bias, yr);
        return;
    }
    const char *pp = pf->p;
    for (int h = 0; h < 2; h++)
        for (int n0 = 0; n0 < NR; n0 += 2) {
            float *yh[2] = {yr[n0] + 32 * h, n0 + 1 < NR ? yr[n0 + 1] + 32 * h : NULL};
            const float *bh = bias ? bias + 32 * h : NULL;
            if (NR - n0 >= 2)
                expand_f32_2(2, b + 32 * h, out, r, u + n0 * r, r, bh, yh, &pp, pf->end);
            else
                expand_f32_2(1, b + 32 * h, out, r, u + n0 * r, r, bh, yh, &pp, pf->end);
        }
    pf->p = pp;
}

LR_INLINE void expand_bf16_nr(const int NR, int64_t cols, const uint16_t *b, int64_t out, int64_t r,
                              const float *u, const uint16_t *bias, uint16_t *const *yr, lr_prefetch *pf) {
    if (cols != LR_COLS) {
        expand_bf16_plain(NR, cols, b, out, r, u, bias, yr);
        return;
    }
    const char *pp = pf->p;
    for (int h = 0; h < 2; h++)
        for (int n0 = 0; n0 < NR; n0 += 2) {
            uint16_t *yh[2] = {yr[n0] + 32 * h, n0 + 1 < NR ? yr[n0 + 1] + 32 * h : NULL};
            const uint16_t *bh = bias ? bias + 32 * h : NULL;
            if (NR - n0 >= 2)
                expand_bf16_2(2, b + 32 * h, out, r, u + n0 * r, r, bh, yh, &pp, pf->end);
            else
                expand_bf16_2(1, b + 32 * h, out, r, u + n0 * r, r, bh, yh, &pp, pf->end);
        }
    pf->p = pp;
}

#else /* portable */

LR_INLINE void expand_f32_nr(const int NR, int64_t cols, const float *b, int64_t out, int64_t r, const float *u,
                             const float *bias, float *const *yr, lr_prefetch *pf) {
    (void)pf;
    expand_f32_plain(NR, cols, b, out, r, u, bias, yr);
}

LR_INLINE void expand_bf16_nr(const int NR, int64_t cols, const uint16_t *b, int64_t out, int64_t r,
                              const float *u, const uint16_t *bias, uint16_t *const *yr, lr_prefetch *pf) {
    (void)pf;
    expand_bf16_plain(NR, cols, b, out, r, u, bias, yr);
}

#endif

static void expand_tile(const lr_job *job, int nr, int64_t cols, const char *b, int64_t r, const float *u,
                        const char *bias, char *const *yr, lr_prefetch *pf) {
    int64_t out = job->out;
    if (job->dtype == LR_BF16) {
        const uint16_t *bh = (const uint16_t *)b, *ch = (const uint16_t *)bias;
        uint16_t *yh[LR_ROWS];
        for (int i = 0; i < nr; i++) yh[i] = (uint16_t *)yr[i];
        switch (nr) {
        case 1: expand_bf16_nr(1, cols, bh, out, r, u, ch, yh, pf); break;
        case 2: expand_bf16_nr(2, cols, bh, out, r, u, ch, yh, pf); break;
        case 3: expand_bf16_nr(3, cols, bh, out, r, u, ch, yh, pf); break;
        default: expand_bf16_nr(4, cols, bh, out, r, u, ch, yh, pf); break;
        }
    } else {
        const float *bf = (const float *)b, *cf = (const float *)bias;
        float *yf[LR_ROWS];
        for (int i = 0; i < nr; i++) yf[i] = (float *)yr[i];
        switch (nr) {
        case 1: expand_f32_nr(1, cols, bf, out, r, u, cf, yf, pf); break;
        case 2: expand_f32_nr(2, cols, bf, out, r, u, cf, yf, pf); break;
        case 3: expand_f32_nr(3, cols, bf, out, r, u, cf, yf, pf); break;
        default: expand_f32_nr(4, cols, bf, out, r, u, cf, yf, pf); break;
        }
    }
}

/* ---------------------------------------------------------------- one chunk */

/* u of group g for ranks [k0, k1): blocks of 4 ranks outside and rows inside, so a block of
 * A stays in L1 while every row of the group uses it. */
static void shrink_ranks(const lr_job *job, int64_t g, int64_t k0, int64_t k1, lr_prefetch *pf) {
    const int32_t *rows = job->order + job->starts[g];
    int64_t n_rows = job->starts[g + 1] - job->starts[g];
    int slot = job->slots[g];
    int64_t r = job->ranks[slot];
    const char *a = weight(job, W_A, slot), *bias = weight(job, W_A_BIAS, slot);
    float *u = job->u + job->u_off[g];
    for (int64_t kb = k0; kb < k1; kb += LR_RANKS) {
        int64_t nk = k1 - kb < LR_RANKS ? k1 - kb : LR_RANKS;
        /* A short last block repeats its first rank row; those dots are dropped. */
        const char *ar[LR_RANKS];
        for (int k = 0; k < LR_RANKS; k++) ar[k] = a + (size_t)((kb + (k < nk ? k : 0)) * job->in) * job->es;
        float add[LR_RANKS] = {0.0f};
        for (int64_t k = 0; bias && k < nk; k++)
            add[k] = job->dtype == LR_BF16 ? bf16_to_f32(((const uint16_t *)bias)[kb + k])
                                           : ((const float *)bias)[kb + k];
        for (int64_t n0 = 0; n0 < n_rows; n0 += LR_ROWS) {
            int nr = n_rows - n0 < LR_ROWS ? (int)(n_rows - n0) : LR_ROWS;
            const char *xr[LR_ROWS];
            for (int i = 0; i < nr; i++) xr[i] = job->x + (size_t)(rows[n0 + i] * job->x_stride) * job->es;
            float dots[LR_ROWS][LR_RANKS];
            pf_top_up(pf);
            shrink_tile(job, nr, xr, ar, dots, pf);
            for (int i = 0; i < nr; i++)
                for (int64_t k = 0; k < nk; k++) u[(n0 + i) * r + kb + k] = act_apply(job->act, dots[i][k] + add[k]);
        }
    }
}

/* y of group g for columns [j_begin, j_end): tiles of 64 columns outside and rows inside, so
 * a B tile stays in L1 while every row of the group uses it. */
static void expand_cols(const lr_job *job, int64_t g, int64_t j_begin, int64_t j_end, lr_prefetch *pf) {
    const int32_t *rows = job->order + job->starts[g];
    int64_t n_rows = job->starts[g + 1] - job->starts[g];
    int slot = job->slots[g];
    int64_t r = job->ranks[slot];
    const char *b = weight(job, W_B, slot), *bias = weight(job, W_B_BIAS, slot);
    const float *u = job->u + job->u_off[g];
    for (int64_t j0 = j_begin; j0 < j_end; j0 += LR_COLS) {
        int64_t cols = j_end - j0 < LR_COLS ? j_end - j0 : LR_COLS;
        for (int64_t n0 = 0; n0 < n_rows; n0 += LR_ROWS) {
            int nr = n_rows - n0 < LR_ROWS ? (int)(n_rows - n0) : LR_ROWS;
            char *yr[LR_ROWS];
            for (int i = 0; i < nr; i++) yr[i] = job->y + (size_t)(rows[n0 + i] * job->y_stride + j0) * job->es;
            pf_top_up(pf);
            expand_tile(job, nr, cols, b + (size_t)j0 * job->es, r, u + n0 * r,
                        bias ? bias + (size_t)j0 * job->es : NULL, yr, pf);
        }
    }
}

static void run_chunk(const lr_job *job, int64_t i, lr_prefetch *pf) {
    const lr_chunk *c = &job->chunks[i];
    if (i < job->n_shrink) {
        int64_t r = job->ranks[job->slots[c->g]];
        int64_t k1 = (int64_t)c->u1 * LR_RANKS < r ? (int64_t)c->u1 * LR_RANKS : r;
        shrink_ranks(job, c->g, (int64_t)c->u0 * LR_RANKS, k1, pf);
    } else {
        int64_t j1 = (int64_t)c->u1 * LR_COLS < job->out ? (int64_t)c->u1 * LR_COLS : job->out;
        expand_cols(job, c->g, (int64_t)c->u0 * LR_COLS, j1, pf);
    }
}

LR_INLINE int64_t claim(lr_job *job) {
    return atomic_fetch_add_explicit(&job->next_chunk, 1, memory_order_relaxed);
}

/* Claims chunks in order, always one ahead so that chunk's weights are prefetched meanwhile;
 * the chunk claimed ahead of the last shrink chunk may be an expand chunk, which waits for
 * the barrier. Every shrink chunk is claimed, and so done, before its claimer's barrier. */
static void run_thread(lr_job *job) {
    lr_prefetch pf;
    int64_t cur = claim(job);
    int64_t nxt = cur < job->n_chunks ? claim(job) : cur;
    for (; cur < job->n_shrink; cur = nxt, nxt = nxt < job->n_chunks ? claim(job) : nxt) {
        pf_start(&pf, job, nxt < job->n_shrink ? PHASE_SHRINK : PHASE_EXPAND,
                 nxt < job->n_chunks ? &job->chunks[nxt] : NULL);
        run_chunk(job, cur, &pf);
    }
#pragma omp barrier
    for (; cur < job->n_chunks; cur = nxt, nxt = nxt < job->n_chunks ? claim(job) : nxt) {
        pf_start(&pf, job, PHASE_EXPAND, nxt < job->n_chunks ? &job->chunks[nxt] : NULL);
        run_chunk(job, cur, &pf);
    }
}

/* ---------------------------------------------------------------- entry point */

/*
 * table (int64): in, out, dtype (0 float32, 1 bfloat16 as uint16 bits), num_slots S, then
 *     S pointers each to A, B, A bias, B bias (a bias pointer may be 0), then S ranks (0 = empty).
 * groups (int32): G, M, starts[G+1], slots[G], order[M]; group g is rows
 *     order[starts[g] .. starts[g+1]], every row index < the rows of x and y.
 * x: rows of `in` elements, x_stride elements apart; y likewise with `out`; x may be y.
 * act: 0 none, 1 relu, 2 gelu (erf), 3 silu, 4 tanh.
 * Returns 0, 1 on a bad argument, 2 when scratch memory cannot be had (y then untouched).
 */
int peftserve_lowrank_apply(const int64_t *table, const int32_t *groups, const void *x, int64_t x_stride, void *y,
                            int64_t y_stride, int act, int n_threads) {
    int64_t in = table[0], out = table[1], dtype = table[2], n_slots = table[3];
    int64_t n_groups = groups[0];
    if ((dtype != LR_F32 && dtype != LR_BF16) || in <= 0 || out <= 0 || n_groups < 0 || act < ACT_NONE ||
        act > ACT_TANH)
        return LR_EBADARG;
    if (n_groups == 0) return LR_OK;
    const int64_t *ranks = table + 4 + 4 * n_slots;
    const int32_t *starts = groups + 2, *slots = starts + n_groups + 1, *order = slots + n_groups;
    for (int64_t g = 0; g < n_groups; g++)
        if (slots[g] < 0 || slots[g] >= n_slots) return LR_EBADARG;

    lr_job job = {(int)dtype, dtype == LR_BF16 ? 2 : 4, x, x_stride, y, y_stride, in, out, order, starts, slots,
                  n_groups, table + 4, n_slots, ranks, act, NULL, NULL, NULL, 0, 0, 0};
    int64_t u_len = 0, weight_elems = 0, max_chunks = 0, total[2] = {0, 0};
    for (int64_t g = 0; g < n_groups; g++) {
        int64_t r = ranks[slots[g]], n_rows = starts[g + 1] - starts[g];
        if (r <= 0 || n_rows <= 0) continue;
        u_len += n_rows * r;
        weight_elems += r * (in + out);
        for (int phase = PHASE_SHRINK; phase <= PHASE_EXPAND; phase++) {
            int64_t units, cost;
            group_units(&job, phase, g, &units, &cost);
            total[phase] += units * cost;
            max_chunks += units;
        }
    }
    int nth = weight_elems < LR_SERIAL_ELEMS || n_threads < 1 ? 1 : n_threads;

    /* One block of scratch: u offsets, chunks, u. */
    size_t off_bytes = (size_t)n_groups * sizeof(int64_t), chunk_bytes = (size_t)max_chunks * sizeof(lr_chunk);
    char *scratch = malloc(off_bytes + chunk_bytes + (size_t)u_len * sizeof(float));
    if (!scratch) return LR_ENOMEM;
    int64_t *u_off = (int64_t *)scratch;
    lr_chunk *chunks = (lr_chunk *)(scratch + off_bytes);
    job.u = (float *)(scratch + off_bytes + chunk_bytes);
    for (int64_t g = 0, off = 0; g < n_groups; g++) {
        u_off[g] = off;
        int64_t r = ranks[slots[g]], n_rows = starts[g + 1] - starts[g];
        if (r > 0 && n_rows > 0) off += n_rows * r;
    }
    job.u_off = u_off;
    /* About 8 chunks per thread and phase, so the last ones to finish are short. */
    int64_t min_cost = LR_CHUNK_ELEMS * (LR_MEM_ROWS + 1);
    for (int phase = PHASE_SHRINK; phase <= PHASE_EXPAND; phase++) {
        int64_t target = total[phase] / (8 * nth) > min_cost ? total[phase] / (8 * nth) : min_cost;
        job.n_chunks += make_chunks(&job, phase, target, chunks + job.n_chunks);
        if (phase == PHASE_SHRINK) job.n_shrink = job.n_chunks;
    }
    job.chunks = chunks;
    atomic_init(&job.next_chunk, 0);

#pragma omp parallel num_threads(nth)
    run_thread(&job);

    free(scratch);
    return LR_OK;
}

/* Many small matrix copies in one call: an adapter's install into its slot rows (pack.py).
 *
 * Item k copies a (rows x cols) matrix from a strided source (element strides s0, s1: a
 * transposed view reads with s0 = 1) into contiguous destination rows, converting between
 * float32 and bfloat16 and multiplying by scale[k] in float32 on the way, rounding once, to
 * nearest even, as torch does. Sources are checked finite before they get here.
 *
 * meta, 7 int64 per item: src pointer, dst pointer, rows, cols, s0, s1, kinds, where
 * kinds = src kind | dst kind << 8 and a kind is 0 for float32, 1 for bfloat16.
 */
#include <stdint.h>
#include <string.h>

static inline float load(const void *p, int64_t i, int kind) {
    if (kind == 0) return ((const float *)p)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static inline void store(void *p, int64_t i, int kind, float v) {
    if (kind == 0) {
        ((float *)p)[i] = v;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    ((uint16_t *)p)[i] = (uint16_t)(bits >> 16);
}

/* One (rows x cols) matrix; SK and DK are compile-time kinds, so each loop is branch-free. A
 * transposed source (s0 == 1) is walked along its own rows, which are contiguous, and written
 * to `rows` destination rows at once; any other source is walked along destination rows. */
#define COPY(SK, DK)                                                                   \
    do {                                                                               \
        if (s0 == 1 && s1 != 1) {                                                      \
            for (int64_t c = 0; c < cols; c++)                                         \
                for (int64_t r = 0; r < rows; r++)                                     \
                    store(dst, r * cols + c, DK, load(src, c * s1 + r, SK) * scale);   \
        } else {                                                                       \
            for (int64_t r = 0; r < rows; r++)                                         \
                for (int64_t c = 0; c < cols; c++)                                     \
                    store(dst, r * cols + c, DK, load(src, r * s0 + c * s1, SK) * scale); \
        }                                                                              \
    } while (0)

int peftserve_pack(int64_t n, const int64_t *meta, const double *scales) {
    for (int64_t k = 0; k < n; k++) {
        const int64_t *m = meta + 7 * k;
        const void *src = (const void *)(intptr_t)m[0];
        void *dst = (void *)(intptr_t)m[1];
        int64_t rows = m[2], cols = m[3], s0 = m[4], s1 = m[5];
        int sk = (int)(m[6] & 0xFF), dk = (int)(m[6] >> 8);
        if (sk > 1 || dk > 1 || rows < 0 || cols < 0) return 1;
        float scale = (float)scales[k];
        if (sk == dk && s1 == 1 && scale == 1.0f) {
            size_t size = sk == 0 ? 4 : 2;
            for (int64_t r = 0; r < rows; r++)
                memcpy((char *)dst + r * cols * size, (const char *)src + r * s0 * size, cols * size);
            continue;
        }
        switch (sk | dk << 1) {
        case 0: COPY(0, 0); break;
        case 1: COPY(1, 0); break;
        case 2: COPY(0, 1); break;
        default: COPY(1, 1); break;
        }
    }
    return 0;
}

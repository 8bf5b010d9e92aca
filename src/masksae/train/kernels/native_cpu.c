/* CPU kernels of the fused step that PyTorch runs as several separate passes.
 *
 * Built on first use by masksae/train/kernels/native.py with the machine's C compiler and
 * called through ctypes (the GIL is released during each call); the row-parallel functions
 * work on a range of rows [r0, r1) so the caller splits a batch across threads, the small
 * bookkeeping passes at the end run whole in one thread. Plain C99, no dependencies (the
 * candidate scan uses AVX-512BW / AVX2 intrinsics when the compiler targets them, a
 * portable form otherwise): a missing compiler only means the PyTorch path runs instead.
 *
 * Layouts (all row-major, contiguous, float32 unless said):
 *   x[B, x_stride], b_dec[D], W_dec[F, D]; bags: entries of bag j = row * G + group are
 *   [bag_off[j], bag_off[j + 1]) in lat[] / vals[] (int64 / float32);
 *   resid[B, G, D]: every prefix residual x - b_dec - sum of the groups up to g;
 *   err[B, G]: their squared norms.
 */
#include <stdint.h>
#include <math.h>
#include <string.h>

#define LANES 16 /* independent partial sums: lets the compiler vectorise the reductions */

static float dot(const float *a, const float *b, int64_t D) {
    float acc[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= D; d += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += a[d + j] * b[d + j];
    float s = 0.0f;
    for (int j = 0; j < LANES; j++) s += acc[j];
    for (; d < D; d++) s += a[d] * b[d];
    return s;
}

static float sum_of_squares(const float *r, int64_t D) { return dot(r, r, D); }

/* p[g] = -2 sum_{i >= g} grad_err[b, i] resid[b, i] for every group g of token b (p: G rows
 * of D): the gradient of the sum decoded by each Matryoshka group, given d loss / d err. */
static void suffix_grads(int64_t b, int64_t G, int64_t D, const float *resid,
                         const float *grad_err, float *p) {
    for (int64_t g = G - 1; g >= 0; g--) {
        const float *r = resid + (b * G + g) * D;
        float *pg = p + g * D;
        const float c = -2.0f * grad_err[b * G + g];
        if (g == G - 1)
            for (int64_t d = 0; d < D; d++) pg[d] = c * r[d];
        else
            for (int64_t d = 0; d < D; d++) pg[d] = pg[D + d] + c * r[d];
    }
}

/* dst[0, n) = src[0, n) with non-temporal stores where the CPU has them and dst is aligned:
 * rows written once here and read by another pass much later (the suffix table, 23.6 MB
 * at B 2048, G 5, D 576) skip the read-for-ownership of a normal store and do not evict the
 * decoder rows from the cache. The caller ends with stream_fence() before the data is read. */
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__AVX512F__) || defined(__AVX__))
#include <immintrin.h>
static void stream_copy(float *dst, const float *src, int64_t n) {
#if defined(__AVX512F__)
    if ((uintptr_t)dst % 64 == 0 && n % 16 == 0) {
        for (int64_t i = 0; i < n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
        return;
    }
#endif
    if ((uintptr_t)dst % 32 == 0 && n % 8 == 0) {
        for (int64_t i = 0; i < n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
        return;
    }
    memcpy(dst, src, (size_t)n * sizeof(float));
}
static void stream_fence(void) { _mm_sfence(); }
#else
static void stream_copy(float *dst, const float *src, int64_t n) {
    memcpy(dst, src, (size_t)n * sizeof(float));
}
static void stream_fence(void) {}
#endif

/* resid[b, g] = x[b] - b_dec - sum over the bags (b, 0..g) of vals[e] * W_dec[lat[e]];
 * err[b, g] = ||resid[b, g]||^2. The sparse decode, the prefix sums and the norms in one
 * pass per token, each residual row staying in L1 while its bag is subtracted.
 *
 * With grad_err != NULL (the gradient the loss is expected to send back to err), also
 * grad_vals[e] = <gp[g], W_dec[lat[e]]> for every entry, gp = suffix_grads: the backward's
 * dot products, done here while the token's decoder rows are still in cache, so the backward
 * reads no decoder row at all when the gradient it is given is that one (sparse_step.py
 * checks). gp goes to scratch (G * D floats per thread), or with suffix != NULL also to
 * suffix[b] ([B, G, D]) for the backward to read instead of rebuilding it from the
 * residuals in every thread; then only the last residual is kept, resid being [B, D], the
 * token's residuals live in scratch too (2 G D floats per thread), and both tables are
 * written with non-temporal stores. */
void prefix_decode_forward(int64_t r0, int64_t r1, int64_t G, int64_t D, const float *x,
                           int64_t x_stride, const float *b_dec, const int64_t *bag_off,
                           const int64_t *lat, const float *vals, const float *W_dec,
                           float *resid, float *err, const float *grad_err, float *grad_vals,
                           float *scratch, float *suffix) {
    for (int64_t b = r0; b < r1; b++) {
        const float *xb = x + b * x_stride;
        float *rb = suffix ? scratch + G * D : resid + b * G * D; /* its G residual rows */
        for (int64_t g = 0; g < G; g++) {
            float *r = rb + g * D;
            if (g == 0)
                for (int64_t d = 0; d < D; d++) r[d] = xb[d] - b_dec[d];
            else
                memcpy(r, r - D, (size_t)D * sizeof(float));
            for (int64_t e = bag_off[b * G + g]; e < bag_off[b * G + g + 1]; e++) {
                const float *w = W_dec + lat[e] * D;
                const float v = vals[e];
                for (int64_t d = 0; d < D; d++) r[d] -= v * w[d];
            }
            err[b * G + g] = sum_of_squares(r, D);
        }
        if (suffix) stream_copy(resid + b * D, rb + (G - 1) * D, D);
        if (!grad_err) continue;
        float *gp = scratch;
        suffix_grads(0, G, D, rb, grad_err + b * G, gp);
        if (suffix) stream_copy(suffix + b * G * D, gp, G * D);
        for (int64_t g = 0; g < G; g++)
            for (int64_t e = bag_off[b * G + g]; e < bag_off[b * G + g + 1]; e++)
                grad_vals[e] = dot(gp + g * D, W_dec + lat[e] * D, D);
    }
    if (suffix) stream_fence();
}

/* Backward of prefix_decode_forward for d loss / d err[b, g] = grad_err[b, g]:
 * grad_parts[b, g] = -2 sum_{i >= g} grad_err[b, i] resid[b, i] (the gradient of group g's
 * decoded sum, written for the decoder-weight gradient) and, for each entry of bag (b, g),
 * grad_vals[e] = <grad_parts[b, g], W_dec[lat[e]]>. */
void prefix_decode_backward(int64_t r0, int64_t r1, int64_t G, int64_t D, const float *resid,
                            const float *grad_err, const int64_t *bag_off, const int64_t *lat,
                            const float *W_dec, float *grad_parts, float *grad_vals) {
    for (int64_t b = r0; b < r1; b++) {
        float *p = grad_parts + b * G * D;
        suffix_grads(b, G, D, resid, grad_err, p);
        for (int64_t g = 0; g < G; g++)
            for (int64_t e = bag_off[b * G + g]; e < bag_off[b * G + g + 1]; e++)
                grad_vals[e] = dot(p + g * D, W_dec + lat[e] * D, D);
    }
}

/* Increasing indices i in [i0, i1) with x[i] > t, written to out and their values to vals (at
 * most cap of them). Returns how many, or -1 when more than cap (the caller then counts
 * another way).
 *
 * With AVX-512BW or AVX2 (and GCC / clang builtins) each 64 entries become one bit mask,
 * and the hits are read off it with count-trailing-zeros: about 3x faster than the portable
 * form below, whose per-entry loop over a block with a hit (a third of the blocks for a
 * top-k cut over 64-entry blocks) and mispredicted block branches made it compute-bound. */
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__AVX512BW__) || defined(__AVX2__))
#include <immintrin.h>
#if defined(__AVX512BW__)
static inline uint64_t mask_gt_i16(const int16_t *x, int16_t t) {
    const __m512i tv = _mm512_set1_epi16(t);
    const uint64_t lo = _mm512_cmpgt_epi16_mask(_mm512_loadu_si512((const void *)x), tv);
    const uint64_t hi = _mm512_cmpgt_epi16_mask(_mm512_loadu_si512((const void *)(x + 32)), tv);
    return lo | hi << 32;
}
static inline uint64_t mask_gt_i32(const int32_t *x, int32_t t) {
    const __m512i tv = _mm512_set1_epi32(t);
    uint64_t m = 0;
    for (int q = 0; q < 4; q++)
        m |= (uint64_t)_mm512_cmpgt_epi32_mask(_mm512_loadu_si512((const void *)(x + 16 * q)), tv)
             << (16 * q);
    return m;
}
#else /* AVX2 */
static inline uint64_t mask_gt_i16(const int16_t *x, int16_t t) {
    const __m256i tv = _mm256_set1_epi16(t);
    uint64_t m = 0;
    for (int q = 0; q < 2; q++) {
        const __m256i a = _mm256_cmpgt_epi16(_mm256_loadu_si256((const __m256i *)(x + 32 * q)), tv);
        const __m256i b =
            _mm256_cmpgt_epi16(_mm256_loadu_si256((const __m256i *)(x + 32 * q + 16)), tv);
        /* packs interleaves the 128-bit lanes (a0-7 b0-7 a8-15 b8-15): put them in order */
        const __m256i ab = _mm256_permute4x64_epi64(_mm256_packs_epi16(a, b), 0xD8);
        m |= (uint64_t)(uint32_t)_mm256_movemask_epi8(ab) << (32 * q);
    }
    return m;
}
static inline uint64_t mask_gt_i32(const int32_t *x, int32_t t) {
    const __m256i tv = _mm256_set1_epi32(t);
    uint64_t m = 0;
    for (int q = 0; q < 8; q++) {
        const __m256i c = _mm256_cmpgt_epi32(_mm256_loadu_si256((const __m256i *)(x + 8 * q)), tv);
        m |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(c)) << (8 * q);
    }
    return m;
}
#endif
#define DEFINE_GREATER(NAME, T, MASK)                                                      \
    int64_t NAME(int64_t i0, int64_t i1, const T *x, T t, int64_t *out, T *vals,           \
                 int64_t cap) {                                                            \
        int64_t n = 0, i = i0;                                                             \
        for (; i + 64 <= i1; i += 64) {                                                    \
            uint64_t m = MASK(x + i, t);                                                   \
            if (!m) continue;                                                              \
            if (n + __builtin_popcountll(m) > cap) return -1;                              \
            do {                                                                           \
                const int64_t j = i + __builtin_ctzll(m);                                  \
                out[n] = j;                                                                \
                vals[n++] = x[j];                                                          \
                m &= m - 1;                                                                \
            } while (m);                                                                   \
        }                                                                                  \
        for (; i < i1; i++)                                                                \
            if (x[i] > t) {                                                                \
                if (n == cap) return -1;                                                   \
                out[n] = i;                                                                \
                vals[n++] = x[i];                                                          \
            }                                                                              \
        return n;                                                                          \
    }
DEFINE_GREATER(greater_i16, int16_t, mask_gt_i16)
DEFINE_GREATER(greater_i32, int32_t, mask_gt_i32)
#else /* portable: blocks with no hit, most of them, cost one vectorised compare */
#define SCAN_BLOCK 64
#define DEFINE_GREATER(NAME, T)                                                            \
    int64_t NAME(int64_t i0, int64_t i1, const T *x, T t, int64_t *out, T *vals,           \
                 int64_t cap) {                                                            \
        int64_t n = 0, i = i0;                                                             \
        for (; i < i1; i += SCAN_BLOCK) {                                                  \
            const int64_t end = i + SCAN_BLOCK < i1 ? i + SCAN_BLOCK : i1;                 \
            int any = 0;                                                                   \
            if (end - i == SCAN_BLOCK)                                                     \
                for (int j = 0; j < SCAN_BLOCK; j++) any |= x[i + j] > t;                  \
            else                                                                           \
                any = 1;                                                                   \
            if (!any) continue;                                                            \
            for (int64_t j = i; j < end; j++)                                              \
                if (x[j] > t) {                                                            \
                    if (n == cap) return -1;                                               \
                    out[n] = j;                                                            \
                    vals[n++] = x[j];                                                      \
                }                                                                          \
        }                                                                                  \
        return n;                                                                          \
    }
DEFINE_GREATER(greater_i16, int16_t)
DEFINE_GREATER(greater_i32, int32_t)
#endif

/* out[f] = sum over j in [offsets[f], offsets[f + 1]) of weights[perm[j]] * table[cols[perm[j]]]
 * for latents f in [r0, r1): the encoder / decoder weight gradients gathered per latent, the
 * entries visited in latent order through perm (no permuted copies of cols and weights). */
void segment_gather_perm(int64_t r0, int64_t r1, int64_t D, const int64_t *offsets,
                         const int64_t *perm, const int64_t *cols, const float *weights,
                         const float *table, float *out) {
    for (int64_t f = r0; f < r1; f++) {
        float *o = out + f * D;
        for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
        for (int64_t j = offsets[f]; j < offsets[f + 1]; j++) {
            const int64_t e = perm[j];
            const float *t = table + cols[e] * D;
            const float w = weights[e];
            for (int64_t d = 0; d < D; d++) o[d] += w * t[d];
        }
    }
}

/* out[e] = <A[rows[e]], B[cols[e]]> (+ bias[cols[e]] when bias != NULL) for the entries e
 * in [row_off[r0], row_off[r1]) of rows [r0, r1) (entries sorted by row): the sampled
 * product of a selection. */
void pair_dot_rows(int64_t r0, int64_t r1, int64_t D, const int64_t *row_off,
                   const int64_t *cols, const float *A, const float *B, const float *bias,
                   float *out) {
    for (int64_t r = r0; r < r1; r++) {
        const float *a = A + r * D;
        for (int64_t e = row_off[r]; e < row_off[r + 1]; e++) {
            const float v = dot(a, B + cols[e] * D, D);
            out[e] = bias ? v + bias[cols[e]] : v;
        }
    }
}

/* For decoder rows w = W[f] and their gradients g = grad[f], f in [r0, r1): remove the
 * component of g along w / (|w| + 1e-6) (dictionary_learning's parallel-gradient removal,
 * in its arithmetic: g -= (g . w) / (|w| + 1e-6)^2 w) and return |g|^2 per row after it. */
void remove_parallel_rows(int64_t r0, int64_t r1, int64_t D, const float *W, float *grad,
                          float *grad_sq) {
    for (int64_t f = r0; f < r1; f++) {
        const float *w = W + f * D;
        float *g = grad + f * D;
        const float denom = sqrtf(sum_of_squares(w, D)) + 1e-6f;
        const float c = dot(g, w, D) / (denom * denom);
        for (int64_t d = 0; d < D; d++) g[d] -= c * w[d];
        grad_sq[f] = sum_of_squares(g, D);
    }
}

/* 1 when every idx[i] lies in [0, bound), else 0 (the wrappers' guard before the kernels
 * above index tables with them; one vectorised pass, no thread hand-off). */
int64_t indices_in_range(const int64_t *idx, int64_t n, int64_t bound) {
    int bad = 0;
    for (int64_t i = 0; i < n; i++) bad |= (idx[i] < 0) | (idx[i] >= bound);
    return !bad;
}

/* 1 when offsets[0..n] is a CSR pointer over `total` entries: starts at 0, ends at total,
 * never decreases. */
int64_t offsets_valid(const int64_t *offsets, int64_t n, int64_t total) {
    int bad = (offsets[0] != 0) | (offsets[n] != total);
    for (int64_t i = 0; i < n; i++) bad |= offsets[i + 1] < offsets[i];
    return !bad;
}

/* The stable permutation sorting keys[0..n) (all in [0, n_keys)) given their CSR pointer
 * offsets[0..n_keys] (a counting sort: one pass, O(n + n_keys), instead of a radix sort);
 * cursor[0..n_keys) is scratch. */
/* Unsigned keys ordered like the floats (NaN as -inf): flip all bits of a negative float,
 * only the sign bit of a non-negative one. */
static inline uint32_t order_key(float v) {
    uint32_t u;
    if (v != v) v = -INFINITY;
    memcpy(&u, &v, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* The bin of hist[0 .. n_bins) (the sum of 4 interleaved copies: consecutive increments of
 * one counter would wait on each other) holding the r-th largest key (r >= 1), counting down
 * from the top bin; *r becomes its rank within that bin. */
static uint32_t rank_bin(uint32_t hist[4][2048], int64_t n_bins, int64_t *r) {
    int64_t b = n_bins - 1;
    for (; b > 0; b--) {
        const int64_t count = (int64_t)hist[0][b] + hist[1][b] + hist[2][b] + hist[3][b];
        if (count >= *r) break;
        *r -= count;
    }
    return (uint32_t)b;
}

/* Positions of the k largest of x[0 .. n) (1 <= k <= n < 2^32), in increasing order, into
 * pos[k]; returns the k-th largest value t. Every entry above t is taken, then entries equal
 * to t in order until there are k; NaN counts as -inf (a diverged run: the trainer stops on its
 * loss). t is found by a radix select on the floats' order-preserving bits (11, 11 and 10
 * bits; the second and third histograms over the members of the chosen bin only, compacted
 * into keys[], n of scratch): a few branch-free linear passes, where a top-k keeps a heap of
 * k entries and a quickselect mispredicts half its branches. */
float top_positions(int64_t n, const float *x, int64_t k, uint32_t *keys, int64_t *pos) {
    static const int LEVEL_SHIFT[3] = {21, 10, 0}, LEVEL_BINS[3] = {2048, 2048, 1024};
    uint32_t hist[4][2048];
    int64_t r = k, m = n;
    uint32_t prefix = 0; /* the bits of t's key chosen so far */
    for (int64_t i = 0; i < n; i++) keys[i] = order_key(x[i]);
    for (int level = 0; level < 3; level++) {
        const int shift = LEVEL_SHIFT[level];
        const uint32_t mask = (uint32_t)LEVEL_BINS[level] - 1;
        memset(hist, 0, sizeof hist);
        int64_t i = 0;
        for (; i + 4 <= m; i += 4)
            for (int c = 0; c < 4; c++) hist[c][(keys[i + c] >> shift) & mask]++;
        for (; i < m; i++) hist[0][(keys[i] >> shift) & mask]++;
        const uint32_t bin = rank_bin(hist, LEVEL_BINS[level], &r);
        prefix |= bin << shift;
        if (level == 2) break;
        /* keep the members of the chosen bin (branch-free: the store is undone by not
         * advancing) */
        int64_t kept = 0;
        for (int64_t j = 0; j < m; j++) {
            keys[kept] = keys[j];
            kept += ((keys[j] >> shift) & mask) == bin;
        }
        m = kept;
    }
    /* r is now t's rank among the entries equal to it: take the first r of those */
    int64_t ties = r, got = 0;
    for (int64_t i = 0; i < n && got < k; i++) {
        const uint32_t key = order_key(x[i]);
        const int64_t eq = key == prefix;
        const int64_t take = (key > prefix) | (eq & (ties > 0));
        ties -= eq & take;
        pos[got] = i;
        got += take;
    }
    const uint32_t u = (prefix & 0x80000000u) ? (prefix & 0x7fffffffu) : ~prefix;
    float t;
    memcpy(&t, &u, sizeof t);
    return t;
}

/* offsets[0 .. n_keys]: the CSR pointer of keys in [0, n_keys) (each key's count, then their
 * running sum; one pass, where bincount also scans for the minimum and the maximum). Returns
 * 0, or -1 (offsets then undefined) when a key lies outside [0, n_keys). */
int64_t csr_offsets(int64_t n, const int64_t *keys, int64_t n_keys, int64_t *offsets) {
    memset(offsets, 0, (size_t)(n_keys + 1) * sizeof(int64_t));
    for (int64_t e = 0; e < n; e++) {
        const int64_t k = keys[e];
        if (k < 0 || k >= n_keys) return -1;
        offsets[k + 1]++;
    }
    for (int64_t k = 0; k < n_keys; k++) offsets[k + 1] += offsets[k];
    return 0;
}

void counting_sort_perm(int64_t n, const int64_t *keys, int64_t n_keys, const int64_t *offsets,
                        int64_t *cursor, int64_t *perm) {
    memcpy(cursor, offsets, (size_t)n_keys * sizeof(int64_t));
    for (int64_t e = 0; e < n; e++) perm[cursor[keys[e]]++] = e;
}

/* The whole sparse backward of one step in one pass, split by latent: this call owns the
 * latents [f0, f1) and writes only their rows, so calls on disjoint ranges run in parallel
 * without conflicts (the caller balances the ranges by entry count).
 *
 * Forward was: vals = the selected pre-activations (ReLU'd) of xin @ W_enc + b_enc;
 * resid[b, g] = x[b] - b_dec - sum over bags (b, 0..g) of vals * W_dec[lat];
 * err[b, g] = |resid[b, g]|^2. Given grad_err, for every token b (in L1, in scratch[G * D]):
 * gp[g] = -2 sum_{i >= g} grad_err[b, i] resid[b, i]; then for each owned entry e of bag
 * (b, g): grad_vals[e] = <gp[g], W_dec[f]>, grad_W_dec[f] += vals[e] gp[g], and through the
 * ReLU (vals[e] > 0) grad_W_enc[f] += grad_vals[e] xin[b], grad_b_enc[f] += grad_vals[e].
 * A call with grad_b_dec != NULL also adds sum_b gp[0] into it (the decoder bias's share;
 * the encoder side, -W_enc grad_b_enc, is the caller's). grad_W_enc, grad_b_enc may be NULL.
 * known_grad_vals, known_suffix (or NULL): the grad_vals and gp prefix_decode_forward
 * already computed for this very grad_err, used instead of the dot products and of
 * rebuilding gp from resid (which may then be NULL). */
void sparse_backward_by_latent(int64_t f0, int64_t f1, int64_t B, int64_t G, int64_t D,
                               const float *resid, const float *grad_err,
                               const int64_t *bag_off, const int64_t *lat, const float *vals,
                               const float *W_dec, const float *xin, float *grad_vals,
                               float *grad_W_dec, float *grad_W_enc, float *grad_b_enc,
                               float *grad_b_dec, float *scratch, uint8_t *seen,
                               const float *known_grad_vals, const float *known_suffix) {
    /* seen[f] (zeroed by the caller): a latent's first entry writes its gradient rows, later
     * ones add; rows never seen are zeroed at the end. No zero-filling pass over the rows
     * before the random updates, which would fetch each of them once more. */
    for (int64_t b = 0; b < B; b++) {
        const int64_t *off = bag_off + b * G;
        /* entries of a token are sorted by latent: skip a token none of whose are ours */
        int64_t lo = off[0], hi = off[G];
        while (lo < hi && lat[lo] < f0) lo++;
        while (hi > lo && lat[hi - 1] >= f1) hi--;
        if (lo == hi && !grad_b_dec) continue;
        const float *gp = known_suffix ? known_suffix + b * G * D : scratch;
        if (!known_suffix) suffix_grads(b, G, D, resid, grad_err, scratch);
        if (grad_b_dec)
            for (int64_t d = 0; d < D; d++) grad_b_dec[d] += gp[d];
        const float *xb = xin ? xin + b * D : NULL;
        for (int64_t g = 0; g < G; g++) {
            const float *p = gp + g * D;
            const int64_t e0 = off[g] > lo ? off[g] : lo, e1 = off[g + 1] < hi ? off[g + 1] : hi;
            for (int64_t e = e0; e < e1; e++) {
                const int64_t f = lat[e];
                float *gw = grad_W_dec + f * D;
                const float v = vals[e];
                /* the forward's dot products when it computed them: no decoder row read */
                const float gv = known_grad_vals ? known_grad_vals[e] : dot(p, W_dec + f * D, D);
                const int first = !seen[f];
                grad_vals[e] = gv;
                seen[f] = 1;
                if (first)
                    for (int64_t d = 0; d < D; d++) gw[d] = v * p[d];
                else
                    for (int64_t d = 0; d < D; d++) gw[d] += v * p[d];
                if (!grad_W_enc) continue;
                float *ge = grad_W_enc + f * D;
                const float ge_scale = v > 0.0f ? gv : 0.0f; /* through the ReLU */
                if (first) {
                    if (v > 0.0f)
                        for (int64_t d = 0; d < D; d++) ge[d] = gv * xb[d];
                    else
                        memset(ge, 0, (size_t)D * sizeof(float));
                    grad_b_enc[f] = ge_scale;
                } else if (v > 0.0f) {
                    for (int64_t d = 0; d < D; d++) ge[d] += gv * xb[d];
                    grad_b_enc[f] += gv;
                }
            }
        }
    }
    for (int64_t f = f0; f < f1; f++) /* latents without an entry */
        if (!seen[f]) {
            memset(grad_W_dec + f * D, 0, (size_t)D * sizeof(float));
            if (grad_W_enc) {
                memset(grad_W_enc + f * D, 0, (size_t)D * sizeof(float));
                grad_b_enc[f] = 0.0f;
            }
        }
}

/* ---- small passes of the step's bookkeeping (each one PyTorch call or more, and a wake-up
 * of its worker threads, for a few hundred kilobytes) ----------------------------------- */

/* rows[i] = idx[i] / n_cols, cols[i] = idx[i] % n_cols: flat indices of a [*, n_cols]
 * matrix split into (row, column). */
void split_flat(int64_t n, const int64_t *idx, int64_t n_cols, int64_t *rows, int64_t *cols) {
    for (int64_t i = 0; i < n; i++) {
        rows[i] = idx[i] / n_cols;
        cols[i] = idx[i] - rows[i] * n_cols;
    }
}

/* bags[i] = rows[i] * G + group_of[lat[i]]: each entry's (token, Matryoshka group) bag. */
void bag_ids(int64_t n, const int64_t *rows, const int64_t *lat, const int64_t *group_of,
             int64_t G, int64_t *bags) {
    for (int64_t i = 0; i < n; i++) bags[i] = rows[i] * G + group_of[lat[i]];
}

/* fired[lat[e]] = 1 for every entry with vals[e] != 0 (fired zeroed by the caller). */
void mark_fired(int64_t n, const int64_t *lat, const float *vals, uint8_t *fired) {
    for (int64_t e = 0; e < n; e++)
        if (vals[e] != 0.0f) fired[lat[e]] = 1;
}

/* max |exact[i] - approx[i]| over the i with a finite approx (0 when there is none); approx
 * is bf16 (approx16, its bits) or fp32 (approx32), the other one NULL. A NaN difference
 * (exact NaN) makes the result NaN, as torch's amax would. */
float max_abs_diff_finite(int64_t n, const float *exact, const uint16_t *approx16,
                          const float *approx32) {
    float m = 0.0f;
    int nan_seen = 0;
    for (int64_t i = 0; i < n; i++) {
        float a;
        if (approx16) {
            const uint32_t bits = (uint32_t)approx16[i] << 16;
            memcpy(&a, &bits, sizeof a);
        } else {
            a = approx32[i];
        }
        if (!isfinite(a)) continue;
        const float d = fabsf(exact[i] - a);
        nan_seen |= d != d;
        m = d > m ? d : m;
    }
    return nan_seen ? NAN : m;
}

/* W[r] /= (|W[r]| + eps) for rows [r0, r1) of W[*, D], one pass per row (the norm, then the
 * division while the row is in L1): the decoder's renormalisation after each step. */
void normalize_rows(int64_t r0, int64_t r1, int64_t D, float *W, float eps) {
    for (int64_t r = r0; r < r1; r++) {
        float *w = W + r * D;
        const float denom = sqrtf(sum_of_squares(w, D)) + eps;
        for (int64_t d = 0; d < D; d++) w[d] /= denom;
    }
}

/* bf16 bits of f, rounded to nearest even: PyTorch's float -> bfloat16 conversion (a NaN
 * becomes its quiet NaN). */
static inline uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* For rows r in [r0, r1) of src[*, D]: v = src[r] - sub (sub may be NULL: v = src[r]);
 * f32_out[r] = v when f32_out != NULL; out16[r] = [bf16(v), bf16(extra), 0 ... 0], K >= D + 1
 * columns, extra = extra_vals[r] (or extra_const when extra_vals is NULL). The bf16 operands
 * of the selection's product ([x - b_dec, 1] and [W_enc, b_enc], padded) in one pass each
 * instead of a subtraction, a copy and three column fills. */
void rows_to_bf16_padded(int64_t r0, int64_t r1, int64_t D, int64_t K, const float *src,
                         const float *sub, float *f32_out, const float *extra_vals,
                         float extra_const, uint16_t *out16) {
    for (int64_t r = r0; r < r1; r++) {
        const float *s = src + r * D;
        uint16_t *o = out16 + r * K;
        if (sub && f32_out) {
            float *v = f32_out + r * D;
            for (int64_t d = 0; d < D; d++) v[d] = s[d] - sub[d];
            for (int64_t d = 0; d < D; d++) o[d] = bf16_bits(v[d]);
        } else if (sub) {
            for (int64_t d = 0; d < D; d++) o[d] = bf16_bits(s[d] - sub[d]);
        } else {
            if (f32_out) memcpy(f32_out + r * D, s, (size_t)D * sizeof(float));
            for (int64_t d = 0; d < D; d++) o[d] = bf16_bits(s[d]);
        }
        o[D] = bf16_bits(extra_vals ? extra_vals[r] : extra_const);
        for (int64_t d = D + 1; d < K; d++) o[d] = 0;
    }
}

/* Key of bf16 bits that orders like the values (negative ones reversed below the positive). */
static inline uint32_t order_key16(uint16_t u) {
    return (u & 0x8000u) ? (uint32_t)(uint16_t)~u : (uint32_t)(u | 0x8000u);
}

/* The bf16 bits of the m-th largest (1 <= m <= the sample's size) of the values in the
 * blocks x16[j stride, j stride + block) (clipped to n): the candidate pre-filter's cut,
 * taken where the sample lies (a cache miss per block, not per value) by a two-pass radix
 * select on the values' order keys, high byte then low byte, each counted into 4 interleaved
 * 256-bin histograms (in L1; one histogram would serialise on repeated keys). */
uint16_t sample_kth_largest_bf16(int64_t n, const uint16_t *x16, int64_t stride, int64_t block,
                                 int64_t m) {
    uint32_t hist[4][256];
    uint32_t hi = 0, lo = 0;
    for (int pass = 0; pass < 2; pass++) {
        memset(hist, 0, sizeof hist);
        for (int64_t s = 0; s < n; s += stride) {
            const int64_t e = s + block < n ? s + block : n;
            int64_t i = s;
#if defined(__GNUC__) || defined(__clang__)
            /* the blocks are far apart (a cache and TLB miss each): ask for later ones early */
            if (pass == 0 && s + 8 * stride < n) {
                __builtin_prefetch(x16 + s + 8 * stride);
                __builtin_prefetch(x16 + s + 8 * stride + 32);
            }
#endif
            if (pass == 0) {
                for (; i + 4 <= e; i += 4)
                    for (int j = 0; j < 4; j++) hist[j][order_key16(x16[i + j]) >> 8]++;
                for (; i < e; i++) hist[0][order_key16(x16[i]) >> 8]++;
            } else {
                for (; i < e; i++) {
                    const uint32_t key = order_key16(x16[i]);
                    if ((key >> 8) == hi) hist[i & 3][key & 255u]++;
                }
            }
        }
        int64_t seen = 0;
        uint32_t bin = 255;
        for (;; bin--) {
            const int64_t c = (int64_t)hist[0][bin] + hist[1][bin] + hist[2][bin] + hist[3][bin];
            if (seen + c >= m || bin == 0) break;
            seen += c;
        }
        m -= seen; /* the rank within the chosen bin */
        if (pass == 0) hi = bin; else lo = bin;
    }
    const uint32_t key = hi << 8 | lo;
    return (uint16_t)((key & 0x8000u) ? (key & 0x7fffu) : ~key);
}

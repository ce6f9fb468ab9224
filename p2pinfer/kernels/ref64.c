/* Float64 matrix products of the near-tie reference (runtime/reference.py): out = A . W^T in float64, where W
 * is a 4-bit MatMulNBits weight (scale x (code - zero point), exact in float64) or a float32 weight (widened,
 * exact). No float64 copy of W exists: each thread widens a panel of W's output columns into a small buffer
 * that stays in its cache, then multiplies every row of A by it with AVX-512 FMA on 8 doubles.
 *
 * Numerics: every product and sum is a float64 operation (nothing is rounded to fewer bits). With five rows or
 * more (and always for float32 weights) each output element is one sequential chain of fused multiply-adds over
 * k = 0..K-1 from +0 (or from out's value when the call adds into it), a further term continuing the chain; one
 * to four rows of a 4-bit weight (the LM head's row; blocks a multiple of 32, K whole blocks, no second term) sum
 * in 8 lanes (k mod 8), across the lanes as _mm512_reduce_add_pd does, then into out's value if it adds. Either
 * order differs from BLAS's: float64 rounding (~1e-16 relative per element). Each element is computed by the
 * same instruction sequence whatever the thread count or which thread takes its panel;
 * tests/test_ref64_fma_chain.py checks every output bit against an exact emulation of these orders.
 *
 * Where the time goes (Zen 5, 2 threads, a Q4_1 layer's three calls, perf): the 8 x 24 FMA tile ~94 % at 256
 * rows and ~90 % at 128, widening the 4-bit codes ~5 % and ~9 %; 204-209 GFLOP/s, as with float32 weights
 * (~213), against the 272 of two cores' FMA pipes (benchmarks/ref64_products.py).
 *
 * Threads: the caller's thread and threads-1 helpers created for the call (a call is a layer's product over up
 * to 256 positions: milliseconds, against ~20 us to start a thread). Panels of output columns are handed out
 * by an atomic counter, so the threads never wait for each other: a descheduled thread takes fewer panels and
 * the others finish the product (no barrier but the final join). A helper that cannot be created leaves its
 * share to the threads that run. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#include <immintrin.h>
#include "exp64.h"

int p2pinfer_ref64_available(void) { return 1; }

#define MR 8           /* rows of A per micro-tile */
#define NR 24          /* columns of W per micro-tile (3 vectors): MR x 3 = 24 accumulators of 8 lanes */
#define PANEL 96       /* columns a thread takes at a time (4 micro-panels) */
#define KC_TARGET 128  /* k values per block: a widened micro-panel (KC x NR doubles, 24 KB) stays in L1 */
#define MAX_THREADS 16

enum { KIND_Q4 = 0, KIND_F32_NK = 1, KIND_F32_KN = 2 };

typedef struct {
    const double *a;        /* [m, k] row-major, row stride lda */
    int64_t m, k, lda;
    int kind;
    /* KIND_Q4: packed [n, blocks, bs/2] bytes, scales [n, blocks] float32, zp [n, blocks] codes (NULL: 8) */
    const uint8_t *packed;
    const float *scales;
    const uint8_t *zp;
    int64_t blocks, bs;
    /* KIND_F32_NK: w [n, k] (row j is column j of the product); KIND_F32_KN: w [k, n] (MatMul's layout) */
    const float *w;
    int64_t n;
    double *out;            /* [m, n] row-major, row stride ldo */
    int64_t ldo;
    int accumulate;         /* out += the product (else out = it) */
    /* an optional second term added in the same pass: a2 [m, k2] (row stride k2) . w2 [k2, n] float32 (the
     * block-minimum term of a Q4_1 weight: block sums of A times the minimums) */
    const double *a2;
    const float *w2;
    int64_t k2;
    int64_t kc;             /* k values per block (4-bit: a whole number of quantization blocks) */
} job_t;

/* ---- widening: W's values for k0..k0+kc of columns c0..c0+cols into buf[kk][NR] (float64, k-major; columns
 * past cols are zero) ---------------------------------------------------------------------------------------- */

/* columns y0..y1 of the micro-panel, k0..k0+kc, one value at a time or 32 codes a vector pass (the tails of
 * widen_q4, and every column where the block size is not a multiple of 32) */
static void widen_q4_columns(const job_t *j, int64_t c0, int y0, int y1, int64_t k0, int64_t kc, double *buf) {
    const int64_t bs = j->bs, b0 = k0 / bs, b1 = (k0 + kc + bs - 1) / bs;
    double tmp[32];
    for (int y = y0; y < y1; y++) {
        const int64_t col = c0 + y;
        const uint8_t *p = j->packed + col * j->blocks * (bs / 2);
        const float *sc = j->scales + col * j->blocks;
        const uint8_t *zp = j->zp ? j->zp + col * j->blocks : NULL;
        for (int64_t b = b0; b < b1; b++) {
            const double scale = (double)sc[b];
            const double zero = zp ? (double)zp[b] : 8.0;
            const uint8_t *q = p + b * (bs / 2);
            for (int64_t i = 0; i < bs; i += 32) {  /* 32 codes at a time: element 2t the low nibble of byte t */
                const int64_t kk0 = b * bs + i - k0;  /* where tmp[0] goes in the block */
                const int count = bs - i < 32 ? (int)(bs - i) : 32;
                if (count == 32) {
                    const __m512d vs = _mm512_set1_pd(scale), vz = _mm512_set1_pd(zero);
                    const __m128i mask = _mm_set1_epi8(15);
                    __m128i bytes = _mm_loadu_si128((const __m128i *)(q + i / 2));
                    __m128i lo = _mm_and_si128(bytes, mask);
                    __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
                    __m128i v0 = _mm_unpacklo_epi8(lo, hi), v1 = _mm_unpackhi_epi8(lo, hi);
                    __m128i parts[4] = {v0, _mm_srli_si128(v0, 8), v1, _mm_srli_si128(v1, 8)};
                    for (int t = 0; t < 4; t++) {
                        __m512d codes = _mm512_cvtepi32_pd(_mm256_cvtepu8_epi32(parts[t]));
                        _mm512_storeu_pd(tmp + 8 * t, _mm512_mul_pd(_mm512_sub_pd(codes, vz), vs));
                    }
                } else {
                    for (int t = 0; t < count; t++) {
                        const int code = (q[(i + t) / 2] >> (4 * ((i + t) & 1))) & 15;
                        tmp[t] = ((double)code - zero) * scale;
                    }
                }
                for (int t = 0; t < count; t++) {
                    const int64_t kk = kk0 + t;
                    if (kk >= 0 && kk < kc) buf[kk * NR + y] = tmp[t];
                }
            }
        }
    }
}

/* the codes k = 8t..8t+7 of a group of 32 (16 bytes at q; element 2u the low nibble of byte u), as doubles */
static inline __m512d codes8(const uint8_t *q, int t) {
    uint32_t word;
    memcpy(&word, q + 4 * t, sizeof word);
    const __m128i bytes = _mm_cvtsi32_si128((int)word), mask = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    return _mm512_cvtepi32_pd(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
}

/* r[y] (column y's 8 values of k) -> r[kk] (8 columns' values of k = kk): moves only */
static inline __attribute__((always_inline)) void transpose8(__m512d r[8]) {
    __m512d t[8], s[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm512_unpacklo_pd(r[2 * i], r[2 * i + 1]);      /* k 0,2,4,6 of columns 2i, 2i+1 */
        t[2 * i + 1] = _mm512_unpackhi_pd(r[2 * i], r[2 * i + 1]);  /* k 1,3,5,7 */
    }
    for (int odd = 0; odd < 2; odd++) {
        s[4 * odd + 0] = _mm512_shuffle_f64x2(t[odd], t[odd + 2], 0x88);      /* k 0+odd, 4+odd: columns 0-3 */
        s[4 * odd + 1] = _mm512_shuffle_f64x2(t[odd], t[odd + 2], 0xDD);      /* k 2+odd, 6+odd */
        s[4 * odd + 2] = _mm512_shuffle_f64x2(t[odd + 4], t[odd + 6], 0x88);  /* columns 4-7 */
        s[4 * odd + 3] = _mm512_shuffle_f64x2(t[odd + 4], t[odd + 6], 0xDD);
    }
    for (int odd = 0; odd < 2; odd++) {
        r[odd + 0] = _mm512_shuffle_f64x2(s[4 * odd + 0], s[4 * odd + 2], 0x88);
        r[odd + 4] = _mm512_shuffle_f64x2(s[4 * odd + 0], s[4 * odd + 2], 0xDD);
        r[odd + 2] = _mm512_shuffle_f64x2(s[4 * odd + 1], s[4 * odd + 3], 0x88);
        r[odd + 6] = _mm512_shuffle_f64x2(s[4 * odd + 1], s[4 * odd + 3], 0xDD);
    }
}

/* W's values for k0..k0+kc of columns c0..c0+cols into buf[kk][NR] (float64, k-major; the caller zeroes columns
 * past cols). Each value is (code - zero point) x scale in float64, exact whatever the path. Eight columns at a
 * time where the block size is a multiple of 32: each column's 8 values of k in a vector, the 8 vectors
 * transposed in registers into 8 rows of the buffer (the one-value-at-a-time stores of widen_q4_columns were
 * ~14 % of a 256-row product). */
static void widen_q4(const job_t *j, int64_t c0, int cols, int64_t k0, int64_t kc, double *buf) {
    const int64_t bs = j->bs;
    int y0 = 0;
    if (bs % 32 == 0) {
        const int64_t whole = kc / 32 * 32;  /* k0 and kc are whole blocks but the last k block may end early */
        const int64_t bytes_per_col = j->blocks * (bs / 2);
        for (; y0 + 8 <= cols; y0 += 8) {
            for (int64_t kk0 = 0; kk0 < whole; kk0 += 32) {
                const int64_t kabs = k0 + kk0, b = kabs / bs;
                __m512d vs[8], vz[8];
                const uint8_t *q[8];
                for (int y = 0; y < 8; y++) {
                    const int64_t col = c0 + y0 + y;
                    vs[y] = _mm512_set1_pd((double)j->scales[col * j->blocks + b]);
                    vz[y] = _mm512_set1_pd(j->zp ? (double)j->zp[col * j->blocks + b] : 8.0);
                    q[y] = j->packed + col * bytes_per_col + kabs / 2;
                }
                for (int t = 0; t < 4; t++) {
                    __m512d r[8];
                    for (int y = 0; y < 8; y++) r[y] = _mm512_mul_pd(_mm512_sub_pd(codes8(q[y], t), vz[y]), vs[y]);
                    transpose8(r);
                    for (int kk = 0; kk < 8; kk++) _mm512_store_pd(buf + (kk0 + 8 * t + kk) * NR + y0, r[kk]);
                }
            }
            if (whole < kc) widen_q4_columns(j, c0, y0, y0 + 8, k0 + whole, kc - whole, buf + whole * NR);
        }
    }
    if (y0 < cols) widen_q4_columns(j, c0, y0, cols, k0, kc, buf);
}

/* w [k, n] (row stride ldw): a row of W holds the panel's columns side by side (zero past cols) */
static void widen_kn(const float *w, int64_t ldw, int64_t c0, int cols, int64_t k0, int64_t kc, double *buf) {
    const __mmask16 m0 = (__mmask16)(cols >= 16 ? 0xFFFF : (1u << cols) - 1);
    const __mmask8 m1 = (__mmask8)(cols >= 24 ? 0xFF : cols <= 16 ? 0 : (1u << (cols - 16)) - 1);
    for (int64_t kk = 0; kk < kc; kk++) {
        const float *src = w + (k0 + kk) * ldw + c0;
        __m512 lo = _mm512_maskz_loadu_ps(m0, src);
        __m256 hi = _mm256_maskz_loadu_ps(m1, src + 16);
        _mm512_storeu_pd(buf + kk * NR, _mm512_cvtps_pd(_mm512_castps512_ps256(lo)));
        _mm512_storeu_pd(buf + kk * NR + 8, _mm512_cvtps_pd(_mm512_extractf32x8_ps(lo, 1)));
        _mm512_storeu_pd(buf + kk * NR + 16, _mm512_cvtps_pd(hi));
    }
}

static void widen_panel(const job_t *j, int64_t c0, int cols, int64_t k0, int64_t kc, double *buf) {
    if (cols < NR)  /* the missing columns multiply to zero (their results are not stored) */
        for (int64_t kk = 0; kk < kc; kk++)
            for (int y = cols; y < NR; y++) buf[kk * NR + y] = 0.0;
    if (j->kind == KIND_Q4) {
        widen_q4(j, c0, cols, k0, kc, buf);
    } else if (j->kind == KIND_F32_NK) {
        for (int y = 0; y < cols; y++) {
            const float *src = j->w + (c0 + y) * j->k + k0;
            for (int64_t kk = 0; kk < kc; kk++) buf[kk * NR + y] = (double)src[kk];
        }
    } else {
        widen_kn(j->w, j->n, c0, cols, k0, kc, buf);
    }
}

/* ---- the micro-tile: rows r..r+mr of A (k0..k0+kc) times the widened micro-panel, added to out ---------- */

static inline __attribute__((always_inline)) void tile(const job_t *j, const double *buf, int64_t r, int64_t col,
                                                       const double *a, int64_t lda, int from_out, int64_t kc,
                                                       __mmask8 masks[3], const int mr) {
    __m512d acc[MR][3];
    double *o[MR];
    for (int x = 0; x < mr; x++) {
        o[x] = j->out + (r + x) * j->ldo + col;
        for (int y = 0; y < 3; y++)  /* the first k block starts from zero, a later one from the partial sum */
            acc[x][y] = from_out ? _mm512_maskz_loadu_pd(masks[y], o[x] + 8 * y) : _mm512_setzero_pd();
    }
    a += r * lda;
    for (int64_t kk = 0; kk < kc; kk++) {
        const __m512d b0 = _mm512_load_pd(buf + kk * NR), b1 = _mm512_load_pd(buf + kk * NR + 8),
                      b2 = _mm512_load_pd(buf + kk * NR + 16);
        for (int x = 0; x < mr; x++) {
            const __m512d av = _mm512_set1_pd(a[x * lda + kk]);
            acc[x][0] = _mm512_fmadd_pd(av, b0, acc[x][0]);
            acc[x][1] = _mm512_fmadd_pd(av, b1, acc[x][1]);
            acc[x][2] = _mm512_fmadd_pd(av, b2, acc[x][2]);
        }
    }
    for (int x = 0; x < mr; x++)
        for (int y = 0; y < 3; y++) _mm512_mask_storeu_pd(o[x] + 8 * y, masks[y], acc[x][y]);
}

/* rows r.. of A (a, row stride lda, from its column k0) times the widened micro-panel, for every row */
static void rows_times_panel(const job_t *j, const double *buf, int64_t col, const double *a, int64_t lda,
                             int from_out, int64_t kc, __mmask8 masks[3]) {
    for (int64_t r = 0; r < j->m; r += MR) {
        switch (j->m - r < MR ? (int)(j->m - r) : MR) {
        case 8: tile(j, buf, r, col, a, lda, from_out, kc, masks, 8); break;
        case 7: tile(j, buf, r, col, a, lda, from_out, kc, masks, 7); break;
        case 6: tile(j, buf, r, col, a, lda, from_out, kc, masks, 6); break;
        case 5: tile(j, buf, r, col, a, lda, from_out, kc, masks, 5); break;
        case 4: tile(j, buf, r, col, a, lda, from_out, kc, masks, 4); break;
        case 3: tile(j, buf, r, col, a, lda, from_out, kc, masks, 3); break;
        case 2: tile(j, buf, r, col, a, lda, from_out, kc, masks, 2); break;
        default: tile(j, buf, r, col, a, lda, from_out, kc, masks, 1); break;
        }
    }
}

static void panel_product(const job_t *j, double *buf, int64_t col0, int64_t cols) {
    for (int64_t c = 0; c < cols; c += NR) {
        const int nr = (int)(cols - c < NR ? cols - c : NR);
        __mmask8 masks[3];
        for (int y = 0; y < 3; y++) {
            const int left = nr - 8 * y;
            masks[y] = (__mmask8)(left >= 8 ? 0xFF : left <= 0 ? 0 : (1u << left) - 1);
        }
        int from_out = j->accumulate;
        for (int64_t k0 = 0; k0 < j->k; k0 += j->kc, from_out = 1) {
            const int64_t kc = j->k - k0 < j->kc ? j->k - k0 : j->kc;
            widen_panel(j, col0 + c, nr, k0, kc, buf);
            rows_times_panel(j, buf, col0 + c, j->a + k0, j->lda, from_out, kc, masks);
        }
        for (int64_t k0 = 0; k0 < j->k2; k0 += KC_TARGET, from_out = 1) {  /* the second term, if any */
            const int64_t kc = j->k2 - k0 < KC_TARGET ? j->k2 - k0 : KC_TARGET;
            if (nr < NR)
                for (int64_t kk = 0; kk < kc; kk++)
                    for (int y = nr; y < NR; y++) buf[kk * NR + y] = 0.0;
            widen_kn(j->w2, j->n, col0 + c, nr, k0, kc, buf);
            rows_times_panel(j, buf, col0 + c, j->a2 + k0, j->k2, from_out, kc, masks);
        }
    }
}

/* ---- few rows (the LM head's one row): dot products over codes widened in registers, no panel buffer ----- */

#define FEW_ROWS 4
#define FEW_COLS 32    /* columns per item */

static void few_rows_item(void *arg, int64_t item, double *scratch) {
    (void)scratch;
    const job_t *j = (const job_t *)arg;
    const int64_t c1 = (item + 1) * FEW_COLS < j->n ? (item + 1) * FEW_COLS : j->n;
    const int64_t bs = j->bs;
    const __m128i mask = _mm_set1_epi8(15);
    for (int64_t col = item * FEW_COLS; col < c1; col++) {
        const uint8_t *p = j->packed + col * j->blocks * (bs / 2);
        const float *sc = j->scales + col * j->blocks;
        const uint8_t *zp = j->zp ? j->zp + col * j->blocks : NULL;
        __m512d acc[FEW_ROWS];
        for (int x = 0; x < FEW_ROWS; x++) acc[x] = _mm512_setzero_pd();
        for (int64_t b = 0; b < j->blocks; b++) {
            const __m512d vs = _mm512_set1_pd((double)sc[b]), vz = _mm512_set1_pd(zp ? (double)zp[b] : 8.0);
            for (int64_t i = 0; i < bs; i += 32) {
                __m128i bytes = _mm_loadu_si128((const __m128i *)(p + (b * bs + i) / 2));
                __m128i lo = _mm_and_si128(bytes, mask);
                __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
                __m128i v0 = _mm_unpacklo_epi8(lo, hi), v1 = _mm_unpackhi_epi8(lo, hi);
                __m128i parts[4] = {v0, _mm_srli_si128(v0, 8), v1, _mm_srli_si128(v1, 8)};
                for (int t = 0; t < 4; t++) {
                    const __m512d w = _mm512_mul_pd(_mm512_sub_pd(_mm512_cvtepi32_pd(_mm256_cvtepu8_epi32(parts[t])), vz), vs);
                    for (int x = 0; x < j->m; x++)
                        acc[x] = _mm512_fmadd_pd(_mm512_loadu_pd(j->a + x * j->lda + b * bs + i + 8 * t), w, acc[x]);
                }
            }
        }
        for (int x = 0; x < j->m; x++) {
            double *o = j->out + x * j->ldo + col;
            const double dot = _mm512_reduce_add_pd(acc[x]);
            *o = j->accumulate ? *o + dot : dot;
        }
    }
}

/* ---- threads: items handed out by a counter, each thread with its own scratch buffer ------------------------ */

typedef void (*item_fn)(void *arg, int64_t item, double *scratch);

typedef struct {
    item_fn fn;
    void *arg;
    int64_t items;
    size_t scratch_bytes;
    atomic_long next;       /* the next item to take */
    atomic_long done;       /* items computed */
} pool_t;

static void *worker(void *p_) {
    pool_t *p = (pool_t *)p_;
    double *scratch = aligned_alloc(64, p->scratch_bytes);
    if (scratch == NULL) return NULL;  /* takes no item: the other threads do its share */
    for (;;) {
        const int64_t item = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
        if (item >= p->items) break;
        p->fn(p->arg, item, scratch);
        atomic_fetch_add_explicit(&p->done, 1, memory_order_relaxed);
    }
    free(scratch);
    return NULL;
}

/* fn(arg, item, scratch) for every item in [0, items), on `threads` threads (the caller's and helpers created
 * for the call). Returns 0, or -1 where an item was left undone (no thread could allocate its scratch). */
static int parallel(item_fn fn, void *arg, int64_t items, int threads, size_t scratch_bytes) {
    pool_t p;
    p.fn = fn; p.arg = arg; p.items = items;
    p.scratch_bytes = (scratch_bytes + 63) & ~(size_t)63;
    if (p.scratch_bytes == 0) p.scratch_bytes = 64;
    atomic_init(&p.next, 0);
    atomic_init(&p.done, 0);
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > items) threads = (int)items;
    pthread_t helpers[MAX_THREADS];
    int started = 0;
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&helpers[started], NULL, worker, &p) != 0) break;  /* its share goes to the others */
        started++;
    }
    worker(&p);
    for (int t = 0; t < started; t++) pthread_join(helpers[t], NULL);
    return atomic_load(&p.done) == items ? 0 : -1;
}

/* the panel's weights asked for at once (into L2): its micro-panels would otherwise wait for each cache line
 * in turn, the weights coming from memory (a 4-bit layer is read once per pass) */
static void prefetch_panel(const job_t *j, int64_t col0, int64_t cols) {
    if (j->kind == KIND_Q4) {
        const int64_t bytes = j->blocks * (j->bs / 2);
        const char *p = (const char *)(j->packed + col0 * bytes);
        for (int64_t i = 0; i < cols * bytes; i += 64) _mm_prefetch(p + i, _MM_HINT_T1);
        const char *sc = (const char *)(j->scales + col0 * j->blocks);
        for (int64_t i = 0; i < (int64_t)(cols * j->blocks * sizeof(float)); i += 64) _mm_prefetch(sc + i, _MM_HINT_T1);
    } else if (j->kind == KIND_F32_NK) {
        const char *p = (const char *)(j->w + col0 * j->k);
        for (int64_t i = 0; i < (int64_t)(cols * j->k * sizeof(float)); i += 64) _mm_prefetch(p + i, _MM_HINT_T1);
    } else {
        for (int64_t k = 0; k < j->k; k++) {
            const char *p = (const char *)(j->w + k * j->n + col0);
            for (int64_t i = 0; i < (int64_t)(cols * sizeof(float)); i += 64) _mm_prefetch(p + i, _MM_HINT_T1);
        }
    }
}

static void product_item(void *arg, int64_t panel, double *buf) {
    const job_t *j = (const job_t *)arg;
    const int64_t col0 = panel * PANEL, cols = j->n - col0 < PANEL ? j->n - col0 : PANEL;
    prefetch_panel(j, col0, cols);
    panel_product(j, buf, col0, cols);
}

static int run(job_t *j, int threads) {
    return parallel(product_item, j, (j->n + PANEL - 1) / PANEL, threads, (size_t)(j->kc * NR * sizeof(double)));
}

/* out[m, n] (+)= A[m, k] . dequantize(W)^T (+ A2[m, k2] . W2[k2, n]) for a MatMulNBits weight: packed [n, blocks,
 * bs/2] 4-bit codes (element 2t of a block the low nibble of byte t), scales [n, blocks] float32, zp [n, blocks]
 * codes (NULL: 8); accumulate: added to out's values; A2 (row stride k2) and W2 float32 (row stride n): a second
 * term summed in the same accumulators (NULL: none). bs even, k <= blocks x bs. Returns 0, or -1 where no buffer
 * could be allocated (out is then incomplete). */
int p2pinfer_ref64_q4(const double *a, int64_t m, int64_t k, int64_t lda, const uint8_t *packed,
                      const float *scales, const uint8_t *zp, int64_t n, int64_t blocks, int64_t bs, double *out,
                      int64_t ldo, int accumulate, const double *a2, int64_t k2, const float *w2, int threads) {
    if (m <= 0 || n <= 0) return 0;
    job_t j;
    memset(&j, 0, sizeof j);
    j.a = a; j.m = m; j.k = k; j.lda = lda; j.kind = KIND_Q4;
    j.packed = packed; j.scales = scales; j.zp = zp; j.blocks = blocks; j.bs = bs;
    j.n = n; j.out = out; j.ldo = ldo; j.accumulate = accumulate;
    if (a2 != NULL && w2 != NULL && k2 > 0) { j.a2 = a2; j.w2 = w2; j.k2 = k2; }
    j.kc = bs * (KC_TARGET / bs > 1 ? KC_TARGET / bs : 1);
    if (m <= FEW_ROWS && bs % 32 == 0 && k == blocks * bs && j.a2 == NULL)  /* the LM head's row(s) */
        return parallel(few_rows_item, &j, (n + FEW_COLS - 1) / FEW_COLS, threads, 64);
    return run(&j, threads);
}

/* out[m, n] = A[m, k] . W for a float32 W: transposed (w [n, k], Gemm's transB) or not (w [k, n], MatMul). */
int p2pinfer_ref64_f32(const double *a, int64_t m, int64_t k, int64_t lda, const float *w, int transposed,
                       int64_t n, double *out, int64_t ldo, int threads) {
    if (m <= 0 || n <= 0) return 0;
    job_t j;
    memset(&j, 0, sizeof j);
    j.a = a; j.m = m; j.k = k; j.lda = lda; j.kind = transposed ? KIND_F32_NK : KIND_F32_KN;
    j.w = w; j.n = n; j.out = out; j.ldo = ldo;
    j.kc = KC_TARGET;
    return run(&j, threads);
}

/* ---- exp in float64 -------------------------------------------------------------------------- */

/* exp(x) for x <= 0 (or any x below ~709), within ~2 ulp: x = n ln2 + r with ln2 in two parts (r exact to
 * ~1e-20), exp(r) by its Taylor series to degree 13 (|r| <= 0.35: truncation below 1e-17 relative), times 2^n.
 * Below -708.39 (exp(x) < 2^-1022, the smallest normal double) it gives 0 where exp gives a subnormal: an
 * attention probability or a sigmoid that small changes nothing above 1e-307, and subnormal operands make
 * every later multiplication by them ~100x slower. */
static inline __m512d exp_pd(__m512d x) {
    const __mmask8 normal = _mm512_cmp_pd_mask(x, _mm512_set1_pd(-708.39), _CMP_NLT_UQ);  /* NaN: kept */
    x = _mm512_max_pd(_mm512_set1_pd(-709.0), x);  /* the second operand where either is NaN: NaN stays NaN */
    return _mm512_maskz_mov_pd(normal, exp64_clamped(x));
}

/* ---- the MLP's activation: silu(gate) x up ------------------------------------------------------------------ */

typedef struct {
    const double *h;        /* [rows, 2 * half]: gate then up */
    double *out;            /* [rows, half] */
    int64_t rows, half;
} silu_t;

#define SILU_ROWS 16

/* onnx.reference's stable sigmoid (e = exp(-|g|); e / (1 + e) where g <= 0, 1 / (1 + e) where g > 0), then
 * (g x sigmoid) x up: the graph's Sigmoid, Mul and Mul in their order, exp within ~2 ulp */
static void silu_item(void *arg, int64_t item, double *scratch) {
    (void)scratch;
    const silu_t *m = (const silu_t *)arg;
    const int64_t r1 = (item + 1) * SILU_ROWS < m->rows ? (item + 1) * SILU_ROWS : m->rows;
    const __m512d one = _mm512_set1_pd(1.0), zero = _mm512_setzero_pd();
    for (int64_t r = item * SILU_ROWS; r < r1; r++) {
        const double *g = m->h + r * 2 * m->half, *up = g + m->half;
        double *o = m->out + r * m->half;
        for (int64_t i = 0; i < m->half; i += 8) {
            const __mmask8 mask = (__mmask8)(m->half - i >= 8 ? 0xFF : (1u << (m->half - i)) - 1);
            const __m512d x = _mm512_maskz_loadu_pd(mask, g + i);
            const __m512d e = exp_pd(_mm512_sub_pd(zero, _mm512_abs_pd(x)));
            const __mmask8 positive = _mm512_cmp_pd_mask(x, zero, _CMP_GT_OQ);
            const __m512d sig = _mm512_div_pd(_mm512_mask_blend_pd(positive, e, one), _mm512_add_pd(e, one));
            const __m512d y = _mm512_mul_pd(_mm512_mul_pd(x, sig), _mm512_maskz_loadu_pd(mask, up + i));
            _mm512_mask_storeu_pd(o + i, mask, y);
        }
    }
}

int p2pinfer_ref64_silu_mul(const double *h, double *out, int64_t rows, int64_t half, int threads) {
    if (rows <= 0 || half <= 0) return 0;
    silu_t m = {h, out, rows, half};
    return parallel(silu_item, &m, (rows + SILU_ROWS - 1) / SILU_ROWS, threads, 64);
}

/* ---- RMSNorm of a sum (SkipSimplifiedLayerNormalization) ---------------------------------------------------- */

typedef struct {
    const double *x, *skip, *gamma;
    double *normed, *inv_std, *total;
    int64_t rows, d;
    double eps;
} norm_t;

#define NORM_ROWS 8

/* total = x + skip; inv_std = 1 / sqrt(mean(total^2) + eps); normed = (total x inv_std) x gamma */
static void norm_item(void *arg, int64_t item, double *scratch) {
    (void)scratch;
    const norm_t *m = (const norm_t *)arg;
    const int64_t r1 = (item + 1) * NORM_ROWS < m->rows ? (item + 1) * NORM_ROWS : m->rows;
    for (int64_t r = item * NORM_ROWS; r < r1; r++) {
        const double *x = m->x + r * m->d, *skip = m->skip + r * m->d;
        double *total = m->total + r * m->d, *normed = m->normed + r * m->d;
        __m512d sq = _mm512_setzero_pd();
        for (int64_t i = 0; i < m->d; i += 8) {
            const __mmask8 mask = (__mmask8)(m->d - i >= 8 ? 0xFF : (1u << (m->d - i)) - 1);
            const __m512d t = _mm512_add_pd(_mm512_maskz_loadu_pd(mask, x + i), _mm512_maskz_loadu_pd(mask, skip + i));
            _mm512_mask_storeu_pd(total + i, mask, t);
            sq = _mm512_add_pd(sq, _mm512_mul_pd(t, t));
        }
        const double inv = 1.0 / __builtin_sqrt(_mm512_reduce_add_pd(sq) / (double)m->d + m->eps);
        m->inv_std[r] = inv;
        const __m512d vi = _mm512_set1_pd(inv);
        for (int64_t i = 0; i < m->d; i += 8) {
            const __mmask8 mask = (__mmask8)(m->d - i >= 8 ? 0xFF : (1u << (m->d - i)) - 1);
            const __m512d t = _mm512_maskz_loadu_pd(mask, total + i);
            _mm512_mask_storeu_pd(normed + i, mask, _mm512_mul_pd(_mm512_mul_pd(t, vi), _mm512_maskz_loadu_pd(mask, m->gamma + i)));
        }
    }
}

int p2pinfer_ref64_skip_rmsnorm(const double *x, const double *skip, const double *gamma, double *normed,
                                double *inv_std, double *total, int64_t rows, int64_t d, double eps, int threads) {
    if (rows <= 0 || d <= 0) return 0;
    norm_t m = {x, skip, gamma, normed, inv_std, total, rows, d, eps};
    return parallel(norm_item, &m, (rows + NORM_ROWS - 1) / NORM_ROWS, threads, 64);
}

/* ---- causal grouped-query attention in float64 ------------------------------------------------------------ */

#define QB 8   /* query positions of one head per item */

typedef struct {
    const double *q;        /* [s, nh, hd]: rotated queries */
    const double *kt;       /* [nkv, hd, tp]: keys transposed, zero past t */
    const double *v;        /* [nkv, t, hd] */
    double *ctx;            /* [s, nh, hd] */
    int64_t s, nh, nkv, t, tp, hd, past, total;
    double factor;
} attn_t;

static inline __attribute__((always_inline)) void scores_tile(const attn_t *a, const double *q0, int64_t j0,
                                                              const double *kt, double *S, int64_t lds,
                                                              const int qn) {
    __m512d acc[QB][3];
    for (int x = 0; x < qn; x++)
        for (int y = 0; y < 3; y++) acc[x][y] = _mm512_setzero_pd();
    const int64_t qstride = a->nh * a->hd;
    for (int64_t d = 0; d < a->hd; d++) {
        const double *row = kt + d * a->tp + j0;
        const __m512d b0 = _mm512_loadu_pd(row), b1 = _mm512_loadu_pd(row + 8), b2 = _mm512_loadu_pd(row + 16);
        for (int x = 0; x < qn; x++) {
            const __m512d qv = _mm512_set1_pd(q0[x * qstride + d]);
            acc[x][0] = _mm512_fmadd_pd(qv, b0, acc[x][0]);
            acc[x][1] = _mm512_fmadd_pd(qv, b1, acc[x][1]);
            acc[x][2] = _mm512_fmadd_pd(qv, b2, acc[x][2]);
        }
    }
    for (int x = 0; x < qn; x++)
        for (int y = 0; y < 3; y++) _mm512_storeu_pd(S + x * lds + j0 + 8 * y, acc[x][y]);
}

static inline __attribute__((always_inline)) void context_tile(const attn_t *a, const double *S, int64_t lds,
                                                               int64_t seen, const double *v, double *out,
                                                               int64_t ostride, const int qn) {
    for (int64_t d0 = 0; d0 < a->hd; d0 += 64) {
        __m512d acc[3][8];
        for (int x = 0; x < qn; x++)
            for (int y = 0; y < 8; y++) acc[x][y] = _mm512_setzero_pd();
        for (int64_t j = 0; j < seen; j++) {
            const double *row = v + j * a->hd + d0;
            __m512d vv[8];
            for (int y = 0; y < 8; y++) vv[y] = _mm512_loadu_pd(row + 8 * y);
            for (int x = 0; x < qn; x++) {
                const __m512d p = _mm512_set1_pd(S[x * lds + j]);
                for (int y = 0; y < 8; y++) acc[x][y] = _mm512_fmadd_pd(p, vv[y], acc[x][y]);
            }
        }
        for (int x = 0; x < qn; x++)
            for (int y = 0; y < 8; y++) _mm512_storeu_pd(out + x * ostride + d0 + 8 * y, acc[x][y]);
    }
}

static void attention_item(void *arg, int64_t item, double *S) {
    const attn_t *a = (const attn_t *)arg;
    const int64_t blocks = (a->s + QB - 1) / QB;
    const int64_t h = item / blocks, i0 = (item % blocks) * QB;
    const int qn = (int)(a->s - i0 < QB ? a->s - i0 : QB);
    const int64_t g = h / (a->nh / a->nkv);
    int64_t seen = a->past + i0 + qn;  /* keys the block's last query may see */
    if (seen > a->total) seen = a->total;
    if (seen > a->t) seen = a->t;
    const int64_t lds = a->tp;
    const double *q0 = a->q + (i0 * a->nh + h) * a->hd;
    const double *kt = a->kt + g * a->hd * a->tp;
    for (int64_t j0 = 0; j0 < seen; j0 += 24) {
        switch (qn) {
        case 8: scores_tile(a, q0, j0, kt, S, lds, 8); break;
        case 7: scores_tile(a, q0, j0, kt, S, lds, 7); break;
        case 6: scores_tile(a, q0, j0, kt, S, lds, 6); break;
        case 5: scores_tile(a, q0, j0, kt, S, lds, 5); break;
        case 4: scores_tile(a, q0, j0, kt, S, lds, 4); break;
        case 3: scores_tile(a, q0, j0, kt, S, lds, 3); break;
        case 2: scores_tile(a, q0, j0, kt, S, lds, 2); break;
        default: scores_tile(a, q0, j0, kt, S, lds, 1); break;
        }
    }
    /* each query's softmax over the keys it may see; the others get probability 0 exactly */
    const __m512d factor = _mm512_set1_pd(a->factor);
    for (int x = 0; x < qn; x++) {
        double *row = S + x * lds;
        int64_t visible = a->past + i0 + x + 1;
        if (visible > a->total) visible = a->total;
        if (visible > seen) visible = seen;
        __m512d mx = _mm512_set1_pd(-__builtin_inf());
        for (int64_t j = 0; j < visible; j += 8) {
            const __mmask8 m = (__mmask8)(visible - j >= 8 ? 0xFF : (1u << (visible - j)) - 1);
            const __m512d sc = _mm512_mul_pd(_mm512_loadu_pd(row + j), factor);
            _mm512_storeu_pd(row + j, sc);
            mx = _mm512_mask_max_pd(mx, m, mx, sc);
        }
        const __m512d top = _mm512_set1_pd(_mm512_reduce_max_pd(mx));
        __m512d sum = _mm512_setzero_pd();
        for (int64_t j = 0; j < visible; j += 8) {
            const __mmask8 m = (__mmask8)(visible - j >= 8 ? 0xFF : (1u << (visible - j)) - 1);
            const __m512d e = _mm512_maskz_mov_pd(m, exp_pd(_mm512_sub_pd(_mm512_loadu_pd(row + j), top)));
            _mm512_storeu_pd(row + j, e);
            sum = _mm512_add_pd(sum, e);
        }
        const __m512d total = _mm512_set1_pd(_mm512_reduce_add_pd(sum));
        for (int64_t j = 0; j < visible; j += 8) _mm512_storeu_pd(row + j, _mm512_div_pd(_mm512_loadu_pd(row + j), total));
        for (int64_t j = visible; j < seen; j++) row[j] = 0.0;  /* (written above past `visible` too) */
    }
    const double *v = a->v + g * a->t * a->hd;
    const int64_t ostride = a->nh * a->hd;
    double *out = a->ctx + (i0 * a->nh + h) * a->hd;
    for (int x = 0; x < qn; x += 3) {
        const int n = qn - x < 3 ? qn - x : 3;
        if (n == 3) context_tile(a, S + x * lds, lds, seen, v, out + x * ostride, ostride, 3);
        else if (n == 2) context_tile(a, S + x * lds, lds, seen, v, out + x * ostride, ostride, 2);
        else context_tile(a, S + x * lds, lds, seen, v, out + x * ostride, ostride, 1);
    }
}

/* ctx[s, nh, hd] = softmax(factor . q k^T, causal) v for one sequence: q [s, nh, hd] (rotated), k and v
 * [nkv, t, hd] (past then new), query i at position past + i sees keys j <= past + i and j < total. hd a
 * multiple of 64, nh a multiple of nkv. Returns 0, or -1 (out of memory: ctx incomplete). */
int p2pinfer_ref64_attention(const double *q, const double *k, const double *v, double *ctx, int64_t s,
                             int64_t nh, int64_t nkv, int64_t t, int64_t hd, int64_t past, int64_t total,
                             double factor, int threads) {
    if (s <= 0 || nh <= 0) return 0;
    if (hd % 64 || nkv <= 0 || nh % nkv) return -1;
    attn_t a;
    a.q = q; a.v = v; a.ctx = ctx; a.s = s; a.nh = nh; a.nkv = nkv; a.t = t; a.hd = hd; a.past = past;
    a.total = total; a.factor = factor;
    a.tp = (t + 23) / 24 * 24;
    double *kt = aligned_alloc(64, (size_t)((nkv * hd * a.tp * sizeof(double) + 63) & ~(size_t)63));
    if (kt == NULL) return -1;
    for (int64_t g = 0; g < nkv; g++)
        for (int64_t d = 0; d < hd; d++) {
            double *row = kt + (g * hd + d) * a.tp;
            for (int64_t j = 0; j < t; j++) row[j] = k[(g * t + j) * hd + d];
            for (int64_t j = t; j < a.tp; j++) row[j] = 0.0;
        }
    a.kt = kt;
    const int rc = parallel(attention_item, &a, nh * ((s + QB - 1) / QB), threads, (size_t)(QB * a.tp * sizeof(double)));
    free(kt);
    return rc;
}

/* The whole of GroupQueryAttention for one sequence, from the packed projections: packed [s, (nh + 2 nkv) hd]
 * (queries, keys, values of each new position), past_k/past_v [nkv, past, hd] (NULL where past is 0), cos/sin
 * float32 [>= past + s, hd / 2] (rotate-half RoPE at positions past..past+s-1); writes present_k/present_v
 * [nkv, past + s, hd] (the past, then the new rotated keys and the values) and ctx [s, nh hd]. */
int p2pinfer_ref64_gqa(const double *packed, const double *past_k, const double *past_v, const float *cosc,
                       const float *sinc, double *present_k, double *present_v, double *ctx, int64_t s, int64_t nh,
                       int64_t nkv, int64_t hd, int64_t past, int64_t total, double factor, int threads) {
    if (s <= 0 || nh <= 0) return 0;
    if (hd % 64 || nkv <= 0 || nh % nkv) return -1;
    const int64_t t = past + s, half = hd / 2, width = (nh + 2 * nkv) * hd;
    double *q = aligned_alloc(64, (size_t)((s * nh * hd * sizeof(double) + 63) & ~(size_t)63));
    if (q == NULL) return -1;
    for (int64_t g = 0; g < nkv; g++) {
        if (past) {
            memcpy(present_k + g * t * hd, past_k + g * past * hd, (size_t)(past * hd) * sizeof(double));
            memcpy(present_v + g * t * hd, past_v + g * past * hd, (size_t)(past * hd) * sizeof(double));
        }
    }
    for (int64_t i = 0; i < s; i++) {
        const double *row = packed + i * width;
        const float *c = cosc + (past + i) * half, *sn = sinc + (past + i) * half;
        for (int64_t h = 0; h < nh + nkv; h++) {  /* queries, then keys: x1 c - x2 s | x2 c + x1 s */
            const double *x = row + h * hd;
            double *o = h < nh ? q + (i * nh + h) * hd : present_k + ((h - nh) * t + past + i) * hd;
            for (int64_t d = 0; d < half; d++) {
                const double cd = (double)c[d], sd = (double)sn[d];
                o[d] = x[d] * cd - x[d + half] * sd;
                o[d + half] = x[d + half] * cd + x[d] * sd;
            }
        }
        for (int64_t g = 0; g < nkv; g++)
            memcpy(present_v + (g * t + past + i) * hd, row + (nh + nkv + g) * hd, (size_t)hd * sizeof(double));
    }
    const int rc = p2pinfer_ref64_attention(q, present_k, present_v, ctx, s, nh, nkv, t, hd, past, total, factor,
                                            threads);
    free(q);
    return rc;
}

#else  /* built for a CPU without AVX-512: the reference multiplies with numpy (runtime/reference.py) */
int p2pinfer_ref64_available(void) { return 0; }
#endif

/* Float64 matrix products of the near-tie reference (runtime/reference.py): out = A . W^T in float64, where W
 * is a 4-bit MatMulNBits weight (scale x (code - zero point), exact in float64) or a float32 weight (widened,
 * exact). No float64 copy of W exists: each thread widens a panel of W's output columns into a small buffer
 * that stays in its cache, then multiplies every row of A by it with AVX-512 FMA on 8 doubles.
 *
 * Numerics: every product and sum is a float64 operation (nothing is rounded to fewer bits); each output
 * element is one dot product over the whole of K, summed in 8 lanes then across the lanes in a fixed order.
 * That order differs from BLAS's: float64 rounding (~1e-16 relative per element). Each element is computed by
 * the same instruction sequence whatever the thread count or which thread takes its panel.
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
    int64_t kc;             /* k values per block (4-bit: a whole number of quantization blocks) */
    atomic_long next;       /* the next panel to take */
    atomic_long done;       /* panels computed */
    int64_t panels;
} job_t;

/* ---- widening: W's values for k0..k0+kc of columns c0..c0+cols into buf[kk][NR] (float64, k-major; columns
 * past cols are zero) ---------------------------------------------------------------------------------------- */

static void widen_q4(const job_t *j, int64_t c0, int cols, int64_t k0, int64_t kc, double *buf) {
    const int64_t bs = j->bs, b0 = k0 / bs, b1 = (k0 + kc + bs - 1) / bs;
    double tmp[32];
    for (int y = 0; y < cols; y++) {
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
    } else {  /* [k, n]: a row of W holds this panel's columns side by side */
        const __mmask16 m0 = (__mmask16)(cols >= 16 ? 0xFFFF : (1u << cols) - 1);
        const __mmask8 m1 = (__mmask8)(cols >= 24 ? 0xFF : cols <= 16 ? 0 : (1u << (cols - 16)) - 1);
        for (int64_t kk = 0; kk < kc; kk++) {
            const float *src = j->w + (k0 + kk) * j->n + c0;
            __m512 lo = _mm512_maskz_loadu_ps(m0, src);
            __m256 hi = _mm256_maskz_loadu_ps(m1, src + 16);
            _mm512_storeu_pd(buf + kk * NR, _mm512_cvtps_pd(_mm512_castps512_ps256(lo)));
            _mm512_storeu_pd(buf + kk * NR + 8, _mm512_cvtps_pd(_mm512_extractf32x8_ps(lo, 1)));
            _mm512_storeu_pd(buf + kk * NR + 16, _mm512_cvtps_pd(hi));
        }
    }
}

/* ---- the micro-tile: rows r..r+mr of A (k0..k0+kc) times the widened micro-panel, added to out ---------- */

static inline __attribute__((always_inline)) void tile(const job_t *j, const double *buf, int64_t r, int64_t col,
                                                       int64_t k0, int64_t kc, __mmask8 masks[3], const int mr) {
    __m512d acc[MR][3];
    double *o[MR];
    for (int x = 0; x < mr; x++) {
        o[x] = j->out + (r + x) * j->ldo + col;
        for (int y = 0; y < 3; y++)  /* the first k block starts from zero, a later one from the partial sum */
            acc[x][y] = k0 ? _mm512_maskz_loadu_pd(masks[y], o[x] + 8 * y) : _mm512_setzero_pd();
    }
    const double *a = j->a + r * j->lda + k0;
    const int64_t lda = j->lda;
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

static void panel_product(const job_t *j, double *buf, int64_t col0, int64_t cols) {
    for (int64_t k0 = 0; k0 < j->k; k0 += j->kc) {
        const int64_t kc = j->k - k0 < j->kc ? j->k - k0 : j->kc;
        for (int64_t c = 0; c < cols; c += NR) {
            const int nr = (int)(cols - c < NR ? cols - c : NR);
            __mmask8 masks[3];
            for (int y = 0; y < 3; y++) {
                const int left = nr - 8 * y;
                masks[y] = (__mmask8)(left >= 8 ? 0xFF : left <= 0 ? 0 : (1u << left) - 1);
            }
            widen_panel(j, col0 + c, nr, k0, kc, buf);
            for (int64_t r = 0; r < j->m; r += MR) {
                switch (j->m - r < MR ? (int)(j->m - r) : MR) {
                case 8: tile(j, buf, r, col0 + c, k0, kc, masks, 8); break;
                case 7: tile(j, buf, r, col0 + c, k0, kc, masks, 7); break;
                case 6: tile(j, buf, r, col0 + c, k0, kc, masks, 6); break;
                case 5: tile(j, buf, r, col0 + c, k0, kc, masks, 5); break;
                case 4: tile(j, buf, r, col0 + c, k0, kc, masks, 4); break;
                case 3: tile(j, buf, r, col0 + c, k0, kc, masks, 3); break;
                case 2: tile(j, buf, r, col0 + c, k0, kc, masks, 2); break;
                default: tile(j, buf, r, col0 + c, k0, kc, masks, 1); break;
                }
            }
        }
    }
}

static void *worker(void *arg) {
    job_t *j = (job_t *)arg;
    double *buf = aligned_alloc(64, (size_t)(j->kc * NR * sizeof(double)));
    if (buf == NULL) return (void *)1;  /* takes no panel: the other threads do its share */
    for (;;) {
        const int64_t p = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (p >= j->panels) break;
        const int64_t col0 = p * PANEL, cols = j->n - col0 < PANEL ? j->n - col0 : PANEL;
        panel_product(j, buf, col0, cols);
        atomic_fetch_add_explicit(&j->done, 1, memory_order_relaxed);
    }
    free(buf);
    return NULL;
}

static int run(job_t *j, int threads) {
    j->panels = (j->n + PANEL - 1) / PANEL;
    atomic_store(&j->next, 0);
    atomic_store(&j->done, 0);
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > j->panels) threads = (int)j->panels;
    pthread_t helpers[MAX_THREADS];
    int started = 0;
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&helpers[started], NULL, worker, j) != 0) break;
        started++;
    }
    worker(j);
    for (int t = 0; t < started; t++) pthread_join(helpers[t], NULL);
    return atomic_load(&j->done) == j->panels ? 0 : -1;  /* short only where no thread had a buffer */
}

/* out[m, n] = A[m, k] . dequantize(W)^T for a MatMulNBits weight: packed [n, blocks, bs/2] 4-bit codes (element
 * 2t of a block the low nibble of byte t), scales [n, blocks] float32, zp [n, blocks] codes (NULL: 8). bs even,
 * k <= blocks x bs. Returns 0, or -1 where no buffer could be allocated (out is then incomplete). */
int p2pinfer_ref64_q4(const double *a, int64_t m, int64_t k, int64_t lda, const uint8_t *packed,
                      const float *scales, const uint8_t *zp, int64_t n, int64_t blocks, int64_t bs, double *out,
                      int64_t ldo, int threads) {
    if (m <= 0 || n <= 0) return 0;
    job_t j;
    memset(&j, 0, sizeof j);
    j.a = a; j.m = m; j.k = k; j.lda = lda; j.kind = KIND_Q4;
    j.packed = packed; j.scales = scales; j.zp = zp; j.blocks = blocks; j.bs = bs;
    j.n = n; j.out = out; j.ldo = ldo;
    j.kc = bs * (KC_TARGET / bs > 1 ? KC_TARGET / bs : 1);
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

#else  /* built for a CPU without AVX-512: the reference multiplies with numpy (runtime/reference.py) */
int p2pinfer_ref64_available(void) { return 0; }
#endif

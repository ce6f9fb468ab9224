/* Per-row statistics of a verification pass's float32 logits, for the check (runtime/row_stats.py), exported
 * with C linkage from the kernel library (included from qmatmul.c; not an onnxruntime op).
 *
 * Why: the check reads every logit of every checked row: the log-softmax normaliser, then the best token, the
 * runner-up and the best unclaimed token. In numpy that is one float64 copy, exp and sum per row for the first,
 * and three argmax passes (two over masked copies of the rows) for the others: ~10 % of a 512-token verification.
 * Here the normaliser is one pass over the float32 row and the three tokens one pass each, in registers.
 *
 * Semantics (tests/test_row_stats.py compares them with numpy's on random rows, ties and infinities included):
 *   p2pinfer_row_scan: numpy's argmax (the lowest index of the largest value) of the row with the excluded
 *     indices set to -inf, that value, and the largest value of that row once its argmax is also set to -inf;
 *     a row whose every value (left) is -inf gives index 0, as numpy's argmax does. Rows holding a NaN are
 *     flagged and left to numpy (whose NaN rules these comparisons do not follow).
 *   p2pinfer_row_log_norm: the row maximum m (exact in float64) and log(sum(exp(x - m))) in float64: each
 *     exp within 1 ulp (exp_nonpositive), summed in 16 float64 lanes. Not numpy's bits (numpy's exp and
 *     pairwise sum are other float64 roundings of the same value, within a few 1e-16 relative); fingerprints
 *     read log-probs through the same numbers on both paths (sampling.log_softmax uses them too).
 *     Rows holding a NaN or +inf, or only -inf, are flagged and left to numpy.
 * Without AVX-512 both return -1 (the caller runs numpy).
 */
#include <math.h>

#if defined(__AVX512F__)
#include "exp64.h"
#define ROWSTATS_MAX_EXCLUDED 64

/* one row; 1 when it holds a NaN */
static int scan_row(const float *x, int64_t n, const int64_t *ex, int64_t k, int64_t *id, float *best, float *second) {
    int64_t sorted[ROWSTATS_MAX_EXCLUDED];
    int64_t m = 0;
    for (int64_t j = 0; j < k; j++) {  /* insertion sort of the excluded indices in range (few) */
        int64_t v = ex[j];
        if (v < 0 || v >= n) continue;
        int64_t p = m++;
        while (p > 0 && sorted[p - 1] > v) { sorted[p] = sorted[p - 1]; p--; }
        sorted[p] = v;
    }
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 b = ninf, s = ninf;  /* per lane: the best value (first index on ties) and the largest of the rest */
    __m512i bi = _mm512_setzero_si512();
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    __mmask16 nan = 0;
    int64_t p = 0;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 live = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        __m512 v = _mm512_mask_loadu_ps(ninf, live, x + i);
        nan |= _mm512_mask_cmp_ps_mask(live, v, v, _CMP_UNORD_Q);
        for (; p < m && sorted[p] < i + 16; p++) v = _mm512_mask_mov_ps(v, (__mmask16)(1u << (sorted[p] - i)), ninf);
        __mmask16 gt = _mm512_cmp_ps_mask(v, b, _CMP_GT_OQ);  /* strictly larger: the earlier index stays on ties */
        s = _mm512_max_ps(s, _mm512_mask_mov_ps(v, gt, b));     /* the smaller of the pair joins the rest */
        b = _mm512_mask_mov_ps(b, gt, v);
        bi = _mm512_mask_mov_epi32(bi, gt, idx);
        idx = _mm512_add_epi32(idx, step);
    }
    if (nan) return 1;
    float bv[16], sv[16];
    int32_t biv[16];
    _mm512_storeu_ps(bv, b);
    _mm512_storeu_ps(sv, s);
    _mm512_storeu_si512(biv, bi);
    int lane = 0;
    for (int l = 1; l < 16; l++)
        if (bv[l] > bv[lane] || (bv[l] == bv[lane] && biv[l] < biv[lane])) lane = l;
    float sec = sv[lane];  /* the rest: the winning lane's others and every other lane's best */
    for (int l = 0; l < 16; l++)
        if (l != lane && bv[l] > sec) sec = bv[l];
    *best = bv[lane];
    *second = sec;
    *id = bv[lane] == -INFINITY ? 0 : biv[lane];  /* every value -inf: numpy's argmax is 0 */
    return 0;
}

/* exp(t) of 8 doubles t <= 0 (-inf included; exp64.h): 0 below -745.2, as exp */
static inline __m512d exp_nonpositive(__m512d t) {
    return exp64_clamped(_mm512_max_pd(t, _mm512_set1_pd(-746.0)));
}

/* one row; 1 when it holds a NaN or +inf or only -inf */
static int log_norm_row(const float *row, int64_t n, double *shift, double *log_norm) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY), pinf = _mm512_set1_ps(INFINITY);
    __m512 mx = ninf;
    __mmask16 bad = 0;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 live = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        __m512 v = _mm512_mask_loadu_ps(ninf, live, row + i);
        bad |= _mm512_mask_cmp_ps_mask(live, v, v, _CMP_UNORD_Q) | _mm512_mask_cmp_ps_mask(live, v, pinf, _CMP_EQ_OQ);
        mx = _mm512_max_ps(mx, v);
    }
    float m = _mm512_reduce_max_ps(mx);
    if (bad || m == -INFINITY) return 1;
    const __m512d md = _mm512_set1_pd((double)m);
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm512_add_pd(s0, exp_nonpositive(_mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(row + i)), md)));
        s1 = _mm512_add_pd(s1, exp_nonpositive(_mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(row + i + 8)), md)));
    }
    if (i < n) {  /* the last < 16 values: -inf lanes add exp(-inf) = 0 */
        __mmask16 live = (__mmask16)((1u << (n - i)) - 1u);
        __m512 v = _mm512_mask_loadu_ps(ninf, live, row + i);
        s0 = _mm512_add_pd(s0, exp_nonpositive(_mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), md)));
        s1 = _mm512_add_pd(s1, exp_nonpositive(_mm512_sub_pd(
            _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))), md)));
    }
    *shift = (double)m;
    *log_norm = log(_mm512_reduce_add_pd(_mm512_add_pd(s0, s1)));
    return 0;
}
#endif

/* rows [0, rows) of x (row r at x + r * stride): ids, best and second per row; flagged[r] = 1 where row r holds a
   NaN (outputs unset). exclude: [rows, k] indices (k <= 64; those outside [0, n) are ignored) or NULL. Returns
   the number of flagged rows, or -1 without AVX-512 or with k > 64 (nothing written). */
int64_t p2pinfer_row_scan(const float *x, int64_t rows, int64_t n, int64_t stride, const int64_t *exclude, int64_t k,
                          int64_t *ids, float *best, float *second, uint8_t *flagged) {
#if defined(__AVX512F__)
    if (k < 0 || k > ROWSTATS_MAX_EXCLUDED || n <= 0 || rows < 0) return -1;
    int64_t count = 0;
    for (int64_t r = 0; r < rows; r++) {
        flagged[r] = (uint8_t)scan_row(x + r * stride, n, exclude ? exclude + r * k : NULL, exclude ? k : 0,
                                       ids + r, best + r, second + r);
        count += flagged[r];
    }
    return count;
#else
    (void)x; (void)rows; (void)n; (void)stride; (void)exclude; (void)k; (void)ids; (void)best; (void)second; (void)flagged;
    return -1;
#endif
}

/* rows [0, rows): shift (the row maximum) and log_norm (log(sum(exp(x - shift)))) per row; flagged[r] = 1 where
   row r holds a NaN or +inf, or only -inf (outputs unset). Returns the number of flagged rows, or -1 without
   AVX-512 (nothing written). */
int64_t p2pinfer_row_log_norm(const float *x, int64_t rows, int64_t n, int64_t stride, double *shift, double *log_norm,
                              uint8_t *flagged) {
#if defined(__AVX512F__)
    if (n <= 0 || rows < 0) return -1;
    int64_t count = 0;
    for (int64_t r = 0; r < rows; r++) {
        flagged[r] = (uint8_t)log_norm_row(x + r * stride, n, shift + r, log_norm + r);
        count += flagged[r];
    }
    return count;
#else
    (void)x; (void)rows; (void)n; (void)stride; (void)shift; (void)log_norm; (void)flagged;
    return -1;
#endif
}

/* exp of 8 doubles, the one polynomial both float64 users share: the check's log-softmax normaliser (rowstats.c,
 * in the kernel library) and the near-tie reference's softmax and sigmoid (ref64.c, its own library). Each
 * clamps its argument and handles the ends its own way, then calls this.
 *
 * x = n ln2 + r by Cody-Waite (ln2 in two parts: r exact to ~1e-20, |r| <= ln2 / 2), exp(r) by its degree-13
 * Taylor polynomial (truncation below 2^-57 relative), times 2^n (scalef). Within 1 ulp of libm's exp over
 * [-745, 0] (2 million random arguments). Needs AVX-512F; x must be above -750 (the callers clamp). */
#ifndef P2PINFER_EXP64_H
#define P2PINFER_EXP64_H
#include <immintrin.h>

static inline __m512d exp64_clamped(__m512d x) {
    const __m512d n = _mm512_roundscale_pd(_mm512_mul_pd(x, _mm512_set1_pd(1.4426950408889634074)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(6.93147180369123816490e-01), x);
    r = _mm512_fnmadd_pd(n, _mm512_set1_pd(1.90821492927058770002e-10), r);
    static const double c[14] = {1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040,
                                 1.0 / 40320, 1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600,
                                 1.0 / 6227020800.0};
    __m512d p = _mm512_set1_pd(c[13]);
    for (int t = 12; t >= 0; t--) p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(c[t]));
    return _mm512_scalef_pd(p, n);
}
#endif

/* The integer one-row path (INT_DOT) for CPUs without AVX-512 VNNI: AVX2 + FMA + F16C (x86-64-v3: Intel since
 * Haswell, AMD since Excavator / Zen; also AVX-512 CPUs without VNNI), with AVX-VNNI (256-bit vpdpbusd: Intel
 * Alder Lake and later cores without AVX-512) where the build has it. #included by qmatmul.c in place of its
 * AVX-512 VNNI version; the same job_t and helpers.
 *
 * It is the SAME algorithm as the AVX-512 VNNI version, not an approximation of it: the same activation
 * quantization (per block the power of two 2^e, x_int = round-to-nearest(x * 2^e), three signed-byte limbs),
 * the same exact int32 per-lane sums, the same float32 operations on the same 16 lanes in the same order (a zmm
 * lane here is lane i of the low ymm or lane i - 8 of the high one), the same final reduction tree
 * (GCC's _mm512_reduce_add_ps: lane i + lane i+8, then + 4, then + 2, then + 1) and the same block-minimum
 * order. So every output row is bit-identical to the AVX-512 VNNI path's (tests/test_decode_kernel.py builds
 * both on one machine and compares them bit for bit), and it is not a new numeric variant.
 *
 * The per-lane integer sum of four code x limb products: AVX-VNNI's vpdpbusd as on AVX-512; on plain AVX2,
 * vpmaddubsw (unsigned codes 0..15 x signed limbs -128..127 -> int16 pairs, |sum| <= 2 * 15 * 128 = 3,840:
 * never saturates) and vpmaddwd by ones (-> the int32 sum of the four): the same integer, exactly.
 *
 * Zmm lane layout (16 lanes, per pair of blocks b, b+1): lanes 0-3 the even elements of b (4 per lane), 4-7 the
 * even elements of b+1, 8-11 the odd elements of b, 12-15 the odd elements of b+1. Here: the low ymm holds lanes
 * 0-7 (the low nibbles of the 32 code bytes of b and b+1, which are contiguous), the high ymm lanes 8-15 (their
 * high nibbles). */
#define INT_DOT 1

/* the 16 even- (odd = 0) or odd-index (odd = 1) int32 values of a block's 32, in order, as two ymm */
static inline void deinterleave(const __m256i xi[4], int odd, __m256i *lo, __m256i *hi) {
    __m256 a = _mm256_castsi256_ps(xi[0]), b = _mm256_castsi256_ps(xi[1]);
    __m256 c = _mm256_castsi256_ps(xi[2]), d = _mm256_castsi256_ps(xi[3]);
    /* per 128-bit lane: a0 a2 b0 b2 | a4 a6 b4 b6, then the 64-bit quarters put in order */
    __m256 l = odd ? _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)) : _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    __m256 h = odd ? _mm256_shuffle_ps(c, d, _MM_SHUFFLE(3, 1, 3, 1)) : _mm256_shuffle_ps(c, d, _MM_SHUFFLE(2, 0, 2, 0));
    *lo = _mm256_permute4x64_epi64(_mm256_castps_si256(l), _MM_SHUFFLE(3, 1, 2, 0));
    *hi = _mm256_permute4x64_epi64(_mm256_castps_si256(h), _MM_SHUFFLE(3, 1, 2, 0));
}

/* 16 int32 values in -128..127 (two ymm) -> 16 bytes, in order */
static inline __m128i narrow16(__m256i lo, __m256i hi) {
    __m256i w = _mm256_packs_epi32(lo, hi);  /* lo0-3 hi0-3 | lo4-7 hi4-7 (int16) */
    __m256i bytes = _mm256_packs_epi16(w, w);  /* dwords: lo0-3, hi0-3, (again) | lo4-7, hi4-7, (again) */
    return _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 0, 4, 1, 5)));
}

/* rows m of x [M, K] -> limbs, 2^-e per lane, zp_t * lane sums (for the terms whose zero point is not 0);
   the AVX-512 version's values exactly (all integer work, and the one float product x * 2^e, the same) */
static void prepare_int_rows(job_t *j, const float *x, int8_t *limbs, float *invc, int32_t *zpx0, int32_t *zpx1) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int m = 0; m < j->M; m++)
        for (int p = 0; p < j->pairs; p++) {
            int8_t *dst = limbs + ((size_t)m * j->pairs + p) * LIMBS * 64;
            float *ic = invc + ((size_t)m * j->pairs + p) * 16;
            int32_t sums[16] = {0};  /* lanes: [b even, b+1 even, b odd, b+1 odd] x 4 */
            for (int h = 0; h < 2; h++) {  /* block b = 2p + h */
                int b = 2 * p + h;
                if (b >= j->nb) {
                    for (int k = 0; k < LIMBS; k++) {
                        memset(dst + k * 64 + 16 * h, 0, 16);
                        memset(dst + k * 64 + 32 + 16 * h, 0, 16);
                    }
                    for (int u = 0; u < 4; u++) ic[4 * h + u] = ic[8 + 4 * h + u] = 0.f;
                    continue;
                }
                const float *src = x + (size_t)m * j->K + 32 * b;
                __m256 v[4];
                for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(src + 8 * i);
                __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], magnitude), _mm256_and_ps(v[1], magnitude)),
                                          _mm256_max_ps(_mm256_and_ps(v[2], magnitude), _mm256_and_ps(v[3], magnitude)));
                __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
                m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
                float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
                /* maxps drops a NaN operand: look for one separately */
                int nan = _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(v[0], v[1], _CMP_UNORD_Q),
                                                          _mm256_cmp_ps(v[2], v[3], _CMP_UNORD_Q)));
                float inv;
                __m256 scale;
                if (nan || !(amax <= 3.0e38f)) {  /* inf or NaN in the block: the output is NaN, never a plausible number */
                    inv = __builtin_nanf("");
                    scale = _mm256_setzero_ps();
                } else {
                    int e = block_exponent(amax);
                    inv = pow2i(-e);
                    scale = _mm256_set1_ps(pow2i(e));
                }
                __m256i xi[4];
                for (int i = 0; i < 4; i++) xi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], scale));  /* exact product, round to nearest */
                /* even elements (0, 2, ..) then odd ones (1, 3, ..): the order of the low and high nibbles */
                for (int odd = 0; odd < 2; odd++) {
                    __m256i lo, hi;
                    deinterleave(xi, odd, &lo, &hi);
                    /* lane sums of 4 consecutive values (integers: any order gives the same sum) */
                    __m256i s = _mm256_hadd_epi32(lo, hi);
                    s = _mm256_hadd_epi32(s, s);  /* g0 g2 g0 g2 | g1 g3 g1 g3 */
                    int32_t g[8];
                    _mm256_storeu_si256((__m256i *)g, s);
                    sums[8 * odd + 4 * h + 0] = g[0]; sums[8 * odd + 4 * h + 1] = g[4];
                    sums[8 * odd + 4 * h + 2] = g[1]; sums[8 * odd + 4 * h + 3] = g[5];
                    for (int k = 0; k < LIMBS; k++) {
                        __m256i al = _mm256_srai_epi32(_mm256_slli_epi32(lo, 24), 24);  /* signed low byte */
                        __m256i ah = _mm256_srai_epi32(_mm256_slli_epi32(hi, 24), 24);
                        _mm_storeu_si128((__m128i *)(dst + k * 64 + 32 * odd + 16 * h), narrow16(al, ah));
                        lo = _mm256_srai_epi32(_mm256_sub_epi32(lo, al), 8);
                        hi = _mm256_srai_epi32(_mm256_sub_epi32(hi, ah), 8);
                    }
                    for (int u = 0; u < 4; u++) ic[8 * odd + 4 * h + u] = inv;
                }
            }
            int32_t *z[2] = {zpx0, zpx1};
            for (int t = 0; t < j->terms; t++)
                if (z[t])
                    for (int u = 0; u < 16; u++)  /* wrapping like vpmulld: a NaN block's garbage stays harmless */
                        z[t][((size_t)m * j->pairs + p) * 16 + u] = (int32_t)((uint32_t)sums[u] * (uint32_t)j->zp[t]);
        }
}

/* the int32 sum of the four products codes x limbs per lane, added to acc (vpdpbusd's value) */
static inline __attribute__((always_inline)) __m256i dot4(__m256i acc, __m256i codes, __m256i limb) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, codes, limb);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, limb), _mm256_set1_epi16(1)));
#endif
}

/* two float16 values (one when !both; the other lane 0) as float32 lanes 0 and 1 */
static inline __m128 two_halves(const uint16_t *src, int both) {
    uint32_t bits = src[0];
    if (both) bits |= (uint32_t)src[1] << 16;
    return _mm_cvtph_ps(_mm_cvtsi32_si128((int)bits));
}

/* rows n..n+R-1 (R <= 4) of activation row m (inlined twice: R = 4 a constant keeps the accumulators in registers) */
static inline __attribute__((always_inline)) void rows_int_of(const job_t *j, int m, int n, int R) {
    __m256 acc[4][2];  /* [row][lanes 0-7, lanes 8-15] */
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    __m128 macc = _mm_setzero_ps(), macc2[4];  /* minimums x block sums: [nb, N] float32 / [N, nb] float16 */
    for (int r = 0; r < 4; r++) macc2[r] = _mm_setzero_ps();
    const __m256i nib = _mm256_set1_epi8(15);
    const __m256i pick = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const __m128i live = _mm_cmpgt_epi32(_mm_set1_epi32(R), _mm_setr_epi32(0, 1, 2, 3));
    prefetch_ahead(j, n);
    const int8_t *lm = j->limbs + (size_t)m * j->pairs * LIMBS * 64;
    const float *icm = j->invc + (size_t)m * j->pairs * 16;
    const float *xs = j->xsum ? j->xsum + (size_t)m * j->nb : NULL;
    for (int p = 0; p < j->pairs; p++) {
        int b = 2 * p, both = b + 1 < j->nb;
        const int8_t *al = lm + (size_t)p * LIMBS * 64;
        __m256 ic0 = _mm256_loadu_ps(icm + (size_t)p * 16), ic1 = _mm256_loadu_ps(icm + (size_t)p * 16 + 8);
        for (int r = 0; r < R; r++) {
            size_t blk = (size_t)(n + r) * j->nb + b;
            for (int t = 0; t < j->terms; t++) {
                const uint8_t *q = j->q[t] + blk * 16;
                /* one block alone (the last of an odd count): its bytes twice, against zero limbs */
                __m256i raw = both ? _mm256_loadu_si256((const __m256i *)q)
                                   : _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q));
                __m256i c0 = _mm256_and_si256(raw, nib), c1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nib);
                const int8_t *top = al + (LIMBS - 1) * 64;
                __m256i i0 = dot4(_mm256_setzero_si256(), c0, _mm256_loadu_si256((const __m256i *)top));
                __m256i i1 = dot4(_mm256_setzero_si256(), c1, _mm256_loadu_si256((const __m256i *)(top + 32)));
                for (int k = LIMBS - 2; k >= 0; k--) {
                    i0 = dot4(_mm256_slli_epi32(i0, 8), c0, _mm256_loadu_si256((const __m256i *)(al + k * 64)));
                    i1 = dot4(_mm256_slli_epi32(i1, 8), c1, _mm256_loadu_si256((const __m256i *)(al + k * 64 + 32)));
                }
                if (j->zpx[t]) {
                    const int32_t *z = j->zpx[t] + ((size_t)m * j->pairs + p) * 16;
                    i0 = _mm256_sub_epi32(i0, _mm256_loadu_si256((const __m256i *)z));
                    i1 = _mm256_sub_epi32(i1, _mm256_loadu_si256((const __m256i *)(z + 8)));
                }
                __m128 s2;
                if (j->s16[t]) {  /* the same values from half the bytes */
                    s2 = two_halves(j->s16[t] + blk, both);
                } else {
                    const float *sp = j->s[t] + blk;
                    s2 = both ? _mm_castpd_ps(_mm_load_sd((const double *)sp)) : _mm_load_ss(sp);
                }
                __m256 sc = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s2), pick);
                acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_mul_ps(sc, ic0), acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_mul_ps(sc, ic1), acc[r][1]);
            }
        }
        if (j->mins16) {  /* rows n..n+3, blocks b, b+1: [N, nb], read in order like the codes */
            __m128 x2 = both ? _mm_castpd_ps(_mm_load_sd((const double *)(xs + b))) : _mm_load_ss(xs + b);
            for (int r = 0; r < R; r++)
                macc2[r] = _mm_fmadd_ps(two_halves(j->mins16 + (size_t)(n + r) * j->nb + b, both), x2, macc2[r]);
        } else if (j->mins) {
            for (int h = 0; h < 1 + both; h++)
                macc = _mm_fmadd_ps(_mm_maskload_ps(j->mins + (size_t)(b + h) * j->N + n, live), _mm_set1_ps(xs[b + h]), macc);
        }
    }
    float mm[4];
    _mm_storeu_ps(mm, macc);
    for (int r = 0; r < R; r++) {
        __m128 two = macc2[r];
        float mr = mm[r] + (_mm_cvtss_f32(two) + _mm_cvtss_f32(_mm_movehdup_ps(two)));
        /* _mm512_reduce_add_ps's tree: lanes i + i+8, then i + i+4, i + i+2, i + i+1 */
        __m256 t8 = _mm256_add_ps(acc[r][1], acc[r][0]);
        __m128 t4 = _mm_add_ps(_mm256_extractf128_ps(t8, 1), _mm256_castps256_ps128(t8));
        __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
        float sum = _mm_cvtss_f32(t2) + _mm_cvtss_f32(_mm_movehdup_ps(t2));
        j->y[(size_t)m * j->N + n + r] = sum + mr;
    }
}

static void rows_int(const job_t *j, int m, int n, int R) {
    if (R == 4) rows_int_of(j, m, n, 4);
    else rows_int_of(j, m, n, R);
}

/* a float16 copy of n float32 values, or NULL when one of them is not exactly a float16 (Q4_K / Q6_K scales
   are float32 products) or memory is short: then the float32 values are read (the AVX-512 version's choice) */
static uint16_t *half_copy(const float *src, size_t n) {
    uint16_t *dst = malloc(n * sizeof(uint16_t) + 64);
    if (!dst) return NULL;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(src + i);
        __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_cvtph_ps(h), v, _CMP_NEQ_UQ))) { free(dst); return NULL; }  /* NaN too */
        _mm_storeu_si128((__m128i *)(dst + i), h);
    }
    for (; i < n; i++) {
        __m128 v = _mm_set_ss(src[i]);
        __m128i h = _mm_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        if (_mm_cvtss_f32(_mm_cvtph_ps(h)) != src[i]) { free(dst); return NULL; }
        dst[i] = (uint16_t)_mm_extract_epi16(h, 0);
    }
    return dst;
}
#define LIMBS_OR_0 LIMBS

/* Philox4x64-10 words of numpy's Philox stream, for the seeded sampler's noise (runtime/philox.py,
 * runtime/sampling.py), exported with C linkage from the kernel library (included from qmatmul.c; not an
 * onnxruntime op).
 *
 * Why: a verifier checking plain sampling draws every checked row's whole stream (one 64-bit word per vocabulary
 * entry: 49,152 a row on SmolLM2): numpy's random_raw costs ~2.7-3 ns a word on the Zen 5 development host, more
 * than half of a T=1 row's check. Here, with AVX-512, 32 blocks of four words are computed side by side (eight
 * per register, four registers in flight to cover the rounds' latency; one or two left it exposed), each
 * 64x64->128-bit product from four 32x32->64-bit vpmuludq: ~0.7 ns a word there (benchmarks/philox.py). Top-k/top-p
 * rows need words at a few hundred chosen indices under a key per row (p2pinfer_philox_draws): ~3 ns a word,
 * where numpy's vectorized blocks (runtime/philox.py) take ~115. A scalar version (one mulx per product) runs at
 * ~2 ns a word as gcc compiles it (interleaving two to eight blocks did not help: gcc spills the 128-bit products;
 * hand-scheduled inline asm of three blocks reached ~1.3 ns, bound by the multiplies' latency chain and the
 * sixteen general registers); it is the path without AVX-512 and computes the last few blocks of a stream.
 *
 * The stream (numpy's Philox, Random123's philox4x64 with 10 rounds): the 256-bit counter is incremented before
 * each block, so word v of the stream keyed (key_lo, key_hi) is word v % 4 of the block at counter
 * (v / 4 + 1, 0, 0, 0). A round maps (x0, x1, x2, x3) under key (k0, k1) to
 *   (hi(M1 x2) ^ x1 ^ k0, lo(M1 x2), hi(M0 x0) ^ x3 ^ k1, lo(M0 x0)),
 * and the key is bumped by (W0, W1) between rounds. Integer arithmetic only: both paths give numpy's words bit
 * for bit (tests/test_philox.py compares them with numpy.random.Philox on random 128-bit keys).
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define PHILOX_M0 0xD2E7470EE14C6C93ULL
#define PHILOX_M1 0xCA5A826395121157ULL
#define PHILOX_W0 0x9E3779B97F4A7C15ULL
#define PHILOX_W1 0xBB67AE8584CAA73BULL
#define PHILOX_ROUNDS 10

/* the high and low 64 bits of a * b */
static inline uint64_t philox_mulhilo(uint64_t a, uint64_t b, uint64_t *hi) {
#if defined(__SIZEOF_INT128__)
    __uint128_t p = (__uint128_t)a * b;
    *hi = (uint64_t)(p >> 64);
    return (uint64_t)p;
#else /* from 32-bit halves: every partial product fits in 64 bits (the same value) */
    uint64_t a_lo = a & 0xFFFFFFFFu, a_hi = a >> 32, b_lo = b & 0xFFFFFFFFu, b_hi = b >> 32;
    uint64_t t = a_lo * b_lo;
    uint64_t mid1 = a_hi * b_lo + (t >> 32);
    uint64_t mid2 = a_lo * b_hi + (mid1 & 0xFFFFFFFFu);
    *hi = a_hi * b_hi + (mid1 >> 32) + (mid2 >> 32);
    return a * b;
#endif
}

/* the block at counter (counter, 0, 0, 0) under key (k0, k1): x[0..3] */
static inline void philox_block(uint64_t counter, uint64_t k0, uint64_t k1, uint64_t x[4]) {
    uint64_t x0 = counter, x1 = 0, x2 = 0, x3 = 0;
    for (int r = 0; r < PHILOX_ROUNDS; r++) {
        if (r) {
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        uint64_t hi0, hi1;
        uint64_t lo0 = philox_mulhilo(PHILOX_M0, x0, &hi0);
        uint64_t lo1 = philox_mulhilo(PHILOX_M1, x2, &hi1);
        x0 = hi1 ^ x1 ^ k0;
        x1 = lo1;
        x2 = hi0 ^ x3 ^ k1;
        x3 = lo0;
    }
    x[0] = x0;
    x[1] = x1;
    x[2] = x2;
    x[3] = x3;
}

/* draws v .. n-1 (v a multiple of 4) of the stream, one block at a time; returns the largest of them and `largest` */
static uint64_t philox_stream_scalar(uint64_t key_lo, uint64_t key_hi, int64_t v, int64_t n, uint64_t *out,
                                     uint64_t largest) {
    for (; v < n; v += 4) {
        uint64_t x[4];
        philox_block((uint64_t)(v / 4) + 1, key_lo, key_hi, x);
        int64_t take = n - v < 4 ? n - v : 4;
        for (int64_t j = 0; j < take; j++) {
            out[v + j] = x[j];
            largest = x[j] > largest ? x[j] : largest;
        }
    }
    return largest;
}

#if defined(__AVX512F__)
#define PHILOX_GROUPS 4 /* registers of 8 blocks in flight: fewer leave the multiplies' latency exposed (measured) */

/* hi(x * m) per 64-bit lane, and lo(x * m) in *lo, from four 32x32->64-bit products (m = mhi 2^32 + mlo) */
static inline __m512i philox_mulhilo8(__m512i x, __m512i mlo, __m512i mhi, __m512i *lo) {
    const __m512i low32 = _mm512_set1_epi64(0xFFFFFFFFu);
    __m512i xh = _mm512_srli_epi64(x, 32);
    __m512i ll = _mm512_mul_epu32(x, mlo), lh = _mm512_mul_epu32(x, mhi);
    __m512i hl = _mm512_mul_epu32(xh, mlo), hh = _mm512_mul_epu32(xh, mhi);
    __m512i t = _mm512_add_epi64(lh, _mm512_srli_epi64(ll, 32));  /* < 2^64: no carry lost */
    __m512i u = _mm512_add_epi64(hl, _mm512_and_si512(t, low32));  /* likewise */
    *lo = _mm512_mask_shuffle_epi32(ll, 0xAAAA, u, _MM_PERM_CCAA);  /* (low 32 bits of u) 2^32 + low 32 bits of ll */
    return _mm512_add_epi64(_mm512_add_epi64(hh, _mm512_srli_epi64(t, 32)), _mm512_srli_epi64(u, 32));
}

/* ten rounds over `groups` registers of 8 blocks each; k0, k1: the lanes' keys of round 0, one register per group,
   or (shared) one for every group */
static inline __attribute__((always_inline)) void philox_rounds8(__m512i *x0, __m512i *x1, __m512i *x2, __m512i *x3,
                                                                 int groups, __m512i *k0, __m512i *k1, int shared) {
    const __m512i m0lo = _mm512_set1_epi64(PHILOX_M0 & 0xFFFFFFFFu), m0hi = _mm512_set1_epi64(PHILOX_M0 >> 32);
    const __m512i m1lo = _mm512_set1_epi64(PHILOX_M1 & 0xFFFFFFFFu), m1hi = _mm512_set1_epi64(PHILOX_M1 >> 32);
    const __m512i w0 = _mm512_set1_epi64((int64_t)PHILOX_W0), w1 = _mm512_set1_epi64((int64_t)PHILOX_W1);
    for (int r = 0; r < PHILOX_ROUNDS; r++) {
        for (int g = 0; g < (shared ? 1 : groups) && r; g++) {
            k0[g] = _mm512_add_epi64(k0[g], w0);
            k1[g] = _mm512_add_epi64(k1[g], w1);
        }
        for (int g = 0; g < groups; g++) {
            __m512i lo0, lo1;
            __m512i hi0 = philox_mulhilo8(x0[g], m0lo, m0hi, &lo0);
            __m512i hi1 = philox_mulhilo8(x2[g], m1lo, m1hi, &lo1);
            x0[g] = _mm512_ternarylogic_epi64(hi1, x1[g], k0[shared ? 0 : g], 0x96);  /* three-way xor */
            x2[g] = _mm512_ternarylogic_epi64(hi0, x3[g], k1[shared ? 0 : g], 0x96);
            x1[g] = lo1;
            x3[g] = lo0;
        }
    }
}

/* blocks first .. first + 8 groups - 1 of the stream into out (their 32 groups words, in stream order); returns the
   lanes' running maximum */
static inline __attribute__((always_inline)) __m512i philox_stream8(uint64_t first, __m512i k0, __m512i k1,
                                                                    int groups, uint64_t *out, __m512i largest) {
    __m512i x0[PHILOX_GROUPS], x1[PHILOX_GROUPS], x2[PHILOX_GROUPS], x3[PHILOX_GROUPS];
    const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    for (int g = 0; g < groups; g++) {
        x0[g] = _mm512_add_epi64(_mm512_set1_epi64((int64_t)(first + 8 * (uint64_t)g)), lane);
        x1[g] = x2[g] = x3[g] = _mm512_setzero_si512();
    }
    philox_rounds8(x0, x1, x2, x3, groups, &k0, &k1, 1);
    const __m512i lower = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
    const __m512i upper = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    for (int g = 0; g < groups; g++) {
        /* 4 x 8 transpose: block b's words x0..x3 to out[4 b .. 4 b + 3]. Per 128-bit lane i, a and c hold the words
           of block 2i, b and d those of block 2i + 1 */
        __m512i a = _mm512_unpacklo_epi64(x0[g], x1[g]), b = _mm512_unpackhi_epi64(x0[g], x1[g]);
        __m512i c = _mm512_unpacklo_epi64(x2[g], x3[g]), d = _mm512_unpackhi_epi64(x2[g], x3[g]);
        __m512i e = _mm512_permutex2var_epi64(a, lower, c), f = _mm512_permutex2var_epi64(b, lower, d);  /* 0 2 | 1 3 */
        __m512i h = _mm512_permutex2var_epi64(a, upper, c), i = _mm512_permutex2var_epi64(b, upper, d);  /* 4 6 | 5 7 */
        __m512i w[4] = {_mm512_shuffle_i64x2(e, f, 0x44), _mm512_shuffle_i64x2(e, f, 0xEE),
                        _mm512_shuffle_i64x2(h, i, 0x44), _mm512_shuffle_i64x2(h, i, 0xEE)};
        for (int j = 0; j < 4; j++) {
            _mm512_storeu_si512(out + 32 * g + 8 * j, w[j]);
            largest = _mm512_max_epu64(largest, w[j]);
        }
    }
    return largest;
}

/* out[j] = draw ids[j] under key (keys[2 j], keys[2 j + 1]) for j < 8 groups: eight keys and counters per register */
static inline __attribute__((always_inline)) void philox_draws8(const uint64_t *keys, const uint64_t *ids, int groups,
                                                                uint64_t *out) {
    const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    const __m512i odd = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
    const __m512i one = _mm512_set1_epi64(1), two = _mm512_set1_epi64(2), three = _mm512_set1_epi64(3);
    __m512i x0[PHILOX_GROUPS], x1[PHILOX_GROUPS], x2[PHILOX_GROUPS], x3[PHILOX_GROUPS], k0[PHILOX_GROUPS],
        k1[PHILOX_GROUPS], id[PHILOX_GROUPS];
    for (int g = 0; g < groups; g++) {
        __m512i pairs_a = _mm512_loadu_si512(keys + 16 * g), pairs_b = _mm512_loadu_si512(keys + 16 * g + 8);
        k0[g] = _mm512_permutex2var_epi64(pairs_a, even, pairs_b);
        k1[g] = _mm512_permutex2var_epi64(pairs_a, odd, pairs_b);
        id[g] = _mm512_loadu_si512(ids + 8 * g);
        x0[g] = _mm512_add_epi64(_mm512_srli_epi64(id[g], 2), one);
        x1[g] = x2[g] = x3[g] = _mm512_setzero_si512();
    }
    philox_rounds8(x0, x1, x2, x3, groups, k0, k1, 0);
    for (int g = 0; g < groups; g++) {
        __m512i word = _mm512_and_si512(id[g], three);
        __m512i w = _mm512_mask_mov_epi64(x0[g], _mm512_cmpeq_epi64_mask(word, one), x1[g]);
        w = _mm512_mask_mov_epi64(w, _mm512_cmpeq_epi64_mask(word, two), x2[g]);
        w = _mm512_mask_mov_epi64(w, _mm512_cmpeq_epi64_mask(word, three), x3[g]);
        _mm512_storeu_si512(out + 8 * g, w);
    }
}
#endif

/* Draws 0 .. n-1 of the stream keyed (key_lo, key_hi) into out (numpy's Philox(key=...).random_raw(n) from a fresh
   state), and the largest of them in *largest (0 when n is 0): the sampled check needs it, and it costs nothing
   here. scalar: 1 takes the scalar path even where AVX-512 is available (tests compare both). Returns 0. */
int64_t p2pinfer_philox_stream(uint64_t key_lo, uint64_t key_hi, int64_t n, uint64_t *out, uint64_t *largest,
                               int32_t scalar) {
    int64_t v = 0;
    uint64_t top = 0;
#if defined(__AVX512F__)
    if (!scalar) {
        const __m512i k0 = _mm512_set1_epi64((int64_t)key_lo), k1 = _mm512_set1_epi64((int64_t)key_hi);
        __m512i lanes = _mm512_setzero_si512();
        for (; v + 32 * PHILOX_GROUPS <= n; v += 32 * PHILOX_GROUPS)
            lanes = philox_stream8((uint64_t)(v / 4) + 1, k0, k1, PHILOX_GROUPS, out + v, lanes);
        for (; v + 32 <= n; v += 32) lanes = philox_stream8((uint64_t)(v / 4) + 1, k0, k1, 1, out + v, lanes);
        top = _mm512_reduce_max_epu64(lanes);
    }
#else
    (void)scalar;
#endif
    *largest = philox_stream_scalar(key_lo, key_hi, v, n, out, top);
    return 0;
}

/* out[j] = draw ids[j] of the stream keyed (keys[2 j], keys[2 j + 1]) (low, high 64 bits), for j < n: word
   ids[j] % 4 of the block at counter ids[j] / 4 + 1 under that key. scalar: as p2pinfer_philox_stream. Returns 0. */
int64_t p2pinfer_philox_draws(const uint64_t *keys, const uint64_t *ids, int64_t n, uint64_t *out, int32_t scalar) {
    int64_t j = 0;
#if defined(__AVX512F__)
    if (!scalar) {
        for (; j + 8 * PHILOX_GROUPS <= n; j += 8 * PHILOX_GROUPS)
            philox_draws8(keys + 2 * j, ids + j, PHILOX_GROUPS, out + j);
        for (; j + 8 <= n; j += 8) philox_draws8(keys + 2 * j, ids + j, 1, out + j);
    }
#else
    (void)scalar;
#endif
    for (; j < n; j++) {
        uint64_t x[4];
        philox_block(ids[j] / 4 + 1, keys[2 * j], keys[2 * j + 1], x);
        out[j] = x[ids[j] % 4];
    }
    return 0;
}

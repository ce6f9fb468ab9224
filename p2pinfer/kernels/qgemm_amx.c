/* Many-row path on AMX tiles (included from qmatmul.c, after the float32 GEMM it falls back to).
 *
 * Why: the float32 GEMM (gemm_part) runs near one core's float32 FMA peak, so more many-row speed needs more
 * arithmetic per instruction. An AMX tdpbf16ps does 16 x 16 x 32 multiply-adds with float32 accumulation, but
 * its inputs are bfloat16 (8-bit significand). So every float32 value is split EXACTLY into bfloat16 limbs and
 * the significant limb products are summed:
 *     x = x1 + x2 + x3     activations: round to nearest each, |x2| <= 2^-9 |x|, |x3| <= 2^-17 |x|
 *     w = w1 + w2 (+ w3)   weights: truncations, |w2| < 2^-7 |w|, |w3| < 2^-15 |w|
 *     w x ~ x1 w1 + x2 w1 + x3 w1 + x1 w2 + x2 w2 (+ x1 w3)
 * Each limb product is exact in float32. Two weight limbs are exact when the weight is one term's scale times a
 * 4-bit code difference and the scales are float16 values (GGUF stores them so): at most 11 + 4 significant
 * bits. The block minimums are then added in the same tiles as 32 more "k" per block group: the activations'
 * block sums (x) times the minimums (w), float16 values too. The only product dropped is x3 w2 (< 2^-24 |w x|,
 * under one float32 rounding). Otherwise (two terms: Q8_0; other scales) three weight limbs of the float32
 * weight sum_t scale_t (q_t - zp_t) + minimum (one rounding) and six products (dropped: x2 w3, x3 w2, x3 w3,
 * < 2^-23 |w x| together). The products accumulate in float32 tiles over k: the rounding of a float32 chain
 * over k, as in gemm_part. Measured against a float64 product: 0.8e-7-1.7e-7 of sum |w x| at most, against
 * 3e-7-5e-7 for gemm_part (the same numeric class, drift within float32 rounding).
 *
 * Row-deterministic: a tile row's result depends only on that activation row and the weights, through the same
 * instruction sequence whatever the number of rows (padded to 16 with zeros), the thread count (threads split
 * the columns in 32-column micro-panels, as gemm_part does) or the row's position in its tile.
 *
 * Used only where the compiler targets AMX-BF16 (-march=native on such a CPU), the CPU reports it and Linux
 * grants this process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM); otherwise gemm_part runs. The op's
 * attribute amx=0 (set from P2PINFER_AMX=0 or amx=False by kernels/__init__.py) also forces gemm_part.
 */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512F__) \
    && defined(__linux__) && defined(__x86_64__)
#define HAVE_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_REQ_XCOMP_PERM 0x1023  /* arch_prctl: ask for an extended state component (asm/prctl.h) */
#define AMX_XTILEDATA 18           /* XFEATURE_XTILEDATA */
#define AMX_CHUNK_ROWS 256         /* activation rows split into limbs at a time: 6 bytes a value */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) amx_config_t;

static int amx_usable;  /* 1: this process may use the tiles on every thread */
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;

static void amx_probe(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22))) return;  /* AMX-TILE, AMX-BF16 */
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return;                       /* AVX512-BF16 */
    if (syscall(SYS_arch_prctl, AMX_REQ_XCOMP_PERM, AMX_XTILEDATA) != 0) return;  /* refused: float32 path */
    amx_usable = 1;
}

/* whether the tiles can run in this process (probed once) */
static int amx_available(void) {
    pthread_once(&amx_once, amx_probe);
    return amx_usable;
}

/* 16 float32 values -> their three bfloat16 limbs (round to nearest even each; the residuals are exact) */
static inline void split3(__m512 v, __m256i *l1, __m256i *l2, __m256i *l3) {
    __m256bh h = _mm512_cvtneps_pbh(v);
    __m512 r = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16)));
    __m256bh m = _mm512_cvtneps_pbh(r);
    __m512 r2 = _mm512_sub_ps(r, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)m), 16)));
    *l1 = (__m256i)h;
    *l2 = (__m256i)m;
    *l3 = (__m256i)_mm512_cvtneps_pbh(r2);
}

/* x rows [rows, K] float32 -> three limb arrays of bfloat16 (padding rows zero), each tile-major:
   [16-row group][(K + extra) / 32][16 rows][32], so that every tile load reads 1 KB contiguous (measured 1-5 %
   faster than rows of K + extra values; the same values, the same products). With extra > 0 the columns after K
   hold each row's block sums (summed in order, as the decode path does), then zeros (K + extra: a multiple of 32) */
static void split_rows(const float *x, int rows, int padded, int K, int nb, int extra, uint16_t *limbs[3]) {
    const size_t stride = (size_t)K + extra;
    float sums[extra > 0 ? extra : 1] __attribute__((aligned(64)));
    for (int m = 0; m < padded; m++) {
        for (int k = 0; k < K + extra; k += 16) {
            __m512 v;
            if (k < K) v = m < rows ? _mm512_loadu_ps(x + (size_t)m * K + k) : _mm512_setzero_ps();
            else {
                if (k == K) {
                    for (int b = 0; b < extra; b++) {
                        float sum = 0.f;
                        if (m < rows && b < nb)
                            for (int i = 0; i < 32; i++) sum += x[(size_t)m * K + 32 * b + i];
                        sums[b] = sum;
                    }
                }
                v = _mm512_load_ps(sums + (k - K));
            }
            __m256i l1, l2, l3;
            split3(v, &l1, &l2, &l3);
            size_t at = ((size_t)(m >> 4) * (stride >> 5) + (size_t)(k >> 5)) * 512 + (size_t)(m & 15) * 32 + (k & 31);
            _mm256_store_si256((__m256i *)(limbs[0] + at), l1);
            _mm256_store_si256((__m256i *)(limbs[1] + at), l2);
            _mm256_store_si256((__m256i *)(limbs[2] + at), l3);
        }
    }
}

/* two truncated bfloat16 limbs of the even and odd elements' weights, stored as pairs (each 32-bit lane: the
   even element's bfloat16 low, the odd one's high: the tiles' pair layout); three with o3 */
static inline void store_limbs(__m512 ev, __m512 od, uint16_t *o1, uint16_t *o2, uint16_t *o3, size_t at) {
    const __m512i top = _mm512_set1_epi32((int)0xFFFF0000u);
    const __mmask32 odd = 0xAAAAAAAAu;
    __m512i e1 = _mm512_and_si512(_mm512_castps_si512(ev), top), od1 = _mm512_and_si512(_mm512_castps_si512(od), top);
    __m512 e2 = _mm512_sub_ps(ev, _mm512_castsi512_ps(e1)), od2 = _mm512_sub_ps(od, _mm512_castsi512_ps(od1));
    _mm512_store_si512((__m512i *)(o1 + at), _mm512_mask_blend_epi16(odd, _mm512_srli_epi32(e1, 16), od1));
    if (!o3) {  /* w - w1 is exact in 8 bits */
        _mm512_store_si512((__m512i *)(o2 + at), _mm512_mask_blend_epi16(odd, _mm512_srli_epi32(_mm512_castps_si512(e2), 16),
                                                                      _mm512_castps_si512(od2)));
        return;
    }
    __m512i e2t = _mm512_and_si512(_mm512_castps_si512(e2), top), od2t = _mm512_and_si512(_mm512_castps_si512(od2), top);
    __m512 e3 = _mm512_sub_ps(e2, _mm512_castsi512_ps(e2t)), od3 = _mm512_sub_ps(od2, _mm512_castsi512_ps(od2t));
    _mm512_store_si512((__m512i *)(o2 + at), _mm512_mask_blend_epi16(odd, _mm512_srli_epi32(e2t, 16), od2t));
    _mm512_store_si512((__m512i *)(o3 + at), _mm512_mask_blend_epi16(odd, _mm512_srli_epi32(_mm512_castps_si512(e3), 16),
                                                                  _mm512_castps_si512(od3)));
}

/* the weights of columns n0 .. n1-1 (n1 - n0 <= 32; zero beyond n1) as limb panels [limb][16-column half]
   [(K + extra) / 2][16][2]. Two limbs: w = scale (q - zp), exact, and after K the block minimums (extra > 0);
   three: w = sum_t scale_t (q_t - zp_t) + minimum with fused multiply-adds (one rounding). terms and two are
   constants in each caller below (the loops then unroll into registers). */
static inline __attribute__((always_inline)) void weight_limbs_of(const gemm_t *g, int n0, int n1, int extra,
                                                                   uint16_t *out, const int terms, const int two) {
    const int kx = g->K + extra;
    const size_t half = (size_t)kx * 16;
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i rows_at = _mm512_mullo_epi32(lane, _mm512_set1_epi32(g->nb));  /* block index of column c0+lane */
    const __m512i bytes_at = _mm512_slli_epi32(rows_at, 4);
    __m512 code_value[2];  /* code c -> c - zp as float32, looked up by the low 4 bits of a lane */
    for (int t = 0; t < terms; t++) code_value[t] = _mm512_sub_ps(_mm512_cvtepi32_ps(lane), _mm512_set1_ps((float)g->zp[t]));
    for (int j = 0; j < 2; j++) {
        int c0 = n0 + 16 * j, valid = n1 - c0;
        if (valid > 16) valid = 16;
        __mmask16 live = valid <= 0 ? 0 : (__mmask16)((1u << valid) - 1u);
        uint16_t *o1 = out + (size_t)j * half, *o2 = out + (size_t)(2 + j) * half;
        uint16_t *o3 = two ? NULL : out + (size_t)(4 + j) * half;
        for (int b = 0; b < g->nb; b++) {
            __m512 scale[2];
            __m512i codes[2][4];
            for (int t = 0; t < terms; t++) {
                const uint8_t *base = g->q[t] + ((size_t)c0 * g->nb + b) * 16;
                scale[t] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, rows_at, g->s[t] + (size_t)c0 * g->nb + b, 4);
                for (int w4 = 0; w4 < 4; w4++)
                    codes[t][w4] = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, bytes_at, base + 4 * w4, 1);
            }
            __m512 mn = g->mins && !two ? _mm512_maskz_loadu_ps(live, g->mins + (size_t)b * g->N + c0) : _mm512_setzero_ps();
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) {  /* byte i of each column's block: elements 32b + 2i (low nibble), +1 (high) */
                __m512 v[2];
                for (int h = 0; h < 2; h++) {
                    v[h] = mn;
                    for (int t = 0; t < terms; t++) {
                        __m512 c = _mm512_permutexvar_ps(_mm512_srli_epi32(codes[t][i >> 2], 8 * (i & 3) + 4 * h), code_value[t]);
                        v[h] = two ? _mm512_mul_ps(scale[t], c) : _mm512_fmadd_ps(scale[t], c, v[h]);
                    }
                }
                store_limbs(v[0], v[1], o1, o2, o3, (size_t)(32 * b + 2 * i) * 16);  /* pair row 16b + i */
            }
        }
        for (int e = 0; e < extra; e += 2) {  /* the minimums of blocks e, e+1 (zero past the last block) */
            __m512 ev = e < g->nb ? _mm512_maskz_loadu_ps(live, g->mins + (size_t)e * g->N + c0) : _mm512_setzero_ps();
            __m512 od = e + 1 < g->nb ? _mm512_maskz_loadu_ps(live, g->mins + (size_t)(e + 1) * g->N + c0) : _mm512_setzero_ps();
            store_limbs(ev, od, o1, o2, NULL, (size_t)(g->K + e) * 16);
        }
    }
}

static void weight_limbs(const gemm_t *g, int n0, int n1, int two, int extra, uint16_t *out) {
    if (two) weight_limbs_of(g, n0, n1, extra, out, 1, 1);  /* two limbs: one term (amx_weight_limbs) */
    else if (g->terms == 1) weight_limbs_of(g, n0, n1, extra, out, 1, 0);
    else weight_limbs_of(g, n0, n1, extra, out, 2, 0);
}

typedef struct {
    const gemm_t *g;
    int two, extra;         /* two weight limbs (amx_weight_limbs); extra k: block sums x minimums (or 0) */
    uint16_t *xbuf;         /* per part: the limbs of up to AMX_CHUNK_ROWS rows (split_rows), xsize values */
    size_t xsize;
} amx_job_t;

static void amx_fail(const gemm_t *g, int m0, int rows, int c0, int c1) {
    for (int m = m0; m < m0 + rows; m++)
        for (int n = c0; n < c1; n++) g->y[(size_t)m * g->N + n] = __builtin_nanf("");
}

static void amx_part(void *arg, int part, int parts) {
    const amx_job_t *a = (const amx_job_t *)arg;
    const gemm_t *g = a->g;
    const int kx = g->K + a->extra;
    int micros = (g->N + MICRO_COLS - 1) / MICRO_COLS, per = (micros + parts - 1) / parts;
    int c0 = part * per * MICRO_COLS, c1 = c0 + per * MICRO_COLS;
    if (c1 > g->N) c1 = g->N;
    if (c0 >= c1) return;
    /* Each thread splits the activation rows itself, into its own part of the buffer: the split is cheap (35 us
       for 176 rows at K = 576, one core), and limbs one thread wrote cost the other a cross-core transfer of the
       whole buffer (0.6 MB at 176 rows) on its first pass over them. Every thread computes the same limbs. */
    uint16_t *xbuf = a->xbuf + (size_t)part * a->xsize;
    uint16_t *wl = aligned_alloc(64, sizeof(uint16_t) * 3 * (size_t)kx * MICRO_COLS);
    if (!wl) {  /* out of memory: NaN, never a plausible wrong number */
        amx_fail(g, 0, g->M, c0, c1);
        return;
    }
    amx_config_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
    const size_t half = (size_t)kx * 16, xs = 64;  /* a tile's rows: 64 bytes apart (split_rows) */
    float out[4][16][16] __attribute__((aligned(64)));
    for (int m0 = 0; m0 < g->M; m0 += AMX_CHUNK_ROWS) {
        const int rows = g->M - m0 < AMX_CHUNK_ROWS ? g->M - m0 : AMX_CHUNK_ROWS, padded = (rows + 15) / 16 * 16;
        uint16_t *xl[3];
        for (int l = 0; l < 3; l++) xl[l] = xbuf + (size_t)l * padded * kx;
        split_rows(g->x + (size_t)m0 * g->K, rows, padded, g->K, g->nb, a->extra, xl);
        for (int n0 = c0; n0 < c1; n0 += MICRO_COLS) {
            int n1 = n0 + MICRO_COLS < c1 ? n0 + MICRO_COLS : c1;
            weight_limbs(g, n0, n1, a->two, a->extra, wl);
            const uint16_t *w1a = wl, *w1b = wl + half, *w2a = wl + 2 * half, *w2b = wl + 3 * half, *w3a = wl + 4 * half,
                           *w3b = wl + 5 * half;
            for (int m = 0; m < padded; m += 32) {
                int pair = m + 16 < padded;  /* a second 16-row group */
                const uint16_t *xa[3], *xb[3];
                for (int l = 0; l < 3; l++) {
                    xa[l] = xl[l] + (size_t)m * kx;
                    xb[l] = pair ? xa[l] + (size_t)16 * kx : xa[l];
                }
                /* tiles: 0..3 accumulators (row group a/b x column half 0/1), 4, 5 activation limbs of groups a, b,
                   6, 7 weight limbs of halves 0, 1. The products' order is fixed (the same for every row, row count
                   and thread count): per 32 k, x1 w1, x1 w2, (x1 w3 with three weight limbs,) x2 w2, x2 w1, x3 w1. A lone
                   16-row group (the last, when the padded rows are an odd number of groups) runs accumulators 0 and 1
                   only: the same products in the same order, so the same bits, without computing its rows twice. */
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (int k = 0; k < kx; k += 32) {
                    size_t wk = (size_t)k * 16;
    #define AMX_PRODUCTS() do { _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);                           \
                                    if (pair) { _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7); } } while (0)
    #define AMX_LOAD_X(l) do { _tile_loadd(4, xa[l] + wk, xs); if (pair) _tile_loadd(5, xb[l] + wk, xs); } while (0)
                    /* each limb tile loaded once where it can be (two weight limbs: 12 loads for 20 products) */
                    AMX_LOAD_X(0);
                    _tile_loadd(6, w1a + wk, 64); _tile_loadd(7, w1b + wk, 64);
                    AMX_PRODUCTS();                                                  /* x1 w1 */
                    _tile_loadd(6, w2a + wk, 64); _tile_loadd(7, w2b + wk, 64);
                    AMX_PRODUCTS();                                                  /* x1 w2 */
                    if (!a->two) {
                        _tile_loadd(6, w3a + wk, 64); _tile_loadd(7, w3b + wk, 64);
                        AMX_PRODUCTS();                                              /* x1 w3 */
                        _tile_loadd(6, w2a + wk, 64); _tile_loadd(7, w2b + wk, 64);
                    }
                    AMX_LOAD_X(1);
                    AMX_PRODUCTS();                                                  /* x2 w2 */
                    _tile_loadd(6, w1a + wk, 64); _tile_loadd(7, w1b + wk, 64);
                    AMX_PRODUCTS();                                                  /* x2 w1 */
                    AMX_LOAD_X(2);
                    AMX_PRODUCTS();                                                  /* x3 w1 */
    #undef AMX_PRODUCTS
    #undef AMX_LOAD_X
                }
                _tile_stored(0, out[0], 64);
                _tile_stored(1, out[1], 64);
                if (pair) {
                    _tile_stored(2, out[2], 64);
                    _tile_stored(3, out[3], 64);
                }
                for (int h = 0; h < 2 && n0 + 16 * h < n1; h++) {
                    int n = n0 + 16 * h, cols = n1 - n < 16 ? n1 - n : 16;
                    __mmask16 live = (__mmask16)((1u << cols) - 1u);
                    for (int r = 0; r < 32 && m + r < rows; r++)
                        _mm512_mask_storeu_ps(g->y + (size_t)(m0 + m + r) * g->N + n, live,
                                              _mm512_load_ps(out[(r >= 16) * 2 + h][r & 15]));
                }
            }
        }
    }
    _tile_release();
    free(wl);
}

/* 2 when every weight (and block minimum) is exactly two bfloat16 limbs: one term whose scales, and minimums,
   are float16 values (the low 13 bits of their float32 significand zero); else 3 */
static int amx_weight_limbs(const gemm_t *g) {
    if (g->terms != 1) return 3;
    uint32_t low = 0, bits;
    for (size_t i = 0; i < (size_t)g->N * g->nb; i++) { memcpy(&bits, g->s[0] + i, 4); low |= bits; }
    if (g->mins)
        for (size_t i = 0; i < (size_t)g->N * g->nb; i++) { memcpy(&bits, g->mins + i, 4); low |= bits; }
    return (low & 0x1FFFu) ? 3 : 2;
}

/* the many-row product on tiles; 0 when it cannot run (no AMX, refused, out of memory before any output).
   *limbs caches amx_weight_limbs for this node (0: not known yet; the weights are constant initializers). */
static int amx_gemm(const gemm_t *g, int parts, int *limbs) {
    if (!amx_available()) return 0;
    int known = __atomic_load_n(limbs, __ATOMIC_RELAXED);
    if (!known) __atomic_store_n(limbs, known = amx_weight_limbs(g), __ATOMIC_RELAXED);
    int extra = known == 2 && g->mins ? (g->nb + 31) / 32 * 32 : 0, chunk = g->M < AMX_CHUNK_ROWS ? g->M : AMX_CHUNK_ROWS;
    size_t xsize = (size_t)3 * ((chunk + 15) / 16 * 16) * (g->K + extra);
    /* allocated here, on the calling thread, once for all parts: the workers' own malloc arenas handed such
       buffers back to the kernel at every free (148 page faults a call at 176 rows, K = 1,536) */
    uint16_t *xbuf = aligned_alloc(64, sizeof(uint16_t) * xsize * (size_t)parts);
    if (!xbuf) return 0;
    amx_job_t a = {g, known == 2, extra, xbuf, xsize};
    run_parallel(amx_part, &a, parts);
    free(xbuf);
    return 1;
}
#else
static int amx_gemm(const gemm_t *g, int parts, int *limbs) { (void)g; (void)parts; (void)limbs; return 0; }
#endif

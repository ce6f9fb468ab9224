/* Many-row path on AMX tiles (included from qmatmul.c, after the float32 GEMM it falls back to).
 *
 * Why: the float32 GEMM (gemm_part) runs near one core's float32 FMA peak, so more many-row speed needs more
 * arithmetic per instruction. An AMX tdpbf16ps does 16 x 16 x 32 multiply-adds; bfloat16 has an 8-bit
 * significand, so each float32 value is split exactly into three bfloat16 limbs (hi + mid + lo, each the
 * round-to-nearest of what the limbs before it left; the residuals are exact in float32):
 *     w = w1 + w2 + w3,  x = x1 + x2 + x3   (|w2| <= 2^-8 |w|, |w3| <= 2^-16 |w|, the same for x)
 *     w x ~ x1 w1  +  (x1 w2 + x2 w1 + x1 w3 + x2 w2 + x3 w1)
 * Each limb product is exact in float32; the dropped ones (x2 w3, x3 w2, x3 w3) are below 2^-24 |w x|, under
 * one float32 rounding. The leading products accumulate in one float32 tile, the five small ones in another
 * (their roundings are 2^-8 smaller), and the two are added once at the end: the rounding of a float32 chain
 * over k, as in gemm_part, plus at most a few float32 roundings. The weight is the float32 value gemm_part uses
 * (dequantize_panel: sum_t scale_t (q_t - zp_t) + the block minimum).
 *
 * Row-deterministic: a tile row's result depends only on that activation row and the weights, through the same
 * instruction sequence whatever the number of rows (padded to 16 with zeros), the thread count (threads split
 * the columns in 32-column micro-panels, as gemm_part does) or the row's position in its tile.
 *
 * Used only where the compiler targets AMX-BF16 (-march=native on such a CPU), the CPU reports it and Linux
 * grants this process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM); otherwise gemm_part runs. The op's
 * attribute amx=0 (set from P2PINFER_AMX=0 by kernels/__init__.py) also forces gemm_part.
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

/* x rows [rows, K] float32 -> three limb arrays [16-padded rows][K] bfloat16 (padding rows zero) */
static void split_rows(const float *x, int rows, int padded, int K, uint16_t *limbs[3]) {
    for (int m = 0; m < padded; m++)
        for (int k = 0; k < K; k += 16) {
            __m256i l1, l2, l3;
            split3(m < rows ? _mm512_loadu_ps(x + (size_t)m * K + k) : _mm512_setzero_ps(), &l1, &l2, &l3);
            _mm256_storeu_si256((__m256i *)(limbs[0] + (size_t)m * K + k), l1);
            _mm256_storeu_si256((__m256i *)(limbs[1] + (size_t)m * K + k), l2);
            _mm256_storeu_si256((__m256i *)(limbs[2] + (size_t)m * K + k), l3);
        }
}

/* the weights of columns n0 .. n1-1 (n1 - n0 <= 32; zero beyond n1), dequantized as dequantize_panel does but with
   one rounding (w = sum_t scale_t (q_t - zp_t) + min, fused multiply-adds), straight into three bfloat16 limb
   panels [limb][16-column half][k/2][16][2] (the tiles' pair layout). The limbs are truncations (w1 = w with
   the low 16 bits cleared, w2 = the same of w - w1, w3 = w - w1 - w2): exact, each difference exact. */
static void weight_limbs(const gemm_t *g, int n0, int n1, uint16_t *out) {
    const size_t half = (size_t)g->K * 16;
    const __m512i top = _mm512_set1_epi32((int)0xFFFF0000u), nib = _mm512_set1_epi32(15);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i rows_at = _mm512_mullo_epi32(lane, _mm512_set1_epi32(g->nb));  /* block index of column c0+lane */
    const __m512i bytes_at = _mm512_slli_epi32(rows_at, 4);
    for (int j = 0; j < 2; j++) {
        int c0 = n0 + 16 * j, valid = n1 - c0;
        if (valid > 16) valid = 16;
        __mmask16 live = valid <= 0 ? 0 : (__mmask16)((1u << valid) - 1u);
        uint16_t *o1 = out + (size_t)j * half, *o2 = out + (size_t)(2 + j) * half, *o3 = out + (size_t)(4 + j) * half;
        for (int b = 0; b < g->nb; b++) {
            __m512 scale[2], zps[2];
            __m512i codes[2][4];
            for (int t = 0; t < g->terms; t++) {
                const uint8_t *base = g->q[t] + ((size_t)c0 * g->nb + b) * 16;
                scale[t] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, rows_at, g->s[t] + (size_t)c0 * g->nb + b, 4);
                zps[t] = _mm512_set1_ps((float)g->zp[t]);
                for (int w4 = 0; w4 < 4; w4++)
                    codes[t][w4] = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, bytes_at, base + 4 * w4, 1);
            }
            __m512 mn = g->mins ? _mm512_maskz_loadu_ps(live, g->mins + (size_t)b * g->N + c0) : _mm512_setzero_ps();
            for (int i = 0; i < 16; i++) {  /* byte i of each column's block: elements 32b + 2i (low nibble), +1 (high) */
                __m512 v[2];
                for (int h = 0; h < 2; h++) {
                    v[h] = mn;
                    for (int t = 0; t < g->terms; t++) {
                        __m512i c = _mm512_and_si512(_mm512_srli_epi32(codes[t][i >> 2], 8 * (i & 3) + 4 * h), nib);
                        v[h] = _mm512_fmadd_ps(scale[t], _mm512_sub_ps(_mm512_cvtepi32_ps(c), zps[t]), v[h]);
                    }
                }
                __m512i e = _mm512_castps_si512(v[0]), od = _mm512_castps_si512(v[1]);
                __m512i e1 = _mm512_and_si512(e, top), od1 = _mm512_and_si512(od, top);
                __m512i e2 = _mm512_castps_si512(_mm512_sub_ps(v[0], _mm512_castsi512_ps(e1)));
                __m512i od2 = _mm512_castps_si512(_mm512_sub_ps(v[1], _mm512_castsi512_ps(od1)));
                __m512i e2t = _mm512_and_si512(e2, top), od2t = _mm512_and_si512(od2, top);
                __m512i e3 = _mm512_castps_si512(_mm512_sub_ps(_mm512_castsi512_ps(e2), _mm512_castsi512_ps(e2t)));
                __m512i od3 = _mm512_castps_si512(_mm512_sub_ps(_mm512_castsi512_ps(od2), _mm512_castsi512_ps(od2t)));
                size_t at = (size_t)(32 * b + 2 * i) * 16;  /* pair row 16b + i */
                /* each 32-bit lane: the even element's bfloat16 low, the odd one's high */
                _mm512_store_si512((__m512i *)(o1 + at), _mm512_or_si512(_mm512_srli_epi32(e1, 16), od1));
                _mm512_store_si512((__m512i *)(o2 + at), _mm512_or_si512(_mm512_srli_epi32(e2t, 16), od2t));
                _mm512_store_si512((__m512i *)(o3 + at), _mm512_mask_blend_epi16(0xAAAAAAAAu, _mm512_srli_epi32(e3, 16), od3));
            }
        }
    }
}

typedef struct {
    const gemm_t *g;
    int m0, rows, padded;   /* the chunk: rows m0 .. m0 + rows - 1 of g->x, padded to a multiple of 16 */
    uint16_t *xl[3];        /* [padded][K] limbs of those rows */
} amx_job_t;

static void amx_fail(const gemm_t *g, int m0, int rows, int c0, int c1) {
    for (int m = m0; m < m0 + rows; m++)
        for (int n = c0; n < c1; n++) g->y[(size_t)m * g->N + n] = __builtin_nanf("");
}

static void amx_part(void *arg, int part, int parts) {
    const amx_job_t *a = (const amx_job_t *)arg;
    const gemm_t *g = a->g;
    const int K = g->K;
    int micros = (g->N + MICRO_COLS - 1) / MICRO_COLS, per = (micros + parts - 1) / parts;
    int c0 = part * per * MICRO_COLS, c1 = c0 + per * MICRO_COLS;
    if (c1 > g->N) c1 = g->N;
    if (c0 >= c1) return;
    uint16_t *wl = aligned_alloc(64, sizeof(uint16_t) * 3 * (size_t)K * MICRO_COLS);
    if (!wl) {  /* out of memory: NaN, never a plausible wrong number */
        amx_fail(g, a->m0, a->rows, c0, c1);
        return;
    }
    amx_config_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
    const size_t half = (size_t)K * 16, xs = (size_t)K * sizeof(uint16_t);
    float out[4][16][16] __attribute__((aligned(64)));
    for (int n0 = c0; n0 < c1; n0 += MICRO_COLS) {
        int n1 = n0 + MICRO_COLS < c1 ? n0 + MICRO_COLS : c1;
        weight_limbs(g, n0, n1, wl);
        const uint16_t *w1a = wl, *w1b = wl + half, *w2a = wl + 2 * half, *w2b = wl + 3 * half, *w3a = wl + 4 * half,
                       *w3b = wl + 5 * half;
        for (int m = 0; m < a->padded; m += 32) {
            int two = m + 16 < a->padded;  /* a second 16-row group */
            const uint16_t *xa[3], *xb[3];
            for (int l = 0; l < 3; l++) {
                xa[l] = a->xl[l] + (size_t)m * K;
                xb[l] = two ? xa[l] + (size_t)16 * K : xa[l];  /* a lone group computes its rows twice, stores once */
            }
            /* tiles: 0..3 accumulators (rows group a/b x column half 0/1), 4, 5 activation limbs of groups a, b,
               6, 7 weight limbs of halves 0, 1. The products' order is fixed (the same for every row, row count
               and thread count): per 32 k, x1 w1, x2 w1, x3 w1, x1 w2, x2 w2, x1 w3. */
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int k = 0; k < K; k += 32) {
                size_t wk = (size_t)k * 16;
#define AMX_PRODUCTS() do { _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7); } while (0)
                _tile_loadd(4, xa[0] + k, xs); _tile_loadd(5, xb[0] + k, xs);
                _tile_loadd(6, w1a + wk, 64); _tile_loadd(7, w1b + wk, 64);
                AMX_PRODUCTS();
                _tile_loadd(4, xa[1] + k, xs); _tile_loadd(5, xb[1] + k, xs);
                AMX_PRODUCTS();
                _tile_loadd(4, xa[2] + k, xs); _tile_loadd(5, xb[2] + k, xs);
                AMX_PRODUCTS();
                _tile_loadd(4, xa[0] + k, xs); _tile_loadd(5, xb[0] + k, xs);
                _tile_loadd(6, w2a + wk, 64); _tile_loadd(7, w2b + wk, 64);
                AMX_PRODUCTS();
                _tile_loadd(4, xa[1] + k, xs); _tile_loadd(5, xb[1] + k, xs);
                AMX_PRODUCTS();
                _tile_loadd(4, xa[0] + k, xs); _tile_loadd(5, xb[0] + k, xs);
                _tile_loadd(6, w3a + wk, 64); _tile_loadd(7, w3b + wk, 64);
                AMX_PRODUCTS();
#undef AMX_PRODUCTS
            }
            _tile_stored(0, out[0], 64);
            _tile_stored(1, out[1], 64);
            _tile_stored(2, out[2], 64);
            _tile_stored(3, out[3], 64);
            for (int half = 0; half < 2 && n0 + 16 * half < n1; half++) {
                int cols = n1 - (n0 + 16 * half) < 16 ? n1 - (n0 + 16 * half) : 16;
                __mmask16 live = (__mmask16)((1u << cols) - 1u);
                for (int r = 0; r < 32 && m + r < a->rows; r++)
                    _mm512_mask_storeu_ps(g->y + (size_t)(a->m0 + m + r) * g->N + n0 + 16 * half, live,
                                          _mm512_load_ps(out[(r >= 16) * 2 + half][r & 15]));
            }
        }
    }
    _tile_release();
    free(wl);
}

/* the many-row product on tiles; 0 when it cannot run (no AMX, refused, out of memory before any output) */
static int amx_gemm(const gemm_t *g, int parts) {
    if (!amx_available()) return 0;
    int chunk = g->M < AMX_CHUNK_ROWS ? g->M : AMX_CHUNK_ROWS;
    int padded_max = (chunk + 15) / 16 * 16;
    uint16_t *buf = aligned_alloc(64, sizeof(uint16_t) * 3 * (size_t)padded_max * g->K);
    if (!buf) return 0;
    for (int m0 = 0; m0 < g->M; m0 += AMX_CHUNK_ROWS) {
        amx_job_t a;
        a.g = g;
        a.m0 = m0;
        a.rows = g->M - m0 < AMX_CHUNK_ROWS ? g->M - m0 : AMX_CHUNK_ROWS;
        a.padded = (a.rows + 15) / 16 * 16;
        for (int l = 0; l < 3; l++) a.xl[l] = buf + (size_t)l * a.padded * g->K;
        split_rows(g->x + (size_t)m0 * g->K, a.rows, a.padded, g->K, a.xl);
        run_parallel(amx_part, &a, parts);
    }
    free(buf);
    return 1;
}
#else
static int amx_gemm(const gemm_t *g, int parts) { (void)g; (void)parts; return 0; }
#endif

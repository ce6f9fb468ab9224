/* SwiGLU: the MLP's activation as one custom op, #included by qmatmul.c (its thread pool and ABI declarations).
 *
 *   input  [..., 2 * inter]: the fused gate/up projection (gate first, then up, on the last axis)
 *   output [..., inter]:     silu(gate) * up
 *
 * It replaces the nodes onnxruntime otherwise runs per layer (Split, QuickGelu with alpha 1 — its fusion of
 * gate * Sigmoid(gate) at ORT_ENABLE_EXTENDED and above — and Mul): one pass over the rows instead of three, and
 * in a decode step 30 nodes instead of 90 (onnxruntime's per-node cost).
 *
 * Numerics: BIT-IDENTICAL to the onnxruntime 1.32 CPU nodes it replaces, on the CPU it runs on. Both of
 * onnxruntime's sigmoids are MLAS's rational approximation (Eigen's coefficients) of the input clamped to
 * [-18, 18]:
 *   v  = max(-18, x) then min(18, v)           (vmaxps / vminps: a NaN input passes through)
 *   x2 = v * v
 *   p  = fma chain over x2 (alpha_9 .. alpha_1), then p = v * p
 *   q  = fma chain over x2 (beta_10 .. beta_0)
 *   s  = p / q + 0.5, then clamped
 * and differ in the clamp (SWIGLU_* below): onnxruntime's QuickGelu on a CPU with AVX-512F runs a fused SiLU
 * kernel that clamps s to [0, 1] and returns a NaN input itself; its Sigmoid node (and QuickGelu without
 * AVX-512F: logistic, then the product) runs the FMA3 logistic kernel, which clamps below only (near |x| = 17.5
 * s exceeds 1 by an ulp: 20 of the 2^32 inputs differ). The rewrite says which node it replaces (attribute
 * quick_gelu) and the CPU decides the rest, as it does for onnxruntime. Then act = x * s and the Mul act * up:
 * every step one IEEE-754 float32 operation in that order, as here. Checked over all 2^32 gate values against
 * onnxruntime on an AVX-512 CPU (tests/test_swiglu.py samples them). CPUs without AVX2 + FMA3 run MLAS's portable
 * kernel (separate multiply and add, clamp to [0, 1]); SWIGLU_PORTABLE follows it, untested here (no such CPU
 * at hand). Element-wise: the thread count and the row count never change a value.
 */
#include <math.h>

/* MLAS's logistic constants (onnxruntime/core/mlas/lib/logistic.cpp, Eigen's coefficients) */
#define SWIGLU_LOWER (-18.0f)
#define SWIGLU_UPPER 18.0f
static const float swiglu_alpha[5] = {4.37031012579801e-11f, 1.15627324459942e-07f, 6.08574864600143e-05f,
                                      8.51377133304701e-03f, 2.48287947061529e-01f};  /* alpha_9 .. alpha_1 */
static const float swiglu_beta[6] = {6.10247389755681e-13f, 5.76102136993427e-09f, 6.29106785017040e-06f,
                                     1.70198817374094e-03f, 1.16817656904453e-01f, 9.93151921023180e-01f};
                                     /* beta_10 .. beta_0 */

/* up * act with up as the FIRST operand of the multiply: where both are NaN, x86 returns the first operand's
   NaN, and onnxruntime's Mul returns up's. Written in assembly because a compiler may swap a product's
   operands (it does: the NaN payloads then differ from onnxruntime's). */
static inline float swiglu_mul_up_first(float up, float act) {
#if defined(__AVX__)
    float r;
    __asm__("vmulss %2, %1, %0" : "=x"(r) : "x"(up), "x"(act));
    return r;
#elif defined(__SSE__) && (defined(__x86_64__) || defined(__i386__))
    __asm__("mulss %1, %0" : "+x"(up) : "x"(act));
    return up;
#else
    return up * act;
#endif
}

/* what onnxruntime computes on this CPU, see above */
typedef enum {
    SWIGLU_CLAMPED = 0,   /* QuickGelu on AVX-512F: s clamped to [0, 1], a NaN gate is its own result */
    SWIGLU_FMA3 = 1,      /* the FMA3 logistic (Sigmoid; QuickGelu without AVX-512F): s clamped below only */
    SWIGLU_PORTABLE = 2,  /* MLAS's portable logistic: multiply, then add; s clamped to [0, 1] */
} swiglu_variant_t;

static swiglu_variant_t swiglu_variant(int quick_gelu) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    /* as MLAS decides: AVX-512F with the OS saving its state (gcc's check includes XCR0), AVX2 + FMA3 */
    if (quick_gelu && __builtin_cpu_supports("avx512f")) return SWIGLU_CLAMPED;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return SWIGLU_FMA3;
#else
    (void)quick_gelu;
#endif
    return SWIGLU_PORTABLE;
}

/* one element, the arithmetic above */
static inline float swiglu_one(float x, float up, swiglu_variant_t variant) {
    float v = SWIGLU_LOWER > x ? SWIGLU_LOWER : x;   /* vmaxps(lower, x): x when either is NaN */
    v = SWIGLU_UPPER < v ? SWIGLU_UPPER : v;         /* vminps(upper, v) */
    float x2 = v * v, p, q, s;
    if (variant != SWIGLU_PORTABLE) {
        p = fmaf(x2, swiglu_alpha[0], swiglu_alpha[1]);
        for (int i = 2; i < 5; i++) p = fmaf(x2, p, swiglu_alpha[i]);
        q = fmaf(x2, swiglu_beta[0], swiglu_beta[1]);
        for (int i = 2; i < 6; i++) q = fmaf(x2, q, swiglu_beta[i]);
    } else {  /* each product rounded before the sum: volatile keeps the compiler from fusing them */
        volatile float t = x2 * swiglu_alpha[0];
        p = t + swiglu_alpha[1];
        for (int i = 2; i < 5; i++) { t = x2 * p; p = t + swiglu_alpha[i]; }
        t = x2 * swiglu_beta[0];
        q = t + swiglu_beta[1];
        for (int i = 2; i < 6; i++) { t = x2 * q; q = t + swiglu_beta[i]; }
    }
    p = v * p;
    s = p / q + 0.5f;
    s = 0.0f > s ? 0.0f : s;                         /* vmaxps(0, s) */
    if (variant != SWIGLU_FMA3) s = 1.0f < s ? 1.0f : s;
    float act = x * s;                               /* QuickGelu: input * logistic */
    if (variant == SWIGLU_CLAMPED && x != x) act = x;
    return swiglu_mul_up_first(up, act);             /* Mul(act, up) */
}

#if defined(__AVX512F__)
/* 16 elements at a time (SWIGLU_CLAMPED or SWIGLU_FMA3); `live` masks the lanes of a partial vector */
static inline void swiglu_vec16(const float *g, const float *u, float *y, __mmask16 live, int clamped) {
    __m512 x = _mm512_maskz_loadu_ps(live, g), up = _mm512_maskz_loadu_ps(live, u);
    __m512 v = _mm512_min_ps(_mm512_set1_ps(SWIGLU_UPPER), _mm512_max_ps(_mm512_set1_ps(SWIGLU_LOWER), x));
    __m512 x2 = _mm512_mul_ps(v, v);
    __m512 p = _mm512_fmadd_ps(x2, _mm512_set1_ps(swiglu_alpha[0]), _mm512_set1_ps(swiglu_alpha[1]));
    for (int i = 2; i < 5; i++) p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(swiglu_alpha[i]));
    __m512 q = _mm512_fmadd_ps(x2, _mm512_set1_ps(swiglu_beta[0]), _mm512_set1_ps(swiglu_beta[1]));
    for (int i = 2; i < 6; i++) q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(swiglu_beta[i]));
    p = _mm512_mul_ps(v, p);
    __m512 s = _mm512_max_ps(_mm512_setzero_ps(), _mm512_add_ps(_mm512_div_ps(p, q), _mm512_set1_ps(0.5f)));
    __m512 act;
    if (clamped) {
        s = _mm512_min_ps(_mm512_set1_ps(1.0f), s);
        act = _mm512_mask_mov_ps(_mm512_mul_ps(x, s), _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
    } else {
        act = _mm512_mul_ps(x, s);
    }
    __m512 out;
    __asm__("vmulps %2, %1, %0" : "=v"(out) : "v"(up), "v"(act));  /* up first, as swiglu_mul_up_first */
    _mm512_mask_storeu_ps(y, live, out);
}
#elif defined(__AVX2__) && defined(__FMA__)
/* 8 elements at a time (SWIGLU_CLAMPED or SWIGLU_FMA3) */
static inline void swiglu_vec8(const float *g, const float *u, float *y, int clamped) {
    __m256 x = _mm256_loadu_ps(g), up = _mm256_loadu_ps(u);
    __m256 v = _mm256_min_ps(_mm256_set1_ps(SWIGLU_UPPER), _mm256_max_ps(_mm256_set1_ps(SWIGLU_LOWER), x));
    __m256 x2 = _mm256_mul_ps(v, v);
    __m256 p = _mm256_fmadd_ps(x2, _mm256_set1_ps(swiglu_alpha[0]), _mm256_set1_ps(swiglu_alpha[1]));
    for (int i = 2; i < 5; i++) p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(swiglu_alpha[i]));
    __m256 q = _mm256_fmadd_ps(x2, _mm256_set1_ps(swiglu_beta[0]), _mm256_set1_ps(swiglu_beta[1]));
    for (int i = 2; i < 6; i++) q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(swiglu_beta[i]));
    p = _mm256_mul_ps(v, p);
    __m256 s = _mm256_max_ps(_mm256_setzero_ps(), _mm256_add_ps(_mm256_div_ps(p, q), _mm256_set1_ps(0.5f)));
    __m256 act;
    if (clamped) {
        s = _mm256_min_ps(_mm256_set1_ps(1.0f), s);
        act = _mm256_blendv_ps(_mm256_mul_ps(x, s), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    } else {
        act = _mm256_mul_ps(x, s);
    }
    __m256 out;
    __asm__("vmulps %2, %1, %0" : "=x"(out) : "x"(up), "x"(act));  /* up first, as swiglu_mul_up_first */
    _mm256_storeu_ps(y, out);
}
#endif

/* rows [r0, r1) of x [rows, 2 * inter] into y [rows, inter] */
static void swiglu_rows(const float *x, float *y, int64_t inter, int64_t r0, int64_t r1, swiglu_variant_t variant) {
    int clamped = variant == SWIGLU_CLAMPED;
    for (int64_t r = r0; r < r1; r++) {
        const float *g = x + r * 2 * inter, *u = g + inter;
        float *out = y + r * inter;
        int64_t i = 0;
#if defined(__AVX512F__)
        if (variant != SWIGLU_PORTABLE) {  /* always so: an AVX-512 CPU has AVX2 and FMA3 */
            for (; i + 16 <= inter; i += 16) swiglu_vec16(g + i, u + i, out + i, 0xFFFF, clamped);
            if (i < inter) swiglu_vec16(g + i, u + i, out + i, (__mmask16)((1u << (inter - i)) - 1), clamped);
            continue;
        }
#elif defined(__AVX2__) && defined(__FMA__)
        if (variant != SWIGLU_PORTABLE)
            for (; i + 8 <= inter; i += 8) swiglu_vec8(g + i, u + i, out + i, clamped);
#endif
        for (; i < inter; i++) out[i] = swiglu_one(g[i], u[i], variant);
    }
}

typedef struct { const float *x; float *y; int64_t inter, rows; swiglu_variant_t variant; } swiglu_job_t;

static void swiglu_part(void *arg, int part, int parts) {
    const swiglu_job_t *j = (const swiglu_job_t *)arg;
    swiglu_rows(j->x, j->y, j->inter, j->rows * part / parts, j->rows * (part + 1) / parts, j->variant);
}

/* elements per thread below which another thread costs more than it saves (a decode row: the calling thread) */
#define SWIGLU_MIN_ELEMENTS_PER_PART 16384

typedef struct { int64_t inter, threads, rank; swiglu_variant_t variant; } swiglu_kernel_t;

static void *swiglu_create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info) {
    (void)op; (void)api;
    swiglu_kernel_t *k = calloc(1, sizeof(swiglu_kernel_t));
    if (!k) return NULL;
    k->inter = attr(info, "inter", 0);
    k->threads = attr(info, "threads", 1);
    k->rank = attr(info, "rank", 0);  /* 0: any rank (the split was on the last axis, -1) */
    /* 1: the nodes replaced run as onnxruntime's QuickGelu (sessions at ORT_ENABLE_EXTENDED and above), 0: as
       its Sigmoid and Mul */
    k->variant = swiglu_variant((int)attr(info, "quick_gelu", 1));
    return k;
}

static void swiglu_compute(void *opk, OrtKernelContext *ctx) {
    const swiglu_kernel_t *k = (const swiglu_kernel_t *)opk;
    const OrtValue *xv;
    int64_t dims[8];
    int rank = input_dims(ctx, 0, &xv, dims, 8);
    /* the graph rewrite checked the pattern; a shape it did not promise leaves the output unwritten (onnxruntime
       then fails the run) rather than reading out of bounds */
    if (rank < 1 || k->inter <= 0 || dims[rank - 1] != 2 * k->inter || (k->rank && rank != k->rank)) return;
    int64_t rows = 1;
    for (int i = 0; i < rank - 1; i++) rows *= dims[i];
    dims[rank - 1] = k->inter;
    OrtValue *yv;
    if (API(SLOT_KernelContext_GetOutput, fn_get_output)(ctx, 0, dims, (size_t)rank, &yv)) return;
    const float *x = data_of(xv);
    float *y = data_of(yv);
    if (!x || !y || rows == 0) return;
    int64_t parts = rows * k->inter / SWIGLU_MIN_ELEMENTS_PER_PART;
    if (parts > k->threads) parts = k->threads;
    if (parts > rows) parts = rows;
    swiglu_job_t job = {x, y, k->inter, rows, k->variant};
    run_parallel(swiglu_part, &job, parts < 1 ? 1 : (int)parts);
}

static void swiglu_destroy(void *opk) { free(opk); }
static const char *swiglu_name(const OrtCustomOp *op) { (void)op; return "SwiGLU"; }

/* one float input, one float output: op_output_type / op_output_count (qmatmul.c) answer for the input too */
static OrtCustomOp swiglu_op = {1, swiglu_create, swiglu_name, op_provider, op_output_type, op_output_count,
                                op_output_type, op_output_count, swiglu_compute, swiglu_destroy, op_required,
                                op_required, op_mem_default, op_one, op_one, op_one, op_one, NULL, NULL, NULL,
                                op_one, op_end_version, no_pairs, release_pairs, no_pairs, release_pairs};

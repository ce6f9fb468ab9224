/* SwiGLU: the MLP's activation as one custom op, #included by qmatmul.c (its thread pool and ABI declarations).
 *
 *   input  [..., 2 * inter]: the fused gate/up projection (gate first, then up, on the last axis)
 *   output [..., inter]:     silu(gate) * up
 *
 * It replaces the three onnxruntime nodes the graph otherwise runs per layer (Split, QuickGelu with alpha 1 —
 * onnxruntime's fusion of gate * Sigmoid(gate) — and Mul): one pass over the rows instead of three, and in a
 * decode step 30 nodes instead of 90 (onnxruntime's per-node cost).
 *
 * Numerics: BIT-IDENTICAL to those onnxruntime CPU nodes. onnxruntime computes the sigmoid with MLAS's
 * logistic kernel (a rational polynomial of the input clamped to [-18, 18], Eigen's coefficients); on x86-64 with
 * AVX2 + FMA3 it runs the kernel MlasLogisticKernelFma3 (also on AVX-512 CPUs), whose arithmetic is, per element:
 *   v  = max(-18, x) then min(18, v)           (vmaxps / vminps: a NaN input passes through)
 *   x2 = v * v
 *   p  = fma chain over x2 (alpha_9 .. alpha_1), then p = v * p
 *   q  = fma chain over x2 (beta_10 .. beta_0)
 *   s  = max(0, p / q + 0.5)                   (a lower clamp only)
 * QuickGelu then multiplies x * s (its alpha 1 scaling x * 1 is exact), and Mul (x * s) * up: every step one
 * IEEE-754 float32 operation in that order, which this file repeats exactly (the fused multiply-adds as fused,
 * max/min with their operand order, so NaN and signed zeros come out the same). Other CPUs run MLAS's portable
 * kernel (plain multiply then add, and a clamp to [0, 1]); the scalar path below follows that where the CPU has
 * no AVX2 + FMA3 (x86) — untested here, as no such CPU is at hand. Element-wise: the thread count and the row
 * count never change a value.
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

/* 1: onnxruntime on this CPU takes the FMA3 logistic kernel (fused multiply-adds, no upper clamp); 0: its
   portable kernel (separate multiply and add, clamp to [0, 1]) */
static int swiglu_fused_logistic(void) {
#if defined(__x86_64__) || defined(__i386__)
    static int known = -1;
    if (known < 0) known = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return known;
#elif defined(__aarch64__)
    return 1;  /* NEON's multiply-add is fused (vfmaq_f32); the clamp to [0, 1] stays */
#else
    return 0;
#endif
}

/* one element, the arithmetic above; `fused` as swiglu_fused_logistic() */
static inline float swiglu_one(float x, float up, int fused) {
    float v = SWIGLU_LOWER > x ? SWIGLU_LOWER : x;   /* vmaxps(lower, x): x when either is NaN */
    v = SWIGLU_UPPER < v ? SWIGLU_UPPER : v;         /* vminps(upper, v) */
    float x2 = v * v, p, q, s;
    if (fused) {
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
    if (!fused) s = 1.0f < s ? 1.0f : s;             /* MlasClampFloat32x4's upper bound */
    float act = x * s;                               /* QuickGelu: input * logistic */
    return act * up;                                 /* Mul(act, up) */
}

#if defined(__AVX512F__)
/* 16 elements at a time; `live` masks the lanes of a partial vector */
static inline void swiglu_vec16(const float *g, const float *u, float *y, __mmask16 live) {
    __m512 x = _mm512_maskz_loadu_ps(live, g), up = _mm512_maskz_loadu_ps(live, u);
    __m512 v = _mm512_min_ps(_mm512_set1_ps(SWIGLU_UPPER), _mm512_max_ps(_mm512_set1_ps(SWIGLU_LOWER), x));
    __m512 x2 = _mm512_mul_ps(v, v);
    __m512 p = _mm512_fmadd_ps(x2, _mm512_set1_ps(swiglu_alpha[0]), _mm512_set1_ps(swiglu_alpha[1]));
    for (int i = 2; i < 5; i++) p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(swiglu_alpha[i]));
    __m512 q = _mm512_fmadd_ps(x2, _mm512_set1_ps(swiglu_beta[0]), _mm512_set1_ps(swiglu_beta[1]));
    for (int i = 2; i < 6; i++) q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(swiglu_beta[i]));
    p = _mm512_mul_ps(v, p);
    __m512 s = _mm512_add_ps(_mm512_div_ps(p, q), _mm512_set1_ps(0.5f));
    s = _mm512_max_ps(_mm512_setzero_ps(), s);
    _mm512_mask_storeu_ps(y, live, _mm512_mul_ps(_mm512_mul_ps(x, s), up));
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline void swiglu_vec8(const float *g, const float *u, float *y) {
    __m256 x = _mm256_loadu_ps(g), up = _mm256_loadu_ps(u);
    __m256 v = _mm256_min_ps(_mm256_set1_ps(SWIGLU_UPPER), _mm256_max_ps(_mm256_set1_ps(SWIGLU_LOWER), x));
    __m256 x2 = _mm256_mul_ps(v, v);
    __m256 p = _mm256_fmadd_ps(x2, _mm256_set1_ps(swiglu_alpha[0]), _mm256_set1_ps(swiglu_alpha[1]));
    for (int i = 2; i < 5; i++) p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(swiglu_alpha[i]));
    __m256 q = _mm256_fmadd_ps(x2, _mm256_set1_ps(swiglu_beta[0]), _mm256_set1_ps(swiglu_beta[1]));
    for (int i = 2; i < 6; i++) q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(swiglu_beta[i]));
    p = _mm256_mul_ps(v, p);
    __m256 s = _mm256_add_ps(_mm256_div_ps(p, q), _mm256_set1_ps(0.5f));
    s = _mm256_max_ps(_mm256_setzero_ps(), s);
    _mm256_storeu_ps(y, _mm256_mul_ps(_mm256_mul_ps(x, s), up));
}
#endif

/* rows [r0, r1) of x [rows, 2 * inter] into y [rows, inter] */
static void swiglu_rows(const float *x, float *y, int64_t inter, int64_t r0, int64_t r1) {
    int fused = swiglu_fused_logistic();
    for (int64_t r = r0; r < r1; r++) {
        const float *g = x + r * 2 * inter, *u = g + inter;
        float *out = y + r * inter;
        int64_t i = 0;
#if defined(__AVX512F__)
        if (fused) {  /* always so: an AVX-512 CPU has AVX2 and FMA3 */
            for (; i + 16 <= inter; i += 16) swiglu_vec16(g + i, u + i, out + i, 0xFFFF);
            if (i < inter) swiglu_vec16(g + i, u + i, out + i, (__mmask16)((1u << (inter - i)) - 1));
            continue;
        }
#elif defined(__AVX2__) && defined(__FMA__)
        if (fused)
            for (; i + 8 <= inter; i += 8) swiglu_vec8(g + i, u + i, out + i);
#endif
        for (; i < inter; i++) out[i] = swiglu_one(g[i], u[i], fused);
    }
}

typedef struct { const float *x; float *y; int64_t inter, rows; } swiglu_job_t;

static void swiglu_part(void *arg, int part, int parts) {
    const swiglu_job_t *j = (const swiglu_job_t *)arg;
    swiglu_rows(j->x, j->y, j->inter, j->rows * part / parts, j->rows * (part + 1) / parts);
}

/* rows per thread below which another thread costs more than it saves (a decode row: the calling thread) */
#define SWIGLU_MIN_ELEMENTS_PER_PART 16384

typedef struct { int64_t inter, threads, rank; } swiglu_kernel_t;

static void *swiglu_create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info) {
    (void)op; (void)api;
    swiglu_kernel_t *k = calloc(1, sizeof(swiglu_kernel_t));
    if (!k) return NULL;
    k->inter = attr(info, "inter", 0);
    k->threads = attr(info, "threads", 1);
    k->rank = attr(info, "rank", 0);  /* 0: any rank (the split was on the last axis, -1) */
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
    swiglu_job_t job = {x, y, k->inter, rows};
    run_parallel(swiglu_part, &job, parts < 1 ? 1 : (int)parts);
}

static void swiglu_destroy(void *opk) { free(opk); }
static const char *swiglu_name(const OrtCustomOp *op) { (void)op; return "SwiGLU"; }

/* one float input, one float output: op_output_type / op_output_count (qmatmul.c) answer for the input too */
static OrtCustomOp swiglu_op = {1, swiglu_create, swiglu_name, op_provider, op_output_type, op_output_count,
                                op_output_type, op_output_count, swiglu_compute, swiglu_destroy, op_required,
                                op_required, op_mem_default, op_one, op_one, op_one, op_one, NULL, NULL, NULL,
                                op_one, op_end_version, no_pairs, release_pairs, no_pairs, release_pairs};

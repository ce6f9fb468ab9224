/* p2pinfer decode kernel: y = x @ W.T for W stored as onnxruntime MatMulNBits 4-bit terms (+ block minimums),
 * as an onnxruntime custom op library.
 *
 * Why: onnxruntime 1.32's MatMulNBits barely uses a second thread for one activation row at SmolLM2's shapes
 * (576->960 54 -> 52 us from 1 to 2 threads) and a Q4_1 layer costs it 5 nodes (terms, block sums, minimums,
 * Sum). This kernel reads the SAME initializers (no new weights, same model digest), computes one node per
 * layer and splits output rows over its own threads.
 *
 * Numerics: float32 activations, float32 accumulation (never int8 activations). Per output row n and block b
 *   y[n] = sum_b ( sum_t scale_t[n,b] * sum_i (q_t[n,b,i] - zp_t) * x[b,i] )  +  sum_b mins[b,n] * sum_i x[b,i]
 * (q - zp) is exact in float32, so this is MatMulNBits' value sum in another order: float32 rounding drift.
 * Decode rows on a CPU with AVX-512 VNNI (or AVX2, qdecode_avx2.c) take the integer path below (INT_DOT): x rounded per block to a
 * 22-23-bit fixed-point value (at most 2^-22 of the block's largest |x|), the block sums then exact.
 * Each output element is computed by the same instruction sequence whatever the thread count and the number
 * of rows: row-deterministic.
 *
 * ABI: no onnxruntime header is needed or shipped. The few declarations below are onnxruntime's stable C ABI,
 * pinned at ORT_API_VERSION 1 (OrtApi slots 0..101 never change; see onnxruntime_c_api.cc, "Shipped as version
 * 1 - DO NOT MODIFY"), and OrtCustomOp's version-1 fields (inputs all required, fixed count per op name).
 * Ops (domain "p2pinfer"): QMatMul1 (x, q, s), QMatMul1M (x, q, s, mins), QMatMul2 (x, q0, s0, q1, s1);
 * attributes K, N, zp0, zp1, threads. And SwiGLU (swiglu.c), the MLP's activation, and GQAttention (qattn.c),
 * GroupQueryAttention (version 16: its KernelComputeV2 reports bad input as an error status).
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* ---- onnxruntime C ABI, version 1 (declared here, not included) ------------------------------------------ */
typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtApi OrtApi;  /* a table of function pointers; we index it by slot */
typedef struct OrtApiBase {
    const OrtApi *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum { ELEM_FLOAT = 1, ELEM_UINT8 = 2 };
/* OrtApi slots (version 1) */
enum {
    SLOT_CreateStatus = 0, SLOT_CreateCustomOpDomain = 26, SLOT_CustomOpDomain_Add = 27, SLOT_AddCustomOpDomain = 28,
    SLOT_GetTensorMutableData = 51, SLOT_GetDimensionsCount = 61, SLOT_GetDimensions = 62,
    SLOT_GetTensorTypeAndShape = 65, SLOT_KernelInfoGetAttribute_int64 = 86, SLOT_KernelContext_GetInputCount = 88,
    SLOT_KernelContext_GetInput = 90, SLOT_KernelContext_GetOutput = 91, SLOT_ReleaseStatus = 93,
    SLOT_ReleaseTensorTypeAndShapeInfo = 99,
};
typedef struct OrtCustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info);
    const char *(*GetName)(const struct OrtCustomOp *op);
    const char *(*GetExecutionProviderType)(const struct OrtCustomOp *op);
    int (*GetInputType)(const struct OrtCustomOp *op, size_t index);
    size_t (*GetInputTypeCount)(const struct OrtCustomOp *op);
    int (*GetOutputType)(const struct OrtCustomOp *op, size_t index);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOp *op);
    void (*KernelCompute)(void *op_kernel, OrtKernelContext *context);
    void (*KernelDestroy)(void *op_kernel);
    /* later versions' fields: onnxruntime 1.32 calls some of them whatever the declared version, so all are set */
    int (*GetInputCharacteristic)(const struct OrtCustomOp *op, size_t index);
    int (*GetOutputCharacteristic)(const struct OrtCustomOp *op, size_t index);
    int (*GetInputMemoryType)(const struct OrtCustomOp *op, size_t index);
    int (*GetVariadicInputMinArity)(const struct OrtCustomOp *op);
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *op);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *op);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *op);
    OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel);
    OrtStatus *(*KernelComputeV2)(void *op_kernel, OrtKernelContext *context);
    OrtStatus *(*InferOutputShapeFn)(const struct OrtCustomOp *op, void *shape_infer_context);
    int (*GetStartVersion)(const struct OrtCustomOp *op);
    int (*GetEndVersion)(const struct OrtCustomOp *op);
    size_t (*GetMayInplace)(int **input_index, int **output_index);
    void (*ReleaseMayInplace)(int *input_index, int *output_index);
    size_t (*GetAliasMap)(int **input_index, int **output_index);
    void (*ReleaseAliasMap)(int *input_index, int *output_index);
} OrtCustomOp;

static const OrtApi *g_api;
#define API(slot, type) ((type)(((void *const *)g_api)[slot]))
typedef OrtStatus *(*fn_create_status)(int, const char *);
typedef OrtStatus *(*fn_attr_i64)(const OrtKernelInfo *, const char *, int64_t *);
typedef OrtStatus *(*fn_input_count)(const OrtKernelContext *, size_t *);
typedef OrtStatus *(*fn_get_input)(const OrtKernelContext *, size_t, const OrtValue **);
typedef OrtStatus *(*fn_get_output)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **);
typedef OrtStatus *(*fn_mutable_data)(OrtValue *, void **);
typedef OrtStatus *(*fn_type_shape)(const OrtValue *, OrtTensorTypeAndShapeInfo **);
typedef OrtStatus *(*fn_dims_count)(const OrtTensorTypeAndShapeInfo *, size_t *);
typedef OrtStatus *(*fn_dims)(const OrtTensorTypeAndShapeInfo *, int64_t *, size_t);
typedef void (*fn_release_shape)(OrtTensorTypeAndShapeInfo *);
typedef void (*fn_release_status)(OrtStatus *);
typedef OrtStatus *(*fn_create_domain)(const char *, OrtCustomOpDomain **);
typedef OrtStatus *(*fn_domain_add)(OrtCustomOpDomain *, const OrtCustomOp *);
typedef OrtStatus *(*fn_add_domain)(OrtSessionOptions *, OrtCustomOpDomain *);

/* ---- a small thread pool: workers spin briefly, then sleep; every hand-over under one mutex ------------ */
#define MAX_THREADS 64
#define SPINS 2000
/* How long an idle worker waits for the next job, yielding its core, before it sleeps. Between two of our nodes
   onnxruntime runs its own operators (attention, norms, ...) for 0.1-1 ms; a worker asleep by then costs a
   wake-up on every node (16-50 us in a VM, and a core back from idle). Spinning until the next node, with the
   core yielded every 64 pauses so that onnxruntime's threads get it whenever they run, took a 4-bit verification
   of 174 positions from 0.158 to 0.144 s (decode alike or faster). A peer with no work sleeps after 2 ms. */
#define WORKER_SPIN_NS 2000000LL
typedef void (*task_fn)(void *arg, int part, int parts);
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;   /* one dispatch at a time */
static pthread_mutex_t state_lock = PTHREAD_MUTEX_INITIALIZER;  /* guards everything below */
static pthread_cond_t work_ready = PTHREAD_COND_INITIALIZER;
static pthread_cond_t work_done = PTHREAD_COND_INITIALIZER;
static atomic_uint generation;   /* written under state_lock; read without it only to spin */
static atomic_int remaining;     /* parts still running; written under state_lock */
static int pool_workers;
static unsigned created_at[MAX_THREADS];  /* the generation when each worker was created */
static task_fn job_fn;
static void *job_arg;
static int job_parts;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static long long monotonic_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* until the generation moves on from seen or WORKER_SPIN_NS pass (see there) */
static void worker_spin(unsigned seen) {
    long long until = 0;
    for (unsigned spins = 1; atomic_load_explicit(&generation, memory_order_acquire) == seen; spins++) {
        cpu_relax();
        if (spins % 64) continue;
        long long t = monotonic_ns();
        if (!until) until = t + WORKER_SPIN_NS;
        else if (t >= until) return;
        sched_yield();
    }
}

static void *worker_main(void *p) {
    int id = (int)(intptr_t)p;  /* part id 1..pool_workers */
    pthread_mutex_lock(&state_lock);
    unsigned seen = created_at[id];  /* it must not run a job dispatched before it existed */
    pthread_mutex_unlock(&state_lock);
    for (;;) {
        worker_spin(seen);
        pthread_mutex_lock(&state_lock);
        while (atomic_load_explicit(&generation, memory_order_relaxed) == seen) pthread_cond_wait(&work_ready, &state_lock);
        seen = atomic_load_explicit(&generation, memory_order_relaxed);
        task_fn fn = job_fn;
        void *arg = job_arg;
        int parts = job_parts;
        pthread_mutex_unlock(&state_lock);
        if (id < parts) {
            fn(arg, id, parts);
            pthread_mutex_lock(&state_lock);
            if (atomic_fetch_sub_explicit(&remaining, 1, memory_order_acq_rel) == 1) pthread_cond_signal(&work_done);
            pthread_mutex_unlock(&state_lock);
        }
    }
    return NULL;
}

/* a forked child has none of the parent's workers: start over (else it would wait for them forever) */
static void pool_after_fork_child(void) {
    pthread_mutex_init(&pool_lock, NULL);
    pthread_mutex_init(&state_lock, NULL);
    pthread_cond_init(&work_ready, NULL);
    pthread_cond_init(&work_done, NULL);
    pool_workers = 0;
    atomic_store(&remaining, 0);
}
static pthread_once_t fork_hook_once = PTHREAD_ONCE_INIT;
static void install_fork_hook(void) { pthread_atfork(NULL, NULL, pool_after_fork_child); }

/* run fn(arg, part, parts) for part in 0..parts-1, part 0 on the calling thread; another thread's dispatch
   in progress (two sessions at once) makes this one run on the calling thread alone */
static void run_parallel(task_fn fn, void *arg, int parts) {
    pthread_once(&fork_hook_once, install_fork_hook);
    if (parts <= 1 || pthread_mutex_trylock(&pool_lock) != 0) { fn(arg, 0, 1); return; }
    pthread_mutex_lock(&state_lock);
    while (pool_workers < parts - 1 && pool_workers < MAX_THREADS - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        created_at[pool_workers + 1] = atomic_load(&generation);
        int failed = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)(pool_workers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool_workers++;
    }
    if (parts > pool_workers + 1) parts = pool_workers + 1;
    job_fn = fn; job_arg = arg; job_parts = parts;
    atomic_store_explicit(&remaining, parts - 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&generation, 1, memory_order_release);
    pthread_cond_broadcast(&work_ready);
    pthread_mutex_unlock(&state_lock);
    fn(arg, 0, parts);
    for (int spins = 0; spins < SPINS && atomic_load_explicit(&remaining, memory_order_acquire) > 0; spins++) cpu_relax();
    pthread_mutex_lock(&state_lock);
    while (atomic_load_explicit(&remaining, memory_order_acquire) > 0) pthread_cond_wait(&work_done, &state_lock);
    pthread_mutex_unlock(&state_lock);
    pthread_mutex_unlock(&pool_lock);
}

/* ---- the product ----------------------------------------------------------------------------------------- */
typedef struct {
    int M, N, K, nb, terms;
    const float *xd;      /* [M, K]: per block, the 16 even-index values, then the 16 odd-index ones */
    const float *xsum;    /* [M, nb] block sums of x (NULL without mins) */
    const uint8_t *q[2];  /* [N, nb, 16] */
    const float *s[2];    /* [N * nb] */
    int zp[2];
    const float *mins;    /* [nb, N] or NULL */
    float *y;             /* [M, N] */
    /* the integer one-row path (INT_DOT): the activation as fixed-point limbs, see prepare_int_rows */
    int pairs;              /* ceil(nb / 2): blocks are taken two at a time */
    const int8_t *limbs;    /* [M, pairs, LIMBS, 64] or NULL (the float path) */
    const float *invc;      /* [M, pairs, 16]: per lane, 2^-e of the lane's block */
    const int32_t *zpx[2];  /* [M, pairs, 16]: zp_t * the lane's sum of integers, or NULL when zp_t == 0 */
    const uint16_t *s16[2]; /* float16 copies of s[t] (the same values), or NULL: read s[t] */
    const uint16_t *mins16; /* a float16 copy of mins TRANSPOSED, [N, nb] (beside the codes), or NULL */
} job_t;

#if defined(__AVX512F__) || defined(__AVX2__)
/* The hardware prefetcher alone leaves the core waiting on memory (measured: the one-row paths are 1.2-1.4x
   faster on one thread with this): ask for the codes and scales of the rows PREFETCH_ROWS ahead (contiguous with
   these), and for the integer path's float16 minimums ([N, nb]: contiguous too), while these rows are computed. */
#define PREFETCH_ROWS 8  /* two groups of four rows; 8, 16 and 32 measured alike */
static inline __attribute__((always_inline)) void prefetch_ahead(const job_t *j, int n) {
    if (n + PREFETCH_ROWS < j->N) {
        int ahead = j->N - n - PREFETCH_ROWS < 4 ? j->N - n - PREFETCH_ROWS : 4;
        size_t first = (size_t)(n + PREFETCH_ROWS) * j->nb, blocks = (size_t)ahead * j->nb;
        for (int t = 0; t < j->terms; t++) {
            const char *q = (const char *)(j->q[t] + first * 16);
            for (size_t off = 0; off < blocks * 16; off += 64) _mm_prefetch(q + off, _MM_HINT_T0);
            const char *s = j->s16[t] ? (const char *)(j->s16[t] + first) : (const char *)(j->s[t] + first);
            size_t sbytes = blocks * (j->s16[t] ? 2 : 4);
            for (size_t off = 0; off < sbytes; off += 64) _mm_prefetch(s + off, _MM_HINT_T0);
        }
        if (j->mins16)
            for (size_t off = 0; off < blocks * 2; off += 64) _mm_prefetch((const char *)(j->mins16 + first) + off, _MM_HINT_T0);
    }
}
#endif

#if defined(__AVX512F__)
/* rows n..n+R-1 (R <= 4) of one activation row */
static void rows_simd(const job_t *j, int m, int n, int R) {
    prefetch_ahead(j, n);
    const float *x = j->xd + (size_t)m * j->K;
    __m512 acc[4];
    float macc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int r = 0; r < 4; r++) acc[r] = _mm512_setzero_ps();
    const __m512i nib = _mm512_set1_epi32(15);
    for (int b = 0; b < j->nb; b++) {
        __m512 xe = _mm512_loadu_ps(x + 32 * b), xo = _mm512_loadu_ps(x + 32 * b + 16);
        for (int r = 0; r < R; r++) {
            size_t blk = (size_t)(n + r) * j->nb + b;
            for (int t = 0; t < j->terms; t++) {
                /* one widening of the 16 bytes: each lane holds a byte, its low nibble the even element and its
                   high nibble (the lane shifted right by 4: the upper bits are zero) the odd one */
                __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(j->q[t] + blk * 16)));
                __m512i zp = _mm512_set1_epi32(j->zp[t]);
                __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(bytes, nib), zp));
                __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bytes, 4), zp));
                __m512 dot = _mm512_fmadd_ps(hi, xo, _mm512_mul_ps(lo, xe));
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(j->s[t][blk]), dot, acc[r]);
            }
            if (j->mins) macc[r] += j->mins[(size_t)b * j->N + n + r] * j->xsum[(size_t)m * j->nb + b];
        }
    }
    for (int r = 0; r < R; r++) j->y[(size_t)m * j->N + n + r] = _mm512_reduce_add_ps(acc[r]) + macc[r];
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static void rows_simd(const job_t *j, int m, int n, int R) {
    prefetch_ahead(j, n);
    const float *x = j->xd + (size_t)m * j->K;
    __m256 acc[4];
    float macc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
    const __m128i nib = _mm_set1_epi8(15);
    for (int b = 0; b < j->nb; b++) {
        const float *xb = x + 32 * b;
        for (int r = 0; r < R; r++) {
            size_t blk = (size_t)(n + r) * j->nb + b;
            for (int t = 0; t < j->terms; t++) {
                __m128i packed = _mm_loadu_si128((const __m128i *)(j->q[t] + blk * 16));
                __m128i lo = _mm_and_si128(packed, nib), hi = _mm_and_si128(_mm_srli_epi16(packed, 4), nib);
                __m256i zp = _mm256_set1_epi32(j->zp[t]);
                __m256 c0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(lo), zp));
                __m256 c1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), zp));
                __m256 c2 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(hi), zp));
                __m256 c3 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), zp));
                __m256 dot = _mm256_mul_ps(c0, _mm256_loadu_ps(xb));
                dot = _mm256_fmadd_ps(c1, _mm256_loadu_ps(xb + 8), dot);
                dot = _mm256_fmadd_ps(c2, _mm256_loadu_ps(xb + 16), dot);
                dot = _mm256_fmadd_ps(c3, _mm256_loadu_ps(xb + 24), dot);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(j->s[t][blk]), dot, acc[r]);
            }
            if (j->mins) macc[r] += j->mins[(size_t)b * j->N + n + r] * j->xsum[(size_t)m * j->nb + b];
        }
    }
    for (int r = 0; r < R; r++) j->y[(size_t)m * j->N + n + r] = hsum256(acc[r]) + macc[r];
}
#else
static void rows_simd(const job_t *j, int m, int n, int R) {  /* portable */
    const float *x = j->xd + (size_t)m * j->K;
    for (int r = 0; r < R; r++) {
        float acc = 0.f, macc = 0.f;
        for (int b = 0; b < j->nb; b++) {
            size_t blk = (size_t)(n + r) * j->nb + b;
            for (int t = 0; t < j->terms; t++) {
                const uint8_t *q = j->q[t] + blk * 16;
                float dot = 0.f;
                for (int i = 0; i < 16; i++)
                    dot += (float)((q[i] & 15) - j->zp[t]) * x[32 * b + i] + (float)((q[i] >> 4) - j->zp[t]) * x[32 * b + 16 + i];
                acc += j->s[t][blk] * dot;
            }
            if (j->mins) macc += j->mins[(size_t)b * j->N + n + r] * j->xsum[(size_t)m * j->nb + b];
        }
        j->y[(size_t)m * j->N + n + r] = acc + macc;
    }
}
#endif

/* ---- one row with integer dot products (AVX-512 VNNI), float32-grade -----------------------------------------
 * Per activation row and 32-element block b, x is scaled by a power of two 2^e_b (the largest that keeps
 * |x| * 2^e_b <= X_LIMIT) and rounded to an integer x_int; that is the ONLY rounding beyond float32's:
 * |x - x_int * 2^-e_b| <= 2^-e_b / 2 <= 2^-(8 * LIMBS - 2) * max|x over the block|, about float32's own
 * resolution at the block's largest value (LIMBS = 3: 2^-22). x_int is split into LIMBS signed bytes
 * (x_int = sum_k a_k * 256^k, each a_k in -128..127) and vpdpbusd multiplies the 4-bit codes (unsigned bytes
 * 0..15) by each limb, four products per int32 lane; the limbs are recombined in int32 (exact: a lane holds
 * four products, at most 4 * 15 * X_LIMIT < 2^29), the zero point is taken off as zp * (the lane's sum of x_int)
 * (exact), and only then is the lane converted to float32 (one rounding, relative 2^-24) and multiplied by
 * scale * 2^-e_b (exact: a power of two). So per block the integer part sum_i (q_i - zp) * x_int_i is EXACT.
 * The block minimum term is float32, as in the float path. Blocks go two at a time (one zmm of codes:
 * 128-bit lanes = even elements of b, of b+1, odd elements of b, of b+1 — the nibble order); every output
 * element is one instruction sequence whatever the thread count: row-deterministic. */
/* The integer decode path's rule for a block, shared by its AVX-512 and AVX2 builds (the same bits on both). */
#if (defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)) \
    || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#ifndef LIMBS
#define LIMBS 3
#endif
#define X_LIMIT (127 << (8 * (LIMBS - 1)))  /* the top limb stays in -127..127 */

/* 2^e for -126 <= e <= 127, exactly */
static inline float pow2i(int e) {
    uint32_t bits = (uint32_t)(e + 127) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* The power of two e_b for a block of finite values whose largest magnitude is amax: amax * 2^e_b fits the
   limbs (<= X_LIMIT) with the most bits kept */
static inline int block_exponent(float amax) {
    uint32_t bits;
    memcpy(&bits, &amax, 4);
    int biased = (int)(bits >> 23);
    int ex = biased ? biased - 126 : -126;  /* amax < 2^ex */
    int e = 8 * LIMBS - 1 - ex;  /* amax * 2^e < 2^(8 * LIMBS - 1) */
    if (e > 126) e = 126;  /* a block of values below 2^-103: kept in steps of 2^-126 (or 0) */
    if (amax * pow2i(e) > (float)X_LIMIT) e--;
    return e;
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define INT_DOT 1

/* rows m of x [M, K] -> limbs, 2^-e per lane, zp_t * lane sums (for the terms whose zero point is not 0) */
static void prepare_int_rows(job_t *j, const float *x, int8_t *limbs, float *invc, int32_t *zpx0, int32_t *zpx1) {
    const __m512i lane = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for (int m = 0; m < j->M; m++)
        for (int p = 0; p < j->pairs; p++) {
            int8_t *dst = limbs + ((size_t)m * j->pairs + p) * LIMBS * 64;
            float *ic = invc + ((size_t)m * j->pairs + p) * 16;
            __m512i sums = _mm512_setzero_si512();  /* lanes: [b even, b+1 even, b odd, b+1 odd] x 4 */
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
                __m512 v0 = _mm512_loadu_ps(src), v1 = _mm512_loadu_ps(src + 16);
                float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
                /* maxps drops a NaN operand: look for one separately (else Q4_0 / Q8_0 rows came out finite) */
                __mmask16 nan = _mm512_cmp_ps_mask(v0, v1, _CMP_UNORD_Q);
                float inv;
                __m512 scale;
                if (nan || !(amax <= 3.0e38f)) {  /* inf or NaN in the block: the output is NaN, never a plausible number */
                    inv = __builtin_nanf("");
                    scale = _mm512_setzero_ps();
                } else {
                    int e = block_exponent(amax);
                    inv = pow2i(-e);
                    scale = _mm512_set1_ps(pow2i(e));
                }
                /* even elements (0, 2, ..) then odd ones (1, 3, ..): the order of the low and high nibbles */
                for (int odd = 0; odd < 2; odd++) {
                    __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32(odd));
                    __m512 v = _mm512_permutex2var_ps(v0, idx, v1);
                    __m512i xi = _mm512_cvtps_epi32(_mm512_mul_ps(v, scale));  /* exact product, round to nearest */
                    /* lane sums of 4 consecutive values: even/odd half, block h */
                    __m512i s4 = _mm512_add_epi32(xi, _mm512_bsrli_epi128(xi, 4));
                    s4 = _mm512_add_epi32(s4, _mm512_bsrli_epi128(s4, 8));  /* lane 4g holds sum of group g */
                    int32_t tmp[16];
                    _mm512_storeu_si512(tmp, s4);
                    int32_t grp[4] = {tmp[0], tmp[4], tmp[8], tmp[12]};
                    __m512i r = xi;
                    for (int k = 0; k < LIMBS; k++) {
                        __m512i a = _mm512_srai_epi32(_mm512_slli_epi32(r, 24), 24);  /* signed low byte */
                        _mm_storeu_si128((__m128i *)(dst + k * 64 + 32 * odd + 16 * h), _mm512_cvtepi32_epi8(a));
                        r = _mm512_srai_epi32(_mm512_sub_epi32(r, a), 8);
                    }
                    int32_t all[16];
                    _mm512_storeu_si512(all, sums);
                    for (int u = 0; u < 4; u++) all[8 * odd + 4 * h + u] = grp[u];
                    sums = _mm512_loadu_si512(all);
                    for (int u = 0; u < 4; u++) ic[8 * odd + 4 * h + u] = inv;
                }
            }
            int32_t *z[2] = {zpx0, zpx1};
            for (int t = 0; t < j->terms; t++)
                if (z[t]) _mm512_storeu_si512(z[t] + ((size_t)m * j->pairs + p) * 16,
                                              _mm512_mullo_epi32(sums, _mm512_set1_epi32(j->zp[t])));
        }
}

/* rows n..n+R-1 (R <= 4) of activation row m */
static void rows_int(const job_t *j, int m, int n, int R) {
    __m512 acc[4];
    for (int r = 0; r < 4; r++) acc[r] = _mm512_setzero_ps();
    __m128 macc = _mm_setzero_ps(), macc2[4];  /* minimums x block sums: [nb, N] float32 / [N, nb] float16 */
    for (int r = 0; r < 4; r++) macc2[r] = _mm_setzero_ps();
    const __m512i nib = _mm512_set1_epi8(15);
    const __m512i pick = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    const __mmask8 live = (__mmask8)((1u << R) - 1u);
    prefetch_ahead(j, n);
    const int8_t *lm = j->limbs + (size_t)m * j->pairs * LIMBS * 64;
    const float *icm = j->invc + (size_t)m * j->pairs * 16;
    const float *xs = j->xsum ? j->xsum + (size_t)m * j->nb : NULL;
    for (int p = 0; p < j->pairs; p++) {
        int b = 2 * p, both = b + 1 < j->nb;
        __m512i a[LIMBS];
        for (int k = 0; k < LIMBS; k++) a[k] = _mm512_loadu_si512(lm + ((size_t)p * LIMBS + k) * 64);
        __m512 ic = _mm512_loadu_ps(icm + (size_t)p * 16);
        for (int r = 0; r < R; r++) {
            size_t blk = (size_t)(n + r) * j->nb + b;
            for (int t = 0; t < j->terms; t++) {
                const uint8_t *q = j->q[t] + blk * 16;
                __m512i codes = both ? _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)q))
                                     : _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)q));
                codes = _mm512_and_si512(_mm512_mask_srli_epi16(codes, 0xFFFF0000u, codes, 4), nib);
                __m512i acc_i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, a[LIMBS - 1]);
                for (int k = LIMBS - 2; k >= 0; k--)
                    acc_i = _mm512_dpbusd_epi32(_mm512_slli_epi32(acc_i, 8), codes, a[k]);
                if (j->zpx[t]) acc_i = _mm512_sub_epi32(acc_i, _mm512_loadu_si512(j->zpx[t] + ((size_t)m * j->pairs + p) * 16));
                __m128 s2;
                if (j->s16[t]) {  /* the same values from half the bytes */
                    const uint16_t *sp = j->s16[t] + blk;
                    s2 = _mm_cvtph_ps(_mm_maskz_loadu_epi16(both ? 3 : 1, sp));
                } else {
                    const float *sp = j->s[t] + blk;
                    s2 = both ? _mm_castpd_ps(_mm_load_sd((const double *)sp)) : _mm_load_ss(sp);
                }
                __m512 sc = _mm512_mul_ps(_mm512_permutexvar_ps(pick, _mm512_castps128_ps512(s2)), ic);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc_i), sc, acc[r]);
            }
        }
        if (j->mins16) {  /* rows n..n+3, blocks b, b+1: [N, nb], read in order like the codes */
            __m128 x2 = both ? _mm_castpd_ps(_mm_load_sd((const double *)(xs + b))) : _mm_load_ss(xs + b);
            for (int r = 0; r < R; r++)
                macc2[r] = _mm_fmadd_ps(_mm_cvtph_ps(_mm_maskz_loadu_epi16(both ? 3 : 1, j->mins16 + (size_t)(n + r) * j->nb + b)),
                                        x2, macc2[r]);
        } else if (j->mins) {
            for (int h = 0; h < 1 + both; h++)
                macc = _mm_fmadd_ps(_mm_maskz_loadu_ps(live, j->mins + (size_t)(b + h) * j->N + n), _mm_set1_ps(xs[b + h]), macc);
        }
    }
    float mm[4];
    _mm_storeu_ps(mm, macc);
    for (int r = 0; r < R; r++) {
        __m128 two = macc2[r];
        float mr = mm[r] + (_mm_cvtss_f32(two) + _mm_cvtss_f32(_mm_movehdup_ps(two)));
        /* the reduction tree spelled out (GCC's _mm512_reduce_add_ps: lanes i + i+8, + 4, + 2, + 1), whatever the
           compiler: qdecode_avx2.c adds its two ymm halves the same way, for the same bits */
        __m256 t8 = _mm256_add_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r]), 1)),
                                  _mm512_castps512_ps256(acc[r]));
        __m128 t4 = _mm_add_ps(_mm256_extractf128_ps(t8, 1), _mm256_castps256_ps128(t8));
        __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
        j->y[(size_t)m * j->N + n + r] = (_mm_cvtss_f32(t2) + _mm_cvtss_f32(_mm_movehdup_ps(t2))) + mr;
    }
}

/* a float16 copy of n float32 values, or NULL when one of them is not exactly a float16 (Q4_K / Q6_K scales
   are float32 products) or memory is short: then the float32 values are read */
static uint16_t *half_copy(const float *src, size_t n) {
    uint16_t *dst = malloc(n * sizeof(uint16_t) + 64);
    if (!dst) return NULL;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(src + i);
        __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        if (_mm512_cmpneq_ps_mask(_mm512_cvtph_ps(h), v)) { free(dst); return NULL; }  /* NaN too */
        _mm256_storeu_si256((__m256i *)(dst + i), h);
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
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "qdecode_avx2.c"  /* the same integer path, bit for bit, on AVX2 (and AVX-VNNI where built with it) */
#else
#define INT_DOT 0
#define LIMBS_OR_0 0
#endif

#if INT_DOT
/* half_copy (each build's own, above) for [rows, cols] float32, written transposed: [cols, rows] */
static uint16_t *half_copy_transposed(const float *src, size_t rows, size_t cols) {
    uint16_t *flat = half_copy(src, rows * cols);
    if (!flat) return NULL;
    uint16_t *dst = malloc(rows * cols * sizeof(uint16_t) + 64);
    if (dst)
        for (size_t r = 0; r < rows; r++)
            for (size_t c = 0; c < cols; c++) dst[c * rows + r] = flat[r * cols + c];
    free(flat);
    return dst;
}
#endif

static void job_part(void *arg, int part, int parts) {
    const job_t *j = (const job_t *)arg;
    int groups = (j->N + 3) / 4, per = (groups + parts - 1) / parts;
    int n0 = part * per * 4, n1 = n0 + per * 4;
    if (n1 > j->N) n1 = j->N;
    for (int m = 0; m < j->M; m++)
        for (int n = n0; n < n1; n += 4) {
#if INT_DOT
            if (j->limbs) { rows_int(j, m, n, n1 - n < 4 ? n1 - n : 4); continue; }
#endif
            rows_simd(j, m, n, n1 - n < 4 ? n1 - n : 4);
        }
}

/* ---- many rows (prefill, verification): a cache-blocked GEMM over dequantized float32 panels -------------
 * For M >= GEMM_MIN_ROWS rows the weights are dequantized, PANEL_COLS output columns at a time, into a float32
 * panel laid out [micro-panel][k][MICRO_COLS] (it stays in L2; the next panel's weights are prefetched meanwhile),
 * and a register-blocked micro-kernel computes MICRO_ROWS x MICRO_COLS outputs at a time (AVX2: x 16; portable: x 8), one kernel
 * per row count: for k = 0..K-1, acc = fma(x[m][k], w[k][n], acc) from +0 (float32; a build without FMA rounds
 * the product first), then one store. The dequantized weight is  s0 * (q0 - zp0)  rounded, + s1 * (q1 - zp1) fused
 * (two terms), + the block minimum rounded: the value MatMulNBits uses, rounded once more when terms are added
 * (tests/test_gemm_fma_chain.py checks every output against this rule, emulated). Every output element is ONE
 * sequential chain over k whatever
 * the thread count, the number of rows or where the row falls in a block (row-deterministic among calls of
 * >= GEMM_MIN_ROWS rows); a single decode row takes the path above, whose summation order differs (float32
 * rounding). Each weight is dequantized once per call, by the thread that owns its columns: the cost is one
 * pass over the 4-bit weights, amortized over the M rows. */
#define GEMM_MIN_ROWS 4
#if defined(__AVX512F__)
#define MICRO_ROWS 8   /* 8 x 32 columns: 16 zmm accumulators; 6, 12 and 14 rows measured alike or slower on Zen 5 */
#else
#define MICRO_ROWS 6   /* AVX2: 6 x 16 columns at a time, 12 ymm accumulators of the 16 registers; the portable
                          build 6 x 8 on 16-byte vectors, 12 xmm */
#endif
#define MICRO_COLS 32
#define PANEL_MICROS 4   /* 128 columns x K float32 per panel: 288 KB at K = 576, 768 KB at K = 1536 */

typedef struct {
    int M, N, K, nb, terms;
    const float *x;       /* [M, K] as given */
    const uint8_t *q[2];  /* [N, nb, 16]: byte i of a block holds element 2i (low nibble) and 2i+1 (high) */
    const float *s[2];    /* [N * nb] */
    int zp[2];
    const float *mins;    /* [nb, N] or NULL */
    float *y;             /* [M, N] */
} gemm_t;

#if defined(__AVX512F__)
/* 16 columns' code bytes of one block (columns `stride` bytes apart, each block 16 bytes) as vector w4 = lane j
   holds bytes 4 w4 .. 4 w4 + 3 of column j: what four 16-lane gathers gave, from 16 loads and 8 permutes (on
   Zen 5 the gathers were most of the dequantization's time) */
static inline __attribute__((always_inline)) void codes_of_16_columns(const uint8_t *base, size_t stride, __m512i out[4]) {
    __m512i four[4];  /* columns 4 i .. 4 i + 3, one per 128-bit lane */
    for (int i = 0; i < 4; i++) {
        const uint8_t *c = base + (size_t)(4 * i) * stride;
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)c));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(c + stride)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(c + 2 * stride)), 2);
        four[i] = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(c + 3 * stride)), 3);
    }
    /* dword d of columns 0..7 (from four[0], four[1]) in lanes 0..7 and dword d + 1 in lanes 8..15; likewise
       columns 8..15; then the 256-bit halves paired */
    const __m512i d01 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i d23 = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
    __m512i lo01 = _mm512_permutex2var_epi32(four[0], d01, four[1]), hi01 = _mm512_permutex2var_epi32(four[2], d01, four[3]);
    __m512i lo23 = _mm512_permutex2var_epi32(four[0], d23, four[1]), hi23 = _mm512_permutex2var_epi32(four[2], d23, four[3]);
    out[0] = _mm512_shuffle_i64x2(lo01, hi01, 0x44);  /* 128-bit lanes 0, 1 of each */
    out[1] = _mm512_shuffle_i64x2(lo01, hi01, 0xEE);  /* lanes 2, 3 */
    out[2] = _mm512_shuffle_i64x2(lo23, hi23, 0x44);
    out[3] = _mm512_shuffle_i64x2(lo23, hi23, 0xEE);
}

#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
/* What dequantizing a panel of columns reads, cut into one slice per (16-column group, block) of the panel being
   dequantized meanwhile: the codes and scales of each term (contiguous) in equal 64-byte-multiple steps, and the
   minimums' run of each block cut by group. Dequantizing a panel while the next one's weights come in: the head's
   28 MB of codes come from DRAM, and 16 columns' 16-byte blocks 288 bytes apart left the core waiting. */
typedef struct {
    const char *at[4];   /* codes and scales of term 0, then of term 1 */
    size_t bytes[4], step[4];
    int streams;
    const char *mins;    /* the minimums of the panel's first column in block 0, or NULL */
    size_t mins_bytes, mins_step, mins_stride;
} prefetch_plan_t;

static inline size_t line_step(size_t bytes, size_t slices) { return (bytes + slices * 64 - 1) / (slices * 64) * 64; }

static void plan_prefetch(const gemm_t *g, int n0, int n1, int groups, prefetch_plan_t *plan) {
    size_t cols = (size_t)(n1 - n0), slices = (size_t)groups * g->nb;
    plan->streams = 0;
    for (int t = 0; t < g->terms; t++) {
        plan->at[plan->streams] = (const char *)(g->q[t] + (size_t)n0 * g->nb * 16);
        plan->bytes[plan->streams++] = cols * g->nb * 16;
        plan->at[plan->streams] = (const char *)(g->s[t] + (size_t)n0 * g->nb);
        plan->bytes[plan->streams++] = cols * g->nb * 4;
    }
    for (int i = 0; i < plan->streams; i++) plan->step[i] = line_step(plan->bytes[i], slices);
    plan->mins = g->mins ? (const char *)(g->mins + n0) : NULL;
    plan->mins_bytes = cols * 4;
    plan->mins_step = line_step(cols * 4, (size_t)groups);
    plan->mins_stride = (size_t)g->N * 4;
}

static inline void prefetch_lines(const char *p, size_t from, size_t to) {
    for (size_t off = from; off < to; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

/* the slice of group `group`, block b */
static inline void prefetch_slice(const prefetch_plan_t *plan, int nb, int group, int b) {
    size_t slice = (size_t)group * nb + b;
    for (int i = 0; i < plan->streams; i++) {
        size_t from = slice * plan->step[i], to = from + plan->step[i] < plan->bytes[i] ? from + plan->step[i] : plan->bytes[i];
        prefetch_lines(plan->at[i], from, to);
    }
    if (plan->mins) {
        size_t from = (size_t)group * plan->mins_step;
        size_t to = from + plan->mins_step < plan->mins_bytes ? from + plan->mins_step : plan->mins_bytes;
        prefetch_lines(plan->mins + (size_t)b * plan->mins_stride, from, to);
    }
}
#endif

#if defined(__AVX512F__)
/* the 32 elements of one block for 16 columns: panel rows dst[i * MICRO_COLS] (columns past `live` zero) */
static inline __attribute__((always_inline)) void block_values(__m512i codes[2][4], const __m512 scale[2], const __m512 centered[2],
                                                               __m512 mn, __mmask16 live, float *dst, const int terms, const int mins) {
    for (int w4 = 0; w4 < 4; w4++)
        for (int half = 0; half < 8; half++) {  /* element 8 * w4 + half: byte half/2, nibble half%2 */
            __m512 v = _mm512_setzero_ps();
            for (int t = 0; t < terms; t++) {
                /* code - zp as float32 (exact) from a table: vpermps reads the low 4 bits of each lane */
                __m512 f = _mm512_permutexvar_ps(_mm512_srli_epi32(codes[t][w4], 4 * half), centered[t]);
                /* the roundings this build has always made: s0 * f0 rounded (a multiply no compiler fuses into the
                   minimum's add), s1 * f1 fused into the sum, the minimum added */
                v = t == 0 ? _mm512_mul_round_ps(scale[t], f, _MM_FROUND_CUR_DIRECTION) : _mm512_fmadd_ps(scale[t], f, v);
            }
            if (mins) v = _mm512_add_ps(v, mn);
            _mm512_store_ps(dst + (size_t)(8 * w4 + half) * MICRO_COLS, _mm512_maskz_mov_ps(live, v));
        }
}

#endif
/* panel[p][k][j] for the columns n0 + p * MICRO_COLS + j < n1 (zero beyond n1); [next0, next1): the columns of
   this thread's next panel, whose codes, scales and minimums are prefetched meanwhile (none when equal) */
#if defined(__AVX512F__)
static void dequantize_panel(const gemm_t *g, int n0, int n1, float *panel, int next0, int next1) {
    int micros = (n1 - n0 + MICRO_COLS - 1) / MICRO_COLS;
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i rows_at = _mm512_mullo_epi32(lane, _mm512_set1_epi32(g->nb));  /* block index of column c0+lane */
    const __m512i bytes_at = _mm512_slli_epi32(rows_at, 4);
    __m512 centered[2];  /* lane c: c - zp_t */
    for (int t = 0; t < g->terms; t++) centered[t] = _mm512_cvtepi32_ps(_mm512_sub_epi32(lane, _mm512_set1_epi32(g->zp[t])));
    prefetch_plan_t plan;
    if (next1 > next0) plan_prefetch(g, next0, next1, micros * (MICRO_COLS / 16), &plan);
    for (int p = 0; p < micros; p++) {
        float *w = panel + (size_t)p * g->K * MICRO_COLS;
        /* 16 columns at a time, block by block: 16 streams of codes (writing both halves of each 128-byte panel
           row together, 32 streams, measured slower on the head) */
        for (int j16 = 0; j16 < MICRO_COLS; j16 += 16)
            for (int b = 0; b < g->nb; b++) {
                if (next1 > next0) prefetch_slice(&plan, g->nb, p * (MICRO_COLS / 16) + j16 / 16, b);
                int c0 = n0 + p * MICRO_COLS + j16;
                int valid = n1 - c0;
                if (valid > 16) valid = 16;
                __mmask16 live = valid <= 0 ? 0 : (__mmask16)((1u << valid) - 1u);
                __m512 scale[2];
                __m512i codes[2][4];
                for (int t = 0; t < g->terms; t++) {
                    const uint8_t *base = g->q[t] + ((size_t)c0 * g->nb + b) * 16;
                    const float *sb = g->s[t] + (size_t)c0 * g->nb + b;
                    scale[t] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, rows_at, sb, 4);
                    if (valid == 16) codes_of_16_columns(base, (size_t)g->nb * 16, codes[t]);
                    else
                        for (int w4 = 0; w4 < 4; w4++)
                            codes[t][w4] = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, bytes_at, base + 4 * w4, 1);
                }
                __m512 mn = g->mins ? _mm512_maskz_loadu_ps(live, g->mins + (size_t)b * g->N + c0) : _mm512_setzero_ps();
                float *dst = w + (size_t)(32 * b) * MICRO_COLS + j16;
                /* one copy per one-term form (no test per element: 1.2x on the layers' dequantization); two terms
                   (the head) in the general copy: its own copy measured 6 % slower on the whole head product */
                if (g->terms == 1 && g->mins) block_values(codes, scale, centered, mn, live, dst, 1, 1);
                else if (g->terms == 1) block_values(codes, scale, centered, mn, live, dst, 1, 0);
                else block_values(codes, scale, centered, mn, live, dst, g->terms, g->mins != NULL);
            }
    }
}
#else
/* panel[p][k][j] for the columns n0 + p * MICRO_COLS + j < n1 (zero beyond n1), one element at a time */
static void dequantize_panel_scalar(const gemm_t *g, int n0, int n1, float *panel) {
    int micros = (n1 - n0 + MICRO_COLS - 1) / MICRO_COLS;
    for (int p = 0; p < micros; p++) {
        float *w = panel + (size_t)p * g->K * MICRO_COLS;
        for (int j16 = 0; j16 < MICRO_COLS; j16 += 16) {
            int c0 = n0 + p * MICRO_COLS + j16;
            int valid = n1 - c0;
            if (valid > 16) valid = 16;
            for (int j = 0; j < 16; j++) {
                int n = c0 + j;
                for (int b = 0; b < g->nb; b++)
                    for (int i = 0; i < 32; i++) {
                        float v = 0.f;
                        if (j < valid) {
                            for (int t = 0; t < g->terms; t++) {
                                uint8_t byte = g->q[t][((size_t)n * g->nb + b) * 16 + i / 2];
                                float f = (float)(((i & 1) ? byte >> 4 : byte & 15) - g->zp[t]);
                                float term = g->s[t][(size_t)n * g->nb + b] * f;
                                v = t == 0 ? term : v + term;
                            }
                            if (g->mins) v += g->mins[(size_t)b * g->N + n];
                        }
                        w[(size_t)(32 * b + i) * MICRO_COLS + j16 + j] = v;
                    }
            }
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* 8 columns' code bytes of one block (columns `stride` bytes apart) as vector w4: lane j holds bytes
   4 w4 .. 4 w4 + 3 of column j (8 loads, 8 unpacks) */
static inline __attribute__((always_inline)) void codes_of_8_columns(const uint8_t *base, size_t stride, __m256i out[4]) {
    __m256i r[4];  /* columns i and i + 4, one per 128-bit lane */
    for (int i = 0; i < 4; i++)
        r[i] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(base + (size_t)i * stride))),
                                       _mm_loadu_si128((const __m128i *)(base + (size_t)(i + 4) * stride)), 1);
    __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    out[0] = _mm256_unpacklo_epi64(t0, t2);
    out[1] = _mm256_unpackhi_epi64(t0, t2);
    out[2] = _mm256_unpacklo_epi64(t1, t3);
    out[3] = _mm256_unpackhi_epi64(t1, t3);
}

/* a * b rounded to float32 here: the empty asm hides it from the compiler, which would otherwise fuse it into
   the minimum's add (-ffp-contract), a different rounding from the scalar rule's */
static inline __attribute__((always_inline)) __m256 rounded_product(__m256 a, __m256 b) {
    __m256 p = _mm256_mul_ps(a, b);
    __asm__("" : "+x"(p));
    return p;
}

/* the 32 elements of one block for 8 columns: panel rows dst[i * MICRO_COLS] */
static inline __attribute__((always_inline)) void block_values8(const __m256i codes[2][4], const __m256 scale[2], __m256 mn,
                                                                const int zp[2], float *dst, const int terms, const int mins) {
    const __m256i nib = _mm256_set1_epi32(15);
    for (int w4 = 0; w4 < 4; w4++)
        for (int half = 0; half < 8; half++) {  /* element 8 * w4 + half: byte half/2, nibble half%2 */
            __m256 v = _mm256_setzero_ps();
            for (int t = 0; t < terms; t++) {
                __m256i c = _mm256_and_si256(_mm256_srli_epi32(codes[t][w4], 4 * half), nib);
                __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(c, _mm256_set1_epi32(zp[t])));  /* exact */
                /* the scalar rule's roundings: s0 * f0 rounded, s1 * f1 fused into the sum, the minimum added */
                v = t == 0 ? rounded_product(scale[t], f) : _mm256_fmadd_ps(scale[t], f, v);
            }
            if (mins) v = _mm256_add_ps(v, mn);
            _mm256_store_ps(dst + (size_t)(8 * w4 + half) * MICRO_COLS, v);
        }
}

/* the AVX2 build: whole micro-panels 8 columns at a time (vector loads of the codes, as the AVX-512 build does),
   a micro-panel with columns past n1 by the scalar rule; the next panel prefetched as on AVX-512 */
static void dequantize_panel(const gemm_t *g, int n0, int n1, float *panel, int next0, int next1) {
    int micros = (n1 - n0 + MICRO_COLS - 1) / MICRO_COLS;
    prefetch_plan_t plan;
    if (next1 > next0) plan_prefetch(g, next0, next1, micros * (MICRO_COLS / 16), &plan);
    const size_t stride = (size_t)g->nb * 16;
    for (int p = 0; p < micros; p++) {
        float *w = panel + (size_t)p * g->K * MICRO_COLS;
        int c = n0 + p * MICRO_COLS;
        if (n1 - c < MICRO_COLS) {
            dequantize_panel_scalar(g, c, n1, w);
            continue;
        }
        for (int j8 = 0; j8 < MICRO_COLS; j8 += 8)
            for (int b = 0; b < g->nb; b++) {
                if (next1 > next0 && !(j8 & 8)) prefetch_slice(&plan, g->nb, p * (MICRO_COLS / 16) + j8 / 16, b);
                int c0 = c + j8;
                __m256 scale[2];
                __m256i codes[2][4];
                for (int t = 0; t < g->terms; t++) {
                    const float *sb = g->s[t] + (size_t)c0 * g->nb + b;
                    size_t nb = (size_t)g->nb;
                    scale[t] = _mm256_setr_ps(sb[0], sb[nb], sb[2 * nb], sb[3 * nb], sb[4 * nb], sb[5 * nb], sb[6 * nb], sb[7 * nb]);
                    codes_of_8_columns(g->q[t] + ((size_t)c0 * g->nb + b) * 16, stride, codes[t]);
                }
                __m256 mn = g->mins ? _mm256_loadu_ps(g->mins + (size_t)b * g->N + c0) : _mm256_setzero_ps();
                float *dst = w + (size_t)(32 * b) * MICRO_COLS + j8;
                if (g->terms == 1 && g->mins) block_values8(codes, scale, mn, g->zp, dst, 1, 1);
                else if (g->terms == 1) block_values8(codes, scale, mn, g->zp, dst, 1, 0);
                else block_values8(codes, scale, mn, g->zp, dst, g->terms, g->mins != NULL);
            }
    }
}
#else
static void dequantize_panel(const gemm_t *g, int n0, int n1, float *panel, int next0, int next1) {
    (void)next0; (void)next1;
    dequantize_panel_scalar(g, n0, n1, panel);
}
#endif
#endif

#if defined(__AVX512F__)
/* rows m0 .. m0+R-1 (R <= MICRO_ROWS, a constant where inlined) x one micro-panel: R x 32 accumulators in
   registers, for k = 0..K-1 acc = fma(x[m][k], w[k][n], acc) from 0 (explicit: no compiler decides it) */
static inline __attribute__((always_inline)) void tile_rows(const gemm_t *g, int m0, const int R, const float *w, int n, int cols) {
    const float *x = g->x + (size_t)m0 * g->K;
    const size_t K = (size_t)g->K;
    __m512 acc[MICRO_ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (size_t k = 0; k < K; k++) {
        __m512 w0 = _mm512_load_ps(w + k * MICRO_COLS), w1 = _mm512_load_ps(w + k * MICRO_COLS + 16);
        for (int r = 0; r < R; r++) {
            __m512 a = _mm512_set1_ps(x[r * K + k]);
            acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
        }
    }
    __mmask16 m0s = cols >= 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1u);
    __mmask16 m1s = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1u);
    for (int r = 0; r < R; r++) {
        float *dst = g->y + (size_t)(m0 + r) * g->N + n;
        _mm512_mask_storeu_ps(dst, m0s, acc[r][0]);
        _mm512_mask_storeu_ps(dst + 16, m1s, acc[r][1]);
    }
}

#elif defined(__AVX2__) && defined(__FMA__)
/* rows m0 .. m0+R-1 (R <= MICRO_ROWS, a constant where inlined) x one micro-panel, 16 columns at a time: the same
   chain per element as the AVX-512 kernel, acc = fma(x[m][k], w[k][n], acc) from 0. (The 64-byte vector code
   below, compiled for AVX2, kept 24 accumulators of two ymm each on the stack: 3 GFLOP/s.) */
static inline __attribute__((always_inline)) void tile_rows16(const gemm_t *g, int m0, const int R, const float *w, int n, int cols) {
    const float *x = g->x + (size_t)m0 * g->K;
    const size_t K = (size_t)g->K;
    __m256 acc[MICRO_ROWS][2];
#pragma GCC unroll 8  /* unrolled before the accumulators are placed: else GCC kept them on the stack too */
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (size_t k = 0; k < K; k++) {
        __m256 w0 = _mm256_load_ps(w + k * MICRO_COLS), w1 = _mm256_load_ps(w + k * MICRO_COLS + 8);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            __m256 a = _mm256_broadcast_ss(x + r * K + k);
            acc[r][0] = _mm256_fmadd_ps(a, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, w1, acc[r][1]);
        }
    }
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i live0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols), lane), live1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols - 8), lane);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        float *dst = g->y + (size_t)(m0 + r) * g->N + n;
        _mm256_maskstore_ps(dst, live0, acc[r][0]);
        _mm256_maskstore_ps(dst + 8, live1, acc[r][1]);
    }
}

static inline __attribute__((always_inline)) void tile_rows(const gemm_t *g, int m0, const int R, const float *w, int n, int cols) {
    tile_rows16(g, m0, R, w, n, cols < 16 ? cols : 16);
    if (cols > 16) tile_rows16(g, m0, R, w + 16, n + 16, cols - 16);
}

#else
/* The portable build (ARM NEON, x86 before AVX2): 16-byte vectors, which every such CPU has (SSE2, NEON). The
   64-byte vectors this build used before (12 accumulators of four registers each) lived on the stack: ~7 GFLOP/s.
   Rows m0 .. m0+R-1 (R <= MICRO_ROWS, a constant where inlined) x 8 columns of one micro-panel: 2R accumulators in
   registers (12 of x86-64's 16 xmm at 6 rows; NEON has 32). Each element's chain is the one the 64-byte code
   computed, written the same way, acc += a * w from 0 over k in order, with the same float types: the compiler
   fuses it (-ffp-contract, where the CPU has FMA: every ARMv8) or rounds the product first (x86-64 without FMA)
   exactly as it did there. */
typedef float vec4 __attribute__((vector_size(16)));

static inline __attribute__((always_inline)) void tile_rows8(const gemm_t *g, int m0, const int R, const float *w, int n, int cols) {
    const float *x = g->x + (size_t)m0 * g->K;
    const size_t K = (size_t)g->K;
    vec4 acc[MICRO_ROWS][2];
#pragma GCC unroll 8  /* unrolled before the accumulators are placed, so that they stay in registers */
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = (vec4){0};
    for (size_t k = 0; k < K; k++) {
        /* the panel is 64-byte aligned and its rows 128 bytes: every 8-column group is 32-byte aligned */
        const vec4 w0 = *(const vec4 *)(w + k * MICRO_COLS), w1 = *(const vec4 *)(w + k * MICRO_COLS + 4);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            float a = x[r * K + k];  /* broadcast to the vector by the product */
            acc[r][0] += a * w0;  /* one fused multiply-add where the CPU has it (-ffp-contract) */
            acc[r][1] += a * w1;
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        float *dst = g->y + (size_t)(m0 + r) * g->N + n;
        if (cols >= 8) { memcpy(dst, &acc[r][0], 16); memcpy(dst + 4, &acc[r][1], 16); }
        else for (int j = 0; j < cols; j++) dst[j] = j < 4 ? acc[r][0][j] : acc[r][1][j - 4];
    }
}

static inline __attribute__((always_inline)) void tile_rows(const gemm_t *g, int m0, const int R, const float *w, int n, int cols) {
    for (int j8 = 0; j8 < MICRO_COLS && j8 < cols; j8 += 8) tile_rows8(g, m0, R, w + j8, n + j8, cols - j8);
}

#endif

/* rows m0 .. m0+rows-1 x one micro-panel, through the build's tile_rows with a kernel for exactly that many rows
   (a constant R, so its accumulators stay in registers; no rows computed twice) */
#if MICRO_ROWS != 6 && MICRO_ROWS != 8
#error "micro_kernel has cases for MICRO_ROWS 6 and 8"
#endif
static void micro_kernel(const gemm_t *g, int m0, int rows, const float *w, int n, int cols) {
    switch (rows) {
#define TILE_ROWS(R) case R: tile_rows(g, m0, R, w, n, cols); break;
        TILE_ROWS(1) TILE_ROWS(2) TILE_ROWS(3) TILE_ROWS(4) TILE_ROWS(5) TILE_ROWS(6)
#if MICRO_ROWS == 8
        TILE_ROWS(7) TILE_ROWS(8)
#endif
#undef TILE_ROWS
        default: break;
    }
}

static void gemm_part(void *arg, int part, int parts) {
    const gemm_t *g = (const gemm_t *)arg;
    int micros = (g->N + MICRO_COLS - 1) / MICRO_COLS, per = (micros + parts - 1) / parts;
    int c0 = part * per * MICRO_COLS, c1 = c0 + per * MICRO_COLS;
    if (c1 > g->N) c1 = g->N;
    if (c0 >= c1) return;
    float *panel = aligned_alloc(64, sizeof(float) * (size_t)g->K * MICRO_COLS * PANEL_MICROS);
    if (!panel) {  /* out of memory: NaN, never a plausible wrong number (a verifier then rejects, loudly) */
        for (int m = 0; m < g->M; m++)
            for (int n = c0; n < c1; n++) g->y[(size_t)m * g->N + n] = __builtin_nanf("");
        return;
    }
    for (int n0 = c0; n0 < c1; n0 += MICRO_COLS * PANEL_MICROS) {
        int n1 = n0 + MICRO_COLS * PANEL_MICROS < c1 ? n0 + MICRO_COLS * PANEL_MICROS : c1;
        int next1 = n1 + MICRO_COLS * PANEL_MICROS < c1 ? n1 + MICRO_COLS * PANEL_MICROS : c1;
        dequantize_panel(g, n0, n1, panel, n1, next1);
        for (int m = 0; m < g->M; m += MICRO_ROWS) {
            int rows = g->M - m < MICRO_ROWS ? g->M - m : MICRO_ROWS;
            for (int n = n0, p = 0; n < n1; n += MICRO_COLS, p++)
                micro_kernel(g, m, rows, panel + (size_t)p * g->K * MICRO_COLS, n, n1 - n < MICRO_COLS ? n1 - n : MICRO_COLS);
        }
    }
    free(panel);
}


#include "qgemm_amx.c"  /* the same product on AMX tiles where the CPU has them (amx_gemm) */

/* the one-row path (M < GEMM_MIN_ROWS rows): activation preparation, then the output rows split over threads */
static void one_row_product(job_t *j, const float *x, int int_dot, int threads) {
    int nb = j->nb;
    /* float path: the deinterleaved row and block sums; integer path: block sums, limbs, 2^-e and zp * sums */
    j->pairs = (nb + 1) / 2;
    size_t per_row = INT_DOT && int_dot
        ? (size_t)nb * 4 + (size_t)j->pairs * (LIMBS_OR_0 * 64 + 16 * 4 * 3) : (size_t)(j->K + nb) * 4;
    char *scratch = aligned_alloc(64, (per_row * (size_t)j->M + 63) / 64 * 64);
    if (!scratch) {  /* out of memory: NaN, never a plausible wrong number */
        for (size_t i = 0; i < (size_t)j->M * j->N; i++) j->y[i] = __builtin_nanf("");
        return;
    }
    float *xs = (float *)scratch;
    for (int m = 0; m < j->M; m++)
        for (int b = 0; b < nb; b++) {
            const float *src = x + (size_t)m * j->K + 32 * b;
            float sum = 0.f;
            for (int i = 0; i < 32; i++) sum += src[i];
            xs[(size_t)m * nb + b] = sum;
        }
    j->xsum = xs;
#if INT_DOT
    if (int_dot) {
        float *invc = xs + (size_t)j->M * nb;
        int32_t *zpx0 = (int32_t *)(invc + (size_t)j->M * j->pairs * 16), *zpx1 = zpx0 + (size_t)j->M * j->pairs * 16;
        int8_t *limbs = (int8_t *)(zpx1 + (size_t)j->M * j->pairs * 16);
        j->zpx[0] = j->zp[0] ? zpx0 : NULL;
        j->zpx[1] = j->terms > 1 && j->zp[1] ? zpx1 : NULL;
        prepare_int_rows(j, x, limbs, invc, (int32_t *)j->zpx[0], (int32_t *)j->zpx[1]);
        j->limbs = limbs; j->invc = invc;
    } else
#endif
    {
        float *xd = xs + (size_t)j->M * nb;
        for (int m = 0; m < j->M; m++)
            for (int b = 0; b < nb; b++) {
                const float *src = x + (size_t)m * j->K + 32 * b;
                float *dst = xd + (size_t)m * j->K + 32 * b;
                for (int i = 0; i < 16; i++) { dst[i] = src[2 * i]; dst[16 + i] = src[2 * i + 1]; }
            }
        j->xd = xd;
    }
    int parts = threads;
    if (parts > (j->N + 3) / 4) parts = (j->N + 3) / 4;
    run_parallel(job_part, j, parts < 1 ? 1 : parts);
    free(scratch);
}

/* ---- the custom op ----------------------------------------------------------------------------------------- */
typedef struct {
    int64_t K, N, zp0, zp1, threads, amx, int_dot;
    int terms, has_mins, amx_limbs;
    /* the integer path's float16 copies of the scales and minimums, made on the first decode row */
    pthread_mutex_t half_lock;
    atomic_int half_made;
    const void *half_of[3];  /* the float32 arrays they copy (s0, s1, mins): used only for those */
    uint16_t *half[3];
} kernel_t;

/* point j at float16 copies of its scales and minimums (same values, half the bytes a token reads) */
static void use_halves(kernel_t *k, job_t *j) {
#if INT_DOT
    const void *src[3] = {j->s[0], j->terms > 1 ? j->s[1] : NULL, j->mins};
    if (!atomic_load_explicit(&k->half_made, memory_order_acquire)) {
        pthread_mutex_lock(&k->half_lock);
        if (!atomic_load_explicit(&k->half_made, memory_order_relaxed)) {
            size_t count = (size_t)j->N * j->nb;
            for (int i = 0; i < 3; i++) {
                k->half_of[i] = src[i];
                k->half[i] = !src[i] ? NULL : i < 2 ? half_copy(src[i], count) : half_copy_transposed(src[i], j->nb, j->N);
            }
            atomic_store_explicit(&k->half_made, 1, memory_order_release);
        }
        pthread_mutex_unlock(&k->half_lock);
    }
    const uint16_t *h[3];
    for (int i = 0; i < 3; i++) h[i] = k->half[i] && k->half_of[i] == src[i] ? k->half[i] : NULL;
    j->s16[0] = h[0]; j->s16[1] = h[1]; j->mins16 = h[2];
#else
    (void)k; (void)j;
#endif
}
typedef struct { OrtCustomOp op; const char *name; int terms, has_mins; } op_def_t;

static int64_t attr(const OrtKernelInfo *info, const char *name, int64_t fallback) {
    int64_t v = fallback;
    OrtStatus *st = API(SLOT_KernelInfoGetAttribute_int64, fn_attr_i64)(info, name, &v);
    if (st) { API(SLOT_ReleaseStatus, fn_release_status)(st); return fallback; }
    return v;
}

static void *create_kernel(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info) {
    (void)api;
    const op_def_t *def = (const op_def_t *)op;
    kernel_t *k = calloc(1, sizeof(kernel_t));
    if (!k) return NULL;
    k->K = attr(info, "K", 0); k->N = attr(info, "N", 0);
    k->zp0 = attr(info, "zp0", 8); k->zp1 = attr(info, "zp1", 8);
    k->threads = attr(info, "threads", 1);
    k->amx = attr(info, "amx", 1);
    k->int_dot = attr(info, "int_dot", 1) && INT_DOT;  /* 0: the float32 one-row path (P2PINFER_DECODE_KERNEL=float) */
    k->terms = def->terms; k->has_mins = def->has_mins;
    pthread_mutex_init(&k->half_lock, NULL);
    return k;
}

/* dims of input i; returns rank or -1 */
static int input_dims(OrtKernelContext *ctx, size_t i, const OrtValue **value, int64_t *dims, int max_rank) {
    if (API(SLOT_KernelContext_GetInput, fn_get_input)(ctx, i, value)) return -1;
    OrtTensorTypeAndShapeInfo *info;
    if (API(SLOT_GetTensorTypeAndShape, fn_type_shape)(*value, &info)) return -1;
    size_t rank = 0;
    int ok = !API(SLOT_GetDimensionsCount, fn_dims_count)(info, &rank) && rank <= (size_t)max_rank
             && !API(SLOT_GetDimensions, fn_dims)(info, dims, rank);
    API(SLOT_ReleaseTensorTypeAndShapeInfo, fn_release_shape)(info);
    return ok ? (int)rank : -1;
}

static void *data_of(const OrtValue *v) {
    void *p = NULL;
    if (API(SLOT_GetTensorMutableData, fn_mutable_data)((OrtValue *)v, &p)) return NULL;
    return p;
}

static void kernel_compute(void *opk, OrtKernelContext *ctx) {
    kernel_t *k = (kernel_t *)opk;
    const OrtValue *xv, *v;
    int64_t xdims[8], d[8];
    int rank = input_dims(ctx, 0, &xv, xdims, 8);
    /* shapes were checked when the graph was rewritten; a mismatch here leaves the output unwritten (onnxruntime
       then fails the run) rather than reading out of bounds */
    if (rank < 1 || xdims[rank - 1] != k->K || k->K % 32 || k->N <= 0) return;
    int nb = (int)(k->K / 32);
    job_t j = {0};
    j.K = (int)k->K; j.N = (int)k->N; j.nb = nb; j.terms = k->terms;
    j.zp[0] = (int)k->zp0; j.zp[1] = (int)k->zp1;
    int64_t rows = 1;
    for (int i = 0; i < rank - 1; i++) rows *= xdims[i];
    j.M = (int)rows;
    for (int t = 0; t < k->terms; t++) {
        if (input_dims(ctx, 1 + 2 * t, &v, d, 8) != 3 || d[0] != k->N || d[1] != nb || d[2] != 16) return;
        j.q[t] = data_of(v);
        if (input_dims(ctx, 2 + 2 * t, &v, d, 8) != 1 || d[0] != k->N * nb) return;
        j.s[t] = data_of(v);
    }
    if (k->has_mins) {
        if (input_dims(ctx, 3, &v, d, 8) != 2 || d[0] != nb || d[1] != k->N) return;
        j.mins = data_of(v);
    }
    int64_t ydims[8];
    memcpy(ydims, xdims, sizeof(int64_t) * rank);
    ydims[rank - 1] = k->N;
    OrtValue *yv;
    if (API(SLOT_KernelContext_GetOutput, fn_get_output)(ctx, 0, ydims, (size_t)rank, &yv)) return;
    j.y = data_of(yv);
    const float *x = data_of(xv);
    if (!x || !j.y) return;
    if (j.M >= GEMM_MIN_ROWS) {
        gemm_t g = {j.M, j.N, j.K, nb, j.terms, x, {j.q[0], j.q[1]}, {j.s[0], j.s[1]}, {j.zp[0], j.zp[1]}, j.mins, j.y};
        int parts = (int)k->threads, micros = (j.N + MICRO_COLS - 1) / MICRO_COLS;
        if (parts > micros) parts = micros;
        if (parts < 1) parts = 1;
        if (!(k->amx && amx_gemm(&g, parts, &k->amx_limbs))) run_parallel(gemm_part, &g, parts);  /* no AMX here */
        return;
    }
    if (k->int_dot) use_halves(k, &j);
    one_row_product(&j, x, (int)k->int_dot, (int)k->threads);
}

static void kernel_destroy(void *opk) {
    kernel_t *k = (kernel_t *)opk;
    for (int i = 0; i < 3; i++) free(k->half[i]);
    pthread_mutex_destroy(&k->half_lock);
    free(k);
}
static const char *op_name(const OrtCustomOp *op) { return ((const op_def_t *)op)->name; }
static const char *op_provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int op_input_type(const OrtCustomOp *op, size_t i) {
    const op_def_t *def = (const op_def_t *)op;
    if (i == 0) return ELEM_FLOAT;
    if (def->has_mins && i == 3) return ELEM_FLOAT;
    return (i % 2) ? ELEM_UINT8 : ELEM_FLOAT;  /* q at odd positions, scales at even */
}
static size_t op_input_count(const OrtCustomOp *op) {
    const op_def_t *def = (const op_def_t *)op;
    return 1 + 2 * (size_t)def->terms + (size_t)def->has_mins;
}
static int op_output_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return ELEM_FLOAT; }
static size_t op_output_count(const OrtCustomOp *op) { (void)op; return 1; }

static int op_required(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; }  /* required */
static int op_mem_default(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int op_one(const OrtCustomOp *op) { (void)op; return 1; }
static int op_end_version(const OrtCustomOp *op) { (void)op; return 2147483647; }
static size_t no_pairs(int **a, int **b) { *a = NULL; *b = NULL; return 0; }
static void release_pairs(int *a, int *b) { (void)a; (void)b; }
#define OP(nm, t, m) {{1, create_kernel, op_name, op_provider, op_input_type, op_input_count, op_output_type, \
                       op_output_count, kernel_compute, kernel_destroy, op_required, op_required, op_mem_default, \
                       op_one, op_one, op_one, op_one, NULL, NULL, NULL, op_one, op_end_version, no_pairs, \
                       release_pairs, no_pairs, release_pairs}, nm, t, m}
static op_def_t ops[] = {OP("QMatMul1", 1, 0), OP("QMatMul1M", 1, 1), OP("QMatMul2", 2, 0)};

#include "qattn.c"  /* GQAttention: GroupQueryAttention on the same thread pool (qattn_op) */
#include "swiglu.c"  /* SwiGLU: the MLP's Split + QuickGelu + Mul as one op (swiglu_op) */
#include "rowstats.c"  /* the check's per-row statistics of float32 logits (runtime/row_stats.py) */
#include "philox.c"  /* the sampled check's Philox draws (runtime/philox.py) */

OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    g_api = base->GetApi(1);
    if (!g_api) return NULL;  /* cannot even make a status; onnxruntime then fails on the unknown ops */
    OrtCustomOpDomain *domain;
    OrtStatus *st = API(SLOT_CreateCustomOpDomain, fn_create_domain)("p2pinfer", &domain);
    if (st) return st;
    for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++)
        if ((st = API(SLOT_CustomOpDomain_Add, fn_domain_add)(domain, &ops[i].op))) return st;
    if ((st = API(SLOT_CustomOpDomain_Add, fn_domain_add)(domain, &qattn_op))) return st;
    if ((st = API(SLOT_CustomOpDomain_Add, fn_domain_add)(domain, &swiglu_op))) return st;
    return API(SLOT_AddCustomOpDomain, fn_add_domain)(options, domain);
}

/* build identity, for the cache key and the log */
const char *p2pinfer_qmatmul_isa(void) {
#if INT_DOT && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    return "avx512-vnni";
#elif INT_DOT && defined(__AVXVNNI__)
    return "avx-vnni";  /* qdecode_avx2.c with 256-bit vpdpbusd */
#elif INT_DOT
    return "avx2";      /* qdecode_avx2.c on vpmaddubsw (also AVX-512 without VNNI: Skylake-SP / X) */
#elif defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2-float";  /* no F16C: float32 decode rows only */
#else
    return "portable";
#endif
}

/* 1 when the many-row path runs on AMX tiles in this process (compiled for them, the CPU has them and Linux
   granted the tile state), else 0; for the log and for calibration (which measures both paths where it is 1) */
int p2pinfer_qmatmul_amx(void) {
#if defined(HAVE_AMX)
    return amx_available();
#else
    return 0;
#endif
}

/* whether decode rows can take the integer path (built for a CPU with AVX-512 VNNI, or AVX2 + FMA + F16C) */
int p2pinfer_qmatmul_int_dot(void) { return INT_DOT; }

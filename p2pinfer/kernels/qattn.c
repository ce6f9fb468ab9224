/* p2pinfer attention: onnxruntime's com.microsoft GroupQueryAttention (CPU, float32), as the GGUF importer emits it
 * (packed QKV, rotate-half rotary from cos/sin caches, past and present KV in BNSH, causal), as custom op
 * "GQAttention" of the kernel library (#included by qmatmul.c, registered beside the QMatMul ops).
 *
 * Why: onnxruntime's CPU GroupQueryAttention multiplies every query row by EVERY key of the pass (future ones too,
 * then zeroed by the causal softmax) and by every value, one head at a time through its GEMM: at 174 positions it
 * was ~1 ms per SmolLM2 layer, 18 % of a verification pass. Here each row touches the keys before it only, the heads of
 * a pass are split over the kernel's own threads (run_parallel), and rotary, KV writes and the output land in place.
 *
 * Semantics (those of onnxruntime's GroupQueryAttention for this attribute set; the rewrite checks the set):
 *   inputs  qkv [B, S, (nh + 2 nkv) hd], past_key, past_value [B, nkv, P, hd], seqlens_k int32 [B] (total - 1),
 *           total_sequence_length int32 [1], cos_cache, sin_cache [R, hd / 2]
 *   outputs out [B, S, nh hd], present_key, present_value [B, nkv, max(total, P), hd] (the same buffers as past
 *           where the caller binds them so: then only the new positions are written)
 *   past_b = S == total ? 0 : seqlens_k[b] + 1 - S: the positions before the pass; row s is position past_b + s, is
 *   rotated with cos/sin row past_b + s (rotate-half: y_i = x_i c_i - x_{i+h} s_i, y_{i+h} = x_{i+h} c_i + x_i s_i),
 *   its rotated key and its value are written at position past_b + s, and it attends to positions 0 .. past_b + s
 *   with scores alpha * q.k (alpha = scale, or 1/sqrt(hd) where scale is 0).
 *
 * Numerics: float32 throughout. Per (row, key) the score is one chain of fused multiply-adds over the dimensions
 * d = 0 .. hd - 1 in order (the keys transposed once per call, 16 positions a vector: no lane reductions). The
 * softmax's maximum is exact; exp is one polynomial (Cephes' expf: about 1 ulp); the sum of exps is a 16-lane
 * sequential accumulation over the keys in order, then one fixed tree over the lanes; the output is sum_t e_t v_t,
 * sequential over t per element, divided by that sum. So a row's result depends on its own q, the keys and values
 * before it and nothing else: not on the other rows of its pass, the pass's length, the row's place in it, nor the
 * thread count. A decode step (one row) runs the very same code as a row of a many-row pass: the two agree bit for
 * bit. (Where the compiler fuses a * b + c, as on every x86-64-v3 or newer build, the builds agree too; an
 * x86-64-v2 build, without FMA, rounds the products separately.)
 *
 * Bounds: every length is checked against the buffers before anything is read or written; a mismatch is an
 * onnxruntime error status (the run fails with its message), never an out-of-bounds access. */

typedef int32_t vec16i __attribute__((vector_size(64)));
typedef float vec16f __attribute__((vector_size(64)));
/* the CPU's own vector: the products (scores, values) of builds without AVX-512 run on it. Their sixteen-lane
   vectors are no machine type there: GCC kept every accumulator of those loops in memory (measured on an
   x86-64-v3 build here: ~5 GFLOP/s, 45x slower than AVX-512). Each lane's chain of operations is the same at any
   width: the same bits. */
#if defined(__AVX512F__)
#define QA_W 16
#elif defined(__AVX__)
#define QA_W 8
#else
#define QA_W 4
#endif
typedef float vecwf __attribute__((vector_size(QA_W * 4)));

#define QA_MAX_HEAD 256  /* head sizes up to this (multiples of 16) */
#define QA_ROWS 4        /* positions per work unit: their transposed keys and values are read once for all four */
#define QA_ELEM_INT32 6

typedef OrtStatus *(*fn_attr_f32)(const OrtKernelInfo *, const char *, float *);
#define SLOT_KernelInfoGetAttribute_float 85

typedef struct {
    int B, S, nh, nkv, hd, units, blocks, chunks;
    int64_t present_len;
    const float *qkv;      /* [B, S, (nh + 2 nkv) hd] */
    const float *cosc, *sinc;
    const int64_t *past;   /* [B]: positions before the pass */
    float *pk, *pv;        /* [B, nkv, present_len, hd] */
    float *kt;             /* [B, nkv, chunks, hd, 16]: the keys transposed (qa_transpose_part) */
    float *out;            /* [B, S, nh hd]: first the rotated queries, then the result, row by row */
    float alpha;
    atomic_int next;       /* the next work unit (dynamic: rows late in the pass cost more) */
} qattn_job_t;

static inline __attribute__((always_inline)) vec16f qa_load(const float *p) { vec16f v; memcpy(&v, p, 64); return v; }
static inline __attribute__((always_inline)) void qa_store(float *p, vec16f v) { memcpy(p, &v, 64); }

/* ---- phase 1: rotary on q and k, k and v written into the present buffers, q into the output rows ---------- */
static void qa_rotate(const float *x, const float *c, const float *s, float *y, int half) {
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        y[i] = a * c[i] - b * s[i];
        y[i + half] = b * c[i] + a * s[i];
    }
}

static void qa_prepare_part(void *arg, int part, int parts) {
    qattn_job_t *j = (qattn_job_t *)arg;
    int rows = j->B * j->S, per = (rows + parts - 1) / parts;
    int r0 = part * per, r1 = r0 + per < rows ? r0 + per : rows;
    int hd = j->hd, half = hd / 2, width = (j->nh + 2 * j->nkv) * hd;
    for (int r = r0; r < r1; r++) {
        int b = r / j->S, s = r % j->S;
        int64_t pos = j->past[b] + s;
        const float *src = j->qkv + (size_t)r * width, *c = j->cosc + pos * half, *sn = j->sinc + pos * half;
        for (int h = 0; h < j->nh; h++) qa_rotate(src + (size_t)h * hd, c, sn, j->out + ((size_t)r * j->nh + h) * hd, half);
        for (int g = 0; g < j->nkv; g++) {
            size_t at = (((size_t)b * j->nkv + g) * j->present_len + pos) * hd;
            qa_rotate(src + (size_t)(j->nh + g) * hd, c, sn, j->pk + at, half);
            memcpy(j->pv + at, src + (size_t)(j->nh + j->nkv + g) * hd, sizeof(float) * hd);
        }
    }
}

/* ---- phase 2: attention, one (batch, head, block of QA_ROWS positions) unit at a time ------------------------ */

/* the sum of v's 16 lanes, in one fixed tree (i + i+8, then + 4, + 2, + 1) */
static inline __attribute__((always_inline)) float qa_lanes_sum(vec16f v) {
    vec16f t = v + __builtin_shuffle(v, (vec16i){8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15});
    t = t + __builtin_shuffle(t, (vec16i){4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7});
    t = t + __builtin_shuffle(t, (vec16i){2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3});
    return t[0] + t[1];
}

/* the 16 x 16 block r[0..15] transposed in place (r[i][l] becomes r[l][i]): four butterfly stages that swap the
   off-diagonal halves, quarters, pairs and single lanes of pairs of vectors */
static inline __attribute__((always_inline)) void qa_stage(vec16f r[16], const int S, vec16i lo, vec16i hi) {
    for (int i = 0; i < 16; i++)
        if (!(i & S)) {
            vec16f a = r[i], b = r[i + S];
            r[i] = __builtin_shuffle(a, b, lo);
            r[i + S] = __builtin_shuffle(a, b, hi);
        }
}
static inline __attribute__((always_inline)) void qa_transpose16(vec16f r[16]) {
    qa_stage(r, 8, (vec16i){0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
             (vec16i){8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
    qa_stage(r, 4, (vec16i){0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
             (vec16i){4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
    qa_stage(r, 2, (vec16i){0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
             (vec16i){2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
    qa_stage(r, 1, (vec16i){0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
             (vec16i){1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
}

#if QA_W < 16
typedef int32_t vecwm __attribute__((vector_size(QA_W * 4)));  /* shuffle masks of the build's own vectors */

/* the QA_W x QA_W block r[0..QA_W-1] transposed in place on the build's own vectors, by the same butterfly stages as
   qa_transpose16. Its 16-lane shuffles are no machine operation without AVX-512: GCC moved every lane through the
   stack (~800 stack accesses in the transpose's code), and a decode step transposes all its past keys */
static inline __attribute__((always_inline)) void qa_stage_w(vecwf r[QA_W], const int S, vecwm lo, vecwm hi) {
    for (int i = 0; i < QA_W; i++)
        if (!(i & S)) {
            vecwf a = r[i], b = r[i + S];
            r[i] = __builtin_shuffle(a, b, lo);
            r[i + S] = __builtin_shuffle(a, b, hi);
        }
}
static inline __attribute__((always_inline)) void qa_transpose_w(vecwf r[QA_W]) {
#if QA_W == 8
    qa_stage_w(r, 4, (vecwm){0, 1, 2, 3, 8, 9, 10, 11}, (vecwm){4, 5, 6, 7, 12, 13, 14, 15});
    qa_stage_w(r, 2, (vecwm){0, 1, 8, 9, 4, 5, 12, 13}, (vecwm){2, 3, 10, 11, 6, 7, 14, 15});
    qa_stage_w(r, 1, (vecwm){0, 8, 2, 10, 4, 12, 6, 14}, (vecwm){1, 9, 3, 11, 5, 13, 7, 15});
#else
    qa_stage_w(r, 2, (vecwm){0, 1, 4, 5}, (vecwm){2, 3, 6, 7});
    qa_stage_w(r, 1, (vecwm){0, 4, 2, 6}, (vecwm){1, 5, 3, 7});
#endif
}
#endif

/* phase 1b: the keys of (batch, kv head) transposed, 16 positions at a time: chunk c is [hd][16] (dimension d of
   positions 16c .. 16c + 15; zeros past the keys), so that 16 scores are one vector per dimension */
static void qa_transpose_part(void *arg, int part, int parts) {
    qattn_job_t *j = (qattn_job_t *)arg;
    int total = j->B * j->nkv * j->chunks, per = (total + parts - 1) / parts;
    int c0 = part * per, c1 = c0 + per < total ? c0 + per : total;
    int hd = j->hd;
    for (int u = c0; u < c1; u++) {
        int bg = u / j->chunks, c = u % j->chunks;
        int64_t keys = j->past[bg / j->nkv] + j->S;
        const float *K = j->pk + (size_t)bg * j->present_len * hd;
        float *dst = j->kt + ((size_t)bg * j->chunks + c) * hd * 16;
#if QA_W == 16
        if (u + 1 < c1 && (u + 1) / j->chunks == bg)  /* the next chunk's rows: a decode step reads its keys cold */
            for (int l = 0; l < 16 && 16 * (int64_t)(c + 1) + l < keys; l++)
                for (int d0 = 0; d0 < hd; d0 += 16) __builtin_prefetch(K + (16 * (size_t)(c + 1) + l) * hd + d0);
        for (int d0 = 0; d0 < hd; d0 += 16) {
            vec16f r[16];
            for (int l = 0; l < 16; l++)
                r[l] = 16 * (int64_t)c + l < keys ? qa_load(K + (16 * (size_t)c + l) * hd + d0) : (vec16f){0};
            qa_transpose16(r);
            for (int l = 0; l < 16; l++) qa_store(dst + (size_t)(d0 + l) * 16, r[l]);
        }
#else
        /* the chunk's 16 x hd block as QA_W x QA_W blocks: positions l0 .. l0 + QA_W - 1, dimensions d0 .., a block of
           positions read whole before the next (in a model a decode step reads the keys cold: rows read in turn
           stream from memory; dimensions outermost, 10-13 % slower decode steps on x86-64-v3) */
        for (int l0 = 0; l0 < 16; l0 += QA_W)
            for (int d0 = 0; d0 < hd; d0 += QA_W) {
                vecwf r[QA_W];
                for (int l = 0; l < QA_W; l++) {
                    int64_t position = 16 * (int64_t)c + l0 + l;
                    r[l] = (vecwf){0};
                    if (position < keys) memcpy(&r[l], K + (size_t)position * hd + d0, sizeof(vecwf));
                }
                qa_transpose_w(r);
                for (int i = 0; i < QA_W; i++) memcpy(dst + (size_t)(d0 + i) * 16 + l0, &r[i], sizeof(vecwf));
            }
#endif
    }
}

/* keeps v in a register. Without it GCC folds v's load into every fused multiply-add that uses it: one 64-byte load
   per FMA (two cache lines each where v's address is not 64-byte aligned), the loads then outnumbering the FMAs
   that share v (measured here: the values' product at half speed on misaligned V). An empty asm: v is unchanged. */
#if defined(__AVX512F__)
#define QA_KEEP(v) __asm__("" : "+v"(v))
#else
#define QA_KEEP(v) ((void)0)
#endif

#if QA_W == 16
/* scores of rows 0 .. R-1 (queries q[r], hd wide) for the 16 C keys of chunks c0 .. c0 + C - 1: per score one
   sequential chain of fused multiply-adds over the dimensions d = 0 .. hd - 1 (a lane of one accumulator); each
   chunk's vector of dimension d loaded once for all R rows */
static inline __attribute__((always_inline)) void qa_scores_block(const float (*q)[QA_MAX_HEAD], const float *kt, int64_t c0,
                                                                  const int R, const int C, const int hd, float *scratch,
                                                                  int64_t stride) {
    vec16f acc[4][16];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = (vec16f){0};
    for (int d = 0; d < hd; d++) {
        vec16f k[16];
        for (int c = 0; c < C; c++) {
            k[c] = qa_load(kt + ((size_t)(c0 + c) * hd + d) * 16);
            if (R > 1) QA_KEEP(k[c]);  /* one row (a decode step) uses each once: a folded load is best */
        }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) acc[r][c] += q[r][d] * k[c];
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) qa_store(scratch + r * stride + 16 * (c0 + c), acc[r][c]);
}

/* the scores of R rows against chunks 0 .. chunks - 1: blocks of 16 / R chunks (sixteen accumulators: the FMA
   latency hidden), then the rest in blocks of 8, 4, 2 and 1 (each a constant: the accumulators stay in registers) */
static inline __attribute__((always_inline)) void qa_scores(const float (*q)[QA_MAX_HEAD], const float *kt, int64_t chunks,
                                                            const int R, const int hd, float *scratch, int64_t stride) {
    const int C = 16 / R;
    int64_t c = 0;
    for (; c + C <= chunks; c += C) qa_scores_block(q, kt, c, R, C, hd, scratch, stride);
    if (C > 8 && c + 8 <= chunks) { qa_scores_block(q, kt, c, R, 8, hd, scratch, stride); c += 8; }
    if (C > 4 && c + 4 <= chunks) { qa_scores_block(q, kt, c, R, 4, hd, scratch, stride); c += 4; }
    if (C > 2 && c + 2 <= chunks) { qa_scores_block(q, kt, c, R, 2, hd, scratch, stride); c += 2; }
    if (c < chunks) qa_scores_block(q, kt, c, R, 1, hd, scratch, stride);
}
#else
/* the same scores on QA_W-lane vectors: chunk c's lanes in 16 / QA_W pieces, R x C x pieces accumulators (at most 8,
   as the 16 AVX registers hold them with the keys) */
static inline __attribute__((always_inline)) void qa_scores_block(const float (*q)[QA_MAX_HEAD], const float *kt, int64_t c0,
                                                                  const int R, const int C, const int hd, float *scratch,
                                                                  int64_t stride) {
    const int P = 16 / QA_W;
    vecwf acc[4][4 * (16 / QA_W)];
    /* every loop over rows, chunks and pieces unrolled before the accumulators are placed: else GCC kept the keys'
       vectors and the accumulators on the stack (a copy loop and a load and a store a multiply-add) */
#pragma GCC unroll 16
    for (int r = 0; r < R; r++)
#pragma GCC unroll 16
        for (int c = 0; c < C * P; c++) acc[r][c] = (vecwf){0};
    for (int d = 0; d < hd; d++) {
        vecwf k[4 * (16 / QA_W)];
#pragma GCC unroll 16
        for (int c = 0; c < C; c++)
#pragma GCC unroll 16
            for (int p = 0; p < P; p++)
                memcpy(&k[c * P + p], kt + ((size_t)(c0 + c) * hd + d) * 16 + p * QA_W, sizeof(vecwf));
#pragma GCC unroll 16
        for (int r = 0; r < R; r++)
#pragma GCC unroll 16
            for (int c = 0; c < C * P; c++) acc[r][c] += q[r][d] * k[c];
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; r++)
#pragma GCC unroll 16
        for (int c = 0; c < C; c++)
#pragma GCC unroll 16
            for (int p = 0; p < P; p++)
                memcpy(scratch + r * stride + 16 * (c0 + c) + p * QA_W, &acc[r][c * P + p], sizeof(vecwf));
}

static inline __attribute__((always_inline)) void qa_scores(const float (*q)[QA_MAX_HEAD], const float *kt, int64_t chunks,
                                                            const int R, const int hd, float *scratch, int64_t stride) {
    const int C = 8 / (R * (16 / QA_W)) > 1 ? 8 / (R * (16 / QA_W)) : 1;
    int64_t c = 0;
    for (; c + C <= chunks; c += C) qa_scores_block(q, kt, c, R, C, hd, scratch, stride);
    if (C > 2 && c + 2 <= chunks) { qa_scores_block(q, kt, c, R, 2, hd, scratch, stride); c += 2; }
    for (; c < chunks; c++) qa_scores_block(q, kt, c, R, 1, hd, scratch, stride);
}
#endif

/* a > b ? a : b per lane: x86's maxps exactly (with NaN or -0 vs +0 it is b), one instruction on AVX-512 */
static inline __attribute__((always_inline)) vec16f qa_max(vec16f a, vec16f b) {
#if defined(__AVX512F__)
    return (vec16f)_mm512_max_ps((__m512)a, (__m512)b);
#else
    vec16i gt = a > b;
    return (vec16f)(((vec16i)a & gt) | ((vec16i)b & ~gt));
#endif
}

/* Cephes expf's reduction and polynomial, for any vector width (the same operations per lane): r = x - n ln2 in
   two steps, then e^r by a degree-7 polynomial; the caller scales by 2^n. One text for qa_exp and qa_expw, so
   that the two builds' lanes cannot drift apart. */
#define QA_EXP_REDUCED(V, x, fn) ({                                  \
    V r_ = (x) - (fn) * 0.693359375f;                                \
    r_ = r_ - (fn) * -2.12194440e-4f;                                \
    V p_ = (V){0} + 1.9875691500e-4f;                                \
    p_ = p_ * r_ + 1.3981999507e-3f;                                 \
    p_ = p_ * r_ + 8.3334519073e-3f;                                 \
    p_ = p_ * r_ + 4.1665795894e-2f;                                 \
    p_ = p_ * r_ + 1.6666665459e-1f;                                 \
    p_ = p_ * r_ + 5.0000001201e-1f;                                 \
    p_ * (r_ * r_) + r_ + 1.0f;                                      \
})

/* e^x for x <= 0 (Cephes expf: x = n ln2 + r, a degree-7 polynomial in r, times 2^n; x below -87.3 is taken as
   -87.3, whose e^x, ~1e-38, is nothing beside the row's largest term, 1; a NaN stays NaN) */
static inline __attribute__((always_inline)) vec16f qa_exp(vec16f x) {
    const vec16f lo = (vec16f){0} - 87.3365447f;
    x = qa_max(lo, x);  /* x < lo ? lo : x */
    vec16f y = x * 1.44269504088896341f - 0.5f;
#if defined(__AVX512F__)
    /* n as a float, y rounded toward zero in one instruction, and p 2^n by vscalefps: the same bits as the
       conversions below (2^n is a normal float for n >= -126, p 2^n one rounding either way; checked for every
       float x <= 0, with and without FTZ/DAZ) in 2 instructions instead of 5 */
    vec16f fn = (vec16f)_mm512_roundscale_ps((__m512)y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
#else
    vec16i n = __builtin_convertvector(y, vec16i);  /* toward zero: the nearest integer to x log2(e) (y <= -0.5) */
    vec16f fn = __builtin_convertvector(n, vec16f);
#endif
    vec16f p = QA_EXP_REDUCED(vec16f, x, fn);
#if defined(__AVX512F__)
    return (vec16f)_mm512_scalef_ps((__m512)p, (__m512)fn);
#else
    return p * (vec16f)((n + 127) << 23);
#endif
}

#if QA_W == 16
/* one row's softmax weights in place: its scores e[0 .. n-1] (times alpha) become e^(score - max), zeros after them
   to the end of the last chunk; returns their sum (a 16-lane accumulation over the chunks in order, then
   qa_lanes_sum), *bad set when a score is NaN or infinite (the row is then NaN: its weights are not used).
   The maximum of finite scores is exact whatever the order of the comparisons (only -0 and +0 tie unequal, and
   e^(s - (-0)) = e^(s - 0) for every s, both 1 for s = +-0): two running maxima over alternate chunks, then a tree
   over the lanes, keep the dependency chains short. A NaN or infinite score shows as a NaN in s * 0 (0 otherwise),
   accumulated: no compare per chunk. */
static inline __attribute__((always_inline)) float qa_softmax(float *e, int64_t n, float alpha, int *bad) {
    const int64_t full = n / 16;
    const int tail = (int)(n % 16);
    if (alpha != 1.0f)
        for (int64_t t = 0; t < n; t++) e[t] *= alpha;
    const vec16f none = (vec16f){0} - __builtin_inff();
    const vec16i lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const vec16i live = lanes < tail;  /* the last chunk's lanes before n */
    vec16f m0 = none, m1 = none, z0 = (vec16f){0}, z1 = (vec16f){0};
    int64_t c = 0;
    for (; c + 2 <= full; c += 2) {
        vec16f a = qa_load(e + 16 * c), b = qa_load(e + 16 * c + 16);
        m0 = qa_max(a, m0);
        m1 = qa_max(b, m1);
        z0 = a * 0.0f + z0;
        z1 = b * 0.0f + z1;
    }
    if (c < full) {
        vec16f a = qa_load(e + 16 * c);
        m0 = qa_max(a, m0);
        z0 = a * 0.0f + z0;
    }
    if (tail) {
        vec16f a = (vec16f)((vec16i)qa_load(e + 16 * full) & live);  /* zeros past n */
        z1 = a * 0.0f + z1;
        m1 = qa_max((vec16f)((vec16i)a | ((vec16i)none & ~live)), m1);
    }
    vec16f m = qa_max(m0, m1), z = z0 + z1;
    m = qa_max(m, __builtin_shuffle(m, (vec16i){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
    m = qa_max(m, __builtin_shuffle(m, (vec16i){4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3}));
    m = qa_max(m, __builtin_shuffle(m, (vec16i){2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1}));
    float mx = m[0] > m[1] ? m[0] : m[1];
    *bad = qa_lanes_sum(z) != 0.0f;  /* a NaN lane makes the sum NaN */
    vec16f acc = (vec16f){0};
    for (c = 0; c + 2 <= full; c += 2) {  /* two chunks' exps in flight; added in order */
        vec16f a = qa_exp(qa_load(e + 16 * c) - mx), b = qa_exp(qa_load(e + 16 * c + 16) - mx);
        qa_store(e + 16 * c, a);
        qa_store(e + 16 * c + 16, b);
        acc += a;
        acc += b;
    }
    if (c < full) {
        vec16f a = qa_exp(qa_load(e + 16 * c) - mx);
        qa_store(e + 16 * c, a);
        acc += a;
    }
    if (tail) {
        vec16f a = (vec16f)((vec16i)qa_exp(qa_load(e + 16 * full) - mx) & live);
        qa_store(e + 16 * full, a);
        acc += a;
    }
    return qa_lanes_sum(acc);
}
#else
typedef int32_t vecwi __attribute__((vector_size(QA_W * 4)));

static inline __attribute__((always_inline)) vecwf qa_maxw(vecwf a, vecwf b) {
    vecwi gt = a > b;
    return (vecwf)(((vecwi)a & gt) | ((vecwi)b & ~gt));
}

/* qa_exp on QA_W lanes: the same operations per lane */
static inline __attribute__((always_inline)) vecwf qa_expw(vecwf x) {
    const vecwf lo = (vecwf){0} - 87.3365447f;
    x = qa_maxw(lo, x);
    vecwf y = x * 1.44269504088896341f - 0.5f;
    vecwi n = __builtin_convertvector(y, vecwi);
    vecwf fn = __builtin_convertvector(n, vecwf);
    vecwf p = QA_EXP_REDUCED(vecwf, x, fn);
    return p * (vecwf)((n + 127) << 23);
}

/* qa_softmax on QA_W-lane vectors: the sixteen lanes' sums in 16 / QA_W accumulators, then the same tree */
static inline __attribute__((always_inline)) float qa_softmax(float *e, int64_t n, float alpha, int *bad) {
    const int P = 16 / QA_W;
    const int64_t full = n / 16;
    const int tail = (int)(n % 16);
    if (alpha != 1.0f)
        for (int64_t t = 0; t < n; t++) e[t] *= alpha;
    const vecwf none = (vecwf){0} - __builtin_inff();
    vecwi lanes;
    for (int l = 0; l < QA_W; l++) lanes[l] = l;
    vecwf m = none, z = (vecwf){0};
    for (int64_t c = 0; c < full; c++)
        for (int p = 0; p < P; p++) {
            vecwf a;
            memcpy(&a, e + 16 * c + p * QA_W, sizeof(a));
            m = qa_maxw(a, m);
            z = a * 0.0f + z;
        }
    if (tail)
        for (int p = 0; p < P; p++) {
            vecwi live = lanes + p * QA_W < tail;
            vecwf a;
            memcpy(&a, e + 16 * full + p * QA_W, sizeof(a));
            a = (vecwf)((vecwi)a & live);
            z = a * 0.0f + z;
            m = qa_maxw((vecwf)((vecwi)a | ((vecwi)none & ~live)), m);
        }
    float mx = m[0];
    int any_odd = 0;
    for (int l = 0; l < QA_W; l++) {
        mx = m[l] > mx ? m[l] : mx;
        any_odd |= !(z[l] == 0.0f);  /* a NaN */
    }
    *bad = any_odd;
    vecwf acc[16 / QA_W];
    for (int p = 0; p < P; p++) acc[p] = (vecwf){0};
    for (int64_t c = 0; c < full; c++)
        for (int p = 0; p < P; p++) {
            vecwf a;
            memcpy(&a, e + 16 * c + p * QA_W, sizeof(a));
            a = qa_expw(a - mx);
            memcpy(e + 16 * c + p * QA_W, &a, sizeof(a));
            acc[p] += a;
        }
    if (tail)
        for (int p = 0; p < P; p++) {
            vecwi live = lanes + p * QA_W < tail;
            vecwf a;
            memcpy(&a, e + 16 * full + p * QA_W, sizeof(a));
            a = (vecwf)((vecwi)qa_expw(a - mx) & live);
            memcpy(e + 16 * full + p * QA_W, &a, sizeof(a));
            acc[p] += a;
        }
    vec16f sum;
    memcpy(&sum, acc, sizeof(sum));
    return qa_lanes_sum(sum);
}
#endif

/* acc[r][e0 .. e0 + G - 1] = those elements of sum_{t < n[r]} e[r][t] v_t for the rows r < rows (e: row r at
   scratch + r * stride; G a multiple of 16, at most 64), sequential over t: the keys all rows share (t < n[0]) with
   v_t's G elements loaded once for all rows, then each row's last. Every loop over rows and pieces unrolled, so that
   the accumulators are registers: GCC had kept them in memory (heads of 128 or more on AVX-512, whose accumulators
   and v_t outgrew the 32 registers) or on the stack (the builds without AVX-512, the loops left rolled) */
static inline __attribute__((always_inline)) void qa_values_group(vec16f acc[QA_ROWS][QA_MAX_HEAD / 16],
                                                                  const float *scratch, int64_t stride, const float *V,
                                                                  const int64_t *n, const int rows, const int hd,
                                                                  const int e0, const int G) {
    const int P = G / QA_W;
    const int64_t n0 = n[0];
    vecwf a[QA_ROWS][64 / QA_W];
#pragma GCC unroll 16
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 16
        for (int p = 0; p < P; p++) a[r][p] = (vecwf){0};
    for (int64_t t = 0; t < n0; t++) {
        vecwf vv[64 / QA_W];
#pragma GCC unroll 16
        for (int p = 0; p < P; p++) {
            memcpy(&vv[p], V + t * hd + e0 + p * QA_W, sizeof(vecwf));
            if (rows > 1) QA_KEEP(vv[p]);
        }
#pragma GCC unroll 16
        for (int r = 0; r < rows; r++) {
            float w = scratch[r * stride + t];
#pragma GCC unroll 16
            for (int p = 0; p < P; p++) a[r][p] += w * vv[p];
        }
    }
#pragma GCC unroll 16
    for (int r = 1; r < rows; r++)
        for (int64_t t = n0; t < n[r]; t++)
#pragma GCC unroll 16
            for (int p = 0; p < P; p++) {
                vecwf vv;
                memcpy(&vv, V + t * hd + e0 + p * QA_W, sizeof(vecwf));
                a[r][p] += scratch[r * stride + t] * vv;
            }
#pragma GCC unroll 16
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 16
        for (int p = 0; p < P; p++) memcpy((float *)acc[r] + e0 + p * QA_W, &a[r][p], sizeof(vecwf));
}

/* acc[r] = sum_{t < n[r]} e[r][t] v_t, each element's sum in the same order, in groups of as many elements as the
   rows' accumulators leave registers for (32 zmm on AVX-512: 64 elements for up to four rows; 16 ymm on AVX2: 64
   for one row (a decode step would otherwise wait on the multiply-add latency with two accumulators), 32 for two,
   16 for more; the portable build half that), then what remains of the head in one group */
static inline __attribute__((always_inline)) void qa_values(vec16f acc[QA_ROWS][QA_MAX_HEAD / 16], const float *scratch,
                                                            int64_t stride, const float *V, const int64_t *n,
                                                            const int rows, const int hd) {
    const int G = QA_W == 16 || rows == 1 ? 8 * QA_W > 64 ? 64 : 8 * QA_W : rows == 2 ? 4 * QA_W : 16;
    int e = 0;
    for (; e + G <= hd; e += G) qa_values_group(acc, scratch, stride, V, n, rows, hd, e, G);
    /* fewer than G elements: a constant count, so that the accumulators stay in registers (each case only where it
       can occur, below G: the compiler then keeps no group wider than the registers hold) */
    switch (hd - e) {
        case 48: if (G > 48) qa_values_group(acc, scratch, stride, V, n, rows, hd, e, 48); break;
        case 32: if (G > 32) qa_values_group(acc, scratch, stride, V, n, rows, hd, e, 32); break;
        case 16: if (G > 16) qa_values_group(acc, scratch, stride, V, n, rows, hd, e, 16); break;
        default: break;
    }
}

/* the products of one unit as functions of their own, one per row count (and SmolLM2's head size of 64): inlined into
   the unit's one large function, GCC kept each loaded vector in a register AND stored it to the stack, one extra
   store per load (measured: the scores and the values' product ~15 % slower than as functions of their own) */
#define QA_PRODUCTS(R, HD, NAME)                                                                                  \
    static __attribute__((noinline)) void qa_scores_##NAME(const float (*q)[QA_MAX_HEAD], const float *kt,        \
                                                           int64_t chunks, int hd, float *scratch,                 \
                                                           int64_t stride) {                                       \
        (void)hd;                                                                                                  \
        qa_scores(q, kt, chunks, R, HD, scratch, stride);                                                          \
    }                                                                                                              \
    static __attribute__((noinline)) void qa_values_##NAME(vec16f acc[QA_ROWS][QA_MAX_HEAD / 16],                 \
                                                           const float *scratch, int64_t stride, const float *V,   \
                                                           const int64_t *n, int hd) {                             \
        (void)hd;                                                                                                  \
        qa_values(acc, scratch, stride, V, n, R, HD);                                                              \
    }
QA_PRODUCTS(4, 64, 4_64)
QA_PRODUCTS(3, 64, 3_64)
QA_PRODUCTS(2, 64, 2_64)
QA_PRODUCTS(1, 64, 1_64)
QA_PRODUCTS(4, hd, 4)
QA_PRODUCTS(3, hd, 3)
QA_PRODUCTS(2, hd, 2)
QA_PRODUCTS(1, hd, 1)

/* one unit: positions s0 .. s0 + rows - 1 of head h of batch b */
static inline __attribute__((always_inline)) void qa_unit(qattn_job_t *j, float *scratch, int b, int h, int s0, int rows, const int hd) {
    int g = h / (j->nh / j->nkv);
    int64_t stride = (int64_t)j->present_len;  /* scratch row stride: present_len rounded up to 16, + 16 */
    stride = (stride + 15) / 16 * 16 + 16;
    const float *V = j->pv + ((size_t)b * j->nkv + g) * j->present_len * hd;
    float q[QA_ROWS][QA_MAX_HEAD];
    int64_t n[QA_ROWS];
    float *outrow[QA_ROWS];
    for (int r = 0; r < rows; r++) {
        outrow[r] = j->out + (((size_t)b * j->S + s0 + r) * j->nh + h) * hd;
        memcpy(q[r], outrow[r], sizeof(float) * hd);  /* the rotated query (phase 1) */
        n[r] = j->past[b] + s0 + r + 1;
    }
    /* scores: every row against the chunks up to its own last key's (those of later keys are then ignored) */
    const float *kt = j->kt + ((size_t)b * j->nkv + g) * j->chunks * hd * 16;
    int64_t chunks = (n[rows - 1] + 15) / 16;
    switch (rows + 4 * (hd == 64)) {  /* a constant row count: the accumulators stay in registers */
        case 8: qa_scores_4_64(q, kt, chunks, hd, scratch, stride); break;
        case 7: qa_scores_3_64(q, kt, chunks, hd, scratch, stride); break;
        case 6: qa_scores_2_64(q, kt, chunks, hd, scratch, stride); break;
        case 5: qa_scores_1_64(q, kt, chunks, hd, scratch, stride); break;
        case 4: qa_scores_4(q, kt, chunks, hd, scratch, stride); break;
        case 3: qa_scores_3(q, kt, chunks, hd, scratch, stride); break;
        case 2: qa_scores_2(q, kt, chunks, hd, scratch, stride); break;
        default: qa_scores_1(q, kt, chunks, hd, scratch, stride); break;
    }
    float sum[QA_ROWS];
    int bad[QA_ROWS];
    for (int r = 0; r < rows; r++) sum[r] = qa_softmax(scratch + r * stride, n[r], j->alpha, &bad[r]);
    /* out = sum_t e_t v_t: for every row, sequential over t */
    vec16f acc[QA_ROWS][QA_MAX_HEAD / 16];
    switch (rows + 4 * (hd == 64)) {
        case 8: qa_values_4_64(acc, scratch, stride, V, n, hd); break;
        case 7: qa_values_3_64(acc, scratch, stride, V, n, hd); break;
        case 6: qa_values_2_64(acc, scratch, stride, V, n, hd); break;
        case 5: qa_values_1_64(acc, scratch, stride, V, n, hd); break;
        case 4: qa_values_4(acc, scratch, stride, V, n, hd); break;
        case 3: qa_values_3(acc, scratch, stride, V, n, hd); break;
        case 2: qa_values_2(acc, scratch, stride, V, n, hd); break;
        default: qa_values_1(acc, scratch, stride, V, n, hd); break;
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < hd / 16; c++)
            qa_store(outrow[r] + 16 * c, bad[r] ? (vec16f){0} + __builtin_nanf("") : acc[r][c] / sum[r]);
}

static void qa_attend_part(void *arg, int part, int parts) {
    (void)part; (void)parts;
    qattn_job_t *j = (qattn_job_t *)arg;
    int64_t stride = (j->present_len + 15) / 16 * 16 + 16;
    float *scratch = aligned_alloc(64, (size_t)QA_ROWS * stride * sizeof(float));
    if (!scratch) return;  /* the other parts take the units; none at all is an error (qa_compute) */
    int per_block = j->B * j->nh;
    for (;;) {
        int u = atomic_fetch_add(&j->next, 1);
        if (u >= j->units) break;
        int blk = j->blocks - 1 - u / per_block, rest = u % per_block;  /* the last positions (most keys) first */
        int b = rest / j->nh, h = rest % j->nh, s0 = blk * QA_ROWS;
        int rows = j->S - s0 < QA_ROWS ? j->S - s0 : QA_ROWS;
        if (j->hd == 64) qa_unit(j, scratch, b, h, s0, rows, 64);  /* SmolLM2's: unrolled, kept in registers */
        else qa_unit(j, scratch, b, h, s0, rows, j->hd);
    }
    free(scratch);
}

/* the transposed keys' buffer of the calling thread: grown, never shrunk (at most the longest sequence's keys of one
   layer: 6 MB for SmolLM2's 8192 positions), so that a decode step allocates nothing; freed when the thread exits
   (a pthread key's destructor: callers' worker threads come and go) */
typedef struct { float *data; size_t capacity; } qa_buffer_t;
static pthread_key_t qa_buffer_key;
static pthread_once_t qa_buffer_once = PTHREAD_ONCE_INIT;
static int qa_buffer_key_ok;
static void qa_buffer_free(void *p) {
    qa_buffer_t *b = (qa_buffer_t *)p;
    if (b) { free(b->data); free(b); }
}
static void qa_buffer_key_make(void) { qa_buffer_key_ok = pthread_key_create(&qa_buffer_key, qa_buffer_free) == 0; }

/* this thread's buffer of at least `floats` floats, or NULL (out of memory) */
static float *qa_thread_buffer(size_t floats) {
    pthread_once(&qa_buffer_once, qa_buffer_key_make);
    if (!qa_buffer_key_ok) return NULL;
    qa_buffer_t *b = pthread_getspecific(qa_buffer_key);
    if (!b) {
        if (!(b = calloc(1, sizeof(*b)))) return NULL;
        if (pthread_setspecific(qa_buffer_key, b)) { free(b); return NULL; }
    }
    if (floats > b->capacity) {
        free(b->data);
        b->capacity = 0;
        if (!(b->data = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64))) return NULL;
        b->capacity = floats;
    }
    return b->data;
}

/* ---- the custom op ----------------------------------------------------------------------------------------- */
typedef struct { int64_t nh, nkv, hd, threads; float scale; } qattn_kernel_t;

static void *qa_create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info) {
    (void)op; (void)api;
    qattn_kernel_t *k = calloc(1, sizeof(qattn_kernel_t));
    if (!k) return NULL;
    k->nh = attr(info, "num_heads", 0); k->nkv = attr(info, "kv_num_heads", 0);
    k->hd = attr(info, "head_size", 0); k->threads = attr(info, "threads", 1);
    float scale = 0.f;
    OrtStatus *st = API(SLOT_KernelInfoGetAttribute_float, fn_attr_f32)(info, "scale", &scale);
    if (st) { API(SLOT_ReleaseStatus, fn_release_status)(st); scale = 0.f; }
    k->scale = scale;
    return k;
}

static OrtStatus *qa_error(const char *message) {
    return API(SLOT_CreateStatus, fn_create_status)(ORT_INVALID_ARGUMENT, message);
}

/* the whole element count of dims[0..rank-1], or -1 when a dimension is negative or the count is absurd */
static int64_t qa_count(const int64_t *dims, int rank) {
    int64_t n = 1;
    for (int i = 0; i < rank; i++) {
        if (dims[i] < 0 || dims[i] > ((int64_t)1 << 31)) return -1;
        n *= dims[i];
        if (n > ((int64_t)1 << 40)) return -1;
    }
    return n;
}

static OrtStatus *qa_compute(void *opk, OrtKernelContext *ctx) {
    qattn_kernel_t *k = (qattn_kernel_t *)opk;
    int64_t nh = k->nh, nkv = k->nkv, hd = k->hd;
    if (nh <= 0 || nkv <= 0 || nh % nkv || hd <= 0 || hd % 16 || hd > QA_MAX_HEAD || nh > 4096)
        return qa_error("GQAttention: unsupported num_heads / kv_num_heads / head_size attributes");
    size_t count = 0;
    if (API(SLOT_KernelContext_GetInputCount, fn_input_count)(ctx, &count) || count != 7)
        return qa_error("GQAttention: expects 7 inputs");
    const OrtValue *xv, *pkv, *pvv, *slv, *tv, *cv, *sv;
    int64_t xd[8], pkd[8], pvd[8], sld[8], td[8], cd[8], sd[8];
    int xr = input_dims(ctx, 0, &xv, xd, 8), pkr = input_dims(ctx, 1, &pkv, pkd, 8), pvr = input_dims(ctx, 2, &pvv, pvd, 8);
    int slr = input_dims(ctx, 3, &slv, sld, 8), tr = input_dims(ctx, 4, &tv, td, 8);
    int cr = input_dims(ctx, 5, &cv, cd, 8), sr = input_dims(ctx, 6, &sv, sd, 8);
    if (xr != 3 || qa_count(xd, 3) < 0 || xd[2] != (nh + 2 * nkv) * hd || xd[0] < 1 || xd[1] < 1)
        return qa_error("GQAttention: query must be [batch, sequence, (num_heads + 2 kv_num_heads) head_size]");
    int64_t B = xd[0], S = xd[1];
    if (pkr != 4 || pvr != 4 || qa_count(pkd, 4) < 0 || memcmp(pkd, pvd, sizeof(int64_t) * 4) || pkd[0] != B
            || pkd[1] != nkv || pkd[3] != hd)
        return qa_error("GQAttention: past_key and past_value must both be [batch, kv_num_heads, positions, head_size]");
    if (slr != 1 || sld[0] != B || tr < 0 || tr > 1 || (tr == 1 && td[0] != 1))
        return qa_error("GQAttention: seqlens_k must be [batch] and total_sequence_length one value");
    if (cr != 2 || sr != 2 || qa_count(cd, 2) < 0 || cd[0] != sd[0] || cd[1] != sd[1] || cd[1] * 2 != hd)
        return qa_error("GQAttention: cos_cache and sin_cache must both be [positions, head_size / 2]");
    const int32_t *seqlens = data_of(slv), *totalp = data_of(tv);
    const float *qkv = data_of(xv), *past_k = data_of(pkv), *past_v = data_of(pvv), *cosc = data_of(cv), *sinc = data_of(sv);
    if (!seqlens || !totalp || !qkv || !past_k || !past_v || !cosc || !sinc)
        return qa_error("GQAttention: an input has no data");
    int64_t total = *totalp, P = pkd[2];
    if (total < S || total > cd[0])
        return qa_error("GQAttention: total_sequence_length must be at least the sequence length and within the rotary cache");
    int64_t present_len = total > P ? total : P;
    int64_t past[64];
    int64_t *pastp = B <= 64 ? past : malloc(sizeof(int64_t) * B);
    if (!pastp) return API(SLOT_CreateStatus, fn_create_status)(ORT_FAIL, "GQAttention: out of memory");
    for (int64_t b = 0; b < B; b++) {
        pastp[b] = S == total ? 0 : (int64_t)seqlens[b] + 1 - S;
        if (pastp[b] < 0 || pastp[b] + S > present_len || pastp[b] + S > cd[0]) {
            if (pastp != past) free(pastp);
            return qa_error("GQAttention: seqlens_k out of range for the sequence, the KV buffers or the rotary cache");
        }
    }
    int64_t od[3] = {B, S, nh * hd}, kd[4] = {B, nkv, present_len, hd};
    OrtValue *ov, *okv, *ovv;
    OrtStatus *st = NULL;
    if ((st = API(SLOT_KernelContext_GetOutput, fn_get_output)(ctx, 0, od, 3, &ov))
            || (st = API(SLOT_KernelContext_GetOutput, fn_get_output)(ctx, 1, kd, 4, &okv))
            || (st = API(SLOT_KernelContext_GetOutput, fn_get_output)(ctx, 2, kd, 4, &ovv))) {
        if (pastp != past) free(pastp);
        return st;
    }
    float *out = data_of(ov), *pk = data_of(okv), *pv = data_of(ovv);
    if (!out || !pk || !pv) {
        if (pastp != past) free(pastp);
        return qa_error("GQAttention: an output has no data");
    }
    int shared_k = pk == past_k, shared_v = pv == past_v;
    if (shared_k != shared_v) {
        if (pastp != past) free(pastp);
        return qa_error("GQAttention: past_key and past_value must both share their present buffer, or neither");
    }
    if (!shared_k) {  /* the present buffers are new: the past positions before the pass, zeros after */
        size_t plane = (size_t)present_len * hd;
        memset(pk, 0, sizeof(float) * B * nkv * plane);
        memset(pv, 0, sizeof(float) * B * nkv * plane);
        for (int64_t b = 0; b < B; b++) {
            int64_t keep = pastp[b] < P ? pastp[b] : P;  /* positions past P would be the pass's own: written below */
            for (int64_t g = 0; g < nkv; g++) {
                size_t from = ((size_t)b * nkv + g) * P * hd, to = ((size_t)b * nkv + g) * plane;
                memcpy(pk + to, past_k + from, sizeof(float) * keep * hd);
                memcpy(pv + to, past_v + from, sizeof(float) * keep * hd);
            }
            if (keep < pastp[b]) {  /* keys the past buffer does not hold */
                if (pastp != past) free(pastp);
                return qa_error("GQAttention: seqlens_k asks for more past positions than past_key holds");
            }
        }
    }
    qattn_job_t j;
    memset(&j, 0, sizeof(j));
    j.B = (int)B; j.S = (int)S; j.nh = (int)nh; j.nkv = (int)nkv; j.hd = (int)hd;
    j.present_len = present_len;
    j.qkv = qkv; j.cosc = cosc; j.sinc = sinc; j.past = pastp; j.pk = pk; j.pv = pv; j.out = out;
    j.alpha = k->scale == 0.f ? 1.0f / __builtin_sqrtf((float)hd) : k->scale;
    j.blocks = (int)((S + QA_ROWS - 1) / QA_ROWS);
    j.units = j.blocks * (int)(B * nh);
    int64_t keys = 0;
    for (int64_t b = 0; b < B; b++) keys = pastp[b] + S > keys ? pastp[b] + S : keys;
    j.chunks = (int)((keys + 15) / 16);
    if (!(j.kt = qa_thread_buffer((size_t)B * nkv * j.chunks * hd * 16))) {
        if (pastp != past) free(pastp);
        return API(SLOT_CreateStatus, fn_create_status)(ORT_FAIL, "GQAttention: out of memory");
    }
    int threads = (int)(k->threads < 1 ? 1 : k->threads);
    /* small work (a decode step's rows, its transposes and its attention up to ~2000 positions) runs on this thread:
       a dispatch to the pool would cost more than it saves (results are the same bits either way) */
    run_parallel(qa_prepare_part, &j, B * S < 8 ? 1 : threads < (int)(B * S) ? threads : (int)(B * S));
    int transposes = (int)(B * nkv) * j.chunks;
    int few = B * S < 8 ? 256 : 32;  /* a many-row pass's from 32 chunks on all threads: ~2x faster at 100 */
    run_parallel(qa_transpose_part, &j, transposes < few ? 1 : threads < transposes ? threads : transposes);
    atomic_store(&j.next, 0);
    int parts = threads < j.units ? threads : j.units;
    if (B * nh * S * keys < 16384) parts = 1;
    run_parallel(qa_attend_part, &j, parts);
    if (pastp != past) free(pastp);
    if (atomic_load(&j.next) < j.units)  /* no part could allocate its scratch: no row was computed */
        return API(SLOT_CreateStatus, fn_create_status)(ORT_FAIL, "GQAttention: out of memory");
    return NULL;
}

static void qa_destroy(void *opk) { free(opk); }
static const char *qa_name(const OrtCustomOp *op) { (void)op; return "GQAttention"; }
static int qa_input_type(const OrtCustomOp *op, size_t i) { (void)op; return i == 3 || i == 4 ? QA_ELEM_INT32 : ELEM_FLOAT; }
static size_t qa_input_count(const OrtCustomOp *op) { (void)op; return 7; }
static size_t qa_output_count(const OrtCustomOp *op) { (void)op; return 3; }
static void qa_compute_v1(void *opk, OrtKernelContext *ctx) { (void)opk; (void)ctx; }  /* never called: version 16 */

/* version 16: onnxruntime calls KernelComputeV2, whose status reports bad input as an error of the run */
static OrtCustomOp qattn_op = {16, qa_create, qa_name, op_provider, qa_input_type, qa_input_count, op_output_type,
                               qa_output_count, qa_compute_v1, qa_destroy, op_required, op_required, op_mem_default,
                               op_one, op_one, op_one, op_one, NULL, qa_compute, NULL, op_one, op_end_version,
                               no_pairs, release_pairs, no_pairs, release_pairs};

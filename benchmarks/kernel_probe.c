// y[m, n] = sum_k x[m, k] * W[n, k], W as GGUF blocks (Q4_1: fp16 d, fp16 m, 16 B codes; Q8_0: fp16 d, 32 int8).
// fp32 activations, fp32 accumulation; each output row computed on its own (row-deterministic).
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

static inline float f16(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return _cvtsh_ss(h); }

static inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

// one weight row (nb blocks) against one x row with precomputed block sums xs[nb]
static float q4_1_row(const uint8_t *w, const float *x, const float *xs, int nb) {
    __m512 acc = _mm512_setzero_ps();
    float macc = 0.f;
    const __m512i low = _mm512_set1_epi32(15);
    for (int b = 0; b < nb; b++, w += 20, x += 32) {
        __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + 4)));
        __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(codes, low));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(codes, 4));
        __m512 dot = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(x)));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(f16(w)), dot, acc);
        macc += f16(w + 2) * xs[b];
    }
    return hsum512(acc) + macc;
}

static float q8_0_row(const uint8_t *w, const float *x, int nb) {
    __m512 acc = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++, w += 34, x += 32) {
        __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 2))));
        __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 18))));
        __m512 dot = _mm512_fmadd_ps(c, _mm512_loadu_ps(x + 16), _mm512_mul_ps(a, _mm512_loadu_ps(x)));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(f16(w)), dot, acc);
    }
    return hsum512(acc);
}


// four weight rows at once: four independent accumulator chains (one chain is FMA-latency bound) and one x load
static void q4_1_rows4(const uint8_t *w, size_t stride, const float *x, const float *xs, int nb, float *out) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    float macc[4] = {0.f, 0.f, 0.f, 0.f};
    const __m512i low = _mm512_set1_epi32(15);
    for (int b = 0; b < nb; b++) {
        __m512 x0 = _mm512_loadu_ps(x + 32 * b), x1 = _mm512_loadu_ps(x + 32 * b + 16);
        for (int r = 0; r < 4; r++) {
            const uint8_t *blk = w + r * stride + (size_t)b * 20;
            // nibbles split at byte width (128-bit ops, cheap ports), then widened
            __m128i packed = _mm_loadu_si128((const __m128i *)(blk + 4));
            __m128i nib = _mm_set1_epi8(15);
            __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(packed, nib)));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(packed, 4), nib)));
            __m512 dot = _mm512_fmadd_ps(hi, x1, _mm512_mul_ps(lo, x0));
            uint32_t dm; memcpy(&dm, blk, 4);
            __m128 dmf = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm));  // [d, m, 0, 0]
            acc[r] = _mm512_fmadd_ps(_mm512_broadcastss_ps(dmf), dot, acc[r]);
            macc[r] += _mm_cvtss_f32(_mm_movehdup_ps(dmf)) * xs[b];
        }
    }
    for (int r = 0; r < 4; r++) out[r] = hsum512(acc[r]) + macc[r];
}
static void q8_0_rows4(const uint8_t *w, size_t stride, const float *x, int nb, float *out) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int b = 0; b < nb; b++) {
        __m512 x0 = _mm512_loadu_ps(x + 32 * b), x1 = _mm512_loadu_ps(x + 32 * b + 16);
        for (int r = 0; r < 4; r++) {
            const uint8_t *blk = w + r * stride + (size_t)b * 34;
            __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2))));
            __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18))));
            __m512 dot = _mm512_fmadd_ps(c, x1, _mm512_mul_ps(a, x0));
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(f16(blk)), dot, acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = hsum512(acc[r]);
}

// type 0: Q4_1, 1: Q8_0. rows [n0, n1) only (the caller splits work over threads).
void gemv_rows(int type, const uint8_t *w, const float *x, float *y, int M, int N, int K, int n0, int n1) {
    int nb = K / 32;
    float xs[4096];
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * K;
        if (type == 0) {
            for (int b = 0; b < nb; b++) { float s = 0.f; for (int i = 0; i < 32; i++) s += xr[b * 32 + i]; xs[b] = s; }
            int n = n0;
            for (; n + 4 <= n1; n += 4) q4_1_rows4(w + (size_t)n * nb * 20, (size_t)nb * 20, xr, xs, nb, y + (size_t)m * N + n);
            for (; n < n1; n++) y[(size_t)m * N + n] = q4_1_row(w + (size_t)n * nb * 20, xr, xs, nb);
        } else {
            int n = n0;
            for (; n + 4 <= n1; n += 4) q8_0_rows4(w + (size_t)n * nb * 34, (size_t)nb * 34, xr, nb, y + (size_t)m * N + n);
            for (; n < n1; n++) y[(size_t)m * N + n] = q8_0_row(w + (size_t)n * nb * 34, xr, nb);
        }
    }
}

#include <omp.h>
// the matmuls of one decode step, in order: one parallel region, rows split evenly (in multiples of 4) over
// the threads, a barrier after each matmul as a graph executor would have
void step(int count, const int *types, const uint8_t *const *ws, const float *const *xs, float *const *ys,
          const int *Ns, const int *Ks, int M, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        for (int i = 0; i < count; i++) {
            int N = Ns[i], chunk = ((N + T - 1) / T + 3) / 4 * 4;
            int n0 = t * chunk, n1 = n0 + chunk > N ? N : n0 + chunk;
            if (n0 < n1) gemv_rows(types[i], ws[i], xs[i], ys[i], M, N, Ks[i], n0, n1);
            #pragma omp barrier
        }
    }
}

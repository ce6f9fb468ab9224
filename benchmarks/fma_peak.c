// This CPU's float32 multiply-add peak, the ceiling of every float32 product (benchmarks/verify_floor.py).
//
//     cc -O2 -march=native -pthread fma_peak.c -o fma_peak && ./fma_peak THREADS [SECONDS_PER_THREAD_SCALE]
//
// Each thread runs 12 independent chains acc = acc * b + c on the build's widest float32 vectors (GCC vector
// extensions: the compiler emits fused multiply-adds where the -march has them, a multiply and an add where
// it has not; twelve chains cover the FMA latency of current x86 and Arm cores), all threads started together
// by a barrier. Prints the multiply-add rate summed over the
// threads in GFLOP/s (one multiply-add = 2 FLOP) as the last line: "gflops N".
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

// the build's widest vector: 12 accumulators + 2 operands must fit its registers (16 ymm without AVX-512)
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
typedef float vec __attribute__((vector_size(LANES * 4)));

#define CHAINS 12

static pthread_barrier_t start;
static long steps;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *run(void *out) {
    vec acc[CHAINS], b, c;
    for (int i = 0; i < LANES; i++) { b[i] = 0.99999f; c[i] = 1e-6f; }
    for (int j = 0; j < CHAINS; j++)
        for (int i = 0; i < LANES; i++) acc[j][i] = (float)(j + i) * 1e-3f;
    pthread_barrier_wait(&start);
    for (long s = 0; s < steps; s++) {
#pragma GCC unroll 12
        for (int j = 0; j < CHAINS; j++) acc[j] = acc[j] * b + c;
    }
    float sum = 0.f;
    for (int j = 0; j < CHAINS; j++)
        for (int i = 0; i < LANES; i++) sum += acc[j][i];
    *(float *)out = sum;
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    double scale = argc > 2 ? atof(argv[2]) : 1.0;
    if (threads < 1 || threads > 1024 || !(scale > 0)) {
        fprintf(stderr, "usage: fma_peak THREADS [SCALE]\n");
        return 2;
    }
    steps = (long)(3e7 * scale);  // ~0.1-0.3 s a thread on a current core
    pthread_t tid[1024];
    float sums[1024];
    pthread_barrier_init(&start, NULL, (unsigned)threads + 1);
    for (int t = 0; t < threads; t++) pthread_create(&tid[t], NULL, run, &sums[t]);
    pthread_barrier_wait(&start);
    double t0 = now();
    for (int t = 0; t < threads; t++) pthread_join(tid[t], NULL);
    double seconds = now() - t0;
    float total = 0.f;
    for (int t = 0; t < threads; t++) total += sums[t];
    printf("checksum %g\n", (double)total);
    printf("gflops %.3f\n", 2.0 * CHAINS * LANES * (double)steps * threads / seconds / 1e9);
    return 0;
}

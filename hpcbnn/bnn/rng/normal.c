/* Counter-based standard normal noise: element i of a row seeded by `seed` is a pure function
 * of (seed, i), so any split of rows or elements over threads, ranks or nodes gives the same bits.
 *
 * Generator: Philox4x32-10 (Salmon et al., SC'11; as in Random123, cuRAND, JAX), key = the 64-bit
 * seed, counter = (block lo, block hi, 0, 0). Elements are grouped in tiles of LANES blocks:
 * float32 element t of tile T comes from block T*LANES + t % LANES, word t / LANES (4 normals per
 * block); float64 element t from the same block, pair t / LANES (2 normals per block). LANES is a
 * fixed constant of the format, not the vector width, and the tile layout lets each word be
 * stored contiguously by a vectorised loop.
 *
 * Uniform -> normal: Box-Muller, r = sqrt(-2 ln u), (r cos a, r sin a). The log is an atanh
 * series (float32) or musl's (fdlibm) log (float64); the angle is reduced to a quarter turn
 * exactly on the integer, and sin/cos are Cephes polynomials on [-pi/4, pi/4]. float32 values
 * are within ~3e-7 relative of the exact transform, float64 ones within a few ulp.
 *
 * Bit-reproducibility: only +, -, *, /, sqrt, fma (the weights only), integer ops and exact or correctly rounded
 * conversions, built with -ffp-contract=off and without fast-math, so scalar, SSE2, AVX2 and
 * AVX-512 code give the same bits (IEEE 754 fixes each result) and the draws call no libm. No
 * intermediate is subnormal (the smallest, z*z*c at the smallest float32 angle, is 1.19e-38, and
 * it is added to 1), so flush-to-zero modes change nothing either. */

#include <float.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "needs FLT_EVAL_METHOD == 0 (SSE or other IEEE single/double arithmetic, not x87)"
#endif

#define LANES 64
#define M0 0xD2511F53u
#define M1 0xCD9E8D57u
#define W0 0x9E3779B9u
#define W1 0xBB67AE85u

static inline uint32_t f32_bits(float x) {
    uint32_t i;
    memcpy(&i, &x, 4);
    return i;
}

static inline float bits_f32(uint32_t i) {
    float x;
    memcpy(&x, &i, 4);
    return x;
}

static inline uint64_t f64_bits(double x) {
    uint64_t i;
    memcpy(&i, &x, 8);
    return i;
}

static inline double bits_f64(uint64_t i) {
    double x;
    memcpy(&x, &i, 8);
    return x;
}

/* Philox4x32-10 of the counter w under the key (k0, k1), in place. */
static inline void philox4x32_10(uint32_t w[4], uint32_t k0, uint32_t k1) {
    for (int r = 0; r < 10; r++, k0 += W0, k1 += W1) {
        uint64_t p0 = (uint64_t)M0 * w[0], p1 = (uint64_t)M1 * w[2];
        uint32_t x0 = (uint32_t)(p1 >> 32) ^ w[1] ^ k0, x2 = (uint32_t)(p0 >> 32) ^ w[3] ^ k1;
        w[0] = x0, w[1] = (uint32_t)p1, w[2] = x2, w[3] = (uint32_t)p0;
    }
}

/* w[i][j]: word i of Philox block base + j (base a multiple of LANES), key (k0, k1). Integer
 * arithmetic only, so the vector versions give the scalar version's bits (the tests check it).
 * They exist because compilers vectorise the 32x32->64 multiply badly: here each word lives in
 * the low half of a 64-bit lane, the layout pmuludq multiplies, and x1, x3 keep the product's
 * high half as garbage that the next multiply and the final truncation ignore. Not inlined:
 * inlined, clang 14 no longer vectorises the Box-Muller loops that read w. */
static __attribute__((noinline)) void philox_lanes(uint32_t w[4][LANES], uint32_t k0, uint32_t k1, uint64_t base) {
#if defined(__AVX512F__)
    /* G independent groups of 8 blocks in flight: one group alone waits on multiply latency */
    enum { G = 4 };
    const __m512i m0 = _mm512_set1_epi64(M0), m1 = _mm512_set1_epi64(M1), hi = _mm512_set1_epi64(base >> 32);
    const __m512i step = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    for (int j = 0; j < LANES; j += 8 * G) {
        __m512i x0[G], x1[G], x2[G], x3[G];
        for (int g = 0; g < G; g++) {
            x0[g] = _mm512_add_epi64(_mm512_set1_epi64((uint32_t)base + j + 8 * g), step);
            x1[g] = hi, x2[g] = x3[g] = _mm512_setzero_si512();
        }
        for (int r = 0; r < 10; r++) {
            __m512i ka = _mm512_set1_epi64((uint32_t)(k0 + r * W0)), kb = _mm512_set1_epi64((uint32_t)(k1 + r * W1));
            for (int g = 0; g < G; g++) {
                __m512i p0 = _mm512_mul_epu32(x0[g], m0), p1 = _mm512_mul_epu32(x2[g], m1);
                x0[g] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), x1[g], ka, 0x96); /* a ^ b ^ c */
                x2[g] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), x3[g], kb, 0x96);
                x1[g] = p1;
                x3[g] = p0;
            }
        }
        for (int g = 0; g < G; g++) {
            _mm256_storeu_si256((__m256i *)&w[0][j + 8 * g], _mm512_cvtepi64_epi32(x0[g]));
            _mm256_storeu_si256((__m256i *)&w[1][j + 8 * g], _mm512_cvtepi64_epi32(x1[g]));
            _mm256_storeu_si256((__m256i *)&w[2][j + 8 * g], _mm512_cvtepi64_epi32(x2[g]));
            _mm256_storeu_si256((__m256i *)&w[3][j + 8 * g], _mm512_cvtepi64_epi32(x3[g]));
        }
    }
#elif defined(__AVX2__)
    enum { G = 2 }; /* independent groups of 4 blocks in flight */
    const __m256i m0 = _mm256_set1_epi64x(M0), m1 = _mm256_set1_epi64x(M1), hi = _mm256_set1_epi64x(base >> 32);
    const __m256i step = _mm256_setr_epi64x(0, 1, 2, 3), even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    for (int j = 0; j < LANES; j += 4 * G) {
        __m256i x0[G], x1[G], x2[G], x3[G];
        for (int g = 0; g < G; g++) {
            x0[g] = _mm256_add_epi64(_mm256_set1_epi64x((uint32_t)base + j + 4 * g), step);
            x1[g] = hi, x2[g] = x3[g] = _mm256_setzero_si256();
        }
        for (int r = 0; r < 10; r++) {
            __m256i ka = _mm256_set1_epi64x((uint32_t)(k0 + r * W0)), kb = _mm256_set1_epi64x((uint32_t)(k1 + r * W1));
            for (int g = 0; g < G; g++) {
                __m256i p0 = _mm256_mul_epu32(x0[g], m0), p1 = _mm256_mul_epu32(x2[g], m1);
                x0[g] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), x1[g]), ka);
                x2[g] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), x3[g]), kb);
                x1[g] = p1;
                x3[g] = p0;
            }
        }
        for (int g = 0; g < G; g++) {
            __m128i *to = (__m128i *)&w[0][j + 4 * g];
            _mm_storeu_si128(to, _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(x0[g], even)));
            _mm_storeu_si128(to + LANES / 4, _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(x1[g], even)));
            _mm_storeu_si128(to + LANES / 2, _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(x2[g], even)));
            _mm_storeu_si128(to + 3 * LANES / 4, _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(x3[g], even)));
        }
    }
#else
    for (int j = 0; j < LANES; j++) {
        uint32_t b[4] = {(uint32_t)base + (uint32_t)j, (uint32_t)(base >> 32), 0, 0};
        philox4x32_10(b, k0, k1);
        for (int i = 0; i < 4; i++) w[i][j] = b[i];
    }
#endif
}

/* ---------------------------------------------------------------- float32 */

/* -2 ln u for u = ((x >> 1) + 1/2) 2^-31 in (0, 1]: ln u = k ln 2 + 2 atanh(s), s = f / (2 + f) with
 * f = m - 1, m in [sqrt(1/2), sqrt(2)); the series to s^9 errs by < 1e-9, the result by < 2.1e-7
 * relative (checked on every 61st u32 against libm in double). */
static inline float minus2log_f32(uint32_t x) {
    float u = ((float)(int32_t)(x >> 1) + 0.5f) * 0x1p-31f;
    uint32_t ix = f32_bits(u) + (0x3f800000u - 0x3f3504f3u);
    int32_t k = (int32_t)(ix >> 23) - 0x7f;
    float f = bits_f32((ix & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
    float s = f / (2.0f + f), z = s * s;
    float ln = 2.0f * s * (1.0f + z * (0.33333334f + z * (0.2f + z * (0.14285715f + z * 0.11111111f)))) +
               (float)k * 0.6931472f;
    return -2.0f * ln;
}

typedef struct {
    float c, s;
} cs_f32;

/* cos and sin of the angle 2 pi (x + 1/2) 2^-32. */
static inline cs_f32 cossin_f32(uint32_t x) {
    uint32_t q = (x + (1u << 29)) >> 30; /* nearest quarter turn */
    int32_t rem = (int32_t)(x - (q << 30)); /* in [-2^29, 2^29) */
    float a = ((float)rem + 0.5f) * (float)(6.283185307179586 / 4294967296.0), z = a * a;
    float sa = a + a * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f));
    float ca = 1.0f - 0.5f * z + z * z * (4.166664568298827e-2f + z * (-1.388731625493765e-3f + z * 2.443315711809948e-5f));
    uint32_t cneg = ((q + 1u) & 2u) << 30, sneg = (q & 2u) << 30; /* rotate by q quarter turns */
    return (cs_f32){bits_f32(f32_bits((q & 1u) ? sa : ca) ^ cneg), bits_f32(f32_bits((q & 1u) ? ca : sa) ^ sneg)};
}

/* The 4 LANES float32 normals of tile `tile`. */
static void tile_f32(float *restrict dst, uint32_t k0, uint32_t k1, uint64_t tile) {
    uint32_t w[4][LANES];
    philox_lanes(w, k0, k1, tile * LANES);
    for (int j = 0; j < LANES; j++) {
        float ra = __builtin_sqrtf(minus2log_f32(w[0][j])), rb = __builtin_sqrtf(minus2log_f32(w[2][j]));
        cs_f32 a = cossin_f32(w[1][j]), b = cossin_f32(w[3][j]);
        dst[j] = ra * a.c;
        dst[LANES + j] = ra * a.s;
        dst[2 * LANES + j] = rb * b.c;
        dst[3 * LANES + j] = rb * b.s;
    }
}

/* ---------------------------------------------------------------- float64 */

/* The integer v, |v| < 2^51, as a double: exact, and without int64 -> double instructions. */
static inline double i64_f64(int64_t v) {
    return bits_f64(0x4338000000000000u + (uint64_t)v) - 0x1.8p52;
}

/* The integer v < 2^52 as a double, exactly. */
static inline double u52_f64(uint64_t v) {
    return bits_f64(0x4330000000000000u | v) - 0x1p52;
}

/* -2 ln u for u = (m + 1/2) 2^-52, m the top 52 bits of (x0, x1): musl's (fdlibm's) log. */
static inline double minus2log_f64(uint32_t x0, uint32_t x1) {
    double u = (u52_f64(((uint64_t)x0 << 20) | (x1 >> 12)) + 0.5) * 0x1p-52;
    uint64_t ix = f64_bits(u) + (0x3ff0000000000000u - 0x3fe6a09e00000000u);
    int64_t k = (int64_t)(ix >> 52) - 0x3ff;
    double f = bits_f64((ix & 0x000fffffffffffffu) + 0x3fe6a09e00000000u) - 1.0;
    double s = f / (2.0 + f), z = s * s, w = z * z;
    double t1 = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01));
    double t2 =
        z * (6.666666666666735130e-01 +
             w * (2.857142874366239149e-01 + w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)));
    double hfsq = 0.5 * f * f, dk = i64_f64(k);
    double ln = s * (hfsq + (t2 + t1)) + dk * 1.90821492927058770002e-10 - hfsq + f + dk * 6.93147180369123816490e-01;
    return -2.0 * ln;
}

typedef struct {
    double c, s;
} cs_f64;

/* cos and sin of the angle 2 pi (b + 1/2) 2^-53, b the top 53 bits of (x2, x3). */
static inline cs_f64 cossin_f64(uint32_t x2, uint32_t x3) {
    uint64_t b = ((uint64_t)x2 << 21) | (x3 >> 11);
    uint64_t q = ((b + (1ull << 50)) >> 51) & 3u; /* nearest quarter turn */
    int64_t rem = (int64_t)((b + (1ull << 50)) & ((1ull << 51) - 1)) - (1ll << 50); /* in [-2^50, 2^50) */
    double a = (i64_f64(rem) + 0.5) * (6.283185307179586 / 9007199254740992.0), z = a * a;
    double sa =
        a + a * z *
                (-1.66666666666666307295e-1 +
                 z * (8.33333333332211858878e-3 +
                      z * (-1.98412698295895385996e-4 +
                           z * (2.75573136213857245213e-6 +
                                z * (-2.50507477628578072866e-8 + z * 1.58962301576546568060e-10)))));
    double ca = 1.0 - 0.5 * z +
                z * z *
                    (4.16666666666665929218e-2 +
                     z * (-1.38888888888730564116e-3 +
                          z * (2.48015872888517045348e-5 +
                               z * (-2.75573141792967388112e-7 +
                                    z * (2.08757008419747316778e-9 + z * -1.13585365213876817300e-11)))));
    uint64_t cneg = ((q + 1u) & 2u) << 62, sneg = (q & 2u) << 62; /* rotate by q quarter turns */
    return (cs_f64){bits_f64(f64_bits((q & 1u) ? sa : ca) ^ cneg), bits_f64(f64_bits((q & 1u) ? ca : sa) ^ sneg)};
}

/* The 2 LANES float64 normals of tile `tile`. */
static void tile_f64(double *restrict dst, uint32_t k0, uint32_t k1, uint64_t tile) {
    uint32_t w[4][LANES];
    philox_lanes(w, k0, k1, tile * LANES);
    for (int j = 0; j < LANES; j++) {
        double r = __builtin_sqrt(minus2log_f64(w[0][j], w[1][j]));
        cs_f64 a = cossin_f64(w[2][j], w[3][j]);
        dst[j] = r * a.c;
        dst[LANES + j] = r * a.s;
    }
}

/* ---------------------------------------------------------------- rows, tiles and threads */

typedef struct {
    void *out;
    const uint64_t *seeds; /* NULL: out holds the draws already, only w is written */
    int64_t n;             /* elements per row */
    uint64_t offset;       /* index of the row's first element */
    int64_t first_tile, tiles_per_row;
    int64_t begin, end; /* this thread's (row, tile) units */
    int f64;
    /* w[row, i] = fma(sigma[i], out[row, i], mu[i]) for i < nw (sigma * out[row, i] without mu):
     * a Bayesian layer's weight samples, written while the tile's draws are in L1. One rounding,
     * as torch's addcmul on FMA hardware; fma is exact-rounded everywhere, so every code path
     * gives the same bits. w NULL: none. */
    const void *mu, *sigma;
    void *w;
    int64_t nw;
} job_t;

static void affine(const job_t *jb, int64_t row, int64_t a, int64_t b) {
    if (!jb->w || a >= jb->nw) return;
    if (b > jb->nw) b = jb->nw;
    if (jb->f64) {
        const double *restrict e = (const double *)jb->out + row * jb->n, *restrict s = jb->sigma, *restrict mu = jb->mu;
        double *restrict w = (double *)jb->w + row * jb->nw;
        if (mu)
            for (int64_t i = a; i < b; i++) w[i] = __builtin_fma(s[i], e[i], mu[i]);
        else
            for (int64_t i = a; i < b; i++) w[i] = s[i] * e[i];
    } else {
        const float *restrict e = (const float *)jb->out + row * jb->n, *restrict s = jb->sigma, *restrict mu = jb->mu;
        float *restrict w = (float *)jb->w + row * jb->nw;
        if (mu)
            for (int64_t i = a; i < b; i++) w[i] = __builtin_fmaf(s[i], e[i], mu[i]);
        else
            for (int64_t i = a; i < b; i++) w[i] = s[i] * e[i];
    }
}

static void *run(void *arg) {
    const job_t *jb = arg;
    const int64_t per = jb->f64 ? 2 * LANES : 4 * LANES; /* elements per tile */
    const int64_t size = jb->f64 ? 8 : 4;
    double buf[2 * LANES]; /* one tile of either dtype (1 KiB) */
    for (int64_t u = jb->begin; u < jb->end; u++) {
        int64_t row = u / jb->tiles_per_row, tile = jb->first_tile + u % jb->tiles_per_row;
        /* the part of this tile inside the row's elements [offset, offset + n) */
        int64_t lo = (int64_t)((uint64_t)tile * per - jb->offset), hi = lo + per;
        int64_t a = lo > 0 ? lo : 0, b = hi < jb->n ? hi : jb->n;
        if (jb->seeds) {
            uint64_t seed = jb->seeds[row];
            char *dst = (char *)jb->out + (row * jb->n + a) * size;
            void *target = (a == lo && b == hi) ? (void *)dst : (void *)buf;
            if (jb->f64)
                tile_f64(target, (uint32_t)seed, (uint32_t)(seed >> 32), (uint64_t)tile);
            else
                tile_f32(target, (uint32_t)seed, (uint32_t)(seed >> 32), (uint64_t)tile);
            if (target == buf) memcpy(dst, (char *)buf + (a - lo) * size, (size_t)(b - a) * size);
        }
        affine(jb, row, a, b);
    }
    return NULL;
}

#define MAX_THREADS 256
#define MIN_UNITS_PER_THREAD 256 /* tiles, ~60 us: starting a thread costs tens of us */

static int fill(void *out, const uint64_t *seeds, int64_t k, int64_t n, uint64_t offset, int threads, int f64,
                const void *mu, const void *sigma, void *w, int64_t nw) {
    if (k <= 0 || n <= 0) return 0;
    const uint64_t per = f64 ? 2 * LANES : 4 * LANES;
    int64_t first = (int64_t)(offset / per), last = (int64_t)((offset + (uint64_t)n - 1) / per);
    int64_t tiles = last - first + 1, units = k * tiles;
    int64_t nt = units / MIN_UNITS_PER_THREAD;
    if (nt > threads) nt = threads;
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    if (nt < 1) nt = 1;
    job_t jobs[MAX_THREADS];
    for (int64_t t = 0; t < nt; t++)
        jobs[t] = (job_t){out, seeds, n, offset, first, tiles, units * t / nt, units * (t + 1) / nt, f64, mu, sigma, w, nw};
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int64_t t = 0; t < nt; t++) run(&jobs[t]);
#else
    pthread_t tids[MAX_THREADS];
    int64_t started = 1;
    for (; started < nt; started++)
        if (pthread_create(&tids[started], NULL, run, &jobs[started])) break;
    /* the calling thread takes job 0 and the jobs of threads that could not start */
    run(&jobs[0]);
    for (int64_t t = started; t < nt; t++) run(&jobs[t]);
    for (int64_t t = 1; t < started; t++) pthread_join(tids[t], NULL);
#endif
    return (int)nt;
}

/* out: k contiguous rows of n elements; row j gets elements [offset, offset + n) of seed seeds[j]
 * (seeds NULL: out is only read). With w, also w[j, i] = fma(sigma[i], out[j, i], mu[i]) for i < nw
 * (mu NULL: sigma[i] * out[j, i]). Returns the number of threads used. */
int hpcbnn_fill_normal_f32(float *out, const uint64_t *seeds, int64_t k, int64_t n, uint64_t offset, int threads,
                           const float *mu, const float *sigma, float *w, int64_t nw) {
    return fill(out, seeds, k, n, offset, threads, 0, mu, sigma, w, nw);
}

int hpcbnn_fill_normal_f64(double *out, const uint64_t *seeds, int64_t k, int64_t n, uint64_t offset, int threads,
                           const double *mu, const double *sigma, double *w, int64_t nw) {
    return fill(out, seeds, k, n, offset, threads, 1, mu, sigma, w, nw);
}

/* Philox4x32-10 on n counters (4 words each) under one key: for known-answer tests. */
void hpcbnn_philox4x32_10(const uint32_t *ctr, const uint32_t *key, uint32_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t b[4] = {ctr[4 * i], ctr[4 * i + 1], ctr[4 * i + 2], ctr[4 * i + 3]};
        philox4x32_10(b, key[0], key[1]);
        memcpy(out + 4 * i, b, sizeof b);
    }
}

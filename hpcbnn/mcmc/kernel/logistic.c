/* One pass over the features for the log density and gradient of logistic regression, for
 * chains in groups of 8 (one AVX2 register: lane c is chain c of the group).
 *
 * For each row x_i and each chain: h = x_i w (w: the half weights), then with a = |h| and
 * e = exp(-2a), t = tanh h = sign(h) (1 - e) / (1 + e) and
 *     |h| - log1p(|t|) = a + log(1 + e) - log 2,
 * summed over rows into logc, and x_i t added into g. A block of ROWS rows is read once from
 * memory and used by both products while it is in L1, so the features stream from memory once
 * per evaluation whatever the number of chains (models.LogisticRegression has the maths).
 *
 * Precision: products in float32, as the features; the gradient sums CHUNK rows in float32
 * before float64. The sum of log(1 + e) is the log of a running product of the factors (each
 * in [1, 2]), kept in [1, 2) by moving its exponent into an integer after every block: one
 * log per chain per call instead of one per row.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define ROWS 8       /* rows per block: 8 accumulators, the weight and a broadcast fit the 16 registers */
#define CHUNK 1024   /* rows per float32 partial sum of the gradient */

/* e^x for x <= 0 (Cephes' expf polynomial; below -87 it returns e^-87, far below float32's epsilon) */
static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

/* The running sums of one chain group over a range of rows. */
typedef struct {
    __m256 abs_sum;   /* sum of |h| over the current chunk */
    __m256 product;   /* product of (1 + e), kept in [1, 2) */
    __m256i exponent; /* the powers of two taken out of product */
    double abs_total[8];
} group_sums;

/* Scratch of one thread: the float32 gradient [groups, d, 8], a padded block [ROWS, d] and the sums. */
static size_t scratch_bytes(int64_t d, int64_t groups) {
    const size_t floats = (size_t)(groups * d * 8 + ((ROWS * d + 7) & ~(int64_t)7));
    return sizeof(float) * floats + sizeof(group_sums) * (size_t)groups;
}

/* Rows [start, stop) of x [*, d]; w [groups, d, 8]; adds into logc [groups * 8] and g [groups, d, 8]. */
static void pass_rows(const float *x, int64_t start, int64_t stop, int64_t d, const float *w, int64_t groups,
                      double *logc, double *g, float *gf) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    float *pad = gf + groups * d * 8;
    group_sums *sums = (group_sums *)(pad + ((ROWS * d + 7) & ~(int64_t)7));
    for (int64_t q = 0; q < groups; q++) {
        sums[q].abs_sum = _mm256_setzero_ps();
        sums[q].product = one;
        sums[q].exponent = _mm256_setzero_si256();
        memset(sums[q].abs_total, 0, sizeof sums[q].abs_total);
    }
    for (int64_t c0 = start; c0 < stop; c0 += CHUNK) {
        const int64_t c1 = c0 + CHUNK < stop ? c0 + CHUNK : stop;
        memset(gf, 0, sizeof(float) * (size_t)(groups * d * 8));
        for (int64_t r0 = c0; r0 < c1; r0 += ROWS) {
            const float *xb = x + r0 * d;
            if (r0 + ROWS > c1) { /* a zero row gives h = 0: t = 0 and a term of exactly log 2 - log 2 */
                memset(pad, 0, sizeof(float) * (size_t)(ROWS * d));
                memcpy(pad, xb, sizeof(float) * (size_t)((c1 - r0) * d));
                xb = pad;
            }
            for (int64_t q = 0; q < groups; q++) {
                const float *wq = w + q * d * 8;
                float *gq = gf + q * d * 8;
                group_sums *s = sums + q;
                __m256 h[ROWS], t[ROWS];
                for (int r = 0; r < ROWS; r++) h[r] = _mm256_setzero_ps();
                for (int64_t j = 0; j < d; j++) {
                    const __m256 wj = _mm256_loadu_ps(wq + j * 8);
                    for (int r = 0; r < ROWS; r++) h[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(xb + r * d + j), wj, h[r]);
                }
                for (int r = 0; r < ROWS; r++) {
                    const __m256 a = _mm256_andnot_ps(sign, h[r]);
                    const __m256 e = exp_nonpositive(_mm256_mul_ps(a, _mm256_set1_ps(-2.0f)));
                    const __m256 one_plus_e = _mm256_add_ps(one, e);
                    t[r] = _mm256_or_ps(_mm256_div_ps(_mm256_sub_ps(one, e), one_plus_e), _mm256_and_ps(sign, h[r]));
                    s->abs_sum = _mm256_add_ps(s->abs_sum, a);
                    s->product = _mm256_mul_ps(s->product, one_plus_e);
                }
                const __m256i bits = _mm256_castps_si256(s->product);
                s->exponent = _mm256_add_epi32(
                    s->exponent, _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127)));
                s->product = _mm256_castsi256_ps(_mm256_or_si256(
                    _mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f800000)));
                /* two partial sums halve the chain of dependent FMAs per feature */
                for (int64_t j = 0; j < d; j++) {
                    __m256 p0 = _mm256_mul_ps(_mm256_broadcast_ss(xb + j), t[0]);
                    __m256 p1 = _mm256_mul_ps(_mm256_broadcast_ss(xb + d + j), t[1]);
                    for (int r = 2; r < ROWS; r += 2) {
                        p0 = _mm256_fmadd_ps(_mm256_broadcast_ss(xb + r * d + j), t[r], p0);
                        p1 = _mm256_fmadd_ps(_mm256_broadcast_ss(xb + (r + 1) * d + j), t[r + 1], p1);
                    }
                    _mm256_store_ps(gq + j * 8, _mm256_add_ps(_mm256_load_ps(gq + j * 8), _mm256_add_ps(p0, p1)));
                }
            }
        }
        for (int64_t q = 0; q < groups; q++) {
            float part[8];
            _mm256_storeu_ps(part, sums[q].abs_sum);
            sums[q].abs_sum = _mm256_setzero_ps();
            for (int c = 0; c < 8; c++) sums[q].abs_total[c] += part[c];
        }
        for (int64_t i = 0; i < groups * d * 8; i++) g[i] += gf[i];
    }
    const double padded_rows = (double)((stop - start + ROWS - 1) / ROWS * ROWS);
    for (int64_t q = 0; q < groups; q++) {
        float product[8];
        int32_t exponent[8];
        _mm256_storeu_ps(product, sums[q].product);
        _mm256_storeu_si256((__m256i *)exponent, sums[q].exponent);
        for (int c = 0; c < 8; c++)
            logc[q * 8 + c] += sums[q].abs_total[c] + (exponent[c] - padded_rows) * M_LN2 + log((double)product[c]);
    }
}

/* All n rows over up to `threads` threads, each on a contiguous range (a multiple of ROWS rows),
 * its sums added in thread order: the result depends on the thread count only through rounding.
 * logc [groups * 8] and g [groups, d, 8] are overwritten. Returns the threads used, -1 out of memory. */
int hpcbnn_logistic_pass_f32(const float *x, int64_t n, int64_t d, const float *w, int64_t groups, double *logc,
                             double *g, int threads) {
    int nt = 1;
#ifdef _OPENMP
    nt = threads < 1 ? 1 : threads;
#else
    (void)threads;
#endif
    const int64_t blocks = (n + ROWS - 1) / ROWS;
    if (nt > blocks / 64) nt = blocks / 64 > 1 ? (int)(blocks / 64) : 1; /* >= 512 rows a thread */
    const int64_t width = groups * 8, size = groups * d * 8;
    const size_t scratch = (scratch_bytes(d, groups) + 31) & ~(size_t)31;
    double *parts = calloc((size_t)(nt * (width + size)), sizeof(double));
    char *scratches = aligned_alloc(32, scratch * (size_t)nt);
    if (!parts || !scratches) {
        free(parts);
        free(scratches);
        return -1;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static, 1)
#endif
    for (int k = 0; k < nt; k++) {
        const int64_t start = blocks * k / nt * ROWS, stop = blocks * (k + 1) / nt * ROWS;
        pass_rows(x, start, stop < n ? stop : n, d, w, groups, parts + k * (width + size),
                  parts + k * (width + size) + width, (float *)(scratches + scratch * (size_t)k));
    }
    memset(logc, 0, sizeof(double) * (size_t)width);
    memset(g, 0, sizeof(double) * (size_t)size);
    for (int k = 0; k < nt; k++) {
        for (int64_t i = 0; i < width; i++) logc[i] += parts[k * (width + size) + i];
        for (int64_t i = 0; i < size; i++) g[i] += parts[k * (width + size) + width + i];
    }
    free(parts);
    free(scratches);
    return nt;
}

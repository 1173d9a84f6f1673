/* AutoGLM's CPU matrix product for compressed weights: y[M,N] = x[M,K] . W[N,K]^T (+ bias).
 *
 * x and y are fp32; W is int8 per output channel, 4-bit per group of inputs, fp16 or bf16, stored
 * in panels of 16 output channels ([N/16][K][16], the layout autoglm_pipelines.cpugemm packs).
 * Needs AVX2, FMA and F16C (every x86 CPU since 2013); torch offers no product on such weights that
 * is faster than its fp32 GEMM on CPUs without AVX512-VNNI/BF16 (see cpugemm.py).
 *
 * Few rows: each 16-column panel is converted to fp32 in registers and multiplied by up to six rows
 * at a time (weight bytes dominate: fewer bytes, faster). Many rows: x is packed six rows at a time,
 * each panel is converted once into a buffer, and every six rows run over 256 inputs of it at a time
 * while that slice stays in L1 (compute dominates: the conversion is amortised over the rows).
 * Threads split the panels (OpenMP: the one runtime torch has loaded already, libgomp.so.1).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { FMT_F32 = 0, FMT_I8 = 1, FMT_I4 = 2, FMT_F16 = 3, FMT_BF16 = 4 };
#define NR 16
#define MR 6
#define INLINE static inline __attribute__((always_inline))

/* Bytes of one k-row of a 16-channel panel. */
static long row_bytes(int fmt) {
    switch (fmt) {
    case FMT_F32: return 64;
    case FMT_I8: return 16;
    case FMT_I4: return 8;
    default: return 32;
    }
}

/* The 16 weights of one panel row as fp32: channels 0-7 in lo, 8-15 in hi. int8 and 4-bit give
 * the stored integers (int4 as 0..15; the caller applies its group's scale and shift). */
INLINE void load_w(const int fmt, const uint8_t *p, __m256 *lo, __m256 *hi) {
    if (fmt == FMT_F32) {
        *lo = _mm256_loadu_ps((const float *)p);
        *hi = _mm256_loadu_ps((const float *)p + 8);
    } else if (fmt == FMT_I8) {
        __m128i v = _mm_loadu_si128((const __m128i *)p);
        *lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        *hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
    } else if (fmt == FMT_I4) {
        /* byte j holds channel j in its low nibble and channel j + 8 in its high nibble */
        __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
        *lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF)));
        *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
    } else if (fmt == FMT_F16) {
        *lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        *hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16)));
    } else { /* FMT_BF16: the upper half of an fp32 */
        *lo = _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
        *hi = _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + 16))), 16));
    }
}

/* Accumulators are named variables, not an array: gcc spills an array of vectors to the stack on
 * every step (measured: 0.6x the speed of this form). Rows past mr are compiled out. */
#define ROWS(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5)
#define DECLARE(i) __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps();
#define LOAD_C(i)                                                                                  \
    if (mr > i) {                                                                                  \
        c##i##0 = _mm256_loadu_ps(out + i * NR);                                                   \
        c##i##1 = _mm256_loadu_ps(out + i * NR + 8);                                               \
    }
#define STEP(i)                                                                                    \
    if (mr > i) {                                                                                  \
        __m256 xv = _mm256_broadcast_ss(x + i * ldx + k * kstride);                                \
        c##i##0 = _mm256_fmadd_ps(xv, lo, c##i##0);                                                \
        c##i##1 = _mm256_fmadd_ps(xv, hi, c##i##1);                                                \
    }
#define STORE_C(i)                                                                                 \
    if (mr > i) {                                                                                  \
        _mm256_storeu_ps(out + i * NR, c##i##0);                                                   \
        _mm256_storeu_ps(out + i * NR + 8, c##i##1);                                               \
    }

/* out[i][0:16] (+)= x[i, k0:k1] . W[k0:k1, 0:16] for mr rows (out: mr rows of 16 floats). int4 rows
 * are dequantized with their group's scale and shift; k0 is then a multiple of the group. */
INLINE void tile(const int fmt, const int mr, int k0, int k1, int group, const float *x, long ldx,
                 const uint8_t *wp, const float *sp, const float *bp, float *out, int accumulate) {
    const long rb = row_bytes(fmt);
    /* fp32 panels come only from the buffered path, whose x is packed [k][MR] (the caller passes
     * ldx = 1): x[i, k] is at i * ldx + k * kstride either way */
    const long kstride = fmt == FMT_F32 ? MR : 1;
    ROWS(DECLARE)
    if (accumulate) {
        ROWS(LOAD_C)
    }
    const int step = fmt == FMT_I4 ? group : k1 - k0;
    for (int g0 = k0; g0 < k1; g0 += step) {
        __m256 slo = _mm256_setzero_ps(), shi = slo, blo = slo, bhi = slo;
        if (fmt == FMT_I4) {
            const int g = g0 / group;
            slo = _mm256_loadu_ps(sp + g * NR);
            shi = _mm256_loadu_ps(sp + g * NR + 8);
            blo = _mm256_loadu_ps(bp + g * NR);
            bhi = _mm256_loadu_ps(bp + g * NR + 8);
        }
        const int g1 = g0 + step < k1 ? g0 + step : k1;
#pragma GCC unroll 4
        for (int k = g0; k < g1; k++) {
            __m256 lo, hi;
            load_w(fmt, wp + k * rb, &lo, &hi);
            if (fmt == FMT_I4) {
                lo = _mm256_fmadd_ps(lo, slo, blo);
                hi = _mm256_fmadd_ps(hi, shi, bhi);
            }
            ROWS(STEP)
        }
    }
    ROWS(STORE_C)
}

#define TILE_CASES(FMT)                                                                            \
    switch (mr) {                                                                                  \
    case 1: tile(FMT, 1, k0, k1, group, x, ldx, wp, sp, bp, out, accumulate); break;               \
    case 2: tile(FMT, 2, k0, k1, group, x, ldx, wp, sp, bp, out, accumulate); break;               \
    case 3: tile(FMT, 3, k0, k1, group, x, ldx, wp, sp, bp, out, accumulate); break;               \
    case 4: tile(FMT, 4, k0, k1, group, x, ldx, wp, sp, bp, out, accumulate); break;               \
    case 5: tile(FMT, 5, k0, k1, group, x, ldx, wp, sp, bp, out, accumulate); break;               \
    default: tile(FMT, 6, k0, k1, group, x, ldx, wp, sp, bp, out, accumulate); break;              \
    }

static void tile_any(int fmt, int mr, int k0, int k1, int group, const float *x, long ldx,
                     const uint8_t *wp, const float *sp, const float *bp, float *out, int accumulate) {
    switch (fmt) {
    case FMT_F32: TILE_CASES(FMT_F32); break;
    case FMT_I8: TILE_CASES(FMT_I8); break;
    case FMT_I4: TILE_CASES(FMT_I4); break;
    case FMT_F16: TILE_CASES(FMT_F16); break;
    default: TILE_CASES(FMT_BF16); break;
    }
}

/* Convert one panel to fp32 rows in buf[K][16]; int8 stays unscaled (its scale is per channel and
 * applied once per output), int4 is dequantized per group. */
static void unpack_panel(int fmt, int K, int group, const uint8_t *wp, const float *sp, const float *bp,
                         float *buf) {
    const long rb = row_bytes(fmt);
    for (int k = 0; k < K; k++) {
        __m256 lo, hi;
        switch (fmt) {
        case FMT_I8: load_w(FMT_I8, wp + k * rb, &lo, &hi); break;
        case FMT_I4: {
            int g = k / group;
            load_w(FMT_I4, wp + k * rb, &lo, &hi);
            lo = _mm256_fmadd_ps(lo, _mm256_loadu_ps(sp + g * NR), _mm256_loadu_ps(bp + g * NR));
            hi = _mm256_fmadd_ps(hi, _mm256_loadu_ps(sp + g * NR + 8), _mm256_loadu_ps(bp + g * NR + 8));
            break;
        }
        case FMT_F16: load_w(FMT_F16, wp + k * rb, &lo, &hi); break;
        default: load_w(FMT_BF16, wp + k * rb, &lo, &hi); break;
        }
        _mm256_store_ps(buf + k * NR, lo);
        _mm256_store_ps(buf + k * NR + 8, hi);
    }
}

/* y[m, n0 + j] = out[i][j] * scale[n0 + j] (int8) + bias[n0 + j], for the channels that exist. */
static void epilogue(int fmt, int mr, int n0, int N, const float *scale, const float *bias,
                     const float *tiles, float *y, long ldy) {
    int width = N - n0 < NR ? N - n0 : NR;
    for (int i = 0; i < mr; i++) {
        float *dst = y + i * ldy + n0;
        if (width == NR) {
            __m256 lo = _mm256_loadu_ps(tiles + i * NR), hi = _mm256_loadu_ps(tiles + i * NR + 8);
            if (fmt == FMT_I8) {
                lo = _mm256_mul_ps(lo, _mm256_loadu_ps(scale + n0));
                hi = _mm256_mul_ps(hi, _mm256_loadu_ps(scale + n0 + 8));
            }
            if (bias) {
                lo = _mm256_add_ps(lo, _mm256_loadu_ps(bias + n0));
                hi = _mm256_add_ps(hi, _mm256_loadu_ps(bias + n0 + 8));
            }
            _mm256_storeu_ps(dst, lo);
            _mm256_storeu_ps(dst + 8, hi);
        } else {
            for (int j = 0; j < width; j++) {
                float v = tiles[i * NR + j];
                if (fmt == FMT_I8) v *= scale[n0 + j];
                if (bias) v += bias[n0 + j];
                dst[j] = v;
            }
        }
    }
}

/* Inputs per pass over a converted panel: 256 x 16 fp32 (16 KB) stays in L1 while every six rows
 * of x run over it. */
#define KC 256

int agm_abi_version(void) { return 2; }

/* Per-row symmetric int8 quantization of x[M,K], in one pass over each row: scale[m] =
 * max(max|x[m]|, 1e-8) / 127 and xq[m, k] = clamp(round_half_even(x[m, k] / scale[m]), -127, 127),
 * the integers stored as fp32. The same IEEE operations as Int8DynamicLinear's torch expression. */
void agm_quantize_rows(int M, int K, const float *x, long ldx, float *xq, float *scale, int threads) {
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int m = 0; m < M; m++) {
        const float *row = x + m * ldx;
        float *out = xq + (long)m * K;
        float amax = 0.0f;
        for (int k = 0; k < K; k++) amax = fmaxf(amax, fabsf(row[k]));
        const float s = fmaxf(amax, 1e-8f) / 127.0f;
        for (int k = 0; k < K; k++) {
            float q = nearbyintf(row[k] / s);
            out[k] = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
        }
        scale[m] = s;
    }
}

/* y[M,N] = x[M,K] . W^T. fmt: FMT_*. w: panels; scale: int8 [Np] per channel, int4 [P][G][16]
 * scales; shift: int4 [P][G][16] (zero - 8 * scale); bias: [N] or NULL. buffered_rows: from this
 * many rows on, each panel is converted once into a buffer. Returns 0, or -1 when out of memory. */
int agm_linear(int fmt, int M, int N, int K, int group, const float *x, long ldx, const void *w,
               const float *scale, const float *shift, const float *bias, float *y, long ldy,
               int threads, int buffered_rows) {
    const int P = (N + NR - 1) / NR;
    const long panel_bytes = (long)K * row_bytes(fmt);
    const int G = fmt == FMT_I4 ? K / group : 0;
    const int buffered = M >= buffered_rows;
    int failed = 0;
    float *xpack = NULL;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *buf = NULL, *tiles = NULL;
        const int mblocks = (M + MR - 1) / MR;
        float small[MR * NR] __attribute__((aligned(32)));
        if (buffered) {
#pragma omp single
            {
                xpack = aligned_alloc(64, ((size_t)mblocks * K * MR * sizeof(float) + 63) / 64 * 64);
            }
            if (!xpack) failed = 1;
            else {
#pragma omp for schedule(static)
                for (int b = 0; b < mblocks; b++) {
                    float *dst = xpack + (long)b * K * MR;
                    for (int i = 0; i < MR; i++) {
                        const float *src = x + (long)(b * MR + i) * ldx;
                        if (b * MR + i < M)
                            for (int k = 0; k < K; k++) dst[k * MR + i] = src[k];
                        else
                            for (int k = 0; k < K; k++) dst[k * MR + i] = 0.0f;
                    }
                }
            }
            buf = aligned_alloc(64, ((size_t)K * NR * sizeof(float) + 63) / 64 * 64);
            tiles = aligned_alloc(64, ((size_t)M * NR * sizeof(float) + 63) / 64 * 64);
            if (!buf || !tiles) failed = 1;
        }
#pragma omp for schedule(static)
        for (int p = 0; p < P; p++) {
            if (failed) continue;
            const uint8_t *wp = (const uint8_t *)w + p * panel_bytes;
            const float *sp = G ? scale + (long)p * G * NR : NULL;
            const float *bp = G ? shift + (long)p * G * NR : NULL;
            if (!buffered) {
                for (int m0 = 0; m0 < M; m0 += MR) {
                    int mr = M - m0 < MR ? M - m0 : MR;
                    tile_any(fmt, mr, 0, K, group, x + m0 * ldx, ldx, wp, sp, bp, small, 0);
                    epilogue(fmt, mr, p * NR, N, scale, bias, small, y + m0 * ldy, ldy);
                }
                continue;
            }
            unpack_panel(fmt, K, group, wp, sp, bp, buf);
            for (int k0 = 0; k0 < K; k0 += KC) {
                int k1 = K - k0 < KC ? K : k0 + KC;
                for (int m0 = 0; m0 < M; m0 += MR) {
                    int mr = M - m0 < MR ? M - m0 : MR;
                    tile_any(FMT_F32, mr, k0, k1, group, xpack + (long)m0 * K, 1, (const uint8_t *)buf, NULL,
                             NULL, tiles + (long)m0 * NR, k0 > 0);
                }
            }
            for (int m0 = 0; m0 < M; m0 += MR) {
                int mr = M - m0 < MR ? M - m0 : MR;
                epilogue(fmt == FMT_I8 ? FMT_I8 : FMT_F32, mr, p * NR, N, scale, bias,
                         tiles + (long)m0 * NR, y + m0 * ldy, ldy);
            }
        }
        free(buf);
        free(tiles);
    }
    free(xpack);
    return failed ? -1 : 0;
}

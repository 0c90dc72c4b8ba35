/*
 * cpu_kernels/fp4_cpu.c: the quantizers in plain C for CPUs, the `cpu` implementation of fastpaths.py. Three entry
 * points, bit for bit the reference fp4.py (tests/test_paths.py): fake_quant (quantize, then dequantize: fp4.fake_quant, NVFP4 and
 * MXFP4), quantize_nvfp4 (packed codes and scales: fp4.quantize_nvfp4) and fake_quant_columns (OutControl's split
 * operand, fp4.by_columns: below). What they compute:
 *
 *     x (M, K), M a multiple of TR (1 or 16 rows per scale tile), K a multiple of the format's block
 *     optionally  x <- x H  per 16-chunk of a row (RHT-16, fp4.rht), H (16, 16) fp32
 *     amax_16 = max |x| over each TR x 16 tile      (replicated on the TR rows)
 *     NVFP4, outer = "tensor":  s_b = e4m3(min(amax_16 * (S_enc * fl(1/6)), 448));  scale = s_b * S_dec
 *     NVFP4, outer = 128:       s_o = amax_128 / 2688 (1 if 0);  s_i = e4m3(min((amax_16 / s_o) / 6, 448))
 *                               (2^-9 if amax_16 = 0);  scale = s_o * s_i
 *     MXFP4:                    scale = X = 2^(floor(log2 amax_32) - 2), an E8M0 value
 *     v = x * min(1 / scale, FLT_MAX);  q = E2M1 magnitude of |v| (RTN or SR, fp4.round_e2m1)
 *     fake_quant: out = ±q * scale (0 for a block whose scale is 0), stored as fp32 or bf16 (round to nearest
 *     even);  quantize_nvfp4: the E2M1 codes of ±q, packed, and the scale bytes
 *   and fp4.py's 2026 additions, each bit for bit its reference function:
 *     RHT-128 (fp4.rht): x <- x * signs per 128-chunk, butterfly h = 1, 2, ..., 64, times fl(2^-3.5)
 *     Four Over Six (fp4.round_four_over_six): map-to-6 and map-to-4 scales per block (1536 = 6 * 256), each
 *       rounded (RTN) and its error taken in TE's expression; map-to-4 kept iff strictly smaller
 *     MS-EDEN (fp4.round_eden): S_dec from 255.99 and 6.0721; per 128-group c = sum z^2 / sum z q (tree order);
 *       the scale s * c rounded stochastically to E4M3 with one uniform per block (row * K/16 + block)
 *     MXFP8 (fp4.quantize_mxfp8, OutControl's channels; fake_quant only): mxfp8_row below
 *
 * Why C: torch.compile fuses the same math into one loop, but its code recomputes each block's scales in
 * scalar code between vector loads, and the SR noise in 64-bit lanes. Here each row of a 128-column block is
 * one vector loop, the 8 block scales of a 128-block are computed together, and the noise hash runs in 32-bit
 * lanes: ~2x faster than the compiled path on a laptop CPU (docs/LOG.md, session 5). Where the compiler targets
 * AVX2 (-march=native), the hot loops are written with intrinsics (transposed loads, RHT-16, fake_quant's row
 * loop): gcc's own vectorization of them spilled, stayed latency-bound or moved one scalar per element; the
 * plain C versions remain for other CPUs and for quantize_nvfp4's rows, and both compute the same bits.
 *
 * Exactness: every operation is the reference's fp32 operation in the reference's order. The build flags
 * (cpu_kernels/__init__.py) forbid what would change a bit: -ffp-contract=off (no fused multiply-adds), no
 * -ffast-math. -fno-trapping-math and -fno-math-errno only let gcc vectorize floorf/rintf; they change no
 * result. Divisions by a power of two are written as multiplications by its inverse, which is exact.
 * The per-tensor amax is a first pass over the tensor (tensor_amax), as in the reference.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define BLOCK 16                       /* elements per E4M3 block scale; every loop works in 16-chunks */
enum { NVFP4_TENSOR = 0, NVFP4_OUTER128 = 1, MXFP4 = 2, MXFP8 = 3 };   /* the kernels' fmt (MXFP8: OutControl's) */
typedef struct {                       /* quantize_nvfp4's outputs, row-major over the (M, K) view */
    uint8_t *codes;                    /* (M, K/2) packed E2M1 codes */
    uint8_t *scales;                   /* (M, K/16) E4M3 block-scale bytes */
    float *outer;                      /* per-tensor: (1,) S_dec; double-block: (M, K/128) s_o */
} CodesOut;
#define OUTER 128                      /* elements per fp32 outer scale (double-block) */
#define MX_BLOCK 32                    /* elements per E8M0 scale (MXFP4) */
#define MAX_GROUP 128                  /* widest column group: one double-block outer block */
#define MAX_TILE_ROWS 16               /* 16x16 tiles (NVIDIA's weights) */
#define E2M1_MAX 6.0f
#define E2M1_MAX_POW2 2                /* floor(log2 6): MXFP4's X = 2^(floor(log2 amax) - 2) */
#define E4M3_MAX 448.0f
#define E4M3_MIN_NORMAL 0.015625f      /* 2^-6: below it E4M3 is subnormal, in steps of 2^-9 */
#define AMAX_TO_SCALE 2688.0f          /* 6 * 448 */
#define ZERO_BLOCK_SCALE 0.001953125f  /* 2^-9: s_i of an all-zero block (double-block) */
#define ONE_SIXTH 0.1666666716337204f   /* fl32(1/6), multiplied into S_enc first as in TE (numerics.md §2) */
#define NOISE_ULP 5.960464477539063e-08f  /* 2^-24 */

static inline float bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t float_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* min(a, b) that keeps a NaN `a`, as torch.clamp(max=b) does (fminf would drop it) */
static inline float min_keep_nan(float a, float b) { return a > b ? b : a; }
/* max(m, a) where a NaN on either side wins, as torch.amax */
static inline float max_keep_nan(float m, float a) { return (a > m || a != a) ? a : m; }

/* fp32 v in [0, 448] (or NaN) -> the nearest E4M3 value, ties to even, as torch's .to(float8_e4m3fn).
 * Normal range: keep 3 mantissa bits, rounding the 20 dropped ones to nearest even with the integer carry
 * trick (a carry into the exponent is the correct next binade). Subnormal range: multiples of 2^-9. */
static inline float round_e4m3(float v) {
    float sub = rintf(v * 512.0f) * (1.0f / 512.0f);
    uint32_t u = float_to_bits(v);
    float normal = bits_to_float((u + 0x7FFFFu + ((u >> 20) & 1u)) & 0xFFF00000u);
    return v < E4M3_MIN_NORMAL ? sub : normal;
}

/* fp32 -> bf16 bits, round to nearest even, NaN -> 0x7FC0: what torch's .to(torch.bfloat16) does */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u = float_to_bits(f);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return f != f ? (uint16_t)0x7FC0 : (uint16_t)rounded;
}

/* PCG-RXS-M-XS, the hash of fp4.uniform_noise, in native wrapping uint32 arithmetic */
static inline uint32_t pcg_hash(uint32_t h) {
    uint32_t state = h * 747796405u + 2891336453u;
    uint32_t word = ((state >> ((state >> 28) + 4u)) ^ state) * 277803737u;
    return (word >> 22) ^ word;
}

/* ------------------------------------------------------------------------------------------------------
 * Loading a (rows, n) block starting at element (r0, c0) into fp32 v[rows][MAX_GROUP]. Either the rows are
 * contiguous (col_stride 1), or the block is read from a transposed operand (wgrad's dY^T and X^T: row_stride
 * 1, col_stride = the source's row length), in place instead of copying the transpose first. Then each
 * column c of the block is `rows` consecutive values in memory, so the block is read column by column:
 * reading a row of it instead would touch one cache line per element, all at the same 4 KiB-aligned offset,
 * which thrashes the L1 set (measured 2x slower). */
static inline float load_one(const void *x, int x_bf16, int64_t i) {
    return x_bf16 ? bits_to_float((uint32_t)((const uint16_t *)x)[i] << 16) : ((const float *)x)[i];
}

#ifdef __AVX2__
/* in-register 8x8 transpose: a[i][j] <- a[j][i], with the usual unpack / shuffle / 128-bit permute network */
static inline void transpose8(__m256 *a) {
    __m256 t[8];
    for (int j = 0; j < 8; j += 2) {
        t[j] = _mm256_unpacklo_ps(a[j], a[j + 1]);
        t[j + 1] = _mm256_unpackhi_ps(a[j], a[j + 1]);
    }
    for (int j = 0; j < 8; j += 4) {
        a[j] = _mm256_shuffle_ps(t[j], t[j + 2], _MM_SHUFFLE(1, 0, 1, 0));
        a[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], _MM_SHUFFLE(3, 2, 3, 2));
        a[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], _MM_SHUFFLE(1, 0, 1, 0));
        a[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm256_permute2f128_ps(a[i], a[i + 4], 0x20);
        t[i + 4] = _mm256_permute2f128_ps(a[i], a[i + 4], 0x31);
    }
    for (int i = 0; i < 8; i++) a[i] = t[i];
}

/* v[r + i][c + j] = the source's 8 consecutive values at start + j * col_stride (i, j < 8): column c + j of the
 * block, transposed into row-major v (transpose8) */
static inline void load_transposed_8x8(const void *x, int x_bf16, int64_t start, int64_t col_stride,
                                       float v[][MAX_GROUP], int r, int c) {
    __m256 a[8];
    for (int j = 0; j < 8; j++) {
        int64_t i = start + j * col_stride;
        a[j] = x_bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
                            _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i))), 16))
                      : _mm256_loadu_ps((const float *)x + i);
    }
    transpose8(a);
    for (int i = 0; i < 8; i++) _mm256_storeu_ps(&v[r + i][c], a[i]);
}
#endif

static void load_block(const void *x, int x_bf16, int64_t row_stride, int64_t col_stride, int64_t r0, int64_t c0,
                       int rows, int n, float v[][MAX_GROUP]) {
    if (col_stride == 1) {
        for (int r = 0; r < rows; r++) {
            int64_t start = (r0 + r) * row_stride + c0;
            if (x_bf16) {
                const uint16_t *p = (const uint16_t *)x + start;
                #pragma omp simd
                for (int e = 0; e < n; e++) v[r][e] = bits_to_float((uint32_t)p[e] << 16);
            } else {
                memcpy(v[r], (const float *)x + start, n * sizeof(float));
            }
        }
    } else {
        int c8 = 0;
#ifdef __AVX2__
        /* 8x8 in-register transposes instead of one scalar load and store per element (512x2048 transposed
         * fp32, one thread, Zen 3: RTN 2.9 -> 2.1 ms, SR + RHT 5.1 -> 4.3 ms) */
        if (row_stride == 1 && rows % 8 == 0)
            for (; c8 + 8 <= n; c8 += 8)
                for (int r = 0; r < rows; r += 8)
                    load_transposed_8x8(x, x_bf16, (r0 + r) + (c0 + c8) * col_stride, col_stride, v, r, c8);
#endif
        for (int c = c8; c < n; c++)
            for (int r = 0; r < rows; r++)
                v[r][c] = load_one(x, x_bf16, (r0 + r) * row_stride + (c0 + c) * col_stride);
    }
}

/* RHT-16 of n contiguous fp32 values in place, chunk by chunk: out[q] = sum_i c[i] H[i][q] summed in the
 * order i = 0..15 (fp4.rht's order; each product is exact, so the order fixes every bit).
 * One chunk alone is a chain of 15 dependent adds per output vector (latency-bound: ~3 cycles per element on
 * Zen 3), so with AVX2 four chunks go through the 16 steps together: 8 independent accumulators, the same
 * operations in the same order per output (2048x512 fp32, one thread: the RHT's share of the kernel
 * 790 -> 510 us on an AMD EPYC Zen 3). */
static inline void rotate16_one(float *in, const float *H) {
    float o[BLOCK];
    #pragma omp simd
    for (int q = 0; q < BLOCK; q++) o[q] = in[0] * H[q];
    for (int i = 1; i < BLOCK; i++) {
        float ci = in[i];
        #pragma omp simd
        for (int q = 0; q < BLOCK; q++) o[q] = o[q] + ci * H[BLOCK * i + q];
    }
    memcpy(in, o, sizeof o);
}

static inline void rotate16(float *v, int n, const float *H) {
    int c = 0;
#ifdef __AVX2__
    for (; c + 4 * BLOCK <= n; c += 4 * BLOCK) {
        float *in = v + c;
        __m256 h0 = _mm256_loadu_ps(H), h1 = _mm256_loadu_ps(H + 8), o[8];
        for (int k = 0; k < 4; k++) {
            __m256 b = _mm256_broadcast_ss(in + BLOCK * k);
            o[2 * k] = _mm256_mul_ps(b, h0);
            o[2 * k + 1] = _mm256_mul_ps(b, h1);
        }
        for (int i = 1; i < BLOCK; i++) {
            h0 = _mm256_loadu_ps(H + BLOCK * i), h1 = _mm256_loadu_ps(H + BLOCK * i + 8);
            for (int k = 0; k < 4; k++) {
                __m256 b = _mm256_broadcast_ss(in + BLOCK * k + i);
                o[2 * k] = _mm256_add_ps(o[2 * k], _mm256_mul_ps(b, h0));      /* never fused: -ffp-contract=off */
                o[2 * k + 1] = _mm256_add_ps(o[2 * k + 1], _mm256_mul_ps(b, h1));
            }
        }
        for (int k = 0; k < 8; k++) _mm256_storeu_ps(in + 8 * k, o[k]);
    }
#endif
    for (; c < n; c += BLOCK) rotate16_one(v + c, H);
}

/* RHT-128 of n contiguous fp32 values in place (n a multiple of 128), chunk by chunk, as fp4.rht: y = c * s
 * (the 128 signs, exact), then the butterfly stages h = 1, 2, 4, ..., 64 in that order, within every 2h-block
 * (a, b) = (y[j], y[j + h]) -> (a + b, a - b), then one multiply by fl(2^-3.5). With AVX2 the chunk is 16
 * vectors of 8: stages h >= 8 add whole vectors, h = 1, 2, 4 add a vector to its lane-swapped self and blend
 * (a + b where the pair's first element sits: IEEE addition commutes, so b + a is the same bits; a - b is
 * computed as swapped - self in the second element's lane, which is a - b itself). */
#define RHT128_NORM 0.0883883461356163f    /* fl32(1/sqrt(128)) */
static inline void rotate128_one(float *y, const float *signs) {
    for (int e = 0; e < OUTER; e++) y[e] = y[e] * signs[e];
    for (int h = 1; h < OUTER; h *= 2)
        for (int blk = 0; blk < OUTER; blk += 2 * h)
            for (int j = blk; j < blk + h; j++) {
                float a = y[j], b = y[j + h];
                y[j] = a + b;
                y[j + h] = a - b;
            }
    for (int e = 0; e < OUTER; e++) y[e] = y[e] * RHT128_NORM;
}

#ifdef __AVX2__
/* one 128-chunk: src -> dst (may be the same), and the running abs-bits max of the rotated values */
static inline __attribute__((always_inline)) __m256i rotate128_avx2(const float *src, float *dst,
                                                                    const float *signs, __m256i amax) {
    __m256 a[16];
    #pragma GCC unroll 16
    for (int k = 0; k < 16; k++) a[k] = _mm256_mul_ps(_mm256_loadu_ps(src + 8 * k), _mm256_loadu_ps(signs + 8 * k));
    #pragma GCC unroll 16
    for (int k = 0; k < 16; k++) {                                       /* h = 1 */
        __m256 sw = _mm256_permute_ps(a[k], _MM_SHUFFLE(2, 3, 0, 1));
        a[k] = _mm256_blend_ps(_mm256_add_ps(a[k], sw), _mm256_sub_ps(sw, a[k]), 0xAA);
    }
    #pragma GCC unroll 16
    for (int k = 0; k < 16; k++) {                                       /* h = 2 */
        __m256 sw = _mm256_permute_ps(a[k], _MM_SHUFFLE(1, 0, 3, 2));
        a[k] = _mm256_blend_ps(_mm256_add_ps(a[k], sw), _mm256_sub_ps(sw, a[k]), 0xCC);
    }
    #pragma GCC unroll 16
    for (int k = 0; k < 16; k++) {                                       /* h = 4 */
        __m256 sw = _mm256_permute2f128_ps(a[k], a[k], 0x01);
        a[k] = _mm256_blend_ps(_mm256_add_ps(a[k], sw), _mm256_sub_ps(sw, a[k]), 0xF0);
    }
    #pragma GCC unroll 4
    for (int hv = 1; hv < 16; hv *= 2)                                   /* h = 8 hv */
        #pragma GCC unroll 16
        for (int k = 0; k < 16; k++)
            if (!(k & hv)) {
                __m256 p = a[k], q = a[k + hv];
                a[k] = _mm256_add_ps(p, q);
                a[k + hv] = _mm256_sub_ps(p, q);
            }
    #pragma GCC unroll 16
    for (int k = 0; k < 16; k++) {
        __m256 y = _mm256_mul_ps(a[k], _mm256_set1_ps(RHT128_NORM));
        _mm256_storeu_ps(dst + 8 * k, y);
        amax = _mm256_max_epi32(amax, _mm256_and_si256(_mm256_castps_si256(y), _mm256_set1_epi32(0x7FFFFFFF)));
    }
    return amax;
}
#endif

static inline void rotate128(float *v, int n, const float *signs) {
    for (int c = 0; c < n; c += OUTER) {
#ifdef __AVX2__
        rotate128_avx2(v + c, v + c, signs, _mm256_setzero_si256());
#else
        rotate128_one(v + c, signs);
#endif
    }
}

/* the RHT the quantizer was given: hsize 16 (H = diag(s) H16 / 4, rht_operand) or 128 (H = the 128 signs) */
static inline void rotate(float *v, int n, const float *H, int hsize) {
    if (hsize == OUTER) rotate128(v, n, H);
    else rotate16(v, n, H);
}

/* max |v[e]| over 16 values; NaN if any is NaN (torch.amax propagates NaN) */
static inline float amax16(const float *v) {
    float m = 0.0f;
    int nan = 0;
    #pragma omp simd reduction(max:m) reduction(|:nan)
    for (int e = 0; e < BLOCK; e++) {
        float a = fabsf(v[e]);
        m = m > a ? m : a;
        nan |= a != a;
    }
    return nan ? NAN : m;
}

#ifdef __AVX2__
/* amax on the bits: for |x| (sign cleared) the int32 order is the fp32 order, and every NaN is above Inf, so
 * an integer max propagates NaN by itself; canon_nan8 then makes any NaN the quiet NaN amax16 returns */
static inline __m256i abs_bits8(const float *p) {
    return _mm256_and_si256(_mm256_loadu_si256((const __m256i *)p), _mm256_set1_epi32(0x7FFFFFFF));
}
static inline __m256 canon_nan8(__m256i m) {
    __m256i nan = _mm256_cmpgt_epi32(m, _mm256_set1_epi32(0x7F800000));
    return _mm256_castsi256_ps(_mm256_blendv_epi8(m, _mm256_set1_epi32(0x7FC00000), nan));
}
/* lanes (per 128-bit half) [a0|a1, a2|a3, b0|b1, b2|b3] of the int max, as hadd's layout */
static inline __m256i hmax_pair(__m256i a, __m256i b) {
    __m256 fa = _mm256_castsi256_ps(a), fb = _mm256_castsi256_ps(b);
    return _mm256_max_epi32(_mm256_castps_si256(_mm256_shuffle_ps(fa, fb, _MM_SHUFFLE(2, 0, 2, 0))),
                            _mm256_castps_si256(_mm256_shuffle_ps(fa, fb, _MM_SHUFFLE(3, 1, 3, 1))));
}
/* the 8 block amaxes of a row of 128 as abs bits, block b in lane b */
static inline __m256i block_amax_bits8(const float *v) {
    __m256i m[8];
    for (int b = 0; b < 8; b++) m[b] = _mm256_max_epi32(abs_bits8(v + BLOCK * b), abs_bits8(v + BLOCK * b + 8));
    __m256i h0 = hmax_pair(hmax_pair(m[0], m[1]), hmax_pair(m[2], m[3]));
    __m256i h1 = hmax_pair(hmax_pair(m[4], m[5]), hmax_pair(m[6], m[7]));
    return _mm256_max_epi32(_mm256_permute2x128_si256(h0, h1, 0x20), _mm256_permute2x128_si256(h0, h1, 0x31));
}
static inline float hmax_bits8(__m256i m) {              /* -> the fp32 max of the 8 lanes, NaN if any */
    __m128i w = _mm_max_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    w = _mm_max_epi32(w, _mm_shuffle_epi32(w, _MM_SHUFFLE(1, 0, 3, 2)));
    w = _mm_max_epi32(w, _mm_shuffle_epi32(w, _MM_SHUFFLE(2, 3, 0, 1)));
    uint32_t u = (uint32_t)_mm_cvtsi128_si32(w);
    return u > 0x7F800000u ? NAN : bits_to_float(u);
}
#endif

/* ------------------------------------------------------------------------------------------------------
 * One row of a tile, n values v, given each element's encode factor, decode scale and keep flag (its
 * 16-chunk's, expanded per element so that the whole row is one vector loop: 5-9% faster than a loop per
 * chunk). `noise_index` is the flat index of v[0] in the (M, K) view; SR draws u = (pcg(pcg(i ^ s0) ^ s1) >> 8)
 * * 2^-24 for element i (fp4.uniform_noise). Inlined with `sr` a constant, so that RTN and SR each become
 * one branch-free vector loop. Two outputs: the dequantized values (fake quantization, fp32 or bf16) or the
 * packed E2M1 codes (quantize_nvfp4). */
#define E2M1_STEP(a) ((a) >= 4.0f ? 2.0f : ((a) >= 2.0f ? 1.0f : 0.5f))   /* grid spacing 2^(e-1) */

/* fp4.round_e2m1(|v|): the E2M1 grid magnitude of scaled value v, RTN or SR with element i's noise */
static inline float round_e2m1(float v, const int sr, uint32_t i, uint32_t s0, uint32_t s1) {
    float a = min_keep_nan(fabsf(v), E2M1_MAX);
    float step = E2M1_STEP(a);
    float x = a * (1.0f / step);
    if (sr) {
        float u = (float)(int32_t)(pcg_hash(pcg_hash(i ^ s0) ^ s1) >> 8) * NOISE_ULP;     /* fp4.uniform_noise */
        float t = floorf(x);
        return (t + (u < x - t ? 1.0f : 0.0f)) * step;          /* up with probability x - floor(x) */
    }
    return rintf(x) * step;                                      /* ties to even, as torch.round */
}

static inline __attribute__((always_inline)) void dequantize_row(
        const float *v, int n, const float *encE, const float *scaleE, const float *keptE, void *out, int out_bf16,
        const int sr, uint32_t noise_index, uint32_t s0, uint32_t s1) {
    float res[MAX_GROUP];
    #pragma omp simd
    for (int e = 0; e < n; e++) {
        float val = v[e] * encE[e];
        float q = round_e2m1(val, sr, noise_index + (uint32_t)e, s0, s1);
        float d = (q * keptE[e]) * scaleE[e];                    /* x_dq = ±q * scale, 0 if the scale is 0 */
        res[e] = ((val < 0.0f) & (keptE[e] != 0.0f)) ? -d : d;
    }
    if (out_bf16) {
        uint16_t *o = (uint16_t *)out;
        #pragma omp simd
        for (int e = 0; e < n; e++) o[e] = float_to_bf16(res[e]);
    } else {
        memcpy(out, res, n * sizeof(float));
    }
}

#ifdef __AVX2__
/* The same row with AVX2 intrinsics, per 16-chunk b from its scalars encode[b], scale[b], keep[b]. gcc's code
 * for dequantize_row spills (~85 instructions per 8 SR elements: it evaluates round_e2m1 for all three grid
 * spacings and blends) and reads the per-element arrays back; this one is the same operations in the same
 * order on the same values, so the same bits. Used for fake_quant's rows (quantize_nvfp4 keeps the C loop).
 * 2048x512 fp32, one thread, Zen 3: RTN 1.41 -> 1.08 ms, SR 2.41 -> 1.70 ms. */
static inline __m256i pcg_hash8(__m256i h) {                    /* pcg_hash in 8 uint32 lanes (mod 2^32) */
    __m256i state = _mm256_add_epi32(_mm256_mullo_epi32(h, _mm256_set1_epi32((int)747796405u)),
                                     _mm256_set1_epi32((int)2891336453u));
    __m256i shift = _mm256_add_epi32(_mm256_srli_epi32(state, 28), _mm256_set1_epi32(4));
    __m256i word = _mm256_mullo_epi32(_mm256_xor_si256(_mm256_srlv_epi32(state, shift), state),
                                      _mm256_set1_epi32(277803737));
    return _mm256_xor_si256(_mm256_srli_epi32(word, 22), word);
}

/* round_e2m1 of 8 scaled values; i: their flat indices (SR only) */
static inline __m256 round_e2m1_8(__m256 val, const int sr, __m256i i, __m256i s0, __m256i s1) {
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
    /* min_keep_nan(|v|, 6): vminps returns its second operand when either is NaN */
    __m256 a = _mm256_min_ps(_mm256_set1_ps(E2M1_MAX), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), val));
    __m256 ge2 = _mm256_cmp_ps(a, two, _CMP_GE_OQ), ge4 = _mm256_cmp_ps(a, _mm256_set1_ps(4.0f), _CMP_GE_OQ);
    __m256 step = _mm256_blendv_ps(_mm256_blendv_ps(half, one, ge2), two, ge4);          /* E2M1_STEP */
    __m256 inv_step = _mm256_blendv_ps(_mm256_blendv_ps(two, one, ge2), half, ge4);      /* 1 / step, exact */
    __m256 x = _mm256_mul_ps(a, inv_step);
    if (sr) {
        __m256i h = pcg_hash8(_mm256_xor_si256(pcg_hash8(_mm256_xor_si256(i, s0)), s1));
        __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(NOISE_ULP));
        __m256 t = _mm256_floor_ps(x);
        __m256 up = _mm256_and_ps(_mm256_cmp_ps(u, _mm256_sub_ps(x, t), _CMP_LT_OQ), one);
        return _mm256_mul_ps(_mm256_add_ps(t, up), step);
    }
    return _mm256_mul_ps(_mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), step);
}

/* float_to_bf16 of 16 values (lo, hi) -> 16 bf16 at o */
static inline void store_bf16_16(uint16_t *o, __m256 lo, __m256 hi) {
    __m256i r[2];
    __m256 f[2] = {lo, hi};
    for (int k = 0; k < 2; k++) {
        __m256i u = _mm256_castps_si256(f[k]);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
        r[k] = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0),
                                  _mm256_castps_si256(_mm256_cmp_ps(f[k], f[k], _CMP_UNORD_Q)));
    }
    /* packus works per 128-bit lane: [lo0-3 hi0-3 lo4-7 hi4-7] -> reorder the 64-bit quarters */
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), _MM_SHUFFLE(3, 1, 2, 0));
    _mm256_storeu_si256((__m256i *)o, packed);
}

static inline __attribute__((always_inline)) void dequantize_row_avx2(
        const float *v, int nb, const float *encode, const float *scale, const int *keep, void *out, int out_bf16,
        const int sr, uint32_t noise_index, uint32_t s0, uint32_t s1) {
    const __m256 neg_zero = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
    const __m256i s0v = _mm256_set1_epi32((int)s0), s1v = _mm256_set1_epi32((int)s1);
    __m256i i = _mm256_add_epi32(_mm256_set1_epi32((int)noise_index), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int b = 0; b < nb; b++) {
        __m256 enc = _mm256_set1_ps(encode[b]), sc = _mm256_set1_ps(scale[b]);
        __m256 kept = _mm256_set1_ps(keep[b] ? 1.0f : 0.0f);
        __m256 keep_mask = _mm256_castsi256_ps(_mm256_set1_epi32(keep[b] ? -1 : 0));
        __m256 res[2];
        for (int k = 0; k < 2; k++) {
            __m256 val = _mm256_mul_ps(_mm256_loadu_ps(v + BLOCK * b + 8 * k), enc);
            __m256 q = round_e2m1_8(val, sr, i, s0v, s1v);
            __m256 d = _mm256_mul_ps(_mm256_mul_ps(q, kept), sc);
            __m256 neg = _mm256_and_ps(_mm256_cmp_ps(val, zero, _CMP_LT_OQ), keep_mask);
            res[k] = _mm256_blendv_ps(d, _mm256_xor_ps(d, neg_zero), neg);
            i = _mm256_add_epi32(i, _mm256_set1_epi32(8));
        }
        if (out_bf16) {
            store_bf16_16((uint16_t *)out + BLOCK * b, res[0], res[1]);
        } else {
            _mm256_storeu_ps((float *)out + BLOCK * b, res[0]);
            _mm256_storeu_ps((float *)out + BLOCK * b + 8, res[1]);
        }
    }
}
#endif

/* codes as fp4.encode_e2m1: k = 2q for q <= 2, else min(q + 2, 7), 0 for NaN; + 8 if negative (and kept);
 * packed two to a byte, element 2j in the low nibble (fp4.pack_e2m1) */
static inline __attribute__((always_inline)) void encode_row(
        const float *v, int n, const float *encE, const float *keptE, uint8_t *codes,
        const int sr, uint32_t noise_index, uint32_t s0, uint32_t s1) {
    uint8_t k[MAX_GROUP];
    #pragma omp simd
    for (int e = 0; e < n; e++) {
        float val = v[e] * encE[e];
        float q = round_e2m1(val, sr, noise_index + (uint32_t)e, s0, s1) * keptE[e];
        float code = q <= 2.0f ? q * 2.0f : min_keep_nan(q + 2.0f, 7.0f);
        code = code != code ? 0.0f : code;
        k[e] = (uint8_t)code + (((val < 0.0f) & (keptE[e] != 0.0f)) ? 8 : 0);
    }
    #pragma omp simd
    for (int j = 0; j < n / 2; j++) codes[j] = (uint8_t)(k[2 * j] | (k[2 * j + 1] << 4));
}

/* E4M3 value (on the grid, >= 0, or NaN) -> its byte, as torch's float8_e4m3fn: NaN -> 0x7F with the sign */
static inline uint8_t e4m3_byte(float s) {
    uint32_t u = float_to_bits(s);
    if (s != s) return (uint8_t)(0x7F | ((u >> 24) & 0x80));
    if (s < E4M3_MIN_NORMAL) return (uint8_t)(s * 512.0f);        /* subnormal: s = m * 2^-9, m = 0..7 */
    return (uint8_t)(((((u >> 23) & 0xFF) - 127 + 7) << 3) | ((u >> 20) & 7));
}

/* ------------------------------------------------------------------------------------------------------
 * What a quantization needs besides the data: the output, the recipe, and the per-tensor numbers of pass 1. */
enum { FOS_NONE = 0, FOS_MAE = 1, FOS_MSE = 2 };   /* Four Over Six's error (fp4.round_four_over_six) */
typedef struct {
    int64_t K;                         /* row length of the (M, K) view: element (r, c) has flat index r*K + c */
    void *out;                         /* fake_quant's output, or NULL */
    int out_bf16;
    const CodesOut *co;                /* quantize_nvfp4's outputs, or NULL */
    int fmt, sr, eden, fos;            /* format, element SR, MS-EDEN, Four Over Six (FOS_*) */
    uint32_t s0, s1;                   /* the seeds: of the elements' noise (sr), or of the scales' (eden) */
    float enc_sixth, s_dec, s_enc, A;  /* per-tensor: S_enc * fl(1/6), S_dec, S_enc, the tensor's amax */
} Job;

#define FOS_AMAX_TO_SCALE 1536.0f      /* Four Over Six: 6 * 256 */
#define MAP_TO_4 1.5f                  /* the map-to-4 candidate: 1.5 x the map-to-6 scale */
#define EDEN_VAL_MAX 6.07210636138916f     /* fl32(6 / 0.988125), Quartet II's grid max */
#define EDEN_SCALE_BOUND 255.99000549316406f   /* fl32(255.99) */

/* E4M3 byte (sign ignored) -> its value; NaN for S.1111.111 */
static inline float e4m3_value(uint32_t b) {
    b &= 0x7Fu;
    if (b == 0x7Fu) return NAN;
    uint32_t e = b >> 3, m = b & 7u;
    return e == 0 ? (float)m * (1.0f / 512.0f) : bits_to_float(((e + 120u) << 23) | (m << 20));
}

/* fp4.stochastic_e4m3 of one t >= 0 (or NaN) with its uniform u -> the E4M3 byte: t where it is on the grid,
 * else its neighbour above iff u < (t - down) / (up - down), the neighbours found from r = e4m3(t) */
static inline uint32_t stochastic_e4m3_byte(float t, float u) {
    t = min_keep_nan(t, E4M3_MAX);
    float r = round_e4m3(t);
    uint32_t rb = e4m3_byte(r);
    if (r == t) return rb;
    int above = r > t;
    uint32_t down_b = above ? rb - 1 : rb, up_b = above ? rb : rb + 1;
    float down = e4m3_value(down_b), up = e4m3_value(up_b);
    return u < (t - down) / (up - down) ? up_b : down_b;     /* (NaN t: the compare fails, rb = NaN stays) */
}

static inline float block_noise(uint32_t i, uint32_t s0, uint32_t s1) {      /* fp4.uniform_noise's element i */
    return (float)(int32_t)(pcg_hash(pcg_hash(i ^ s0) ^ s1) >> 8) * NOISE_ULP;
}

/* Four Over Six's error of one 16-block of one row for one candidate (E4M3 scale s, decode scale sc), as
 * fp4.round_four_over_six: q = ±E2M1(x * min(1/sc, FLT_MAX)) (RTN, 0 if s = 0), x̂ = ((q * s) * A) / 1536
 * (per-tensor) or q * sc (outer 128), d = |x̂ - x| or (x̂ - x)², summed left to right */
static inline float fos_block_error(const float *x, float s, float sc, const Job *j) {
    const float enc = min_keep_nan(1.0f / sc, FLT_MAX);
    const int keep = s != 0.0f;
    float err = 0.0f;
    for (int e = 0; e < BLOCK; e++) {
        float val = x[e] * enc;
        float mag = keep ? round_e2m1(val, 0, 0, 0, 0) : 0.0f;
        float q = (keep && val < 0.0f) ? -mag : mag;
        float xhat = j->fmt == NVFP4_TENSOR ? ((q * s) * j->A) / FOS_AMAX_TO_SCALE : q * sc;
        float diff = xhat - x[e];
        float d = j->fos == FOS_MSE ? diff * diff : fabsf(diff);
        err = e == 0 ? d : err + d;
    }
    return err;
}

#ifdef __AVX2__

/* fos_block_error for the 8 blocks of a 128-row at once, both candidates: the row is transposed so that lane b
 * holds block b and element e of every block is one vector; the 16-term sums then run down the vectors, in
 * the same left-to-right order per block. err[k]: candidate k's 8 block errors. */
static inline __attribute__((always_inline)) void fos_row_errors_avx2(
        const float *v, const float s[2][MAX_GROUP / BLOCK], const float sc[2][MAX_GROUP / BLOCK], const Job *j,
        __m256 err[2], __m256 keep_q[2][BLOCK]) {
    __m256 t[16];
    for (int b = 0; b < 8; b++) {
        t[b] = _mm256_loadu_ps(v + BLOCK * b);
        t[8 + b] = _mm256_loadu_ps(v + BLOCK * b + 8);
    }
    transpose8(t);
    transpose8(t + 8);                      /* t[e] = (v[e], v[16 + e], ..., v[112 + e]) */
    const __m256 neg_zero = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
    const __m256 A = _mm256_set1_ps(j->A), div = _mm256_set1_ps(FOS_AMAX_TO_SCALE);
    const __m256i no = _mm256_setzero_si256();
    for (int k = 0; k < 2; k++) {
        __m256 sv = _mm256_loadu_ps(s[k]), scv = _mm256_loadu_ps(sc[k]);
        /* min_keep_nan(1 / sc, FLT_MAX): vminps returns its second operand when either is NaN */
        __m256 enc = _mm256_min_ps(_mm256_set1_ps(FLT_MAX), _mm256_div_ps(_mm256_set1_ps(1.0f), scv));
        __m256 keep = _mm256_cmp_ps(sv, zero, _CMP_NEQ_UQ);
        __m256 acc = zero;
        for (int e = 0; e < BLOCK; e++) {
            __m256 x = t[e], val = _mm256_mul_ps(x, enc);
            __m256 mag = _mm256_and_ps(round_e2m1_8(val, 0, no, no, no), keep);
            __m256 neg = _mm256_and_ps(_mm256_cmp_ps(val, zero, _CMP_LT_OQ), keep);
            __m256 q = _mm256_xor_ps(mag, _mm256_and_ps(neg, neg_zero));
            if (keep_q) keep_q[k][e] = q;
            __m256 xhat = j->fmt == NVFP4_TENSOR ? _mm256_div_ps(_mm256_mul_ps(_mm256_mul_ps(q, sv), A), div)
                                                 : _mm256_mul_ps(q, scv);
            __m256 diff = _mm256_sub_ps(xhat, x);
            __m256 d = j->fos == FOS_MSE ? _mm256_mul_ps(diff, diff) : _mm256_andnot_ps(neg_zero, diff);
            acc = e == 0 ? d : _mm256_add_ps(acc, d);
        }
        err[k] = acc;
    }
}
#endif

#ifdef __AVX2__
/* Four Over Six on a 1x16-tiled row of 128 for fake_quant, fused: the two candidates' ±q from the error pass are
 * kept (block b in lane b), the picked one is multiplied by its decode scale and transposed back: the values
 * _round_blocks would give for the picked scale (±q * sc is ±(q * sc) exactly; a zero scale has q = +0). */
static inline void fos_row_fake_avx2(const float *v, const float s[2][MAX_GROUP / BLOCK],
                                     const float sc[2][MAX_GROUP / BLOCK], const Job *j, void *out) {
    __m256 err[2], q[2][BLOCK], o[BLOCK];
    fos_row_errors_avx2(v, s, sc, j, err, q);
    __m256 pick = _mm256_cmp_ps(err[1], err[0], _CMP_LT_OQ);
    __m256 scale = _mm256_blendv_ps(_mm256_loadu_ps(sc[0]), _mm256_loadu_ps(sc[1]), pick);
    for (int e = 0; e < BLOCK; e++) o[e] = _mm256_mul_ps(_mm256_blendv_ps(q[0][e], q[1][e], pick), scale);
    transpose8(o);
    transpose8(o + 8);                      /* o[b]: block b's elements 0..7, o[8 + b]: 8..15 */
    for (int b = 0; b < 8; b++) {
        if (j->out_bf16) {
            store_bf16_16((uint16_t *)out + BLOCK * b, o[b], o[8 + b]);
        } else {
            _mm256_storeu_ps((float *)out + BLOCK * b, o[b]);
            _mm256_storeu_ps((float *)out + BLOCK * b + 8, o[8 + b]);
        }
    }
}
#endif

/* Four Over Six's choice for one tile (fp4.round_four_over_six): pick[b] = 1 iff map-to-4's error is strictly
 * below map-to-6's (a tie, or a NaN, keeps map-to-6). With 16x16 tiles the 16 row errors of a block are added
 * as a tree: rows i + i+8, then i + i+4, ... (TE's warp reduction). */
static void fos_pick(float v[][MAX_GROUP], int tile_rows, int nb, const float s[2][MAX_GROUP / BLOCK],
                     const float sc[2][MAX_GROUP / BLOCK], const Job *j, int *pick) {
    float err[2][MAX_TILE_ROWS][MAX_GROUP / BLOCK];
    for (int r = 0; r < tile_rows; r++) {
#ifdef __AVX2__
        if (nb == MAX_GROUP / BLOCK) {
            __m256 e[2];
            fos_row_errors_avx2(v[r], s, sc, j, e, NULL);
            _mm256_storeu_ps(err[0][r], e[0]);
            _mm256_storeu_ps(err[1][r], e[1]);
            continue;
        }
#endif
        for (int k = 0; k < 2; k++)
            for (int b = 0; b < nb; b++) err[k][r][b] = fos_block_error(v[r] + BLOCK * b, s[k][b], sc[k][b], j);
    }
    for (int half = tile_rows / 2; half >= 1; half /= 2)
        for (int k = 0; k < 2; k++)
            for (int r = 0; r < half; r++)
                for (int b = 0; b < nb; b++) err[k][r][b] = err[k][r][b] + err[k][r + half][b];
    for (int b = 0; b < nb; b++) pick[b] = err[1][0][b] < err[0][0][b];
}

#ifdef __AVX2__
/* MS-EDEN's two sums over one 128-group x (16 vectors of 8): z = x * enc[block], q = ±E2M1(z) rounded to nearest,
 * Σ z² and Σ z·q in fp4.tree_sum's order (element e + e+64 is vector k + k+8 in the same lane, ... down to one
 * vector, whose lanes are then added the same way: 0-3 + 4-7, 0-1 + 2-3, 0 + 1). q is kept in q_out (16 vectors)
 * unless it is NULL. */
static inline void eden_sums_avx2(const float *x, const float *enc, __m256 *q_out, float *num, float *den) {
    const __m256i no = _mm256_setzero_si256();
    __m256 zz[16], zq[16];
    for (int k = 0; k < 16; k++) {
        __m256 z = _mm256_mul_ps(_mm256_loadu_ps(x + 8 * k), _mm256_set1_ps(enc[k / 2]));
        __m256 mag = round_e2m1_8(z, 0, no, no, no);
        __m256 neg = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LT_OQ);
        __m256 q = _mm256_xor_ps(mag, _mm256_and_ps(neg, _mm256_set1_ps(-0.0f)));
        if (q_out) q_out[k] = q;
        zz[k] = _mm256_mul_ps(z, z);
        zq[k] = _mm256_mul_ps(z, q);
    }
    for (int h = 8; h >= 1; h /= 2)
        for (int k = 0; k < h; k++) {
            zz[k] = _mm256_add_ps(zz[k], zz[k + h]);
            zq[k] = _mm256_add_ps(zq[k], zq[k + h]);
        }
    float sums[2];
    __m256 fin[2] = {zz[0], zq[0]};
    for (int i = 0; i < 2; i++) {
        __m128 w = _mm_add_ps(_mm256_castps256_ps128(fin[i]), _mm256_extractf128_ps(fin[i], 1));
        w = _mm_add_ps(w, _mm_movehl_ps(w, w));
        w = _mm_add_ss(w, _mm_shuffle_ps(w, w, 1));
        sums[i] = _mm_cvtss_f32(w);
    }
    *num = sums[0];
    *den = sums[1];
}
#endif

/* Σ z² and Σ z·q of one 128-group, z = x * enc[block], q = ±E2M1(z) to nearest, in fp4.tree_sum's order */
static inline void eden_group_sums(const float *x, const float *enc, float *num, float *den) {
#ifdef __AVX2__
    eden_sums_avx2(x, enc, NULL, num, den);
#else
    float zz[OUTER], zq[OUTER];
    for (int e = 0; e < OUTER; e++) {
        float z = x[e] * enc[e / BLOCK];
        float mag = round_e2m1(z, 0, 0, 0, 0);
        float q = z < 0.0f ? -mag : mag;
        zz[e] = z * z;
        zq[e] = z * q;
    }
    for (int h = OUTER / 2; h >= 1; h /= 2)
        for (int e = 0; e < h; e++) {
            zz[e] = zz[e] + zz[e + h];
            zq[e] = zq[e] + zq[e + h];
        }
    *num = zz[0], *den = zq[0];
#endif
}

/* MS-EDEN's scales for one row of n (a multiple of 128) values (fp4.round_eden): from the tile amax, the first
 * E4M3 scale s (1 if 0) and its encode factor; per 128-group c = Σ z² / Σ z q (1 if Σ z q = 0), both sums in
 * _tree_sum's order (halves added elementwise); then the scale s * c rounded stochastically to E4M3 with block
 * (row, b)'s uniform. The elements are rounded with encode (from s) and dequantized with the new scale. */
static void eden_scales(const float *v, int n, const float *tile_amax, int64_t row, int64_t c0, const Job *j,
                        float *encode, float *block_scale) {
    const int nb = n / BLOCK;
    float s[MAX_GROUP / BLOCK];
    for (int b = 0; b < nb; b++) {
        float sb = round_e4m3(min_keep_nan((tile_amax[b] / EDEN_VAL_MAX) / j->s_dec, E4M3_MAX));
        s[b] = sb == 0.0f ? 1.0f : sb;
        encode[b] = min_keep_nan(1.0f / (s[b] * j->s_dec), FLT_MAX);
    }
    for (int g = 0; g < n / OUTER; g++) {
        const float *x = v + OUTER * g;
        const float *enc = encode + g * (OUTER / BLOCK);
        float num, den;
        eden_group_sums(x, enc, &num, &den);
        float c = den == 0.0f ? 1.0f : num / den;
        for (int b = g * (OUTER / BLOCK); b < (g + 1) * (OUTER / BLOCK); b++) {
            uint32_t i = (uint32_t)(row * (j->K / BLOCK) + c0 / BLOCK + b);
            block_scale[b] = e4m3_value(stochastic_e4m3_byte(s[b] * c, block_noise(i, j->s0, j->s1)));
        }
    }
}

#ifdef __AVX2__
/* round_e4m3 of 8 values */
static inline __m256 round_e4m3_8(__m256 v) {
    __m256 sub = _mm256_mul_ps(_mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(512.0f)),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                               _mm256_set1_ps(1.0f / 512.0f));
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 20), _mm256_set1_epi32(1));
    __m256i normal = _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFFF)), lsb),
                                      _mm256_set1_epi32((int)0xFFF00000u));
    return _mm256_blendv_ps(_mm256_castsi256_ps(normal), sub,
                            _mm256_cmp_ps(v, _mm256_set1_ps(E4M3_MIN_NORMAL), _CMP_LT_OQ));
}

/* e4m3_value of 8 bytes in 0..0x7E: (b + 960) << 20 is the fp32 bits of a normal one, m * 2^-9 a subnormal */
static inline __m256 e4m3_value_8(__m256i b) {
    __m256 normal = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(960)), 20));
    __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(b), _mm256_set1_ps(1.0f / 512.0f));
    return _mm256_blendv_ps(normal, sub, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), b)));
}

/* MS-EDEN's whole row of 128 (8 blocks, tile_amax given) for fake_quant, fused: the scale math of eden_scales
 * with the 8 blocks in the 8 lanes (stochastic_e4m3_byte's steps on vectors: r = e4m3(t), its byte, the
 * neighbour bytes, their values; t itself where r = t, NaN where t is), the elements rounded once and kept,
 * then written as ±q * (s' * S_dec). Same operations as eden_scales + dequantize_row_avx2, same bits. */
static inline void eden_row_avx2(const float *v, const float *tile_amax, int64_t row, int64_t c0, const Job *j,
                                 void *out) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    const __m256 s_dec = _mm256_set1_ps(j->s_dec);
    __m256 sb = _mm256_div_ps(_mm256_div_ps(_mm256_loadu_ps(tile_amax), _mm256_set1_ps(EDEN_VAL_MAX)), s_dec);
    sb = round_e4m3_8(_mm256_min_ps(_mm256_set1_ps(E4M3_MAX), sb));       /* min_keep_nan */
    sb = _mm256_blendv_ps(sb, one, _mm256_cmp_ps(sb, zero, _CMP_EQ_OQ));
    __m256 enc = _mm256_min_ps(_mm256_set1_ps(FLT_MAX), _mm256_div_ps(one, _mm256_mul_ps(sb, s_dec)));
    float encb[8];
    _mm256_storeu_ps(encb, enc);
    __m256 q[16];
    float num, den;
    eden_sums_avx2(v, encb, q, &num, &den);
    float c = den == 0.0f ? 1.0f : num / den;
    /* stochastic_e4m3 of t = s * c, 8 blocks */
    __m256 t = _mm256_min_ps(_mm256_set1_ps(E4M3_MAX), _mm256_mul_ps(sb, _mm256_set1_ps(c)));
    __m256 r = round_e4m3_8(t);
    __m256i rb = _mm256_blendv_epi8(
        _mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(r), 20), _mm256_set1_epi32(960)),
        _mm256_cvttps_epi32(_mm256_mul_ps(r, _mm256_set1_ps(512.0f))),
        _mm256_castps_si256(_mm256_cmp_ps(r, _mm256_set1_ps(E4M3_MIN_NORMAL), _CMP_LT_OQ)));
    __m256i above = _mm256_castps_si256(_mm256_cmp_ps(r, t, _CMP_GT_OQ));          /* -1 where r > t */
    __m256i down_b = _mm256_add_epi32(rb, above), up_b = _mm256_add_epi32(down_b, _mm256_set1_epi32(1));
    __m256 down = e4m3_value_8(down_b), up = e4m3_value_8(up_b);
    __m256 frac = _mm256_div_ps(_mm256_sub_ps(t, down), _mm256_sub_ps(up, down));
    __m256i i = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)(row * (j->K / BLOCK) + c0 / BLOCK)),
                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i h = pcg_hash8(_mm256_xor_si256(pcg_hash8(_mm256_xor_si256(i, _mm256_set1_epi32((int)j->s0))),
                                           _mm256_set1_epi32((int)j->s1)));
    __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(NOISE_ULP));
    __m256 s2 = _mm256_blendv_ps(down, up, _mm256_cmp_ps(u, frac, _CMP_LT_OQ));
    s2 = _mm256_blendv_ps(s2, r, _mm256_cmp_ps(r, t, _CMP_EQ_OQ));
    s2 = _mm256_blendv_ps(s2, t, _mm256_cmp_ps(t, t, _CMP_UNORD_Q));             /* NaN stays NaN */
    float scb[8];
    _mm256_storeu_ps(scb, _mm256_mul_ps(s2, s_dec));
    for (int b = 0; b < 8; b++) {
        __m256 sc = _mm256_set1_ps(scb[b]);
        __m256 lo = _mm256_mul_ps(q[2 * b], sc), hi = _mm256_mul_ps(q[2 * b + 1], sc);
        if (j->out_bf16) {
            store_bf16_16((uint16_t *)out + BLOCK * b, lo, hi);
        } else {
            _mm256_storeu_ps((float *)out + BLOCK * b, lo);
            _mm256_storeu_ps((float *)out + BLOCK * b + 8, hi);
        }
    }
}
#endif

/* One scale tile: rows v[0..tile_rows) of a loaded block, n columns starting at column c0 of row r0 ->
 * the scales of its n/16 chunks (from the tile's amax), then every row's chunks quantized into out. */
static void quantize_tile(float v[][MAX_GROUP], int tile_rows, int n, int64_t r0, int64_t c0, const Job *j) {
    const int nb = n / BLOCK, fmt = j->fmt, sr = j->sr;
    const int64_t K = j->K;
    const uint32_t s0 = j->s0, s1 = j->s1;
    const CodesOut *co = j->co;
    float tile_amax[MAX_GROUP / BLOCK], encode[MAX_GROUP / BLOCK], scale[MAX_GROUP / BLOCK];
    float block_scale[MAX_GROUP / BLOCK], s_o = 1.0f;               /* the E4M3 scales, the outer scale */
    int keep[MAX_GROUP / BLOCK], have_encode = 0;
#ifdef __AVX2__
    if (nb == MAX_GROUP / BLOCK) {
        __m256i m = block_amax_bits8(v[0]);
        for (int r = 1; r < tile_rows; r++) m = _mm256_max_epi32(m, block_amax_bits8(v[r]));
        _mm256_storeu_ps(tile_amax, canon_nan8(m));
    } else
#endif
    for (int b = 0; b < nb; b++) {
        float m = 0.0f;
        for (int r = 0; r < tile_rows; r++) {
            float a = amax16(v[r] + BLOCK * b);
            m = max_keep_nan(m, a);
        }
        tile_amax[b] = m;
    }
    if (j->fos) {                    /* Four Over Six: two candidates per block (fp4.round_four_over_six) */
        float s[2][MAX_GROUP / BLOCK], sc[2][MAX_GROUP / BLOCK];
        int pick[MAX_GROUP / BLOCK];
        if (fmt == NVFP4_OUTER128) {
            float a128 = 0.0f;
            for (int b = 0; b < nb; b++) a128 = max_keep_nan(a128, tile_amax[b]);
            s_o = a128 == 0.0f ? 1.0f : a128 / FOS_AMAX_TO_SCALE;
            for (int b = 0; b < nb; b++) {
                float base = (tile_amax[b] / s_o) / E2M1_MAX;
                int zero = tile_amax[b] == 0.0f;
                s[0][b] = zero ? ZERO_BLOCK_SCALE : round_e4m3(min_keep_nan(base, E4M3_MAX));
                s[1][b] = zero ? ZERO_BLOCK_SCALE : round_e4m3(min_keep_nan(base * MAP_TO_4, E4M3_MAX));
                sc[0][b] = s_o * s[0][b];
                sc[1][b] = s_o * s[1][b];
            }
        } else {
            for (int b = 0; b < nb; b++) {
                float base = (tile_amax[b] / E2M1_MAX) * j->s_enc;
                s[0][b] = round_e4m3(min_keep_nan(base, E4M3_MAX));
                s[1][b] = round_e4m3(min_keep_nan(base * MAP_TO_4, E4M3_MAX));
                sc[0][b] = s[0][b] * j->s_dec;
                sc[1][b] = s[1][b] * j->s_dec;
            }
        }
#ifdef __AVX2__
        if (!co && tile_rows == 1 && nb == MAX_GROUP / BLOCK) {
            fos_row_fake_avx2(v[0], s, sc, j, (char *)j->out + (r0 * K + c0) * (j->out_bf16 ? 2 : 4));
            return;
        }
#endif
        fos_pick(v, tile_rows, nb, s, sc, j, pick);
        for (int b = 0; b < nb; b++) {
            block_scale[b] = s[pick[b]][b];
            scale[b] = sc[pick[b]][b];
            keep[b] = block_scale[b] != 0.0f;
        }
    } else if (fmt == NVFP4_OUTER128) {   /* double-block (with eden, EDEN's correction into s_o below) */
        float a128 = 0.0f;
        for (int b = 0; b < nb; b++) a128 = max_keep_nan(a128, tile_amax[b]);
        s_o = a128 == 0.0f ? 1.0f : a128 / AMAX_TO_SCALE;
        #pragma omp simd
        for (int b = 0; b < nb; b++) {
            float s_i = tile_amax[b] == 0.0f ? ZERO_BLOCK_SCALE
                        : round_e4m3(min_keep_nan((tile_amax[b] / s_o) / E2M1_MAX, E4M3_MAX));
            block_scale[b] = s_i;
            scale[b] = s_o * s_i;
            keep[b] = s_i != 0.0f;
        }
        if (j->eden) {               /* fp4.round_eden_128, one row of 128: c = Σz²/Σzq of the RTN codes (zero-scale
                                        blocks out) multiplies s_o; the elements still round with the plain scale */
            float enc_kept[MAX_GROUP / BLOCK], num, den;
            for (int b = 0; b < nb; b++) {
                encode[b] = min_keep_nan(1.0f / scale[b], FLT_MAX);
                enc_kept[b] = keep[b] ? encode[b] : 0.0f;
            }
            eden_group_sums(v[0], enc_kept, &num, &den);
            s_o = s_o * (den == 0.0f ? 1.0f : num / den);
            for (int b = 0; b < nb; b++) scale[b] = s_o * block_scale[b];
            have_encode = 1;
        }
    } else if (j->eden) {            /* MS-EDEN (1x16 tiles, n a multiple of 128) */
#ifdef __AVX2__
        if (!co && n == MAX_GROUP) {
            eden_row_avx2(v[0], tile_amax, r0, c0, j, (char *)j->out + (r0 * K + c0) * (j->out_bf16 ? 2 : 4));
            return;
        }
#endif
        eden_scales(v[0], n, tile_amax, r0, c0, j, encode, block_scale);
        for (int b = 0; b < nb; b++) {
            scale[b] = block_scale[b] * j->s_dec;
            keep[b] = 1;                                            /* fp4.round_eden has no zero-scale mask */
        }
        have_encode = 1;
    } else if (fmt == MXFP4) {      /* fp4.quantize_mxfp4: X = 2^(floor(log2 amax_32) - 2), an E8M0 byte */
        for (int b = 0; b < nb; b += MX_BLOCK / BLOCK) {
            float a32 = max_keep_nan(tile_amax[b], tile_amax[b + 1]);
            int32_t e = (int32_t)((float_to_bits(a32) >> 23) & 0xFF) - 127 - E2M1_MAX_POW2;
            int32_t byte = (e < -127 ? -127 : e > 127 ? 127 : e) + 127;
            float X = !isfinite(a32) ? NAN : byte == 0 ? bits_to_float(0x00400000u) : bits_to_float((uint32_t)byte << 23);
            for (int k = b; k < b + MX_BLOCK / BLOCK; k++) {
                scale[k] = X;
                keep[k] = 1;
            }
        }
    } else {
        const float enc_sixth = j->enc_sixth, s_dec = j->s_dec;
        #pragma omp simd
        for (int b = 0; b < nb; b++) {
            float s_b = round_e4m3(min_keep_nan(tile_amax[b] * enc_sixth, E4M3_MAX));
            block_scale[b] = s_b;
            scale[b] = s_b * s_dec;
            keep[b] = s_b != 0.0f;
        }
    }
    /* (MXFP4's x / X is exactly x * (1/X): X and 1/X are powers of two, 2^-127 and 2^127 included) */
    if (!have_encode) {
        #pragma omp simd
        for (int b = 0; b < nb; b++) encode[b] = min_keep_nan(1.0f / scale[b], FLT_MAX);
    }
    const int out_bf16 = j->out_bf16;
    const size_t out_size = out_bf16 ? 2 : 4;
    void *out = j->out;
#ifdef __AVX2__
    if (!co) {
        for (int r = 0; r < tile_rows; r++) {
            int64_t i = (r0 + r) * K + c0;
            char *o = (char *)out + i * out_size;
            if (sr) dequantize_row_avx2(v[r], nb, encode, scale, keep, o, out_bf16, 1, (uint32_t)i, s0, s1);
            else dequantize_row_avx2(v[r], nb, encode, scale, keep, o, out_bf16, 0, 0, 0, 0);
        }
        return;
    }
#endif
    float encE[MAX_GROUP], scaleE[MAX_GROUP], keptE[MAX_GROUP];               /* per element */
    for (int b = 0; b < nb; b++)
        for (int e = BLOCK * b; e < BLOCK * (b + 1); e++) {
            encE[e] = encode[b];
            scaleE[e] = scale[b];
            keptE[e] = keep[b] ? 1.0f : 0.0f;
        }
    for (int r = 0; r < tile_rows; r++) {
        int64_t i = (r0 + r) * K + c0;
        if (co) {                                                   /* codes, scale bytes, outer scale */
            uint8_t *codes = co->codes + i / 2;
            if (sr) encode_row(v[r], n, encE, keptE, codes, 1, (uint32_t)i, s0, s1);
            else encode_row(v[r], n, encE, keptE, codes, 0, 0, 0, 0);
            for (int b = 0; b < nb; b++) co->scales[i / BLOCK + b] = e4m3_byte(block_scale[b]);
            if (fmt == NVFP4_OUTER128) co->outer[i / OUTER] = s_o;
        } else {
            char *o = (char *)out + i * out_size;
            if (sr) dequantize_row(v[r], n, encE, scaleE, keptE, o, out_bf16, 1, (uint32_t)i, s0, s1);
            else dequantize_row(v[r], n, encE, scaleE, keptE, o, out_bf16, 0, 0, 0, 0);
        }
    }
}

/* OutControl's channels, fp4.dequantize_mxfp8(fp4.quantize_mxfp8(.)) of one row of n fp32 values (n a multiple
 * of 32), per 32-block: r = amax_32 / 448;  X = 2^(exponent field of r - 127, plus 1 if r has mantissa bits),
 * an E8M0 value (clamped to 2^-127..2^127; NaN where amax is not finite);  out = ±e4m3(min(|x * (1/X)|, 448)) * X,
 * e4m3 to nearest even. (x / X is exactly x * (1/X): both are powers of two, 2^-127 and 2^127 included.) */
static void mxfp8_row(const float *v, int n, char *o, int out_bf16) {
    for (int b = 0; b < n; b += MX_BLOCK) {
        float a = 0.0f;
#ifdef __AVX2__
        a = hmax_bits8(_mm256_max_epi32(_mm256_max_epi32(abs_bits8(v + b), abs_bits8(v + b + 8)),
                                        _mm256_max_epi32(abs_bits8(v + b + 16), abs_bits8(v + b + 24))));
#else
        for (int e = 0; e < MX_BLOCK; e++) a = max_keep_nan(a, fabsf(v[b + e]));
#endif
        uint32_t r = float_to_bits(a / E4M3_MAX);
        int32_t e8 = (int32_t)((r >> 23) & 0xFF) - 127 + ((r & 0x7FFFFFu) != 0);
        uint32_t byte = (uint32_t)((e8 < -127 ? -127 : e8 > 127 ? 127 : e8) + 127);
        float X = !isfinite(a) ? NAN : byte == 0 ? bits_to_float(0x00400000u) : bits_to_float(byte << 23);
        float inv = 1.0f / X, q[MX_BLOCK] __attribute__((aligned(32)));
#ifdef __AVX2__
        const __m256 vinv = _mm256_set1_ps(inv), vX = _mm256_set1_ps(X), sign = _mm256_set1_ps(-0.0f),
                     vmax = _mm256_set1_ps(E4M3_MAX);
        for (int e = 0; e < MX_BLOCK; e += 8) {
            __m256 t = _mm256_mul_ps(_mm256_loadu_ps(v + b + e), vinv);
            /* min(448, |t|) returns |t| where it is NaN, as min_keep_nan; the sign ORed back is copysignf */
            __m256 m = round_e4m3_8(_mm256_min_ps(vmax, _mm256_andnot_ps(sign, t)));
            _mm256_store_ps(q + e, _mm256_mul_ps(_mm256_or_ps(m, _mm256_and_ps(sign, t)), vX));
        }
        if (out_bf16) {
            store_bf16_16((uint16_t *)o + b, _mm256_load_ps(q), _mm256_load_ps(q + 8));
            store_bf16_16((uint16_t *)o + b + 16, _mm256_load_ps(q + 16), _mm256_load_ps(q + 24));
            continue;
        }
#else
        for (int e = 0; e < MX_BLOCK; e++) {
            float t = v[b + e] * inv;
            q[e] = copysignf(round_e4m3(min_keep_nan(fabsf(t), E4M3_MAX)), t) * X;
        }
        if (out_bf16) {
            for (int e = 0; e < MX_BLOCK; e++) ((uint16_t *)o)[b + e] = float_to_bf16(q[e]);
            continue;
        }
#endif
        memcpy((float *)o + b, q, sizeof q);
    }
}

/* The columns a step works on: 128 (a double-block outer block, the AVX2 paths' width), then what is left of K
 * (a multiple of the format's block, as K is): bit-neutral, as every scale's block lies within one step. */
static inline int chunk(int64_t K, int64_t c0) { return K - c0 < MAX_GROUP ? (int)(K - c0) : MAX_GROUP; }

/* Pass 1 of the per-tensor recipe: A = max |x H| (or |x|) over the whole tensor, NaN if any element is.
 * `rotated`: NULL, or an (M, K) fp32 buffer that receives x H, so that pass 2 need not rotate again. */
static float tensor_amax(const void *x, int x_bf16, int64_t row_stride, int64_t col_stride, int64_t M, int64_t K,
                         const float *H, int hsize, float *rotated) {
    const int rows = (col_stride != 1 && M % MAX_TILE_ROWS == 0) ? MAX_TILE_ROWS : 1;
    float A = 0.0f;
    int nan = 0;
    /* 128 columns per step where K allows (once 16: load_block's and rotate16's per-call work dominated; 512x2048
     * transposed per-tensor SR RHT, one thread: 5.9 -> 4.2 ms), then the rest (chunk) */
    #pragma omp parallel for schedule(static) reduction(max:A) reduction(|:nan)
    for (int64_t r0 = 0; r0 < M; r0 += rows) {
        float v[MAX_TILE_ROWS][MAX_GROUP] __attribute__((aligned(64)));
#ifdef __AVX2__
        __m256i m = _mm256_setzero_si256();
        if (!H && !x_bf16 && col_stride == 1 && K % 8 == 0) {      /* fp32 rows: read them in place */
            for (int r = 0; r < rows; r++) {
                const float *p = (const float *)x + (r0 + r) * row_stride;
                for (int64_t c = 0; c < K; c += 8) m = _mm256_max_epi32(m, abs_bits8(p + c));
            }
        } else if (H && hsize == OUTER) {     /* RHT-128: rotate from the rows (in place, or as loaded) into the buffer */
            const int direct = !x_bf16 && col_stride == 1;
            for (int64_t c0 = 0; c0 < K; c0 += OUTER) {
                if (!direct) load_block(x, x_bf16, row_stride, col_stride, r0, c0, rows, OUTER, v);
                for (int r = 0; r < rows; r++) {
                    const float *src = direct ? (const float *)x + (r0 + r) * row_stride + c0 : v[r];
                    m = rotate128_avx2(src, rotated ? rotated + (r0 + r) * K + c0 : v[r], H, m);
                }
            }
        } else {
            for (int64_t c0 = 0, G; c0 < K; c0 += G) {
                G = chunk(K, c0);
                load_block(x, x_bf16, row_stride, col_stride, r0, c0, rows, G, v);
                for (int r = 0; r < rows; r++) {
                    if (H) rotate(v[r], G, H, hsize);
                    if (rotated) memcpy(rotated + (r0 + r) * K + c0, v[r], G * sizeof(float));
                    for (int e = 0; e < G; e += 8) m = _mm256_max_epi32(m, abs_bits8(v[r] + e));
                }
            }
        }
        float a = hmax_bits8(m);
        nan |= a != a;
        A = A > a ? A : a;
#else
        for (int64_t c0 = 0, G; c0 < K; c0 += G) {
            G = chunk(K, c0);
            load_block(x, x_bf16, row_stride, col_stride, r0, c0, rows, G, v);
            for (int r = 0; r < rows; r++) {
                if (H) rotate(v[r], G, H, hsize);
                if (rotated) memcpy(rotated + (r0 + r) * K + c0, v[r], G * sizeof(float));
                for (int b = 0; b < G; b += BLOCK) {
                    float a = amax16(v[r] + b);
                    nan |= a != a;
                    A = A > a ? A : a;
                }
            }
        }
#endif
    }
    return nan ? NAN : A;
}

/* fp4.tensor_scales from the tensor's amax A: S_enc = min(2688 / A, FLT_MAX) (1 if A = 0), S_dec = 1 / S_enc;
 * MS-EDEN's S_dec = (A / 255.99) / fl(6 / 0.988125) (1 if A = 0), fp4.round_eden */
static void tensor_scales(Job *j, float A) {
    j->A = A;
    if (j->eden) {
        j->s_dec = A == 0.0f ? 1.0f : (A / EDEN_SCALE_BOUND) / EDEN_VAL_MAX;
    } else {
        float S_enc = A == 0.0f ? 1.0f : min_keep_nan((j->fos ? FOS_AMAX_TO_SCALE : AMAX_TO_SCALE) / A, FLT_MAX);
        j->s_enc = S_enc;
        j->s_dec = 1.0f / S_enc;
        j->enc_sixth = S_enc * ONE_SIXTH;
    }
}

/* ------------------------------------------------------------------------------------------------------
 * The kernels. Arguments:
 *   x, x_bf16, row_stride, col_stride   input (M, K): element (r, c) at x[r*row_stride + c*col_stride]
 *   out, out_bf16                       fake_quant's output (M, K), contiguous
 *   codes, scales, outer                quantize_nvfp4's outputs (CodesOut above), contiguous
 *   tile_rows                           1 or 16 (TR above)
 *   fmt                                 NVFP4_TENSOR, NVFP4_OUTER128 (s_o per 1x128 / 16x128), MXFP4 or MXFP8
 *   sr, s0, s1                          stochastic rounding and its two uint32 seeds
 *   H, hsize                            NULL, or the 16x16 RHT matrix (rht_operand below), row-major (hsize 16),
 *                                       or the 128 signs of RHT-128 (hsize 128); the entry points take fp4.rht's signs
 *   eden                                MS-EDEN (NVFP4_TENSOR, 1x16, K a multiple of 128; s0, s1 seed the
 *                                       scales' noise, the elements round to nearest: sr = 0)
 *   fos                                 Four Over Six's error, FOS_NONE / FOS_MAE / FOS_MSE (NVFP4, RTN)
 * The work is blocks of `rows` x chunk() columns (16 rows for 16x16 tiles and for transposed inputs, else 1), one
 * OpenMP thread per contiguous range of row blocks. */
static void run(const void *x, int x_bf16, int64_t row_stride, int64_t col_stride, void *out, int out_bf16,
                const CodesOut *co, int64_t M, int64_t K, int tile_rows, int fmt, int sr, uint32_t s0, uint32_t s1,
                const float *H, int hsize, int eden, int fos) {
    Job j = {K, out, out_bf16, co, fmt, sr, eden, fos, s0, s1, 0.0f, 0.0f, 0.0f, 0.0f};
    float *rotated = NULL;
    if (fmt == NVFP4_TENSOR) {
        rotated = H ? malloc(M * K * sizeof(float)) : NULL;     /* (NVIDIA's wgrad operands: rotate once) */
        tensor_scales(&j, tensor_amax(x, x_bf16, row_stride, col_stride, M, K, H, hsize, rotated));
        if (rotated) {                                           /* pass 2 reads x H, contiguous */
            x = rotated, x_bf16 = 0, row_stride = K, col_stride = 1, H = NULL;
        }
        if (co) co->outer[0] = j.s_dec;
    }
    const size_t out_size = out_bf16 ? 2 : 4;
    const int rows = (tile_rows == MAX_TILE_ROWS || (col_stride != 1 && M % MAX_TILE_ROWS == 0)) ? MAX_TILE_ROWS : 1;
    const int in_place = rows == 1 && !x_bf16 && col_stride == 1 && !H;
    #pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < M; r0 += rows) {
        float v[MAX_TILE_ROWS][MAX_GROUP] __attribute__((aligned(64)));
        for (int64_t c0 = 0, G; c0 < K; c0 += G) {
            G = chunk(K, c0);
            if (in_place) {          /* one fp32 row, nothing to rotate: quantize_tile reads it where it is */
                const float *row = (const float *)x + r0 * row_stride + c0;
                if (fmt == MXFP8) mxfp8_row(row, G, (char *)out + (r0 * K + c0) * out_size, out_bf16);
                else quantize_tile((float (*)[MAX_GROUP])row, 1, G, r0, c0, &j);
                continue;
            }
            load_block(x, x_bf16, row_stride, col_stride, r0, c0, rows, G, v);
            if (H)
                for (int r = 0; r < rows; r++) rotate(v[r], G, H, hsize);
            if (fmt == MXFP8)
                for (int r = 0; r < rows; r++) mxfp8_row(v[r], G, (char *)out + ((r0 + r) * K + c0) * out_size, out_bf16);
            else
                for (int t = 0; t < rows; t += tile_rows) quantize_tile(v + t, tile_rows, G, r0 + t, c0, &j);
        }
    }
    free(rotated);
}

/* fake_quant_columns' loads and stores: v[e] = x[start + to[e]] (0 from m to n), and out[to[e]] = res[e]. Scalar on
 * purpose: AVX2 gathers are microcoded on AMD; gcc's vectorized loop made a 128-column row ~390-440 ns against
 * ~320 ns (Zen 3, one thread, 512-8192 rows), intrinsics with vgatherdps ~440 ns. */
__attribute__((noinline, optimize("no-tree-vectorize")))
static void gather_row(const void *x, int x_bf16, int64_t start, const int64_t *to, int m, int n, float *v) {
    if (x_bf16) for (int e = 0; e < m; e++) v[e] = bits_to_float((uint32_t)((const uint16_t *)x)[start + to[e]] << 16);
    else for (int e = 0; e < m; e++) v[e] = ((const float *)x)[start + to[e]];
    for (int e = m; e < n; e++) v[e] = 0.0f;
}

__attribute__((noinline, optimize("no-tree-vectorize")))
static void scatter_row(const char *res, int bf16, char *out, const int64_t *to, int m) {
    if (bf16) for (int e = 0; e < m; e++) ((uint16_t *)out)[to[e]] = ((const uint16_t *)res)[e];
    else for (int e = 0; e < m; e++) ((float *)out)[to[e]] = ((const float *)res)[e];
}

/* OutControl's mixed operand (fp4.fake_quant with columns, numerics.md §8), fp4.by_columns' twin in one pass:
 * cols (K,) = the F inlier columns, then the K - F outliers. The inliers are the recipe's FP4 matrix (RTN, no
 * RHT; the per-tensor amax is theirs alone), the outliers MXFP8. Each row block's columns are gathered as they load
 * and each result written back to its own column: the gathered parts, their padding and their concatenation never
 * exist (six passes over x and six allocations in the decomposition). The inliers go in 128-column steps, the last
 * zero-padded to 128 where the reference pads to the format's block, the outliers' last step to 32 as the
 * reference's: the same bits, as every scale's block lies within one step and a zero block changes no other
 * block's scale; and 128 columns are the AVX2 paths' width (a narrower step takes Four Over Six's scalar path). */
void fake_quant_columns(const void *x, int x_bf16, int64_t row_stride, void *out, int out_bf16, int64_t M,
                        int64_t K, const int64_t *cols, int64_t F, int tile_rows, int fmt, int fos) {
    /* K = MAX_GROUP: quantize_tile writes a step's rows into res below (no SR or EDEN here: their noise indices
     * would take it for the row length) */
    Job j = {MAX_GROUP, NULL, out_bf16, NULL, fmt, 0, 0, fos, 0, 0, 0.0f, 0.0f, 0.0f, 0.0f};
    if (fmt == NVFP4_TENSOR) {                                       /* pass 1: the inliers' amax */
        float A = 0.0f;
        int nan = 0;
        #pragma omp parallel for schedule(static) reduction(max:A) reduction(|:nan)
        for (int64_t r = 0; r < M; r++)
            for (int64_t f = 0; f < F; f++) {
                float a = fabsf(load_one(x, x_bf16, r * row_stride + cols[f]));
                nan |= a != a;
                A = A > a ? A : a;
            }
        tensor_scales(&j, nan ? NAN : A);
    }
    const size_t size = out_bf16 ? 2 : 4;
    const int64_t F128 = (F + MAX_GROUP - 1) / MAX_GROUP * MAX_GROUP;
    #pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < M; r0 += tile_rows) {
        float v[MAX_TILE_ROWS][MAX_GROUP] __attribute__((aligned(64)));
        char res[MAX_TILE_ROWS * MAX_GROUP * 4] __attribute__((aligned(64)));   /* a tile's results, rows of MAX_GROUP */
        Job jt = j;
        jt.out = res;                                /* quantize_tile writes (r, e) at res + (r * MAX_GROUP + e) */
        for (int64_t c0 = 0, n; c0 < K - F + F128; c0 += n) {
            const int mx = c0 >= F128;               /* the outliers, from column F128 of the gathered view on */
            const int64_t first = mx ? F + (c0 - F128) : c0, real = mx ? K : F;   /* cols[first ..], up to cols[real) */
            n = mx ? (chunk(K, first) + MX_BLOCK - 1) / MX_BLOCK * MX_BLOCK : MAX_GROUP;   /* (zero-padded: as by_columns) */
            const int rows = mx ? 1 : tile_rows;
            const int64_t *to = cols + first;
            const int m = (int)(real - first < n ? real - first : n);                     /* (not the padding) */
            for (int rr = 0; rr < tile_rows; rr += rows) {
                for (int r = 0; r < rows; r++) gather_row(x, x_bf16, (r0 + rr + r) * row_stride, to, m, n, v[r]);
                if (mx) mxfp8_row(v[0], n, res, out_bf16);
                else quantize_tile(v, rows, n, 0, 0, &jt);
                for (int r = 0; r < rows; r++)
                    scatter_row(res + (size_t)r * MAX_GROUP * size, out_bf16, (char *)out + (r0 + rr + r) * K * size, to, m);
            }
        }
    }
}

/* The RHT operand rotate() takes, from the signs fp4.rht takes: for 16 signs the matrix H = diag(s) H16 / 4,
 * row-major, H16[i][q] = (-1)^popcount(i & q) (the Sylvester matrix fp4.sylvester builds); 128 signs as they are. */
static const float *rht_operand(const float *signs, int n_signs, float *H) {
    if (!signs || n_signs == OUTER) return signs;
    for (int i = 0; i < BLOCK; i++)
        for (int q = 0; q < BLOCK; q++)
            H[BLOCK * i + q] = signs[i] * ((__builtin_popcount(i & q) & 1) ? -0.25f : 0.25f);
    return H;
}

void fake_quant(const void *x, int x_bf16, int64_t row_stride, int64_t col_stride, void *out, int out_bf16,
                int64_t M, int64_t K, int tile_rows, int fmt, int sr, uint32_t s0, uint32_t s1, const float *signs,
                int n_signs, int eden, int fos) {
    float H[BLOCK * BLOCK];
    run(x, x_bf16, row_stride, col_stride, out, out_bf16, NULL, M, K, tile_rows, fmt, sr, s0, s1,
        rht_operand(signs, n_signs, H), n_signs, eden, fos);
}

void quantize_nvfp4(const void *x, int x_bf16, int64_t row_stride, int64_t col_stride, uint8_t *codes,
                    uint8_t *scales, float *outer, int64_t M, int64_t K, int tile_rows, int fmt, int sr, uint32_t s0,
                    uint32_t s1, const float *signs, int n_signs, int eden, int fos) {
    CodesOut co = {codes, scales, outer};
    float H[BLOCK * BLOCK];
    run(x, x_bf16, row_stride, col_stride, NULL, 0, &co, M, K, tile_rows, fmt, sr, s0, s1,
        rht_operand(signs, n_signs, H), n_signs, eden, fos);
}

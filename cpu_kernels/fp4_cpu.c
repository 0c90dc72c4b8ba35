/*
 * cpu_kernels/fp4_cpu.c: the quantizers in plain C for CPUs, the `cpu` implementation of fastpaths.py. Two entry
 * points, bit for bit the reference fp4.py (tests/test_paths.py): fake_quant (quantize, then dequantize: fp4.fake_quant, NVFP4 and
 * MXFP4) and quantize_nvfp4 (packed codes and scales: fp4.quantize_nvfp4). What they compute:
 *
 *     x (M, K), M a multiple of TR (1 or 16 rows per scale tile), K a multiple of the format's block
 *     optionally  x <- x H  per 16-chunk of a row (RHT-16, fp4.rht16), H (16, 16) fp32
 *     amax_16 = max |x| over each TR x 16 tile      (replicated on the TR rows)
 *     NVFP4, outer = "tensor":  s_b = e4m3(min(amax_16 * (S_enc * fl(1/6)), 448));  scale = s_b * S_dec
 *     NVFP4, outer = 128:       s_o = amax_128 / 2688 (1 if 0);  s_i = e4m3(min((amax_16 / s_o) / 6, 448))
 *                               (2^-9 if amax_16 = 0);  scale = s_o * s_i
 *     MXFP4:                    scale = X = 2^(floor(log2 amax_32) - 2), an E8M0 value
 *     v = x * min(1 / scale, FLT_MAX);  q = E2M1 magnitude of |v| (RTN or SR, fp4.round_e2m1_magnitude)
 *     fake_quant: out = ±q * scale (0 for a block whose scale is 0), stored as fp32 or bf16 (round to nearest
 *     even);  quantize_nvfp4: the E2M1 codes of ±q, packed, and the scale bytes
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
 * (cpu_kernels.py) forbid what would change a bit: -ffp-contract=off (no fused multiply-adds), no
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
enum { NVFP4_TENSOR = 0, NVFP4_OUTER128 = 1, MXFP4 = 2 };   /* the kernels' fmt: the recipe's format */
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
/* v[r + i][c + j] = the source's 8 consecutive values at start + j * col_stride (i, j < 8): column c + j of the
 * block, transposed into row-major v with the usual unpack / shuffle / 128-bit permute network */
static inline void load_transposed_8x8(const void *x, int x_bf16, int64_t start, int64_t col_stride,
                                       float v[][MAX_GROUP], int r, int c) {
    __m256 a[8], t[8];
    for (int j = 0; j < 8; j++) {
        int64_t i = start + j * col_stride;
        a[j] = x_bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
                            _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i))), 16))
                      : _mm256_loadu_ps((const float *)x + i);
    }
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
        _mm256_storeu_ps(&v[r + i][c], _mm256_permute2f128_ps(a[i], a[i + 4], 0x20));
        _mm256_storeu_ps(&v[r + i + 4][c], _mm256_permute2f128_ps(a[i], a[i + 4], 0x31));
    }
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
 * order i = 0..15 (fp4._rotate16's order; each product is exact, so the order fixes every bit).
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

/* ------------------------------------------------------------------------------------------------------
 * One row of a tile, n values v, given each element's encode factor, decode scale and keep flag (its
 * 16-chunk's, expanded per element so that the whole row is one vector loop: 5-9% faster than a loop per
 * chunk). `noise_index` is the flat index of v[0] in the (M, K) view; SR draws u = (pcg(pcg(i ^ s0) ^ s1) >> 8)
 * * 2^-24 for element i (fp4.uniform_noise). Inlined with `sr` a constant, so that RTN and SR each become
 * one branch-free vector loop. Two outputs: the dequantized values (fake quantization, fp32 or bf16) or the
 * packed E2M1 codes (quantize_nvfp4). */
#define E2M1_STEP(a) ((a) >= 4.0f ? 2.0f : ((a) >= 2.0f ? 1.0f : 0.5f))   /* grid spacing 2^(e-1) */

/* fp4.round_e2m1_magnitude(|v|): the E2M1 grid magnitude of scaled value v, RTN or SR with element i's noise */
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

/* codes as fp4._code_values: k = 2q for q <= 2, else min(q + 2, 7), 0 for NaN; + 8 if negative (and kept);
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
 * One scale tile: rows v[0..tile_rows) of a loaded block, n columns starting at column c0 of row r0 ->
 * the scales of its n/16 chunks (from the tile's amax), then every row's chunks quantized into out. */
static void quantize_tile(float v[][MAX_GROUP], int tile_rows, int n, int64_t r0, int64_t c0, int64_t K,
                          void *out, int out_bf16, const CodesOut *co, int fmt, float enc_sixth, float s_dec,
                          int sr, uint32_t s0, uint32_t s1) {
    const int nb = n / BLOCK;
    float tile_amax[MAX_GROUP / BLOCK], encode[MAX_GROUP / BLOCK], scale[MAX_GROUP / BLOCK];
    float block_scale[MAX_GROUP / BLOCK], s_o = 1.0f;               /* the E4M3 scales, the outer scale */
    int keep[MAX_GROUP / BLOCK];
    for (int b = 0; b < nb; b++) {
        float m = 0.0f;
        for (int r = 0; r < tile_rows; r++) {
            float a = amax16(v[r] + BLOCK * b);
            m = max_keep_nan(m, a);
        }
        tile_amax[b] = m;
    }
    if (fmt == NVFP4_OUTER128) {
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
    } else if (fmt == MXFP4) {      /* fp4._round_mxfp4: X = 2^(floor(log2 amax_32) - 2), an E8M0 byte */
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
        #pragma omp simd
        for (int b = 0; b < nb; b++) {
            float s_b = round_e4m3(min_keep_nan(tile_amax[b] * enc_sixth, E4M3_MAX));
            block_scale[b] = s_b;
            scale[b] = s_b * s_dec;
            keep[b] = s_b != 0.0f;
        }
    }
    /* (MXFP4's x / X is exactly x * (1/X): X and 1/X are powers of two, 2^-127 and 2^127 included) */
    #pragma omp simd
    for (int b = 0; b < nb; b++) encode[b] = min_keep_nan(1.0f / scale[b], FLT_MAX);
    const size_t out_size = out_bf16 ? 2 : 4;
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

/* Pass 1 of the per-tensor recipe: A = max |x H| (or |x|) over the whole tensor, NaN if any element is.
 * `rotated`: NULL, or an (M, K) fp32 buffer that receives x H, so that pass 2 need not rotate again. */
static float tensor_amax(const void *x, int x_bf16, int64_t row_stride, int64_t col_stride, int64_t M, int64_t K,
                         const float *H, float *rotated) {
    const int rows = (col_stride != 1 && M % MAX_TILE_ROWS == 0) ? MAX_TILE_ROWS : 1;
    float A = 0.0f;
    int nan = 0;
    /* 128 columns per step where K allows (was 16: load_block's and rotate16's per-call work dominated;
     * 512x2048 transposed per-tensor SR RHT, one thread: 5.9 -> 4.2 ms) */
    const int G = K % MAX_GROUP == 0 ? MAX_GROUP : BLOCK;
    #pragma omp parallel for schedule(static) reduction(max:A) reduction(|:nan)
    for (int64_t r0 = 0; r0 < M; r0 += rows) {
        float v[MAX_TILE_ROWS][MAX_GROUP] __attribute__((aligned(64)));
        for (int64_t c0 = 0; c0 < K; c0 += G) {
            load_block(x, x_bf16, row_stride, col_stride, r0, c0, rows, G, v);
            for (int r = 0; r < rows; r++) {
                if (H) rotate16(v[r], G, H);
                if (rotated) memcpy(rotated + (r0 + r) * K + c0, v[r], G * sizeof(float));
                for (int b = 0; b < G; b += BLOCK) {
                    float a = amax16(v[r] + b);
                    nan |= a != a;
                    A = A > a ? A : a;
                }
            }
        }
    }
    return nan ? NAN : A;
}

/* ------------------------------------------------------------------------------------------------------
 * The kernels. Arguments:
 *   x, x_bf16, row_stride, col_stride   input (M, K): element (r, c) at x[r*row_stride + c*col_stride]
 *   out, out_bf16                       fake_quant's output (M, K), contiguous
 *   codes, scales, outer                quantize_nvfp4's outputs (CodesOut above), contiguous
 *   tile_rows                           1 or 16 (TR above)
 *   fmt                                 NVFP4_TENSOR, NVFP4_OUTER128 (s_o per 1x128 / 16x128) or MXFP4
 *   sr, s0, s1                          stochastic rounding and its two uint32 seeds
 *   H                                   NULL, or the 16x16 RHT matrix (fp4.hadamard16), row-major
 * The work is blocks of `rows` x G elements (16 rows for 16x16 tiles and for transposed inputs, else 1), one
 * OpenMP thread per contiguous range of row blocks. */
static void run(const void *x, int x_bf16, int64_t row_stride, int64_t col_stride, void *out, int out_bf16,
                const CodesOut *co, int64_t M, int64_t K, int tile_rows, int fmt, int sr, uint32_t s0, uint32_t s1,
                const float *H) {
    float enc_sixth = 0.0f, s_dec = 0.0f, *rotated = NULL;
    if (fmt == NVFP4_TENSOR) {       /* fp4.tensor_scales: S_enc = min(2688 / A, FLT_MAX) (1 if A = 0), S_dec = 1 / S_enc */
        rotated = H ? malloc(M * K * sizeof(float)) : NULL;     /* (NVIDIA's wgrad operands: rotate once) */
        float A = tensor_amax(x, x_bf16, row_stride, col_stride, M, K, H, rotated);
        if (rotated) {                                           /* pass 2 reads x H, contiguous */
            x = rotated, x_bf16 = 0, row_stride = K, col_stride = 1, H = NULL;
        }
        float S_enc = A == 0.0f ? 1.0f : min_keep_nan(AMAX_TO_SCALE / A, FLT_MAX);
        s_dec = 1.0f / S_enc;
        enc_sixth = S_enc * ONE_SIXTH;
        if (co) co->outer[0] = s_dec;
    }
    const int G = K % MAX_GROUP == 0 ? MAX_GROUP : fmt == MXFP4 ? MX_BLOCK : BLOCK;  /* columns per step */
    const int rows = (tile_rows == MAX_TILE_ROWS || (col_stride != 1 && M % MAX_TILE_ROWS == 0)) ? MAX_TILE_ROWS : 1;
    #pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < M; r0 += rows) {
        float v[MAX_TILE_ROWS][MAX_GROUP] __attribute__((aligned(64)));
        for (int64_t c0 = 0; c0 < K; c0 += G) {
            load_block(x, x_bf16, row_stride, col_stride, r0, c0, rows, G, v);
            if (H)
                for (int r = 0; r < rows; r++) rotate16(v[r], G, H);
            for (int t = 0; t < rows; t += tile_rows)
                quantize_tile(v + t, tile_rows, G, r0 + t, c0, K, out, out_bf16, co, fmt, enc_sixth, s_dec,
                              sr, s0, s1);
        }
    }
    free(rotated);
}

void fake_quant(const void *x, int x_bf16, int64_t row_stride, int64_t col_stride, void *out, int out_bf16,
                int64_t M, int64_t K, int tile_rows, int fmt, int sr, uint32_t s0, uint32_t s1, const float *H) {
    run(x, x_bf16, row_stride, col_stride, out, out_bf16, NULL, M, K, tile_rows, fmt, sr, s0, s1, H);
}

void quantize_nvfp4(const void *x, int x_bf16, int64_t row_stride, int64_t col_stride, uint8_t *codes,
                    uint8_t *scales, float *outer, int64_t M, int64_t K, int tile_rows, int fmt, int sr, uint32_t s0,
                    uint32_t s1, const float *H) {
    CodesOut co = {codes, scales, outer};
    run(x, x_bf16, row_stride, col_stride, NULL, 0, &co, M, K, tile_rows, fmt, sr, s0, s1, H);
}

"""
kernels.py: fused Triton kernels for NVFP4 quantization, the fast twins of fp4.py (which stays the definition).

Two kernels: _nvfp4_kernel (quantize and fake-quant, below) and _fp4_gemm_kernel (a GEMM straight from the
FP4 codes, for GPUs with FP4 tensor cores; further down, with its own explanation).

Optional: fastpaths.py imports this module only for the "triton" path (fastpaths.use decides, and
requires CUDA for training); it imports fp4.py for the definitions it mirrors, and nothing else of the repo. Every kernel here must equal fp4.py bit for bit: codes, scale bytes and
dequantized values, for RTN and for SR (both draw fp4.uniform_noise, a counter-based hash of the element
index, so the same seed gives the same noise in any order). tests/test_paths.py checks this on CPU with
TRITON_INTERPRET=1 and, when a GPU is present, on the GPU; tests/test_kernels_compile.py compiles every variant to
machine code for H100 (sm_90) and B200 (sm_100) with Triton's own ptxas, which needs no GPU (the interpreter
skips compilation, so it cannot catch what only the compiler rejects).

What one launch computes (one program per 16 rows x 128 columns of the padded (Mp, Kp) fp32 input):

    x      = load the (16, 128) tile                          # 8 blocks of 16 along K per row
    x      = x H on every 16-chunk                            # optional RHT-16, fp4.rht's order
         or the row's 128-chunk rotated                       # optional RHT-128, fp4.rht's butterfly
    amax16 = max |x| over each 1x16 block (or 16x16 tile: max over the 16 rows too)
    per-tensor (numerics.md §2): A = amax|x| from a first pass; S_enc = 2688 / A; S_dec = 1 / S_enc
        s_b = e4m3(min(amax16 * (S_enc * fl(1/6)), 448));   scale = s_b * S_dec
    double-block (numerics.md §3): one 128-block per row of the tile, so a single pass:
        s_o = amax128 / 2688;  s_i = e4m3(min(amax16 / s_o / 6, 448));   scale = s_o * s_i
    Four Over Six (§10, RTN, no RHT): the same with 1536 for 2688 and two candidates per block, s6 (map to 6)
        and s4 = e4m3(1.5 x the unrounded s6); each is rounded and its error summed (_four_over_six_errors:
        column i of every 16-chunk loaded on its own, so the 16 errors add left to right; a 16x16 tile's row
        sums as a tree); the block keeps s4 iff err4 < err6, and the elements below are rounded with it
    MS-EDEN (§11, per-tensor, 1x16, 128 columns = one correction group per tile row):
        S_dec = (A / 255.99) / 6.0721;  s_b = e4m3(min(amax16 / 6.0721 / S_dec, 448)) (1 if 0);  scale = s_b * S_dec
    q      = E2M1(x * min(1 / scale, FLT_MAX))                # RTN, or SR with u = uniform_noise(seed, i)
    MS-EDEN after the elements: c = Σz² / Σz·q over the row's 128 (fp4.tree_sum's order, _tree_sum here);
        s_b = s_b * c stochastically rounded to a neighbouring E4M3 value with u = uniform_noise(seed, block);
        scale = s_b * S_dec (q itself is not rounded again)
    store    fake-quant: ±q * scale (fp32)   |   quantize: packed codes, E4M3 scale bytes, outer scale

Exactness notes (why the kernel does some things by hand):
  - divisions use tl.math.div_rn (IEEE round-to-nearest): Triton's `/` compiles to div.full.f32 on NVIDIA GPUs,
    an approximation. A division by a power of two is a multiplication by its exact reciprocal instead.
  - the kernel is compiled with enable_fp_fusion=False (EXACT), so no a*b+c becomes a fused multiply-add (Triton
    fuses by default); fp4.py rounds the product and the sum separately, as cpu_kernels/fp4_cpu.c does (-ffp-contract=off).
  - the E4M3 rounding is arithmetic (round to 3 mantissa bits / to multiples of 2^-9), not a cast: Triton's
    interpreter rounds fp32 -> float8e4nv ties away from zero and flushes subnormals, which TE does not.
  - round-half-even is (v + 2^23) - 2^23, exact for 0 <= v < 2^22 in IEEE fp32 arithmetic.
  - the RHT is fp4.rht's 16 multiply-adds in the same order (not a tl.dot, whose summation order is
    the compiler's); RHT-128 is fp4.rht's butterfly, stage by stage.
  - sums whose order fp4.py fixes are not tl.sum (the compiler's order): a tree of halves is tl.split of a
    reshape, one exact add per step (_add_halves), and the 4/6 error's left-to-right sum adds loaded columns.
"""

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:                             # a run learns this from fastpaths' probe; the script, here
    if __name__ == "__main__":
        raise SystemExit(f"error: kernels.py needs triton ({e}); pip install triton (Linux, CUDA GPU)")
    raise

import fp4

TILE_ROWS = 16          # rows per program: one 16x16 weight tile tall
TILE_COLS = 128         # columns per program: one double-block outer block wide (8 blocks of 16)
RNE_MAGIC = tl.constexpr(8388608.0)   # 2^23: (v + 2^23) - 2^23 rounds 0 <= v < 2^22 to the nearest integer,
                                      # ties to even (a constexpr: @triton.jit code reads no other globals)
RHT128_NORM = tl.constexpr(fp4.RHT128_NORM)       # fl32(2^-3.5), RHT-128's one rounding multiply
EDEN_VAL_MAX = tl.constexpr(fp4.EDEN_VAL_MAX)     # MS-EDEN's grid max 6 / 0.988125 and tensor-scale bound 255.99
EDEN_SCALE_BOUND = tl.constexpr(fp4.EDEN_SCALE_BOUND)
EXACT = dict(enable_fp_fusion=False)  # the quantizer's compile options: Triton fuses a*b+c into an FMA by default,
                                      # fp4.py rounds the product and the sum separately

# -----------------------------------------------------------------------------
# device helpers (each mirrors one function of fp4.py)


@triton.jit
def _pcg_hash(h):
    """fp4._pcg_hash: int64 holding uint32 values; every product < 2^62, masked back to 32 bits."""
    state = (h * 747796405 + 2891336453) & 0xFFFFFFFF
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & 0xFFFFFFFF
    return (word >> 22) ^ word


@triton.jit
def _round_e4m3(s):
    """fp32 s in [0, 448] (or NaN) -> the nearest E4M3 value (ties to even), as fp32: a multiple of 2^(e-3)
    for s >= 2^-6 (e = floor(log2 s), read from the bits), else of 2^-9 (E4M3 subnormals)."""
    e = ((s.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)        # 2^(e-3), exact
    inv_step = ((3 - e + 127) << 23).to(tl.float32, bitcast=True)    # 2^(3-e): s * inv_step == s / step
    return ((s * inv_step + RNE_MAGIC) - RNE_MAGIC) * step


@triton.jit
def _e4m3_byte(v):
    """An exact E4M3 value v >= 0 (fp32, or NaN) -> its byte: (e + 7) << 3 | mantissa, or the subnormal
    v / 2^-9; 0x7F for NaN."""
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    inv_pow2 = ((127 - tl.maximum(e, -6)) << 23).to(tl.float32, bitcast=True)     # 2^-e
    normal = ((e + 7) << 3) | (v * inv_pow2 * 8.0 - 8.0).to(tl.int32)
    byte = tl.where(v >= 2.0 ** -6, normal, (v * 512.0).to(tl.int32))
    return tl.where(v != v, 0x7F, byte).to(tl.uint8)


@triton.jit
def _amax(v, axis):
    """max over `axis` that returns NaN if any element is NaN, like torch.amax (tl.max may skip NaNs)."""
    has_nan = tl.max(tl.where(v != v, 1, 0), axis=axis)
    return tl.where(has_nan > 0, float("nan"), tl.max(v, axis=axis))


@triton.jit
def _min(a, b):
    """min that propagates NaN, like torch.clamp(max=)."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _round_e2m1(a, noise, SR: tl.constexpr):
    """fp4.round_e2m1: a >= 0 -> grid magnitude; RTN, or SR with `noise` (same shape)."""
    a = _min(a, 6.0)
    step = tl.where(a >= 4.0, 2.0, tl.where(a >= 2.0, 1.0, 0.5))
    x = a * tl.where(a >= 4.0, 0.5, tl.where(a >= 2.0, 1.0, 2.0))     # a / step, exactly
    if SR:
        t = tl.floor(x)
        return (t + tl.where(noise < x - t, 1.0, 0.0)) * step
    return ((x + RNE_MAGIC) - RNE_MAGIC) * step


@triton.jit
def _uniform(idx, seed_ptr):
    """fp4.uniform_noise at int64 indices idx (already masked to 32 bits): u in [0, 1) in steps of 2^-24."""
    seed0, seed1 = tl.load(seed_ptr), tl.load(seed_ptr + 1)            # read on the GPU: no host sync
    return (_pcg_hash(_pcg_hash(idx ^ seed0) ^ seed1) >> 8).to(tl.float32) * (2.0 ** -24)


@triton.jit
def _add_halves(t, R: tl.constexpr, N: tl.constexpr):
    """(R, N) -> (R, N/2): t[:, :N/2] + t[:, N/2:], one add per output (fp4.tree_sum's step; split, not tl.sum,
    whose order would be the compiler's)."""
    a, b = tl.split(tl.permute(tl.reshape(t, (R, 2, N // 2)), (0, 2, 1)))
    return a + b


@triton.jit
def _tree_sum(t, R: tl.constexpr, LOG2N: tl.constexpr):
    """fp4.tree_sum over the last dim of (R, 2^LOG2N) -> (R,): halves added until one is left."""
    for i in tl.static_range(LOG2N):                                   # unrolled: the shape halves each step
        t = _add_halves(t, R, (1 << LOG2N) >> i)
    return tl.reshape(t, (R,))


@triton.jit
def _rotate128(x, h_ptr, R: tl.constexpr):
    """fp4.rht on (R, 128): x ∘ signs, the butterfly stages h = 1, 2, ..., 64 ((a, b) = (y[j], y[j + h])
    in every 2h-block -> (a + b, a - b)), then one multiply by fp4.RHT128_NORM."""
    y = x * tl.load(h_ptr + tl.arange(0, 128))[None, :]
    for s in tl.static_range(7):                                       # unrolled: h = 2^s
        a, b = tl.split(tl.permute(tl.reshape(y, (R, 64 >> s, 2, 1 << s)), (0, 1, 3, 2)))   # (R, 64/h, h) each
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (R, 128))
    return y * RHT128_NORM


@triton.jit
def _e4m3_value(b):
    """int32 E4M3 byte 0..126 -> its value (fp32): (1 + m/8)·2^(e-7), or m·2^-9 for e = 0."""
    e, m = b >> 3, b & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    return tl.where(e == 0, m.to(tl.float32) * (2.0 ** -9), normal)


@triton.jit
def _stochastic_e4m3(t, noise):
    """fp4.stochastic_e4m3, as values: t >= 0 (or NaN) -> t where it is an E4M3 value, else its neighbour below
    or above (the nearest E4M3 value r and the one next to it), up iff noise < (t - down) ⊘ (up - down)."""
    t = _min(t, 448.0)
    r = _round_e4m3(t)
    rb = _e4m3_byte(r).to(tl.int32)
    above = r > t
    down = tl.where(above, _e4m3_value(rb - 1), r)
    up = tl.where(above, r, _e4m3_value(rb + 1))
    return tl.where(r == t, r, tl.where(noise < tl.math.div_rn(t - down, up - down), up, down))


@triton.jit
def _candidate_error(xi, encode, s, scale, A, PER_TENSOR: tl.constexpr, MSE: tl.constexpr):
    """One element column (R, NB) of a Four Over Six candidate (fp4.round_four_over_six): RTN with its E4M3 block
    scale s and decode scale -> |x̂ - x| or (x̂ - x)², x̂ = ((±e2m1 ⊗ s) ⊗ A) ⊘ 1536 (per tensor) or ±e2m1 ⊗ scale."""
    v = xi * encode
    keep = s != 0.0
    m = tl.where(keep, _round_e2m1(tl.abs(v), v, False), 0.0)
    q = tl.where((v < 0.0) & keep, -m, m)
    if PER_TENSOR:
        x_hat = tl.math.div_rn((q * s) * A, tl.full(q.shape, 1536.0, tl.float32))
    else:
        x_hat = q * scale
    diff = x_hat - xi
    if MSE:
        return diff * diff
    return tl.abs(diff)


@triton.jit
def _four_over_six_errors(x_ptr, starts, cmask, enc6, s6, scale6, enc4, s4, scale4, A, PER_TENSOR: tl.constexpr,
                          MSE: tl.constexpr, TILE16: tl.constexpr, BM: tl.constexpr, NB: tl.constexpr):
    """Both candidates' errors per block, (BM, NB): the 16 element errors of a row block added left to right
    (column i of every 16-chunk loaded on its own, i = 0..15); a 16x16 tile's 16 row sums then as a tree."""
    for i in tl.static_range(16):
        xi = tl.load(x_ptr + starts + i, mask=cmask, other=0.0).to(tl.float32)             # (BM, NB)
        d6 = _candidate_error(xi, enc6, s6, scale6, A, PER_TENSOR, MSE)
        d4 = _candidate_error(xi, enc4, s4, scale4, A, PER_TENSOR, MSE)
        if i == 0:
            err6, err4 = d6, d4
        else:
            err6, err4 = err6 + d6, err4 + d4
    if TILE16:      # rows i + i+8, then i + i+4, ...: the tree over the tile's rows, on its transpose (NB, 16)
        err6 = tl.broadcast_to(_tree_sum(tl.trans(err6), NB, 4)[None, :], (BM, NB))
        err4 = tl.broadcast_to(_tree_sum(tl.trans(err4), NB, 4)[None, :], (BM, NB))
    return err6, err4

# -----------------------------------------------------------------------------
# the kernel


@triton.jit
def _nvfp4_kernel(x_ptr, out_ptr, codes_ptr, scale_ptr, outer_ptr, amax_ptr, h_ptr, seed_ptr, M, Kp,
                  FAKE: tl.constexpr, DOUBLE_BLOCK: tl.constexpr, TILE16: tl.constexpr, SR: tl.constexpr,
                  RHT: tl.constexpr, EDEN: tl.constexpr, FOUR_OVER_SIX: tl.constexpr, BM: tl.constexpr,
                  BK: tl.constexpr):
    """RHT: 0 (none), 16 (h_ptr: H = diag(signs) H16 / 4, _rht_operand) or 128 (h_ptr: the 128 signs). FOUR_OVER_SIX: 0 (off),
    1 ("mae") or 2 ("mse"). EDEN (SR False): MS-EDEN with a per-tensor scale (1x16, its noise per block), or with
    DOUBLE_BLOCK EDEN on double-block scales (no noise at all, numerics.md §13)."""
    NB: tl.constexpr = BK // 16                                         # 16-blocks per tile row
    rows = tl.program_id(0) * BM + tl.arange(0, BM)                     # (BM,)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)                     # (BK,)
    mask = (rows[:, None] < M) & (cols[None, :] < Kp)                   # (BM, BK)
    offs = rows[:, None].to(tl.int64) * Kp + cols[None, :]
    # the first element of each 16-chunk, (BM, NB): the RHT-16 and Four Over Six load column i of every chunk
    starts = rows[:, None].to(tl.int64) * Kp + (tl.program_id(1) * BK + tl.arange(0, NB) * 16)[None, :]
    cmask = (rows[:, None] < M) & ((tl.program_id(1) * BK + tl.arange(0, NB) * 16)[None, :] < Kp)
    if RHT == 16:   # xb[r, b, j] = Σ_i x[r, 16b + i]·H[i, j], i = 0..15 in order (fp4.rht)
        xb = tl.zeros((BM, NB, 16), tl.float32)
        for i in tl.static_range(16):
            xi = tl.load(x_ptr + starts + i, mask=cmask, other=0.0).to(tl.float32)   # (BM, NB)
            hi = tl.load(h_ptr + i * 16 + tl.arange(0, 16))                        # (16,) row i of H
            if i == 0:
                xb = xi[:, :, None] * hi[None, None, :]
            else:
                xb = xb + xi[:, :, None] * hi[None, None, :]
    else:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # (BM, BK), pad reads 0
        if RHT == 128:                                                  # the tile row is one 128-chunk
            x = _rotate128(x, h_ptr, BM)
        xb = tl.reshape(x, (BM, NB, 16))
    amax16 = _amax(tl.abs(xb), 2)                                       # (BM, NB)
    if TILE16:                                                          # one amax per 16x16 tile
        amax16 = tl.broadcast_to(_amax(amax16, 0)[None, :], (BM, NB))
    if EDEN and not DOUBLE_BLOCK:                                       # numerics.md §11, A from the amax pass
        A = tl.load(amax_ptr)
        s_dec = tl.where(A == 0.0, 1.0, tl.math.div_rn(tl.math.div_rn(A, EDEN_SCALE_BOUND), EDEN_VAL_MAX))
        s_b = tl.math.div_rn(tl.math.div_rn(amax16, tl.full(amax16.shape, EDEN_VAL_MAX, tl.float32)), s_dec)
        s_b = _round_e4m3(_min(s_b, 448.0))
        block_scale = tl.where(s_b == 0.0, 1.0, s_b)                    # before the correction
        scale = block_scale * s_dec
    elif FOUR_OVER_SIX > 0:                                             # numerics.md §10: two candidates per block
        if DOUBLE_BLOCK:
            A = 0.0                                                     # (the error is on the dequantized value)
            amax128 = _amax(amax16, 1)
            s_o = tl.where(amax128 == 0.0, 1.0, tl.math.div_rn(amax128, tl.full(amax128.shape, 1536.0, tl.float32)))
            base = tl.math.div_rn(tl.math.div_rn(amax16, s_o[:, None]), tl.full(amax16.shape, 6.0, tl.float32))
            s6 = tl.where(amax16 == 0.0, 2.0 ** -9, _round_e4m3(_min(base, 448.0)))
            s4 = tl.where(amax16 == 0.0, 2.0 ** -9, _round_e4m3(_min(base * 1.5, 448.0)))
            scale6, scale4 = s_o[:, None] * s6, s_o[:, None] * s4
        else:
            A = tl.load(amax_ptr)
            s_enc = tl.where(A == 0.0, 1.0, _min(tl.math.div_rn(1536.0, A), 3.4028234663852886e38))
            s_dec = tl.math.div_rn(1.0, s_enc)
            base = tl.math.div_rn(amax16, tl.full(amax16.shape, 6.0, tl.float32)) * s_enc
            s6, s4 = _round_e4m3(_min(base, 448.0)), _round_e4m3(_min(base * 1.5, 448.0))
            scale6, scale4 = s6 * s_dec, s4 * s_dec
        enc6 = _min(tl.math.div_rn(tl.full(scale6.shape, 1.0, tl.float32), scale6), 3.4028234663852886e38)
        enc4 = _min(tl.math.div_rn(tl.full(scale4.shape, 1.0, tl.float32), scale4), 3.4028234663852886e38)
        err6, err4 = _four_over_six_errors(x_ptr, starts, cmask, enc6, s6, scale6, enc4, s4, scale4, A,
                                           not DOUBLE_BLOCK, FOUR_OVER_SIX == 2, TILE16, BM, NB)
        pick4 = err4 < err6                                             # a tie keeps map-to-6
        block_scale = tl.where(pick4, s4, s6)
        scale = tl.where(pick4, scale4, scale6)                         # the elements below: the chosen rounding
    elif DOUBLE_BLOCK:                                                  # numerics.md §3
        amax128 = _amax(amax16, 1)                                      # (BM,)
        s_o = tl.where(amax128 == 0.0, 1.0, tl.math.div_rn(amax128, tl.full(amax128.shape, 2688.0, tl.float32)))
        s_i = tl.math.div_rn(tl.math.div_rn(amax16, s_o[:, None]), tl.full(amax16.shape, 6.0, tl.float32))
        s_i = tl.where(amax16 == 0.0, 2.0 ** -9, _round_e4m3(_min(s_i, 448.0)))
        block_scale = s_i
        scale = s_o[:, None] * s_i                                      # (BM, NB)
    else:                                                               # numerics.md §2, A from the amax pass
        A = tl.load(amax_ptr)
        s_enc = tl.where(A == 0.0, 1.0, _min(tl.math.div_rn(2688.0, A), 3.4028234663852886e38))
        s_dec = tl.math.div_rn(1.0, s_enc)
        block_scale = _round_e4m3(_min(amax16 * (s_enc * 0.1666666716337204), 448.0))
        scale = block_scale * s_dec
    encode = _min(tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale), 3.4028234663852886e38)
    v = xb * encode[:, :, None]                                         # (BM, NB, 16)
    if SR:
        u = _uniform(tl.reshape(offs & 0xFFFFFFFF, (BM, NB, 16)), seed_ptr)
    else:
        u = v
    q = _round_e2m1(tl.abs(v), u, SR)
    keep = (block_scale != 0.0)[:, :, None]                             # (always true for MS-EDEN: s_b >= 2^-9)
    q = tl.where(keep, q, 0.0)
    negative = (v < 0.0) & keep
    scols = tl.program_id(1) * NB + tl.arange(0, NB)                    # this tile's block-scale columns
    if EDEN:   # c = Σz² ⊘ Σz·q over the row's 128-group (tree order, zero-scale blocks out: fp4.eden_correction)
        z = tl.where(keep, v, 0.0)
        zq = tl.where(negative, -q, q) * z
        num, den = _tree_sum(tl.reshape(z * z, (BM, BK)), BM, 7), _tree_sum(tl.reshape(zq, (BM, BK)), BM, 7)
        c = tl.where(den == 0.0, 1.0, tl.math.div_rn(num, den))         # (BM,)
        if DOUBLE_BLOCK:    # §13: RTN's codes and s_i kept, c exact in the fp32 outer scale s_o ⊗ c
            s_o = s_o * c
            scale = s_o[:, None] * block_scale
        else:               # §11: s_b ⊗ c rounded stochastically to E4M3, one uniform per 16-block
            ub = _uniform((rows[:, None].to(tl.int64) * (Kp // 16) + scols[None, :]) & 0xFFFFFFFF, seed_ptr)
            block_scale = _stochastic_e4m3(block_scale * c[:, None], ub)
            scale = block_scale * s_dec
    if FAKE:
        x_dq = q * scale[:, :, None]
        tl.store(out_ptr + offs, tl.reshape(tl.where(negative, -x_dq, x_dq), (BM, BK)), mask=mask)
    else:                                                               # codes, two per byte, low nibble first
        k = tl.where(q <= 2.0, q * 2.0, _min(q + 2.0, 7.0))             # NaN stays NaN, so code 0 as in fp4.py
        k = tl.where(k != k, 0.0, k) + tl.where(negative, 8.0, 0.0)
        lo, hi = tl.split(tl.reshape(k.to(tl.int32), (BM, BK // 2, 2)))
        pcols = tl.program_id(1) * (BK // 2) + tl.arange(0, BK // 2)
        tl.store(codes_ptr + rows[:, None].to(tl.int64) * (Kp // 2) + pcols[None, :], (lo | (hi << 4)).to(tl.uint8),
                 mask=(rows[:, None] < M) & (pcols[None, :] < Kp // 2))
        tl.store(scale_ptr + rows[:, None].to(tl.int64) * (Kp // 16) + scols[None, :], _e4m3_byte(block_scale),
                 mask=(rows[:, None] < M) & (scols[None, :] < Kp // 16))
        if DOUBLE_BLOCK:
            tl.store(outer_ptr + rows.to(tl.int64) * (Kp // 128) + tl.program_id(1), s_o, mask=rows < M)



@triton.jit
def _mxfp8_kernel(x_ptr, out_ptr, M, Kp, BM: tl.constexpr, BK: tl.constexpr):
    """OutControl's channels, fp4.dequantize_mxfp8(fp4.quantize_mxfp8(x)) on a (BM, BK) tile, per 32-block:
    r = amax ⊘ 448, X = 2^(exponent of r, + 1 if r has mantissa bits) in [2^-127, 2^127] (NaN where amax is not
    finite), x_dq = ±e4m3(min(|x ⊗ (1 ⊘ X)|, 448)) ⊗ X (x ⊘ X exactly: X and 1 ⊘ X are powers of two)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rows[:, None] < M) & (cols[None, :] < Kp)
    offs = rows[:, None].to(tl.int64) * Kp + cols[None, :]
    xb = tl.reshape(tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32), (BM, BK // 32, 32))
    amax = _amax(tl.abs(xb), 2)                                         # (BM, BK/32)
    r = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)).to(tl.int32, bitcast=True)
    e = ((r >> 23) & 0xFF) - 127 + tl.where((r & 0x7FFFFF) != 0, 1, 0)
    byte = tl.minimum(tl.maximum(e, -127), 127) + 127
    X = tl.where(byte == 0, 2.0 ** -127, (byte << 23).to(tl.float32, bitcast=True))
    X = tl.where(amax < float("inf"), X, float("nan"))
    t = xb * tl.math.div_rn(tl.full(X.shape, 1.0, tl.float32), X)[:, :, None]
    m = _round_e4m3(_min(tl.abs(t), 448.0))
    x_dq = tl.where(t.to(tl.int32, bitcast=True) < 0, -m, m) * X[:, :, None]   # the sign bit: -0.0 stays -0.0
    tl.store(out_ptr + offs, tl.reshape(x_dq, (BM, BK)), mask=mask)

# -----------------------------------------------------------------------------
# wrappers: check, allocate, launch


def _abs_max(t):
    """max |t| as a 0-dim fp32, NaN if t has one, in one read of t: max(-min t, max t) from torch.aminmax.
    (t.abs().amax() writes |t| out and reads it back: three passes over memory, 12x slower on a 4096² CPU tensor.)"""
    lo, hi = torch.aminmax(t)
    return torch.maximum(-lo, hi).float()


def _on(device):
    """Triton launches on the current CUDA device, not the tensors': make it theirs (cuda:1 under cuda:0)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _rht_operand(signs, device):
    """fp4.rht's signs -> what the kernel reads: H = diag(s) · H16 / 4 (16, 16) for RHT-16, the 128 signs for RHT-128."""
    signs = signs.to(device).float()
    return (signs[:, None] * (0.25 * fp4.sylvester(16, device)) if len(signs) == 16 else signs).contiguous()


def _launch(x2, outer, tile, seed, signs, fake, eden=False, four_over_six=None):
    tile, (M, Kp) = tuple(tile), x2.shape
    rht = 0 if signs is None else len(signs)
    block = fp4.OUTER_BLOCK if outer == fp4.OUTER_BLOCK or eden or rht == fp4.OUTER_BLOCK else fp4.NVFP4_BLOCK
    assert x2.dim() == 2 and Kp % block == 0 and M % tile[0] == 0, f"kernels: {tuple(x2.shape)} is not padded (fp4.pad_2d)"
    x2 = x2.contiguous()                             # bf16 stays bf16: the kernel upcasts as it loads
    dev = x2.device
    h = None if signs is None else _rht_operand(signs, dev)                    # H = diag(s) H16 / 4, or the 128 signs
    amax = torch.zeros((), device=dev)
    if outer == "tensor":
        amax = _abs_max(fp4.rht(x2, signs) if signs is not None else x2)               # the amax pass
    out = torch.empty(x2.shape, device=dev) if fake else torch.empty(0, device=dev)
    codes = torch.empty(M, Kp // 2, dtype=torch.uint8, device=dev)
    scales = torch.empty(M, Kp // 16, dtype=torch.uint8, device=dev)
    outer_scale = torch.empty(M, Kp // 128 if outer == fp4.OUTER_BLOCK else 0, device=dev)
    grid = (triton.cdiv(M, TILE_ROWS), triton.cdiv(Kp, TILE_COLS))
    with _on(dev):
        _nvfp4_kernel[grid](x2, out, codes, scales, outer_scale, amax, h if h is not None else amax,
                            seed.to(dev) if seed is not None else amax, M, Kp,         # (amax: unread placeholders)
                            FAKE=fake, DOUBLE_BLOCK=outer == fp4.OUTER_BLOCK, TILE16=tile == (16, 16),
                            SR=seed is not None and not eden, RHT=rht, EDEN=eden,
                            FOUR_OVER_SIX={None: 0, "mae": 1, "mse": 2}[four_over_six],
                            BM=TILE_ROWS, BK=TILE_COLS, **EXACT)
    if fake:
        return out
    if outer == "tensor":                                                 # S_dec, as the kernel computed it
        if eden:
            outer_scale = torch.where(amax == 0, 1.0, fp4._div(fp4._div(amax, fp4.EDEN_SCALE_BOUND), fp4.EDEN_VAL_MAX))
        else:
            outer_scale = fp4.tensor_scales(amax, fp4.NVFP4_AMAX_TO_SCALE if four_over_six is None
                                            else fp4.FOUR_OVER_SIX_AMAX_TO_SCALE)[1]
    return codes, scales.view(torch.float8_e4m3fn), outer_scale


def quantize_nvfp4(x2, outer="tensor", tile=(1, 16), seed=None, signs=None, eden=False, four_over_six=None):
    """fp32 (Mp, Kp), padded as fp4.quantize_nvfp4 pads -> (codes uint8 (Mp, Kp/2), block_scale e4m3
    (Mp, Kp/16), outer_scale: 0-dim S_dec or (Mp, Kp/128) s_o). seed: None (RTN) or fp4.draw_seed's (2,)
    int64 (SR, or MS-EDEN's scale noise with eden=True). signs: None, or 16 or 128 ±1 to quantize rht(x2)
    instead (fused RHT-16 / RHT-128). eden: fp4 rounding "eden" (MS-EDEN; EDEN on double-block with
    outer=128). four_over_six: None, "mae", "mse"."""
    return _launch(x2, outer, tile, seed, signs, False, eden, four_over_six)


def fake_quant_nvfp4(x2, outer="tensor", tile=(1, 16), seed=None, signs=None, eden=False, four_over_six=None):
    """(Mp, Kp) float -> fp32 (Mp, Kp): dequantize(quantize(x2)) in one pass (two with a per-tensor scale);
    fp4.reference_kernel's twin. Arguments as quantize_nvfp4."""
    return _launch(x2, outer, tile, seed, signs, True, eden, four_over_six)


def fake_quant(x2, fmt, outer, tile, rounding, seed, rht_signs=None, four_over_six=None, dtype=None, columns=None):
    """fp4.KERNEL on CUDA (NVFP4, and OutControl's MXFP8; fastpaths' probe refuses mxfp4 recipes) -> fp32 (Mp, Kp)."""
    if columns is not None:                                  # OutControl's split: the definition, on these kernels
        return fp4.by_columns(fake_quant, x2, fmt, outer, tile, four_over_six, dtype, columns)
    if fmt == "mxfp8":
        assert x2.dim() == 2 and x2.shape[1] % fp4.MX_BLOCK == 0, f"kernels: {tuple(x2.shape)} is not padded (fp4.pad_2d)"
        (M, Kp), x2 = x2.shape, x2.contiguous()
        out = torch.empty(x2.shape, device=x2.device)
        with _on(x2.device):
            _mxfp8_kernel[(triton.cdiv(M, TILE_ROWS), triton.cdiv(Kp, fp4.MX_BLOCK))](
                x2, out, M, Kp, BM=TILE_ROWS, BK=fp4.MX_BLOCK, **EXACT)
        return out
    assert fmt == "nvfp4", "kernels.py has NVFP4 and MXFP8 kernels only"
    return _launch(x2, outer, tile, seed if rounding != "nearest" else None, rht_signs, True, rounding == "eden",
                   four_over_six)

# -----------------------------------------------------------------------------
# The FP4 GEMM: C = dequantize(A) dequantize(B)ᵀ straight from the codes, on tensor cores that multiply
# block-scaled FP4 (Blackwell, compute capability >= 10: tcgen05 mma with E4M3 scales per 16 or E8M0 per 32).
#
#     for each (BM, BN) tile of C:                                    # A (M, K) and B (N, K), both packed along K
#         acc = 0
#         for each 128-wide K chunk c:                                # 128 = one double-block outer block
#             part = dot_scaled(codes_A[:, c], s_A[:, c], codes_B[:, c]ᵀ, s_B[:, c])   # Σ_k (a·s_a)(b·s_b), fp32
#             acc += part                   if the outer scale is per tensor (applied once at the end), or
#             acc += part · s_o,A[:, c] s_o,B[:, c]ᵀ     per-128 outer scales (TetraJet-v2 double-block, numerics.md §3)
#         C = acc · S_dec,A · S_dec,B       (per-tensor outer scales: the epilogue)
#
# Why a Triton kernel rather than torch._scaled_mm: _scaled_mm applies one scale per operand in its epilogue,
# which is enough for NVIDIA's per-tensor recipe but not for TetraJet-v2's fp32 scale per (row, 128-chunk):
# that scale changes along K, so it has to multiply each chunk's partial sum inside the K loop, as here.
# The products are exact and accumulate in fp32, so C differs from the simulated GEMM (dequantize, round to
# bf16, bf16 matmul) only by summation order and that bf16 rounding: it is the more accurate of the two.
# This is a plain pointer-based kernel (no TMA, no preshuffled scale layout as in Triton's tutorial 10):
# correct everywhere tl.dot_scaled runs, fast only where it maps to FP4 tensor cores.

GEMM_BM, GEMM_BN = 128, 128     # output tile per program
GEMM_BK = 128                   # K per step: one outer block, so a per-128 outer scale is constant within it


@triton.jit
def _fp4_gemm_kernel(a_ptr, sa_ptr, oa_ptr, b_ptr, sb_ptr, ob_ptr, c_ptr, M, N, Kp,
                     GROUP: tl.constexpr, OUTER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr):
    """OUTER: 0 none (MX), 1 per-tensor (0-dim oa, ob), 2 per-128 ((M, Kp/128), (N, Kp/128))."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)                      # (BM,) rows of A and C
    rn = tl.program_id(1) * BN + tl.arange(0, BN)                      # (BN,) rows of B, columns of C
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, Kp, BK):
        kc = k0 // 2 + tl.arange(0, BK // 2)                            # packed bytes of this chunk
        ks = k0 // GROUP + tl.arange(0, BK // GROUP)                    # its block scales
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * (Kp // 2) + kc[None, :],
                    mask=(rm[:, None] < M) & (kc[None, :] < Kp // 2), other=0)              # (BM, BK/2) uint8
        b = tl.load(b_ptr + rn[:, None].to(tl.int64) * (Kp // 2) + kc[None, :],
                    mask=(rn[:, None] < N) & (kc[None, :] < Kp // 2), other=0)              # (BN, BK/2)
        sa = tl.load(sa_ptr + rm[:, None].to(tl.int64) * (Kp // GROUP) + ks[None, :],
                     mask=(rm[:, None] < M) & (ks[None, :] < Kp // GROUP), other=0.0)         # (BM, BK/GROUP)
        sb = tl.load(sb_ptr + rn[:, None].to(tl.int64) * (Kp // GROUP) + ks[None, :],
                     mask=(rn[:, None] < N) & (ks[None, :] < Kp // GROUP), other=0.0)         # (BN, BK/GROUP)
        part = tl.dot_scaled(a, sa, "e2m1", tl.trans(b), sb, "e2m1")   # (BM, BN) fp32; codes 0 pad the tail
        if OUTER == 2:
            oa = tl.load(oa_ptr + rm.to(tl.int64) * (Kp // 128) + k0 // 128, mask=rm < M, other=0.0)
            ob = tl.load(ob_ptr + rn.to(tl.int64) * (Kp // 128) + k0 // 128, mask=rn < N, other=0.0)
            acc += part * (oa[:, None] * ob[None, :])
        else:
            acc += part
    if OUTER == 1:
        acc = acc * (tl.load(oa_ptr) * tl.load(ob_ptr))
    tl.store(c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def fp4_gemm_supported(device):
    """True where tl.dot_scaled runs on FP4 tensor cores: CUDA compute capability >= 10 (Blackwell)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 10


def _fp4_gemm(a_codes, a_scale, a_outer, b_codes, b_scale, b_outer):
    """The launch, format-agnostic: codes uint8 (M, Kp/2) and (N, Kp/2); scales (rows, Kp/group) as
    float8_e4m3fn (group 16) or E8M0 bytes as uint8 (group 32); outers None, 0-dim fp32 each, or
    (rows, Kp/128) fp32 each -> fp32 (M, N)."""
    (M, half), (N, half_b) = a_codes.shape, b_codes.shape
    if half != half_b or a_scale.shape[1] != b_scale.shape[1] or a_scale.dtype != b_scale.dtype:
        raise ValueError(f"fp4_gemm: A and B must share K and the scale format, got codes {tuple(a_codes.shape)} "
                         f"and {tuple(b_codes.shape)}, scales {tuple(a_scale.shape)} {a_scale.dtype} and "
                         f"{tuple(b_scale.shape)} {b_scale.dtype}")
    Kp = 2 * half
    group = Kp // a_scale.shape[1]
    outer = 0 if a_outer is None else 1 if a_outer.dim() == 0 else 2
    if outer == 2 and (Kp % GEMM_BK or a_outer.shape != (M, Kp // 128) or b_outer.shape != (N, Kp // 128)):
        raise ValueError(f"fp4_gemm: per-128 outer scales need K padded to 128 and shapes (M, K/128), (N, K/128); "
                         f"got K {Kp}, {tuple(a_outer.shape)} and {tuple(b_outer.shape)}")
    c = torch.empty(M, N, device=a_codes.device)
    oa, ob = (c, c) if outer == 0 else (a_outer.contiguous(), b_outer.contiguous())   # (c: unread placeholder)
    grid = (triton.cdiv(M, GEMM_BM), triton.cdiv(N, GEMM_BN))
    with _on(c.device):
        _fp4_gemm_kernel[grid](a_codes.contiguous(), a_scale.contiguous(), oa, b_codes.contiguous(),
                               b_scale.contiguous(), ob, c, M, N, Kp, GROUP=group, OUTER=outer, BM=GEMM_BM,
                               BN=GEMM_BN, BK=GEMM_BK, enable_fp_fusion=True)   # FMA: not bit-exact anyway
    return c


def fp4_gemm(a, b):
    """a (M, K), b (N, K): two fp4.NVFP4 tuples with the same outer-scale kind, or two MXFP4 fp4.MX tuples,
    quantized along K -> fp32 (M, N) = dequantize(a) @ dequantize(b)ᵀ, computed from the codes by
    tl.dot_scaled. Rows are as stored (a 16x16-tiled weight keeps its padding rows: crop the result)."""
    if isinstance(a, fp4.NVFP4) and isinstance(b, fp4.NVFP4):
        if a.outer_scale.dim() != b.outer_scale.dim():
            raise ValueError("fp4_gemm: A and B must both have per-tensor or both per-128 outer scales")
        return _fp4_gemm(a.codes, a.block_scale, a.outer_scale, b.codes, b.block_scale, b.outer_scale)
    if isinstance(a, fp4.MX) and isinstance(b, fp4.MX) and a.codes.dtype == b.codes.dtype == torch.uint8:
        return _fp4_gemm(a.codes, a.scale.view(torch.uint8), None, b.codes, b.scale.view(torch.uint8), None)
    raise ValueError(f"fp4_gemm: needs two NVFP4 or two MXFP4 tuples, got {type(a).__name__} and {type(b).__name__}")

# -----------------------------------------------------------------------------
# validate, then benchmark:  python kernels.py   (on a GPU; TRITON_INTERPRET=1 python kernels.py on a CPU)


def main(argv=None):
    """python kernels.py: every kernel against fp4.py (codes, scale bytes, dequantized values), then on CUDA timings."""
    import argparse
    import os
    import sys
    import time
    p = argparse.ArgumentParser(prog="kernels.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="python kernels.py checks every kernel bit for bit against fp4.py, then times "
                                "them, on a CUDA GPU;\nwithout one, TRITON_INTERPRET=1 python kernels.py runs the "
                                "checks in Triton's interpreter on the CPU\n(slowly, on small tensors, no timings).")
    p.error = lambda message: sys.exit(f"error: {message} (see python kernels.py --help)")
    p.parse_args(argv)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":   # Triton launches need a GPU
        sys.exit("error: kernels.py runs its Triton kernels on a CUDA GPU, and this torch sees none; check them here in "
                 "Triton's interpreter instead (slow, no timings): TRITON_INTERPRET=1 python kernels.py")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (4096, 4096) if device == "cuda" else (64, 256)
    x = torch.randn(shape, device=device)
    seed = fp4.draw_seed(torch.Generator(device).manual_seed(0), device)
    for outer in ("tensor", 128):
        for tile in ((1, 16), (16, 16)):
            for s in (None, seed):
                rounding = "nearest" if s is None else "stochastic"
                ref = fp4.quantize_nvfp4(x, outer=outer, tile=tile, rounding=rounding,
                                         generator=torch.Generator(device).manual_seed(0))
                got = quantize_nvfp4(x, outer, tile, s)                          # the same seed as draw_seed above
                same = (torch.equal(got[0], ref.codes) and torch.equal(got[1].view(torch.uint8),
                        ref.block_scale.view(torch.uint8)) and torch.equal(got[2], ref.outer_scale))
                same_dq = torch.equal(fake_quant_nvfp4(x, outer, tile, s), fp4.reference_kernel(x, "nvfp4", outer, tile, rounding, s))
                print(f"outer={outer!s:6s} tile={tile} {rounding:10s} codes/scales equal: {same}, fake-quant equal: {same_dq}")
    signs128 = fp4.random_signs(torch.Generator().manual_seed(0), n=128).to(device)
    for name, outer, tile, rounding, signs, fos in (("4/6 mae", "tensor", (1, 16), "nearest", None, "mae"),
                                                     ("4/6 mse 16x16", 128, (16, 16), "nearest", None, "mse"),
                                                     ("MS-EDEN RHT-128", "tensor", (1, 16), "eden", signs128, None),
                                                     ("EDEN-128 RHT-128", 128, (1, 16), "eden", signs128, None),
                                                     ("SR RHT-128", 128, (1, 16), "stochastic", signs128, None)):
        ref = fp4.quantize_nvfp4(x, outer=outer, tile=tile, rounding=rounding, rht_signs=signs, four_over_six=fos,
                                 generator=torch.Generator(device).manual_seed(0))
        got = quantize_nvfp4(x, outer, tile, seed if rounding != "nearest" else None, signs, rounding == "eden", fos)
        same = (torch.equal(got[0], ref.codes) and torch.equal(got[1].view(torch.uint8),
                ref.block_scale.view(torch.uint8)) and torch.equal(got[2], ref.outer_scale))
        print(f"{name:16s} outer={outer!s:6s} tile={tile} codes/scales equal: {same}")
    qa, qb = fp4.quantize_mxfp4(x[:256]), fp4.quantize_mxfp4(x[-128:])     # the GEMM: MXFP4 runs everywhere,
    ref = fp4.dequantize(qa)[:, :shape[1]] @ fp4.dequantize(qb)[:, :shape[1]].t()    # NVFP4 only on FP4 tensor cores
    print(f"fp4_gemm mxfp4 max |error| / max |C|: {((fp4_gemm(qa, qb) - ref).abs().max() / ref.abs().max()).item():.1e}")
    if fp4_gemm_supported(device):
        for outer in ("tensor", 128):
            qa, qb = fp4.quantize_nvfp4(x[:256], outer=outer), fp4.quantize_nvfp4(x[-128:], outer=outer)
            ref = fp4.dequantize(qa)[:, :shape[1]] @ fp4.dequantize(qb)[:, :shape[1]].t()
            err = ((fp4_gemm(qa, qb) - ref).abs().max() / ref.abs().max()).item()
            print(f"fp4_gemm nvfp4 outer={outer!s:6s} max |error| / max |C|: {err:.1e}")
    if device == "cuda":
        def ms(fn, n=20):
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / n * 1e3
        n = x.numel()
        copy = ms(x.clone)
        print(f"copy: {copy:.3f} ms = {n * 8 / copy / 1e6:.0f} GB/s")
        for name, fn, nbytes in (("quantize per-tensor", lambda: quantize_nvfp4(x), n * 4.5625),
                                 ("quantize double-block", lambda: quantize_nvfp4(x, 128), n * 4.5625),
                                 ("quantize double-block SR", lambda: quantize_nvfp4(x, 128, seed=seed), n * 4.5625),
                                 ("fake-quant double-block", lambda: fake_quant_nvfp4(x, 128), n * 8),
                                 ("quantize per-tensor 4/6", lambda: quantize_nvfp4(x, four_over_six="mae"), n * 4.5625),
                                 ("quantize MS-EDEN RHT-128", lambda: quantize_nvfp4(x, seed=seed, signs=signs128, eden=True),
                                  n * 4.5625),
                                 ("quantize EDEN-128 RHT-128", lambda: quantize_nvfp4(x, 128, signs=signs128, eden=True),
                                  n * 4.5625)):
            t = ms(fn)
            print(f"{name:28s} {t:.3f} ms  {nbytes / t / 1e6:6.0f} GB/s  ({nbytes / t / (n * 8 / copy):.0%} of copy)")
        if fp4_gemm_supported(device):                                   # 4096^3 GEMM: FP4 codes vs bf16
            xb = x.bfloat16()
            t_bf16 = ms(lambda: xb @ xb.t())
            for outer in ("tensor", 128):
                q = fp4.NVFP4(*quantize_nvfp4(x, outer))
                t = ms(lambda: fp4_gemm(q, q))
                print(f"fp4_gemm outer={outer!s:6s} {t:.3f} ms = {2 * shape[0] ** 3 / t / 1e9:.0f} TFLOP/s "
                      f"(bf16 matmul {t_bf16:.3f} ms)")


if __name__ == "__main__":
    main()

"""
fp4.py: 4-bit (NVFP4 / MXFP4) training numerics in plain PyTorch, read top to bottom as a lesson.

Every number here is defined in docs/numerics.md ("§n" below) with its sources: NVIDIA (arXiv 2509.25149 and
Transformer Engine), TetraJet-v2 (arXiv 2510.27527), Four Over Six (2512.02010), Quartet II (2601.22813). This file
is the reference: the C and Triton kernels that fastpaths.py swaps in through the KERNEL hook must give its bits.

The format
----------
An FP4 number is E2M1: 1 sign bit, 2 exponent bits, 1 mantissa bit. Its eight magnitudes are

    code k:     0    1    2    3    4    5    6    7
    value:      0   0.5   1   1.5   2    3    4    6          (code | 8 = the negative twin)

so a normal value has two significant bits (1.5 = 1.1 in binary), over a range of 12x: it needs a scale per block.
  NVFP4  blocks of 16 along the GEMM's reduction dim K, each with an E4M3 (fp8, max 448) scale, on top of an
         fp32 outer scale: one per tensor (NVIDIA, §2) or one per 1x128 block ("double-block", TetraJet-v2, §3).
  MXFP4  blocks of 32, each with an E8M0 (pure power of two) scale, no outer scale (OCP MX v1.0, §4).

A value decodes as x_dq = e2m1(code) * block_scale * outer_scale. Per-tensor NVFP4 of a tensor with amax A = 12:

    S_enc = 2688 / 12 = 224, S_dec = 1/224        (the tensor's amax will map to e2m1 6 x e4m3 448)
    s_b   = e4m3(3 * 224 / 6) = e4m3(112) = 112    (the E4M3 scale of a block with amax 3)
    x = 1.3 in that block encodes as 1.3 * 224 / 112 = 2.6 -> nearest grid value 3 (code 5), and decodes
    as 3 * 112 / 224 = 1.5: a 15% error, typical of two significant bits (SQNR ~20 dB on Gaussian data).
    With a per-tensor scale a block far below the tensor's amax gets a coarse (E4M3 subnormal) or zero
    scale; a per-128 outer scale makes that far rarer (a block ≳ 30,000x below its own 128-block's max).

Rounding is to nearest even (RTN, forward) or stochastic (SR, gradients: E[q] = x, bar a ≈1% bias at the clamp, §2).

The three GEMMs of a Linear (§6)
--------------------------------
    fprop  Y  = X  Wᵀ     X (N tokens, in), W (out, in)   reduces over in
    dgrad  dX = dY W      dY (N, out)                     reduces over out
    wgrad  dW = dYᵀ X                                     reduces over N (tokens)

Each GEMM quantizes its operands afresh, along its own K. We simulate ("fake-quant"): quantize and dequantize in
fp32, then multiply in the activation dtype as the baseline does (FP4 hardware: kernels.fp4_gemm). Recipes:
  - nvidia:   per-tensor scale; W in 16x16 tiles so Q(Wᵀ) = Q(W)ᵀ; SR on dY; a fixed RHT on wgrad.
  - tetrajet: double-block; backward from the forward's X̂, Ŵ ("aligned"), all SR after a fresh random RHT-16.
  - quartet2: per-tensor, Four Over Six in the forward; aligned backward, all MS-EDEN after a fresh RHT-128.
  - tetrajet-eden (ours): tetrajet's forward; aligned backward, EDEN on double-block scales after a fresh RHT-128.
  - mxfp4:    the OCP MX baseline, SR on dY.
What stays high precision in every recipe: master weights, embeddings, LM head, norms, attention, loss.

Layout: E2M1 -> a minimal NVFP4 on one screen -> NVFP4 in full -> Four Over Six -> MS-EDEN -> MXFP4/MXFP8 -> the
RHT -> recipes -> fake_quant and its kernel hook -> the FP4 linear -> TetraJet-v2's OsciReset and OutControl ->
exactness tricks. Left out: packing beyond nibbles, swizzled scale layouts, tensor subclasses, TP/FSDP.
"""

import math
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn as nn

# -----------------------------------------------------------------------------
# E2M1 elements (§1)
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
F4_E2M1_MAX = 6.0                      # the largest magnitude


def round_e2m1(a, noise=None):
    """fp32 a >= 0 (any shape) -> the E2M1 grid magnitude (fp32) min(a, 6) rounds to; NaN stays NaN. noise: None
    (to nearest even) or uniforms on [0, 1) of a's shape (stochastic). The spacing 2^(e-1) is 0.5 on [1, 2) (the
    subnormals 0, 0.5 share it), 1 on [2, 4), 2 on [4, 6], so x = a / 2^(e-1) is exact, the grid its integers:
        nearest:    q = round(x) · 2^(e-1)                        (torch.round ties to even = the even code)
        stochastic: q = (floor(x) + [u < x - floor(x)]) · 2^(e-1)  (P(up) is exactly the fraction: E[q] = a)"""
    a = a.clamp(max=F4_E2M1_MAX)
    inv_step = torch.where(a >= 4.0, 0.5, torch.where(a >= 2.0, 1.0, 2.0))   # 1 / 2^(e-1)
    x = a * inv_step
    if noise is None:
        return torch.round(x) / inv_step
    t = torch.floor(x)
    return (t + (noise < x - t).float()) / inv_step


def encode_e2m1(magnitude, negative):
    """Grid magnitudes (fp32, or NaN) and a bool sign mask -> uint8 codes 0..15: k = 2q for q <= 2, else
    min(q + 2, 7); + 8 if negative. NaN gives code 0 (it only occurs under a NaN scale, which carries it)."""
    k = torch.where(magnitude <= 2.0, magnitude * 2.0, (magnitude + 2.0).clamp(max=7.0)).nan_to_num(0.0)
    return (k + negative.float() * 8.0).to(torch.uint8)


def decode_e2m1(codes):
    """uint8 codes (any shape) -> fp32 (-1)^(code >> 3) · E2M1_GRID[code & 7]."""
    return torch.tensor(E2M1_GRID + tuple(-g for g in E2M1_GRID), device=codes.device)[codes.long()]


def pack_e2m1(codes):
    """(..., K) uint8 codes, K even -> (..., K/2) uint8, element 2j in the low nibble (TE, torchao, Triton)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed):
    """(..., K/2) uint8 -> (..., K) uint8 codes, the inverse of pack_e2m1."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)

# -----------------------------------------------------------------------------
# A minimal NVFP4, on one screen: per-tensor scale, 1x16 blocks, RTN or SR, no padding, no variants. The full
# quantizer below generalizes it, and tests/test_numerics.py proves the two equal wherever this one applies.
F8E4M3_MAX = 448.0                     # the largest E4M3 value
NVFP4_BLOCK = 16                       # elements per E4M3 block scale
NVFP4_AMAX_TO_SCALE = F4_E2M1_MAX * F8E4M3_MAX   # 2688: the tensor's amax maps to e2m1 6 x e4m3 448
FP32_ONE_SIXTH = 0.1666666716337204    # fl32(1/6): TE multiplies by it instead of dividing by 6 (§2)
FLT_MAX = 3.4028234663852886e38        # the largest finite fp32


def nvfp4_minimal(x, stochastic=False, generator=None):
    """x (M, K) fp32, K a multiple of 16 -> x_dq (M, K) fp32, per-tensor NVFP4 quantized and dequantized (§2):
        A = amax|x|;  S_enc = min(2688 ⊘ A, FLT_MAX) (1 if A = 0);  S_dec = 1 ⊘ S_enc   (one per tensor)
        s_b = e4m3(min(amax_b ⊗ (S_enc ⊗ fl(1/6)), 448))                      (one E4M3 scale per 16-block b)
        x_dq = E2M1(x ⊗ (1 ⊘ (s_b ⊗ S_dec))) ⊗ (s_b ⊗ S_dec)
    ⊗ ⊘ are fp32 operations; E2M1 rounds to nearest even or, with stochastic=True, with uniform_noise."""
    M, K = x.shape
    A = x.abs().amax()
    S_enc = torch.where(A == 0, 1.0, (x.new_full((), NVFP4_AMAX_TO_SCALE) / A).clamp(max=FLT_MAX))
    S_dec = 1.0 / S_enc
    blocks = x.view(M, K // NVFP4_BLOCK, NVFP4_BLOCK)                               # (M, K/16, 16)
    s_b = (blocks.abs().amax(-1) * (S_enc * FP32_ONE_SIXTH)).clamp(max=F8E4M3_MAX).to(torch.float8_e4m3fn)
    scale = s_b.float() * S_dec                                                     # (M, K/16) decode scale
    v = blocks * (1.0 / scale).clamp(max=FLT_MAX)[..., None]                        # what E2M1 sees, |v| <~ 6
    noise = uniform_noise(draw_seed(generator), v.shape) if stochastic else None
    keep = (s_b.float() != 0)[..., None]                                            # a 0 scale zeroes its block (+0)
    q = round_e2m1(v.abs(), noise) * keep
    return (torch.where((v < 0) & keep, -q, q) * scale[..., None]).view(M, K)

# -----------------------------------------------------------------------------
# NVFP4 in full (§2 per-tensor, §3 double-block): any shape, padding, 16x16 weight tiles, the variants. Every
# quantizer works on the last dim of a 2-D fp32 view (Mp, Kp), zero-padded to whole blocks, and returns width Kp.
OUTER_BLOCK = 128                      # elements per fp32 outer scale in double-block (TetraJet-v2)
DOUBLE_BLOCK_ZERO_SCALE = 2.0 ** -9    # s_i of an all-zero 16-block: the smallest E4M3 subnormal (§3)


class NVFP4(NamedTuple):
    codes: torch.Tensor        # uint8 (..., Kp/2), packed E2M1
    block_scale: torch.Tensor  # float8_e4m3fn (..., Kp/16); with 16x16 tiles each row holds its tile's scale
    outer_scale: torch.Tensor  # fp32: per-tensor S_dec (0-dim), or per-128 s_o (..., Kp/128)


def pad_2d(x, row_multiple, col_multiple):
    """x (..., K) -> (Mp, Kp) in x's dtype: rows flattened, then zero-padded to row_multiple and K to col_multiple."""
    x2 = x.reshape(-1, x.shape[-1])                                                 # (M, K)
    pad_rows, pad_cols = -x2.shape[0] % row_multiple, -x2.shape[1] % col_multiple
    return torch.nn.functional.pad(x2, (0, pad_cols, 0, pad_rows)) if pad_rows or pad_cols else x2


def unpad_2d(t, x):
    """(Mp, n), computed from pad_2d(x, ...) -> (..., n): the padded rows dropped, x's leading dims restored."""
    return t[:x.numel() // x.shape[-1]].reshape(*x.shape[:-1], t.shape[-1])


def tile_amax(x2, tile):
    """fp32 (Mp, Kp) -> (Mp, Kp/16) amax |x| of each 1x16 or 16x16 tile (a 16x16 tile's replicated on its rows)."""
    (tr, tc), (Mp, Kp) = tile, x2.shape
    a = x2.abs().view(Mp // tr, tr, Kp // tc, tc).amax(dim=(1, 3))
    return a.repeat_interleave(tr, dim=0) if tr > 1 else a


def tensor_scales(A, amax_to_scale=NVFP4_AMAX_TO_SCALE):
    """amax A (0-dim fp32) -> (S_enc, S_dec): S_enc = min(amax_to_scale ⊘ A, FLT_MAX), 1 if A = 0; S_dec = 1 ⊘ S_enc.
    (Not `2688 / A`, which torch rounds twice: docs/numerics.md, Notation.)"""
    S_enc = torch.where(A == 0, 1.0, (A.new_full((), amax_to_scale) / A).clamp(max=FLT_MAX))
    return S_enc, 1.0 / S_enc


def outer_scales(amax16, amax_to_scale=NVFP4_AMAX_TO_SCALE):
    """amax_16 (Mp, Kp/16) -> (s_o = amax_128 ⊘ amax_to_scale (1 if 0) (Mp, Kp/128), s_o per 16-block (Mp, Kp/16))."""
    amax128 = amax16.view(amax16.shape[0], -1, OUTER_BLOCK // NVFP4_BLOCK).amax(-1)
    s_o = torch.where(amax128 == 0, 1.0, _div(amax128, amax_to_scale))
    return s_o, s_o.repeat_interleave(OUTER_BLOCK // NVFP4_BLOCK, dim=-1)


def nvfp4_scales(x2, outer, tile):
    """fp32 (Mp, Kp) -> (block_scale e4m3 and decode scale fp32, both (Mp, Kp/16); outer_scale), no lower clamp:
        outer="tensor": s_b = e4m3(min(amax_b ⊗ (S_enc ⊗ fl(1/6)), 448)), decode s_b ⊗ S_dec, outer S_dec (§2)
        outer=128:      s_i = e4m3(min((amax_16 ⊘ s_o) ⊘ 6, 448)) (2^-9 if amax_16 = 0), decode s_o ⊗ s_i (§3)"""
    amax16 = tile_amax(x2, tile)                                                    # (Mp, Kp/16)
    if outer == "tensor":
        S_enc, S_dec = tensor_scales(amax16.amax())
        block_scale = (amax16 * (S_enc * FP32_ONE_SIXTH)).clamp(max=F8E4M3_MAX).to(torch.float8_e4m3fn)
        return block_scale, block_scale.float() * S_dec, S_dec
    s_o, s_o16 = outer_scales(amax16)
    s_i = _div(amax16 / s_o16, F4_E2M1_MAX).clamp(max=F8E4M3_MAX)
    block_scale = torch.where(amax16 == 0, DOUBLE_BLOCK_ZERO_SCALE, s_i).to(torch.float8_e4m3fn)
    return block_scale, s_o16 * block_scale.float(), s_o


def round_blocks(x2, block_scale, scale, noise=None):
    """fp32 (Mp, Kp), E4M3 block scales and decode scales (Mp, Kp/16) -> (magnitude fp32, negative bool), both
    (Mp, Kp/16, 16): v = x ⊗ min(1 ⊘ scale, FLT_MAX), round_e2m1(|v|); a zero E4M3 scale gives +0 (§2 step 3)."""
    v = x2.view(x2.shape[0], -1, NVFP4_BLOCK) * (1.0 / scale).clamp(max=FLT_MAX)[..., None]
    magnitude = round_e2m1(v.abs(), None if noise is None else noise.view(v.shape))
    keep = (block_scale.float() != 0)[..., None]
    return torch.where(keep, magnitude, 0.0), (v < 0) & keep


def quantize_nvfp4(x, *, outer="tensor", tile=(1, 16), rounding="nearest", generator=None, rht_signs=None,
                   four_over_six=None):
    """x (..., K) float -> NVFP4 along the last dim, K zero-padded to Kp (k_multiple), rows to 16 with tile=(16, 16).
        outer: "tensor" (§2, values and scale bytes bit for bit TE's reference) or 128 (§3, double-block)
        rounding: "nearest", "stochastic" (uniform_noise(draw_seed(generator), (Mp, Kp))) or "eden" (MS-EDEN, §11)
        rht_signs: None, or 16 or 128 ±1 signs: quantize rht(x) instead (§5)
        four_over_six: None, "mae" or "mse": Four Over Six block scales (§10, RTN and no RHT only; below)"""
    x2 = pad_2d(x, tile[0], k_multiple("nvfp4", outer, rounding, rht_signs)).float()  # (Mp, Kp)
    q = _quantize_nvfp4_2d(x2, outer, tuple(tile), rounding, _seed(rounding, generator, x2), rht_signs, four_over_six)
    return NVFP4(unpad_2d(q.codes, x), unpad_2d(q.block_scale, x),
                 q.outer_scale if outer == "tensor" else unpad_2d(q.outer_scale, x))


def _quantize_nvfp4_2d(x2, outer, tile, rounding, seed, rht_signs=None, four_over_six=None):
    """quantize_nvfp4 on the padded fp32 (Mp, Kp), the random seed already drawn -> NVFP4 of (Mp, Kp)."""
    x2 = x2 if rht_signs is None else rht(x2, rht_signs)
    if four_over_six is not None:                                                   # §10
        magnitude, negative, block_scale, outer_scale = round_four_over_six(x2, outer, tile, four_over_six)
    elif rounding == "eden":                                                        # §11; double-block: §13
        magnitude, negative, block_scale, outer_scale = round_eden(x2, seed) if outer == "tensor" else round_eden_128(x2)
    else:
        block_scale, scale, outer_scale = nvfp4_scales(x2, outer, tile)
        noise = uniform_noise(seed, tuple(x2.shape)) if rounding == "stochastic" else None
        magnitude, negative = round_blocks(x2, block_scale, scale, noise)
    return NVFP4(pack_e2m1(encode_e2m1(magnitude, negative).reshape(x2.shape)), block_scale, outer_scale)


def dequantize_nvfp4(q):
    """NVFP4 -> fp32 (..., Kp): x_dq = e2m1(code) ⊗ (fp32(block_scale) ⊗ S_dec), or ⊗ (s_o ⊗ s_i) per 128."""
    values = decode_e2m1(unpack_e2m1(q.codes))                                      # (..., Kp)
    scale = (q.block_scale.float() * q.outer_scale if q.outer_scale.dim() == 0 else
             q.outer_scale.repeat_interleave(OUTER_BLOCK // NVFP4_BLOCK, dim=-1) * q.block_scale.float())
    return (values.unflatten(-1, (-1, NVFP4_BLOCK)) * scale[..., None]).flatten(-2)


def k_multiple(fmt, outer, rounding="nearest", rht_signs=None):
    """The width K is zero-padded to: 32 (MXFP4), 16 (NVFP4), 128 (double-block, MS-EDEN's groups, RHT-128)."""
    if fmt == "mxfp4":
        return MX_BLOCK
    wide = outer == OUTER_BLOCK or rounding == "eden" or (rht_signs is not None and len(rht_signs) == OUTER_BLOCK)
    return OUTER_BLOCK if wide else NVFP4_BLOCK

# -----------------------------------------------------------------------------
# Four Over Six (§10): per block, the usual map-to-6 scale or 1.5x it (the block max then lands on 4, where
# the grid is denser around the other values), whichever reconstructs the block better. RTN, no RHT.
FOUR_OVER_SIX_BOUND = 256.0            # the tensor scale's E4M3 bound: 256 x 1.5 = 384 still fits 448
FOUR_OVER_SIX_AMAX_TO_SCALE = F4_E2M1_MAX * FOUR_OVER_SIX_BOUND   # 1536
MAP_TO_4 = 1.5                         # map-to-4 scale = 1.5 x map-to-6 scale


def round_four_over_six(x2, outer, tile, error):
    """fp32 (Mp, Kp) -> (magnitude, negative (Mp, Kp/16, 16), block_scale, outer_scale); a block keeps map-to-4 iff
    its error is strictly smaller ("mae": Σ|x̂ - x|, TE's default; "mse": Σ(x̂ - x)²), in TE's expressions (§10):
        outer="tensor": S_enc = min(1536 ⊘ A, FLT_MAX); base = (amax_b ⊘ 6) ⊗ S_enc; s6 = e4m3(base), s4 = e4m3(base ⊗ 1.5);
                        each candidate's x̂ = ((±e2m1 ⊗ fp32(s)) ⊗ A) ⊘ 1536
        outer=128 (ours): s_o = amax_128 ⊘ 1536; base = (amax_16 ⊘ s_o) ⊘ 6; x̂ = ±e2m1 ⊗ (s_o ⊗ s)
    Errors sum a block's 16 values left to right, a 16x16 tile's 16 row sums as a tree (tree_sum)."""
    amax16 = tile_amax(x2, tile)                                                    # (Mp, Kp/16)
    if outer == "tensor":
        A = amax16.amax()
        S_enc, outer_scale = tensor_scales(A, FOUR_OVER_SIX_AMAX_TO_SCALE)
        base, lift = _div(amax16, F4_E2M1_MAX) * S_enc, 1.0
    else:
        A, (outer_scale, lift) = None, outer_scales(amax16, FOUR_OVER_SIX_AMAX_TO_SCALE)
        base = _div(amax16 / lift, F4_E2M1_MAX)
    candidates = []
    for b in (base, base * MAP_TO_4):                                               # map to 6, map to 4
        s = b.clamp(max=F8E4M3_MAX)
        s = (s if A is not None else torch.where(amax16 == 0, DOUBLE_BLOCK_ZERO_SCALE, s)).to(torch.float8_e4m3fn)
        scale = s.float() * outer_scale if A is not None else lift * s.float()
        magnitude, negative = round_blocks(x2, s, scale)
        q = torch.where(negative, -magnitude, magnitude)
        x_hat = _div((q * s.float()[..., None]) * A, FOUR_OVER_SIX_AMAX_TO_SCALE) if A is not None else q * scale[..., None]
        d = x_hat - x2.view(q.shape)
        d = d.abs() if error == "mae" else d * d
        err = sum((d[..., i] for i in range(1, NVFP4_BLOCK)), d[..., 0])           # (Mp, Kp/16), left to right
        if tile[0] > 1:
            err = tree_sum(err.view(-1, NVFP4_BLOCK, err.shape[1]).transpose(1, 2)).repeat_interleave(NVFP4_BLOCK, 0)
        candidates.append((magnitude, negative, s, err))
    (m6, n6, s6, e6), (m4, n4, s4, e4) = candidates
    pick4 = e4 < e6                                                                 # a tie keeps map-to-6
    block_scale = torch.where(pick4, s4.view(torch.uint8), s6.view(torch.uint8)).view(torch.float8_e4m3fn)
    return torch.where(pick4[..., None], m4, m6), torch.where(pick4[..., None], n4, n6), block_scale, outer_scale


def tree_sum(t):
    """(..., n), n a power of two -> (...,) Σ in a warp's fixed order: halves added, t[..., :n/2] + t[..., n/2:]."""
    while t.shape[-1] > 1:
        t = t[..., :t.shape[-1] // 2] + t[..., t.shape[-1] // 2:]
    return t[..., 0]

# -----------------------------------------------------------------------------
# MS-EDEN (Quartet II, §11): RTN elements, each 128-group's scale corrected by c = Σz² / Σz·q and rounded
# stochastically: unbiased over a fresh RHT-128 (it makes the RTN errors look random), bar a dominated group.
EDEN_VAL_MAX = 6.07210636138916        # fl32(6 / 0.988125): Quartet II's backward grid max, (17/16)·0.93 scale override
EDEN_SCALE_BOUND = 255.99000549316406  # fl32(255.99): the tensor scale's bound, room for c > 1 in E4M3
EDEN_GROUP = 128                       # elements per correction: one RHT-128 group, 8 blocks


def eden_correction(z, q):
    """z, ±E2M1 q (Mp, Kp/16, 16) -> c (Mp, Kp/128) = Σz² ⊘ Σz·q per 128-group, in tree_sum order (1 if Σz·q = 0)."""
    group = (z.shape[0], -1, EDEN_GROUP)
    num, den = tree_sum((z * z).view(group)), tree_sum((z * q).view(group))
    return torch.where(den == 0, 1.0, num / den)


def round_eden(x2, seed):
    """fp32 (Mp, Kp), Kp a multiple of 128, already rotated -> (magnitude, negative, block_scale, S_dec):
        A = amax|x|;  S_dec = (A ⊘ 255.99) ⊘ v (1 if A = 0), v = EDEN_VAL_MAX
        s_b = e4m3(min((amax_b ⊘ v) ⊘ S_dec, 448)), 1 where that is 0
        z = x ⊗ min(1 ⊘ (s_b ⊗ S_dec), FLT_MAX);  q = E2M1(z), to nearest even
        c_g = eden_correction(z, q) per 128-group;  s'_b = SR_e4m3(s_b ⊗ c_g)
    with one uniform per block, uniform_noise(seed, (Mp, Kp/16)); x_dq = e2m1(q) ⊗ (s'_b ⊗ S_dec)."""
    A = x2.abs().amax()
    S_dec = torch.where(A == 0, 1.0, _div(_div(A, EDEN_SCALE_BOUND), EDEN_VAL_MAX))
    s = (_div(tile_amax(x2, (1, NVFP4_BLOCK)), EDEN_VAL_MAX) / S_dec).clamp(max=F8E4M3_MAX).to(torch.float8_e4m3fn).float()
    s = torch.where(s == 0, 1.0, s)                                                 # Quartet II: 0 -> 1
    z = x2.view(x2.shape[0], -1, NVFP4_BLOCK) * (1.0 / (s * S_dec)).clamp(max=FLT_MAX)[..., None]
    magnitude = round_e2m1(z.abs())
    c = eden_correction(z, torch.where(z < 0, -magnitude, magnitude))               # (Mp, Kp/128)
    t = s * c.repeat_interleave(EDEN_GROUP // NVFP4_BLOCK, dim=-1)                  # (Mp, Kp/16)
    return magnitude, z < 0, stochastic_e4m3(t, uniform_noise(seed, tuple(t.shape))), S_dec


def round_eden_128(x2):
    """EDEN on double-block (ours, §13): rotated fp32 (Mp, Kp), Kp % 128 = 0 -> (magnitude, negative, s_i, s_o ⊗ c):
    outer=128 RTN's codes and s_i; c = eden_correction(z = x ⊗ (1 ⊘ s_o s_i), q), zero-scale blocks out; no SR."""
    block_scale, scale, s_o = nvfp4_scales(x2, OUTER_BLOCK, (1, NVFP4_BLOCK))
    magnitude, negative = round_blocks(x2, block_scale, scale)
    keep = (block_scale.float() != 0)[..., None]
    z = torch.where(keep, x2.view(magnitude.shape) * (1.0 / scale).clamp(max=FLT_MAX)[..., None], 0.0)
    return magnitude, negative, block_scale, s_o * eden_correction(z, torch.where(negative, -magnitude, magnitude))


def stochastic_e4m3(t, noise):
    """fp32 t >= 0, clamped to 448 -> E4M3 of t's shape, E[result] = t: t if it is an E4M3 value, else the neighbour
    up with probability (t - down) ⊘ (up - down), the neighbours e4m3(t) and the byte next to it. NaN stays NaN."""
    t = t.clamp(max=F8E4M3_MAX)
    r = t.to(torch.float8_e4m3fn)
    rb = r.view(torch.uint8).to(torch.int32)
    above = r.float() > t
    down_b, up_b = torch.where(above, rb - 1, rb), torch.where(above, rb, rb + 1)
    down, up = (b.to(torch.uint8).view(torch.float8_e4m3fn).float() for b in (down_b, up_b))
    pick = torch.where(r.float() == t, rb, torch.where(noise < (t - down) / (up - down), up_b, down_b))
    return pick.to(torch.uint8).view(torch.float8_e4m3fn)

# -----------------------------------------------------------------------------
# MXFP4 and MXFP8 (§4, OCP Microscaling v1.0): power-of-two scales per 32, no outer scale
MX_BLOCK = 32                          # elements per E8M0 scale
E2M1_MAX_POW2 = 2                      # 6 = 1.5 · 2^2: an MXFP4 scale is 2^(floor(log2 amax) - 2)


class MX(NamedTuple):
    codes: torch.Tensor  # MXFP4: uint8 (..., Kp/2) packed E2M1; MXFP8: float8_e4m3fn (..., Kp)
    scale: torch.Tensor  # float8_e8m0fnu (..., Kp/32): X = 2^(byte - 127)


def quantize_mxfp4(x, rounding="nearest", generator=None):
    """x (..., K) -> MX, blocks of 32 (Kp = K rounded up to 32): X = 2^(floor(log2 amax) - 2), the exponent read
    from the fp32 bits (OCP's rule; amax = 0 gives 2^-127); q = E2M1(x ⊘ X), saturating at ±6 (§4)."""
    x2 = pad_2d(x, 1, MX_BLOCK).float()
    q = _quantize_mxfp4_2d(x2, rounding, _seed(rounding, generator, x2))
    return MX(unpad_2d(q.codes, x), unpad_2d(q.scale, x).view(torch.float8_e8m0fnu))


def _quantize_mxfp4_2d(x2, rounding, seed):
    blocks = x2.view(x2.shape[0], -1, MX_BLOCK)                                     # (M, Kp/32, 32)
    amax = blocks.abs().amax(-1)
    scale = _e8m0(_fp32_exponent(amax) - E2M1_MAX_POW2, amax)                       # uint8 bytes
    v = blocks / _e8m0_value(scale)[..., None]
    noise = uniform_noise(seed, tuple(x2.shape)).view(v.shape) if rounding == "stochastic" else None
    codes = encode_e2m1(round_e2m1(v.abs(), noise), v < 0).view(x2.shape)
    return MX(pack_e2m1(codes), scale)                      # the scale as its bytes: quantize_mxfp4 types them


def dequantize_mxfp4(q):
    """MX (E2M1 codes) -> fp32 (..., Kp): x_dq = e2m1(code) ⊗ X."""
    values = decode_e2m1(unpack_e2m1(q.codes)).unflatten(-1, (-1, MX_BLOCK))
    return (values * _e8m0_value(q.scale.view(torch.uint8))[..., None]).flatten(-2)


def quantize_mxfp8(x):
    """x (..., K) -> MX with E4M3 elements (OutControl's channels, §8): X = 2^ceil(log2(amax ⊘ 448)) (the exponent
    of r = amax ⊘ 448, plus 1 if r's mantissa is non-zero), elements e4m3(clamp(x ⊘ X, ±448)) to nearest even."""
    q = _quantize_mxfp8_2d(pad_2d(x, 1, MX_BLOCK).float())
    return MX(unpad_2d(q.codes, x), unpad_2d(q.scale, x).view(torch.float8_e8m0fnu))


def _quantize_mxfp8_2d(x2):
    blocks = x2.view(x2.shape[0], -1, MX_BLOCK)                                     # (M, Kp/32, 32)
    amax = blocks.abs().amax(-1)
    r = _div(amax, F8E4M3_MAX)
    scale = _e8m0(_fp32_exponent(r) + ((r.view(torch.int32) & 0x7FFFFF) != 0).int(), amax)
    codes = (blocks / _e8m0_value(scale)[..., None]).clamp(-F8E4M3_MAX, F8E4M3_MAX).to(torch.float8_e4m3fn)
    return MX(codes.view(x2.shape), scale)                  # the scale as its bytes, as _quantize_mxfp4_2d


def dequantize_mxfp8(q):
    """MX (E4M3 codes) -> fp32 (..., Kp): x_dq = fp32(code) ⊗ X."""
    X = _e8m0_value(q.scale.view(torch.uint8))                                     # (bytes: torch.compile has no e8m0)
    return (q.codes.float().unflatten(-1, (-1, MX_BLOCK)) * X[..., None]).flatten(-2)

# -----------------------------------------------------------------------------
# The random Hadamard transform (§5). Both operands of a GEMM are multiplied along K, chunk by chunk, by the same
# orthogonal H = diag(s) · H_n / √n (signs on the inputs), so (A H)(B H)ᵀ = A Bᵀ; an outlier 16 becomes sixteen ±4s.
NVIDIA_RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)   # TE's fixed vector
RHT128_NORM = 0.0883883461356163       # fl32(1/√128) = fl32(2^-3.5)


def random_signs(generator=None, device=None, n=NVFP4_BLOCK):
    """n (16 or 128) random ±1 fp32 signs, torch.randint(0, 2, (n,), generator) mapped 0 -> +1, 1 -> -1."""
    return (1 - 2 * torch.randint(0, 2, (n,), generator=generator, device=device)).float()


def sylvester(n, device):
    """The n x n Sylvester ±1 Hadamard matrix (fp32 on `device`): H_2n = [[H, H], [H, -H]] from H_1 = [1]."""
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def rht(x, signs):
    """x (..., K), K a multiple of len(signs) -> fp32, every contiguous chunk c of the last dim rotated:
        16 signs (RHT-16):   c ↦ c H, H = diag(s) · H₁₆ / 4, out[j] = Σ_i c[i]·H[i, j] added for i = 0, 1, ..., 15
                             (each product is ±¼ × an input, exact, so the order fixes every bit)
        128 signs (RHT-128): c ↦ ((c ∘ s) H₁₂₈) ⊗ fl(2^-3.5), H₁₂₈ as the butterfly: stages h = 1, 2, ..., 64, each
                             pair (a, b) = (y[j], y[j + h]) of a 2h-block becomes (a + b, a - b) (Quartet II)."""
    signs = signs.to(x.device).float()
    n = len(signs)
    if n == NVFP4_BLOCK:
        H = signs[:, None] * (0.25 * sylvester(NVFP4_BLOCK, x.device))               # (16, 16), entries ±¼
        c = x.float().reshape(*x.shape[:-1], -1, NVFP4_BLOCK)
        return sum((c[..., i:i + 1] * H[i] for i in range(1, NVFP4_BLOCK)), c[..., 0:1] * H[0]).reshape(x.shape)
    y = x.float().reshape(-1, n) * signs                                             # (chunks, 128)
    h = 1
    while h < n:
        y = y.view(y.shape[0], n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(x.shape) * RHT128_NORM

# -----------------------------------------------------------------------------
# Recipes (§6): which quantizer each operand of each GEMM gets, every knob independent. A recipe prints as its
# preset plus what differs, e.g. tetrajet[rht=none,aligned=false], and parse_recipe reads that string back.
ROUNDINGS = ("nearest", "stochastic", "eden")
GEMMS = ("fprop", "dgrad", "wgrad")        # a GEMM left out of Recipe.gemms multiplies in high precision (§14)
FOUR_OVER_SIX_SCOPES = ("none", "weights", "activations", "all")


@dataclass(frozen=True)
class Recipe:
    name: str                          # the preset it starts from (str(recipe) adds what differs)
    fmt: str = "nvfp4"                 # element/scale format: nvfp4 or mxfp4
    outer: object = "tensor"           # NVFP4 outer scale: "tensor" (NVIDIA) or 128 (TetraJet-v2 double-block)
    weight_tile: tuple = (1, 16)       # W's scale tile in fprop and dgrad: (1, 16) or (16, 16)
    grad_rounding: str = "stochastic"  # dY in dgrad and wgrad: nearest, stochastic or eden (MS-EDEN; double-block: §13)
    other_rounding: str = "nearest"    # the other backward operand (W in dgrad, X in wgrad): same choices
    rht: tuple = ()                    # backward GEMMs with an RHT: a subset of (dgrad, wgrad)
    rht_signs: str = "fixed"           # fixed (NVIDIA_RHT_SIGNS) or random (fresh per GEMM per step)
    rht_size: int = 16                 # 16 or 128 points
    aligned: bool = False              # the backward quantizes the forward's X̂, Ŵ instead of X, W
    four_over_six: str = "none"        # forward operands with Four Over Six scales: none, weights, activations, all
    four_over_six_error: str = "mae"   # the error 4/6 picks by: mae (TE's default) or mse
    gemms: tuple = GEMMS               # the GEMMs in FP4 (the rest in the run's dtype): to find where the loss goes

    def __post_init__(self):
        eden = "eden" in (self.grad_rounding, self.other_rounding)
        for ok, what in (
            (self.fmt in ("nvfp4", "mxfp4"), "fmt must be nvfp4 or mxfp4"),
            (self.outer in ("tensor", OUTER_BLOCK), f"outer must be tensor or {OUTER_BLOCK}"),
            (self.weight_tile in ((1, 16), (16, 16)), "weight_tile must be 1x16 or 16x16"),
            (self.fmt == "nvfp4" or (self.outer, self.weight_tile) == ("tensor", (1, 16)),
             "mxfp4 has no outer scale and no 2-D tiles"),
            ({self.grad_rounding, self.other_rounding} <= set(ROUNDINGS), f"roundings must be in {ROUNDINGS}"),
            (not eden or self.fmt == "nvfp4", "eden needs fmt=nvfp4 (MS-EDEN per tensor, or EDEN on double-block scales)"),
            (self.other_rounding != "eden" or self.weight_tile == (1, 16),
             "MS-EDEN on the other operand needs weight_tile=1x16 (dgrad quantizes Wᵀ with W's tile)"),
            (set(self.rht) <= {"dgrad", "wgrad"}, "rht must be a subset of dgrad, wgrad"),
            (self.gemms and set(self.gemms) <= set(GEMMS), "gemms must be one or more of fprop, dgrad, wgrad"),
            (isinstance(self.aligned, bool), "aligned must be true or false"),
            (self.rht_signs in ("fixed", "random"), "rht_signs must be fixed or random"),
            (self.rht_size in (NVFP4_BLOCK, OUTER_BLOCK), "rht_size must be 16 or 128"),
            (self.rht_size == NVFP4_BLOCK or self.rht_signs == "random", "RHT-128 needs rht_signs=random"),
            (self.rht_size == NVFP4_BLOCK or self.fmt == "nvfp4", "RHT-128 is for nvfp4"),
            (self.four_over_six in FOUR_OVER_SIX_SCOPES, f"four_over_six must be one of {FOUR_OVER_SIX_SCOPES}"),
            (self.four_over_six_error in ("mae", "mse"), "four_over_six_error must be mae or mse"),
            (self.fmt == "nvfp4" or self.four_over_six == "none", "Four Over Six is an nvfp4 scale rule"),
            (not eden or (self.rht_size, self.rht_signs, set(self.rht)) == (OUTER_BLOCK, "random", {"dgrad", "wgrad"}),
             "eden needs a fresh RHT-128 on both backward GEMMs (rht=dgrad+wgrad, rht_size=128, "
             "rht_signs=random): without it its estimate is biased")):
            if not ok:
                raise ValueError(f"FP4 recipe {self.name}: {what}")

    def __str__(self):
        base = RECIPES.get(self.name)
        changed = [f.name for f in fields(self)[1:] if base is None or getattr(self, f.name) != getattr(base, f.name)]
        return self.name + (f"[{','.join(f'{k}={_format_value(getattr(self, k))}' for k in changed)}]" if changed else "")


RECIPES = {   # the presets the module docstring describes (docs/numerics.md §6 tables every field)
    "nvidia": Recipe("nvidia", weight_tile=(16, 16), rht=("wgrad",)),                      # arXiv 2509.25149 §4
    # nvidia with Four Over Six on both forward operands (TE's nvfp4_4over6="all", error mae)
    "nvidia-4over6": Recipe("nvidia-4over6", weight_tile=(16, 16), rht=("wgrad",), four_over_six="all"),
    "tetrajet": Recipe("tetrajet", outer=OUTER_BLOCK, other_rounding="stochastic", rht=("dgrad", "wgrad"),
                       rht_signs="random", aligned=True),                                    # arXiv 2510.27527 §3
    "quartet2": Recipe("quartet2", grad_rounding="eden", other_rounding="eden", rht=("dgrad", "wgrad"),
                       rht_signs="random", rht_size=OUTER_BLOCK, aligned=True, four_over_six="all",
                       four_over_six_error="mse"),                                           # arXiv 2601.22813
    # this lab's own: tetrajet's forward, an EDEN backward on double-block scales after a fresh RHT-128 (§13)
    "tetrajet-eden": Recipe("tetrajet-eden", outer=OUTER_BLOCK, grad_rounding="eden", other_rounding="eden",
                            rht=("dgrad", "wgrad"), rht_signs="random", rht_size=OUTER_BLOCK, aligned=True),
    "mxfp4": Recipe("mxfp4", fmt="mxfp4"),                                                   # OCP MX v1.0
}


def _format_value(v):
    """A Recipe field's value as parse_recipe reads it back: 128, 16x16, dgrad+wgrad, none, true."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, tuple):
        return "x".join(map(str, v)) if v and isinstance(v[0], int) else "+".join(v) or "none"
    return str(v)


GEMM_ORDER = lambda g: GEMMS.index(g) if g in GEMMS else len(GEMMS)     # (an unknown name last: __post_init__ says it)


def parse_recipe(spec):
    """"preset" or "preset[field=value,...]" (what str(recipe) prints) -> Recipe; ValueError naming the fix."""
    if isinstance(spec, Recipe):
        return spec
    name, bracket, rest = spec.partition("[")
    if name not in RECIPES or (bracket and not rest.endswith("]")):
        raise ValueError(f"unknown FP4 recipe {spec!r}; write a preset ({', '.join(RECIPES)}) or preset[field=value,...]")
    known, changes = [f.name for f in fields(Recipe)[1:]], {}
    for item in filter(None, rest[:-1].split(",")):      # (rht and gemms list GEMMs in the order of GEMMS)
        key, eq, v = item.partition("=")
        if key not in known or not eq:
            raise ValueError(f"FP4 recipe {spec!r}: {item!r} is not field=value with a field of {', '.join(known)}")
        default = getattr(RECIPES[name], key)         # the value's type follows the field's preset value
        changes[key] = (v == "true" if isinstance(default, bool) and v in ("true", "false") else
                        int(v) if v.isdigit() else
                        tuple(int(n) for n in v.split("x")) if key == "weight_tile" and v.replace("x", "").isdigit() else
                        (() if v == "none" else tuple(sorted(v.split("+"), key=GEMM_ORDER))) if key in ("rht", "gemms") else v)
    try:
        return replace(RECIPES[name], **changes)
    except ValueError as e:                           # name the spec as given, not just its preset
        raise ValueError(str(e).replace(f"FP4 recipe {name}:", f"FP4 recipe {spec}:", 1)) from None

# -----------------------------------------------------------------------------
# fake_quant = dequantize(quantize(x)). KERNEL is the one hook through which a faster implementation of the same
# bits replaces reference_kernel (fastpaths.use sets it at start-up), on the padded (Mp, Kp) and the drawn seed:
#     KERNEL(x2, fmt, outer, tile, rounding, seed, rht_signs, four_over_six, dtype, columns=None) -> (Mp, Kp)
# in dtype or fp32. fmt is the recipe's ("nvfp4", "mxfp4") or "mxfp8" (OutControl's channels: RTN, no outer scale,
# no RHT); with columns (OutControl's split, RTN) x2 is padded in rows only and by_columns is the definition.
KERNEL = None


def quantize(x, recipe, rounding="nearest", tile=(1, 16), generator=None, rht_signs=None, four_over_six=None):
    """x (..., K) -> the recipe's quantized tuple (NVFP4 or MX) along the last dim."""
    recipe = parse_recipe(recipe)
    if recipe.fmt == "mxfp4":
        return quantize_mxfp4(x, rounding, generator)
    return quantize_nvfp4(x, outer=recipe.outer, tile=tile, rounding=rounding, generator=generator,
                          rht_signs=rht_signs, four_over_six=four_over_six)


def dequantize(q):
    """NVFP4 or MX (E2M1 or E4M3 elements) -> fp32 (..., Kp)."""
    if isinstance(q, NVFP4):
        return dequantize_nvfp4(q)
    return dequantize_mxfp8(q) if q.codes.dtype == torch.float8_e4m3fn else dequantize_mxfp4(q)


def fake_quant(x, recipe, rounding="nearest", tile=(1, 16), generator=None, *, rht_signs=None, dtype=torch.float32,
               four_over_six=None, columns=None):
    """x (..., K) -> (..., K) in dtype = dequantize(quantize(x)), padding cropped (with rht_signs: rht(x)'s, width K
    rounded up to the chunk). columns (OutControl, §8; RTN, no RHT): None, or (outliers, inliers) in descending-norm
    order: MXFP8 on the outliers, the recipe's FP4 on the inliers, each gathered and quantized as its own matrix."""
    recipe, tile = parse_recipe(recipe), tuple(tile)
    if columns is not None and (rounding != "nearest" or rht_signs is not None):
        raise ValueError("fake_quant: OutControl's columns are the forward's split: round to nearest, no RHT")
    if columns is not None and len(columns[0]):                                   # (no outliers: all FP4)
        out = (KERNEL or reference_kernel)(pad_2d(x, tile[0], 1), recipe.fmt, recipe.outer, tile, "nearest", None,
                                           None, four_over_six, dtype, columns=columns)
        return unpad_2d(out, x).to(dtype)
    x2 = pad_2d(x, tile[0], k_multiple(recipe.fmt, recipe.outer, rounding, rht_signs))   # (Mp, Kp)
    seed = _seed(rounding, generator, x2)
    out = (KERNEL or reference_kernel)(x2, recipe.fmt, recipe.outer, tile, rounding, seed, rht_signs, four_over_six, dtype)
    width = x.shape[-1] if rht_signs is None else -(-x.shape[-1] // len(rht_signs)) * len(rht_signs)
    return unpad_2d(out[:, :width], x).to(dtype)


def by_columns(kernel, x2, fmt, outer, tile, four_over_six, dtype, columns):
    """OutControl's operand (§8) on any KERNEL: x2 (Mp, K), columns = (outliers, inliers) -> (Mp, K) = the recipe's
    FP4 (RTN) on the inlier columns and MXFP8 on the outliers, each gathered, padded and quantized as its own matrix."""
    outliers, inliers = columns                   # (index_select: a CPU gather ~6x faster than x[:, inliers])
    fp4_part = pad_2d(x2.index_select(1, inliers), 1, k_multiple(fmt, outer))
    fp8_part = pad_2d(x2.index_select(1, outliers), 1, MX_BLOCK)
    parts = (kernel(fp4_part, fmt, outer, tile, "nearest", None, None, four_over_six, dtype)[:, :len(inliers)],
             kernel(fp8_part, "mxfp8", "tensor", (1, MX_BLOCK), "nearest", None, None, None, dtype)[:, :len(outliers)])
    return scatter_columns(parts, columns)


def scatter_columns(parts, columns):
    """(inlier part (M, F), outlier part (M, O)), columns = (outliers, inliers) -> (M, F + O) with each part's
    columns back where `columns` took them from (a gather by the inverse permutation: no slow scatter on CPUs)."""
    outliers, inliers = columns
    return torch.cat(parts, 1).index_select(1, torch.cat((inliers, outliers)).argsort())


def fake_quant_mxfp8(x, dtype=torch.float32):
    """x (M, K) -> (M, K) in dtype = dequantize_mxfp8(quantize_mxfp8(x)), on the chosen KERNEL: OutControl's channels."""
    out = (KERNEL or reference_kernel)(pad_2d(x, 1, MX_BLOCK), "mxfp8", "tensor", (1, MX_BLOCK), "nearest", None,
                                       None, None, dtype)
    return out[:, :x.shape[1]].to(dtype)


def reference_kernel(x2, fmt, outer, tile, rounding, seed, rht_signs=None, four_over_six=None, dtype=None,
                     columns=None):
    """KERNEL's reference twin on the padded (Mp, Kp): x_dq = dequantize(quantize(x2)), fp32 (fake_quant casts)."""
    if columns is not None:                                                         # OutControl's operand (§8)
        return by_columns(reference_kernel, x2, fmt, outer, tile, four_over_six, dtype, columns)
    x2 = x2.float()
    if fmt == "mxfp8":                                                              # OutControl's channels (§8)
        return dequantize_mxfp8(_quantize_mxfp8_2d(x2))
    if fmt == "mxfp4":
        return dequantize(_quantize_mxfp4_2d(x2 if rht_signs is None else rht(x2, rht_signs), rounding, seed))
    return dequantize(_quantize_nvfp4_2d(x2, outer, tile, rounding, seed, rht_signs, four_over_six))


def four_over_six_of(recipe, operand):
    """fprop's operand "activations" (X) or "weights" (W) -> recipe.four_over_six_error if in scope, else None."""
    return recipe.four_over_six_error if recipe.four_over_six in (operand, "all") else None

# -----------------------------------------------------------------------------
# The FP4 linear (§6). fprop rounds to nearest: its output is the network. dgrad and wgrad feed an optimizer that
# averages SR's noise over steps. Aligned: the net ran on X̂, Ŵ, so dX = dY Ŵ; from W, a bias dY (W - Ŵ) no SR removes.


def backward_gemm(gemm, a, b, recipe, generator, b_tile=(1, 16), dtype=torch.float32):
    """a (M, K) = dY's side, b (P, K) -> (M, P) in dtype = Q(a H) Q(b H)ᵀ ≈ a bᵀ: `a` rounded with grad_rounding,
    `b` with other_rounding, H the recipe's RHT if it has one for this GEMM (the same signs on both operands), else
    the identity. Draws from `generator` in this order: the signs, a's noise, b's noise."""
    signs = (None if gemm not in recipe.rht else random_signs(generator, a.device, recipe.rht_size)
             if recipe.rht_signs == "random" else torch.tensor(NVIDIA_RHT_SIGNS, dtype=torch.float32, device=a.device))
    a_dq = fake_quant(a, recipe, recipe.grad_rounding, generator=generator, rht_signs=signs, dtype=dtype)
    b_dq = fake_quant(b, recipe, recipe.other_rounding, b_tile, generator, rht_signs=signs, dtype=dtype)
    return a_dq @ b_dq.t()


class FP4LinearFunction(torch.autograd.Function):
    """y = Q(x) Q(W)ᵀ, dgrad and wgrad in FP4 (those in recipe.gemms; the others unquantized): x (..., in), weight
    (out, in) -> y (..., out) in x.dtype. Quantizers compute in fp32; GEMMs multiply in x.dtype, as the baseline."""

    @staticmethod
    def forward(ctx, x, weight, recipe, generator, columns=None):
        dtype, x2 = x.dtype, x.reshape(-1, x.shape[-1])                          # (N, in)
        columns = columns if columns is not None and len(columns[0]) else None
        # === GEMM 1: fprop  Y = X̂ Ŵᵀ, both quantized along `in`, round to nearest ===
        # (with OutControl: = Q4(X[:, F]) Q4(W[:, F])ᵀ + Q8(X[:, O]) Q8(W[:, O])ᵀ, §8; not in gemms: X̂ = X, Ŵ = W)
        x_hat, w_hat = x2, weight
        if "fprop" in recipe.gemms:
            x_hat = fake_quant(x2, recipe, dtype=dtype, four_over_six=four_over_six_of(recipe, "activations"), columns=columns)
            w_hat = fake_quant(weight, recipe, tile=recipe.weight_tile, dtype=dtype,
                               four_over_six=four_over_six_of(recipe, "weights"), columns=columns)
        # NVIDIA's 16x16 tiles make Q(Wᵀ) = Q(W)ᵀ (§2): when dgrad would re-quantize W as the forward did (RTN,
        # no RHT), it reuses Ŵ. Aligned recipes keep X̂, Ŵ for the backward; the others keep X and W.
        ctx.reuse_w = (recipe.weight_tile == (16, 16) and "dgrad" not in recipe.rht and recipe.other_rounding ==
                       "nearest" and not recipe.aligned and {"fprop", "dgrad"} <= set(recipe.gemms))
        ctx.save_for_backward(x_hat if recipe.aligned else x2, w_hat if (recipe.aligned or ctx.reuse_w) else weight)
        ctx.recipe, ctx.generator, ctx.columns, ctx.x_shape, ctx.w_dtype = recipe, generator, columns, x.shape, weight.dtype
        return (x_hat @ w_hat.to(dtype).t()).reshape(*x.shape[:-1], -1)          # (..., out)

    @staticmethod
    def backward(ctx, dy):
        recipe, gen, columns = ctx.recipe, ctx.generator, ctx.columns
        x_src, w_src = ctx.saved_tensors                                          # X̂ or X (N, in), Ŵ or W (out, in)
        dy2, dtype, dx, dw = dy.reshape(-1, dy.shape[-1]), dy.dtype, None, None   # (N, out)
        # === GEMM 2: dgrad  dX = dY W, reduces over `out`: operands dY (N, out) and Wᵀ (in, out) ===
        # (fully FP4 even with OutControl: W's source is then the mixed Ŵ, §8)
        if ctx.needs_input_grad[0] and "dgrad" not in recipe.gemms:                 # high precision (§14)
            dx = dy2 @ w_src.to(dtype)
        elif ctx.needs_input_grad[0] and ctx.reuse_w:
            dx = fake_quant(dy2, recipe, recipe.grad_rounding, generator=gen, dtype=dtype) @ w_src
        elif ctx.needs_input_grad[0]:
            dx = backward_gemm("dgrad", dy2, w_src.t(), recipe, gen, recipe.weight_tile, dtype)
        # === GEMM 3: wgrad  dW = dYᵀ X, reduces over tokens: operands dYᵀ (out, N) and Xᵀ (in, N) ===
        if ctx.needs_input_grad[1] and "wgrad" not in recipe.gemms:
            dw = dy2.t() @ x_src.to(dtype)
        elif ctx.needs_input_grad[1] and columns is None:
            dw = backward_gemm("wgrad", dy2.t(), x_src.t(), recipe, gen, dtype=dtype)
        elif ctx.needs_input_grad[1]:                                             # FP4 on inliers, MXFP8 on outliers
            outliers, inliers = columns
            dw_fp4 = backward_gemm("wgrad", dy2.t(), x_src.index_select(1, inliers).t(), recipe, gen, dtype=dtype)
            dw_fp8 = fake_quant_mxfp8(dy2.t(), dtype) @ fake_quant_mxfp8(x_src.index_select(1, outliers).t(), dtype).t()
            dw = scatter_columns((dw_fp4, dw_fp8), columns)                           # (out, in)
        return (None if dx is None else dx.reshape(ctx.x_shape)), (None if dw is None else dw.to(ctx.w_dtype)), None, None, None


class FP4Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in simulated FP4 on the fp32 master weight. Its random draws come from its own
    generator (seeded with `seed`), saved in the state_dict: a resumed run continues the stream. OutControl sets
    `columns` and sums `channel_norm` while not None; `high_precision` makes it a plain linear (health's probe)."""

    def __init__(self, in_features, out_features, bias=False, *, recipe="tetrajet", seed=0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe, self.seed, self.generator = parse_recipe(recipe), seed, None
        self.columns, self.channel_norm, self.high_precision = None, None, False

    @classmethod
    def from_linear(cls, linear, recipe="tetrajet", seed=0):
        """Wrap an existing nn.Linear; the weight and bias Parameters are shared, not copied."""
        m = cls(linear.in_features, linear.out_features, recipe=recipe, seed=seed, device="meta")
        m.weight, m.bias = linear.weight, linear.bias
        return m

    def forward(self, x):
        if self.high_precision:
            y = nn.functional.linear(x, self.weight.to(x.dtype))
        else:
            if self.channel_norm is not None and self.training:               # OutControl calibrating: Σ‖X[:, c]‖₂
                self.channel_norm = self.channel_norm + x.detach().reshape(-1, self.in_features).float().norm(dim=0)
            if self.generator is None or self.generator.device != x.device:
                self.generator = torch.Generator(x.device).manual_seed(self.seed)
            y = FP4LinearFunction.apply(x, self.weight, self.recipe, self.generator, self.columns)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def quantize_weight(self):
        """Ŵ (out, in) fp32, the forward's quantized weight: what OsciReset tracks."""
        return fake_quant(self.weight.detach(), self.recipe, tile=self.recipe.weight_tile, columns=self.columns,
                          four_over_six=four_over_six_of(self.recipe, "weights"))

    def get_extra_state(self):
        rng = None if self.generator is None else (self.generator.device.type, self.generator.get_state())
        return {"recipe": str(self.recipe), "seed": self.seed, "rng": rng, "columns": self.columns,
                "channel_norm": self.channel_norm}

    def set_extra_state(self, state):
        self.seed, self.generator, device = state["seed"], None, self.weight.device
        if state["rng"] is not None and state["rng"][0] == device.type:          # resume the saved stream
            self.generator = torch.Generator(device).set_state(state["rng"][1])
        move = lambda t: None if t is None else t.to(device)
        self.columns = None if state["columns"] is None else tuple(map(move, state["columns"]))
        self.channel_norm = move(state["channel_norm"])

    def extra_repr(self):
        return f"{super().extra_repr()}, recipe={self.recipe}"


def convert_to_fp4(model, recipe="tetrajet", *, keep_first_k=0, keep_last_k=0, blocks="transformer.h", seed=0):
    """-> model, each nn.Linear in model.<blocks> (an nn.ModuleList) swapped for an FP4Linear sharing its weight, layer
    i seeded seed + i, except in the first keep_first_k and last keep_last_k blocks. The LM head stays too (§6)."""
    recipe, block_list = parse_recipe(recipe), model.get_submodule(blocks)
    n = len(block_list)
    if not (0 <= keep_first_k and 0 <= keep_last_k and keep_first_k + keep_last_k <= n):
        raise ValueError(f"keep_first_k {keep_first_k} + keep_last_k {keep_last_k} must fit the model's {n} blocks")
    converted, kept = 0, [i for i in range(n) if i < keep_first_k or i >= n - keep_last_k]
    for i, block in enumerate(block_list):
        for name, child in [] if i in kept else list(block.named_modules()):
            if isinstance(child, nn.Linear) and not isinstance(child, FP4Linear):
                parent, _, attr = name.rpartition(".")
                setattr(block.get_submodule(parent), attr, FP4Linear.from_linear(child, recipe, seed=seed + converted))
                converted += 1
    high = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, FP4Linear)]
    print(f"convert_to_fp4: {converted}/{converted + len(high)} Linear layers -> FP4Linear (recipe {recipe}); kept in "
          f"high precision: {', '.join(h for h in high if not h.startswith(blocks + '.')) or 'nothing else'}"
          + (f"; the Linears of blocks {kept}" if kept else ""))
    return model

# -----------------------------------------------------------------------------
# OsciReset (TetraJet-v2 paper §4; here §7): late in training a master weight on a rounding boundary flips its FP4
# value a whole bin back and forth: over T steps r = Σ|Q(w_t) - Q(w_t-1)| / Σ|w_t - w_t-1| is >> 1 there, ≈ 1 on drift.


class OsciReset:
    """layers {name: FP4Linear}: every `period` optimizer steps from `start`, accumulate r over `window` steps, then
    snap w <- Q(w) (its grid value; FP4 columns only, optimizer state untouched) where r >= `threshold`, if reset."""

    def __init__(self, layers, period=200, window=50, threshold=8.0, start=0, reset=True):
        if not 0 < window < period:
            raise ValueError(f"OsciReset needs 0 < window ({window}) < period ({period})")
        self.layers, self.period, self.window, self.threshold, self.start = layers, period, window, threshold, start
        self.reset = reset
        self.state = {}      # name -> {prev_w, prev_q, sum_dq, sum_dw}, only while a window is open
        self.last = {}       # name -> {oscillating: fraction with r >= threshold, tracked, reset: count}, last window

    @torch.no_grad()
    def after_step(self, step):
        """Call after every optimizer step with the steps done (and once before training). A window opens at phase
        (step - start) % period = 0, closes at phase = window; a layer that missed its opening waits for the next."""
        if step < self.start or (phase := (step - self.start) % self.period) > self.window:
            return
        for name, layer in self.layers.items():
            if phase != 0 and name not in self.state:
                continue
            w, q = layer.weight, layer.quantize_weight()                  # (out, in) master, fp32 Q(w)
            if phase == 0:
                zeros = torch.zeros_like(q)
                self.state[name] = dict(prev_w=w.float().clone(), prev_q=q, sum_dq=zeros, sum_dw=zeros.clone())
                continue
            st = self.state[name]
            st["sum_dq"] += (q - st["prev_q"]).abs()
            st["sum_dw"] += (w.float() - st["prev_w"]).abs()
            st["prev_w"], st["prev_q"] = w.float().clone(), q
            if phase == self.window:                                      # close it: reset the oscillators
                fp4_columns = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
                if layer.columns is not None:
                    fp4_columns[layer.columns[0]] = False
                ratio = torch.where(st["sum_dw"] > 0, st["sum_dq"] / st["sum_dw"], 0.0)
                mask = (ratio >= self.threshold) & fp4_columns
                if self.reset:
                    w[mask] = q[mask].to(w.dtype)
                tracked = int(fp4_columns.sum()) * w.shape[0]
                self.last[name] = {"oscillating": mask.sum().item() / max(tracked, 1), "tracked": tracked,
                                   "reset": int(mask.sum()) if self.reset else 0}
                del self.state[name]

    def summary(self):
        """-> (fraction of tracked weights with r >= threshold in the last windows, weights reset then)."""
        n = sum(v["tracked"] for v in self.last.values())
        osc = sum(v["oscillating"] * v["tracked"] for v in self.last.values())
        return (osc / n if n else 0.0), sum(v["reset"] for v in self.last.values())

    def state_dict(self):    # what training uses: measuring only, no open window (a resumed run measures from the
        keep = ("prev_q", "sum_dq", "sum_dw")             # next); resetting, not w: the layer's own at a checkpoint
        return {"state": {n: {k: st[k] for k in keep} for n, st in self.state.items()} if self.reset else {},
                "last": self.last}

    def load_state_dict(self, d):
        self.last, self.state = d["last"], {}
        for name, st in d["state"].items():
            w = self.layers[name].weight
            self.state[name] = {k: t.to(w.device) for k, t in st.items()} | {"prev_w": w.detach().float().clone()}

# -----------------------------------------------------------------------------
# OutControl (TetraJet-v2 paper §4; here §8): a few input channels carry most of the activation energy, the same
# ones all of training. After a short calibration the top `frac` by L2 norm are fixed and kept in MXFP8 (fprop, wgrad).


def select_outlier_channels(channel_norm, frac, generator=None):
    """(in,) summed channel norms -> (outliers, inliers) LongTensors, both in descending-norm order: the top `frac`,
    rounded up to 32 (one MXFP8 block), at most half, and the rest. A generator draws as many at random (a control)."""
    count = min(math.ceil(frac * channel_norm.numel() / MX_BLOCK) * MX_BLOCK, channel_norm.numel() // 2)
    order = channel_norm.argsort(descending=True, stable=True)
    if generator is None:
        return order[:count], order[count:]
    picked = torch.zeros(channel_norm.numel(), dtype=torch.bool)
    picked[torch.randperm(channel_norm.numel(), generator=generator)[:count]] = True
    picked = picked.to(order.device)[order]
    return order[picked], order[~picked]


class OutControl:
    """For `window` steps from `start` each FP4Linear sums ‖X[:, c]‖₂ over its training tokens (channel_norm); then
    its top `frac` channels become its outliers for good (choice="random": the control, drawn from `seed`). Call
    before_step(step) before each optimizer step, after_step(steps_done, reduce) after (reduce: DDP in-place sum)."""

    def __init__(self, layers, frac=0.1, start=500, window=50, choice="norm", seed=0):
        self.layers, self.frac, self.start, self.window, self.choice, self.seed = layers, frac, start, window, choice, seed

    def before_step(self, step):
        for layer in self.layers.values():
            if self.start <= step < self.start + self.window and layer.columns is None and layer.channel_norm is None:
                layer.channel_norm = torch.zeros(layer.in_features, device=layer.weight.device)

    def after_step(self, step, reduce=None):
        if step != self.start + self.window:
            return
        gen = torch.Generator().manual_seed(self.seed) if self.choice == "random" else None
        for layer in self.layers.values():
            if layer.channel_norm is not None:
                if reduce is not None:
                    reduce(layer.channel_norm)
                layer.columns = select_outlier_channels(layer.channel_norm, self.frac, gen)
                layer.channel_norm = None

    def summary(self):
        return {k: 0 if m.columns is None else len(m.columns[0]) for k, m in self.layers.items()}

# =============================================================================
# Appendix: exactness tricks, so that every implementation and device gives the same bits: exponents read from the
# fp32 bits (not log2), E8M0 bytes built as integers, true division, SR noise a pure function of (seed, index).
E8M0_BIAS, E8M0_NAN = 127, 255         # E8M0 byte b means 2^(b - 127); 255 is NaN


def _fp32_exponent(a):
    """Unbiased exponent field of fp32 a: floor(log2 a) for normal a, exactly, from the bits (-127 for 0)."""
    return ((a.view(torch.int32) >> 23) & 0xFF) - 127


def _e8m0(exponent, amax):
    """int exponent -> uint8 E8M0 byte exponent + 127, clamped to [0, 254]; 255 (NaN) where amax is not finite."""
    b = (exponent.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)
    return torch.where(torch.isfinite(amax), b, E8M0_NAN).to(torch.uint8)


def _e8m0_value(b):
    """uint8 E8M0 b -> fp32 2^(b - 127), NaN for 255: b.view(float8_e8m0fnu).float() in integer ops, from the bits."""
    bits = torch.where(b == 0, 0x00400000, torch.where(b == E8M0_NAN, 0x7FC00000, b.int() << 23))
    return bits.int().view(torch.float32)


def _div(a, b):
    """a ⊘ b for a Python number b: a true division by a 0-dim tensor on every device (docs/numerics.md, Notation)."""
    return a / a.new_full((), b)

# SR noise, counter-based (§1): element i's uniform is a pure function of (seed, i), the same in any evaluation
# order and computed by a kernel, not read; a torch.Generator still draws each quantization's seed.
PCG_MULTIPLIER, PCG_INCREMENT, PCG_OUTPUT_MULTIPLIER = 747796405, 2891336453, 277803737
U32_MASK = 0xFFFFFFFF
NOISE_ULP = 2.0 ** -24                 # u = (24-bit integer) · 2^-24, exact in fp32


def _pcg_hash(h):
    """uint32 values in int64 -> PCG-RXS-M-XS (O'Neill 2014): state = h·747796405 + 2891336453; word =
    ((state >> ((state >> 28) + 4)) ^ state)·277803737; out = (word >> 22) ^ word, all mod 2^32 (products < 2^62)."""
    state = (h * PCG_MULTIPLIER + PCG_INCREMENT) & U32_MASK
    word = (((state >> ((state >> 28) + 4)) ^ state) * PCG_OUTPUT_MULTIPLIER) & U32_MASK
    return (word >> 22) ^ word


def draw_seed(generator=None, device=None):
    """-> int64 (2,): one quantization's seeds (s0, s1) = torch.randint(0, 2^32, (2,), generator)."""
    return torch.randint(0, 1 << 32, (2,), generator=generator, device=device or torch.device("cpu"))


def _seed(rounding, generator, x2):
    return None if rounding == "nearest" else draw_seed(generator, x2.device)


def uniform_noise(seed, shape):
    """int64 (2,) seed -> fp32 of `shape`, uniform on [0, 1) in steps of 2^-24: u[i] = (pcg(pcg(i ^ s0) ^ s1) >> 8)·2^-24,
    i the row-major element index mod 2^32. Two chained hashes so that different seeds give unrelated streams."""
    seed = seed.to(torch.int64)
    i = torch.arange(math.prod(shape), device=seed.device, dtype=torch.int64).view(shape) & U32_MASK
    return (_pcg_hash(_pcg_hash(i ^ seed[0]) ^ seed[1]) >> 8).float() * NOISE_ULP

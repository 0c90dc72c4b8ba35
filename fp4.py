"""
fp4.py: the numerics of 4-bit (NVFP4 / MXFP4) training, in plain PyTorch.

This file is the readable reference and nothing else: the faster implementations (fastpaths.py holds them and
chooses one at start-up) must match it bit for bit. "§n" below is a section of docs/numerics.md, which states
every formula with its source: NVIDIA's "Pretraining LLMs with NVFP4" (arXiv 2509.25149, Transformer Engine
>= 2.14) and TetraJet-v2 (arXiv 2510.27527).

The format
----------
An FP4 number is E2M1: 1 sign bit, 2 exponent bits, 1 mantissa bit. Its eight magnitudes are

    code k:     0    1    2    3    4    5    6    7
    value:      0   0.5   1   1.5   2    3    4    6          (code | 8 = the negative twin)

so it can hold about one significant bit. To be useful it needs a scale per small block of elements:

  NVFP4  blocks of 16 along the GEMM's reduction dim K, each with an E4M3 (fp8, max 448) scale, on top of an
         fp32 outer scale. NVIDIA uses one outer scale per tensor (S_dec, §2); TetraJet-v2 one per 1x128
         block ("double-block", §3), so the E4M3 scales always use their full range.
  MXFP4  blocks of 32, each with an E8M0 (pure power of two) scale, no outer scale (OCP MX v1.0, §4).

A value is decoded as x_dq = e2m1(code) * block_scale * outer_scale. Two codes are packed per uint8 along
the last dim, element 2j in the low nibble (the layout TE, torchao and Triton's tl.dot_scaled use).

A worked example, per-tensor NVFP4 of a tensor whose amax is A = 12 and one of whose blocks has amax 3:
    S_enc = 2688 / 12 = 224, S_dec = 1/224        (the tensor's amax will map to e2m1 6 x e4m3 448)
    s_b   = e4m3(3 * 224 / 6) = e4m3(112) = 112    (this block's E4M3 scale)
    x = 1.3 in that block encodes as 1.3 * 224 / 112 = 2.6 -> nearest grid value 3 (code 5), and decodes
    as 3 * 112 / 224 = 1.5: a 15% error, typical for one-significant-bit numbers (SQNR ~20 dB on Gaussian
    data). The E4M3 scale has only 3 mantissa bits and 2^-9 as its smallest value, so with a per-tensor
    scale a block far below the tensor's amax gets a coarse or zero scale; a per-128 outer scale avoids it.

Rounding is round-to-nearest-even (RTN, for the forward pass) or stochastic (SR, for gradients: unbiased,
E[q] = x, so quantization noise averages out over steps instead of biasing the update).

The three GEMMs of a Linear (§6)
-------------------------------------
    fprop  Y  = X  Wᵀ     X (N tokens, in), W (out, in)   reduces over in
    dgrad  dX = dY W      dY (N, out)                     reduces over out
    wgrad  dW = dYᵀ X                                     reduces over N (tokens)

Every operand is quantized along the K of its GEMM, so each GEMM quantizes its operands afresh (X is
quantized along `in` for fprop but along tokens for wgrad). We simulate ("fake-quant"): quantize and dequantize
in fp32, then multiply in the activation dtype (bf16, like the baseline); on FP4 hardware the same quantized
operands feed a real FP4 GEMM (kernels.fp4_gemm on Blackwell GPUs: see _fprop and Reference).
  - nvidia:   per-tensor scale; W with 16x16 tiles so Q(Wᵀ) = Q(W)ᵀ and dgrad reuses the forward weight;
              SR on dY; a fixed random Hadamard transform (RHT) on both wgrad operands.
  - tetrajet: double-block scale; the backward reuses the *dequantized forward* X̂, Ŵ ("aligned" operands),
              so the expected gradients are exactly those of the network that ran; SR on every backward
              operand; fresh random RHT on both backward GEMMs (TetraJet-v2 §3).
  - quartet2: per-tensor scale with Four Over Six (MSE) blocks in the forward; the backward starts from X̂, Ŵ
              and rounds every operand with MS-EDEN (unbiased, low noise) after a fresh 128-point RHT
              (Quartet II, §10-§11).
  - mxfp4:    the OCP MX baseline, SR on dY.

The RHT (§5) multiplies every 16-chunk along K of both operands by the same orthogonal H, so
(A H)(B H)ᵀ = A Bᵀ exactly, while the quantizer sees spread-out, Gaussian-looking values instead of outliers.

What stays high precision in every recipe: master weights, embeddings, LM head, norms, attention, loss.

Weight oscillation reset (OsciReset) and outlier-channel control (OutControl), TetraJet-v2's two training-time
additions, act on all FP4 layers over many steps: they live in fp4_training.py. Here is only what they need from
a layer: FP4Linear.quantize_weight (what OsciReset tracks) and the MXFP8 columns of fake_quant_split (§8).

Layout: formats and quantizers, the RHT, recipes, the FP4 linear (the Reference implementation object, then
FP4LinearFunction, one `# === GEMM k ===` block per GEMM), block_health, FP4Linear and convert_to_fp4; an
appendix at the end holds the exactness tricks (bit-level exponents, exact division, counter-based SR noise)
that make every implementation give the same bits.
What we leave out: swizzled scale layouts, tensor subclasses, TP/FSDP.
Padding: a K that is not a multiple of the block is zero-padded (zeros change neither amax nor a GEMM), so
quantizers return the *padded* width; `fake_quant` crops back.
Non-finite input: a NaN or Inf makes its amax non-finite, hence its scale NaN, hence every element sharing
that scale dequantizes to NaN (the whole tensor with a per-tensor scale, the 1x128 block with double-block,
the 32-block with MX). NaN is never turned into finite garbage.
"""

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

# -----------------------------------------------------------------------------
# Constants. Each is exactly representable in fp32, so mixing them with fp32 tensors rounds only once.

F4_E2M1_MAX = 6.0                      # largest E2M1 magnitude
F8E4M3_MAX = 448.0                     # largest E4M3 value
NVFP4_AMAX_TO_SCALE = F4_E2M1_MAX * F8E4M3_MAX  # 2688.0: the amax maps to e2m1 6 x e4m3 448
FP32_ONE_SIXTH = 0.1666666716337204    # fl32(1/6) = 0x3E2AAAAB, in TE's order of operations (§2)
FLT_MAX = 3.4028234663852886e38        # largest finite fp32
NVFP4_BLOCK = 16                       # elements per E4M3 block scale
# Four Over Six (§10): per block, the map-to-6 scale or 1.5x it (the block max then lands on 4), the better one
FOUR_OVER_SIX_BOUND = 256.0            # the tensor scale's E4M3 bound in place of 448: 256 x 1.5 = 384 <= 448
MAP_TO_4 = 1.5                         # map-to-4 scale = 1.5 x map-to-6 scale (6 / 4)
FOUR_OVER_SIX_AMAX_TO_SCALE = F4_E2M1_MAX * FOUR_OVER_SIX_BOUND   # 1536.0: the amax maps to e2m1 6 x e4m3 256
FOUR_OVER_SIX_ERRORS = ("mae", "mse")  # the error that picks a block's scale: sum |x̂ - x| (TE's default) or (x̂ - x)²
FOUR_OVER_SIX_SCOPES = ("none", "weights", "activations", "all")   # Recipe.four_over_six: forward operands with 4/6
OUTER_BLOCK = 128                      # elements per fp32 outer scale in double-block (TetraJet-v2)
MX_BLOCK = 32                          # elements per E8M0 scale (OCP MX)
DOUBLE_BLOCK_ZERO_SCALE = 2.0 ** -9    # s_i of an all-zero 16-block: smallest E4M3 subnormal (§3)
E2M1_MAX_POW2 = 2                      # 6 = 1.5 * 2^2: MXFP4 scale exponent = floor(log2 amax) - 2
E8M0_BIAS, E8M0_NAN = 127, 255         # E8M0 byte b means 2^(b - 127); 255 is NaN
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# NVIDIA's fixed RHT sign vector (TE), + + + - + - - - - - - + - + - -
NVIDIA_RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
ROUNDINGS = ("nearest", "stochastic")   # E2M1 element rounding (round_e2m1)
EDEN = "eden"                          # MS-EDEN (Quartet II, §11): RTN elements, SR'd corrected scales
QUANTIZER_ROUNDINGS = ROUNDINGS + (EDEN,)   # what quantize_nvfp4 / fake_quant / a Recipe's roundings take
# Quartet II's constants (IST-DASLab/Quartet-II, schemes/quartet_2.py; §11). Their backward scale override
# (17/16)·0.93 = 0.988125 shrinks the grid's max from 6 to 6 / 0.988125, and the tensor scale's bound 255.99
# (not 448) leaves room for the EDEN correction to scale a block up.
EDEN_SCALE_OVERRIDE = 17 / 16 * 0.93   # 0.988125, in Python double as in their code
EDEN_VAL_MAX = 6.07210636138916        # fl32(6 / 0.988125): the constexpr their Triton kernel divides by
EDEN_SCALE_BOUND = 255.99000549316406  # fl32(255.99)
EDEN_GROUP = 128                       # elements per EDEN correction: one Hadamard group, 8 micro-blocks
RHT_SIZES = (16, 128)                  # RHT-16 (NVIDIA, TetraJet-v2) or RHT-128 (Quartet II)
RHT128_NORM = 0.0883883461356163       # fl32(1/sqrt(128)) = fl32(2^-3.5): H_128's normalization, one rounding
# FP4Linear(seed=s) seeds its noise generator with s + NOISE_SEED_OFFSET. Without the offset, seed s would
# replay the very stream torch.manual_seed(s) used to draw the weights or data, and SR noise correlated with
# the values it rounds is biased (measured: 16.8 dB instead of 17.25 dB SQNR on randn).
NOISE_SEED_OFFSET = 1 << 32
# SR noise (uniform_noise): PCG-RXS-M-XS 32-bit hash constants, and the spacing of the uniforms
PCG_MULTIPLIER, PCG_INCREMENT, PCG_OUTPUT_MULTIPLIER = 747796405, 2891336453, 277803737
U32_MASK = 0xFFFFFFFF
NOISE_ULP = 2.0 ** -24                 # u = (24-bit integer) * 2^-24, exact in fp32

# -----------------------------------------------------------------------------
# E2M1 elements (§1)


def round_e2m1_magnitude(a, noise=None):
    """fp32 a >= 0 (any shape) -> the E2M1 grid magnitude it rounds to (fp32, one of E2M1_GRID); NaN stays NaN.

    The grid spacing is 2^(e-1) on region e = clamp(floor(log2 a), 0, 2): 0.5 on [0, 2), 1 on [2, 4), 2 on
    [4, 6]. In units of the spacing, x = a / 2^(e-1) is exact (a power-of-two scaling) and the grid points are
    the integers, so
        nearest:    q = round(x) · 2^(e-1)                     (torch.round: ties to even, §1)
        stochastic: q = (floor(x) + [u < x - floor(x)]) · 2^(e-1), u = `noise` (same shape, uniform [0, 1))
    after clamping a to 6. x - floor(x) is exact (Sterbenz), so P(round up) is exactly the fractional part.
    Ties to even in x are ties to the even code, since code = x + 2e (0.25->0, 0.75->1, 1.25->1, 1.75->2,
    2.5->2, 3.5->4, 5->4); x = 4 is the next region's first grid point (2 or 4), so the result is always on
    the grid. Written as compares and multiplies (no table lookups), so it is one elementwise expression.
    """
    # Why SR for gradients: RTN maps every value in a bin to the same grid point, a bias that does not
    # average out over steps; SR's E[q] = a makes the quantized gradient an unbiased estimate of the true
    # one, at the price of ~twice the error variance (about 3 dB lower SQNR).
    a = a.clamp(max=F4_E2M1_MAX)
    inv_step = torch.where(a >= 4.0, 0.5, torch.where(a >= 2.0, 1.0, 2.0))   # 1 / 2^(e-1)
    x = a * inv_step
    if noise is None:
        return torch.round(x) / inv_step
    t = torch.floor(x)
    return (t + (noise < x - t).float()) / inv_step


def e2m1_codes(magnitude, negative):
    """Grid magnitudes (fp32, E2M1_GRID values or NaN) and a bool sign mask -> uint8 codes 0..15."""
    return _code_values(magnitude, negative).to(torch.uint8)


def _code_values(magnitude, negative):
    """-> the codes as fp32: k = 2·q for q <= 2 (0, 0.5, 1, 1.5, 2 -> 0..4), else min(q + 2, 7) (3 -> 5,
    4 -> 6, 6 -> 7); + 8 if negative. NaN gives 0 (it only occurs under a NaN scale, which carries the NaN)."""
    k = torch.where(magnitude <= 2.0, magnitude * 2.0, (magnitude + 2.0).clamp(max=7.0)).nan_to_num(0.0)
    return k + negative.float() * 8.0


def round_e2m1(v, rounding="nearest", generator=None):
    """Round fp32 v (any shape) to 4-bit E2M1 codes (uint8 in 0..15, same shape, unpacked): |v| with
    round_e2m1_magnitude, SR noise = uniform_noise(draw_seed(generator), v.shape). The sign bit is set iff
    v < 0: -0.0 gives code 0, a tiny negative gives code 8 (-0), as TE's reference."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    v = v.float()
    noise = uniform_noise(draw_seed(generator, v.device), v.shape) if rounding == "stochastic" else None
    return e2m1_codes(round_e2m1_magnitude(v.abs(), noise), v < 0)


def decode_e2m1(codes):
    """uint8 codes (any shape, 0..15) -> fp32 values: (-1)^(code >> 3) * E2M1_GRID[code & 7]."""
    table = torch.tensor(E2M1_GRID + tuple(-g for g in E2M1_GRID), device=codes.device)
    return table[codes.long()]


def pack_e2m1(codes):
    """(..., K) uint8 codes, K even -> (..., K/2) uint8 with element 2j in the low nibble, 2j+1 in the high."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed):
    """(..., K/2) uint8 -> (..., K) uint8 codes; the inverse of pack_e2m1."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)

# -----------------------------------------------------------------------------
# Shared plumbing: every quantizer works on the last dim of a 2-D fp32 view, zero-padded to whole blocks.

def _as_padded_2d(x, row_multiple, col_multiple):
    """x (..., K) float -> (Mp, Kp) in x's dtype, rows padded to row_multiple, K to col_multiple, with zeros
    (a view when no padding is needed). The quantizers then compute in fp32: bf16/fp16 upcast exactly, fp64
    is rounded to fp32 (the formats are defined on fp32)."""
    if not x.is_floating_point() or x.dim() == 0:
        raise TypeError(f"expected a floating tensor with at least one dim, got {x.dtype} of shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {tuple(x.shape)}")
    x2 = x.reshape(-1, x.shape[-1])                           # (M, K)
    M, K = x2.shape
    pad_rows, pad_cols = -M % row_multiple, -K % col_multiple
    return torch.nn.functional.pad(x2, (0, pad_cols, 0, pad_rows)) if pad_rows or pad_cols else x2


def _restore(t, x, rows):
    """(Mp, n) -> (*x.shape[:-1], n), dropping the padded rows."""
    return t[:rows].reshape(*x.shape[:-1], t.shape[-1])


def _tile_amax(x2, tile):
    """fp32 (Mp, Kp) -> (Mp, Kp/16) amax of |x| over each 1x16 or 16x16 tile (a 16x16 tile's amax is
    replicated on its 16 rows). NaN propagates (torch.amax returns NaN if any input is NaN)."""
    tr, tc = tile
    Mp, Kp = x2.shape
    a = x2.abs().view(Mp // tr, tr, Kp // tc, tc).amax(dim=(1, 3))   # (Mp/tr, Kp/16)
    return a.repeat_interleave(tr, dim=0) if tr > 1 else a


# -----------------------------------------------------------------------------
# NVFP4 (§2 per-tensor, §3 double-block)

class NVFP4(NamedTuple):
    codes: torch.Tensor        # uint8 (..., Kp/2), packed E2M1, element 2j in the low nibble
    block_scale: torch.Tensor  # float8_e4m3fn (..., Kp/16); with 16x16 tiles each row holds its tile's scale
    outer_scale: torch.Tensor  # fp32: per-tensor decode scale S_dec (0-dim), or per-128 s_o (..., Kp/128)


def _check(outer, tile, rounding, rht_signs=None):
    if outer not in ("tensor", OUTER_BLOCK):
        raise ValueError(f"outer must be 'tensor' or {OUTER_BLOCK}, got {outer!r}")
    if tuple(tile) not in ((1, 16), (16, 16)):
        raise ValueError(f"tile must be (1, 16) or (16, 16), got {tile!r}")
    if rounding not in QUANTIZER_ROUNDINGS:
        raise ValueError(f"rounding must be one of {QUANTIZER_ROUNDINGS}, got {rounding!r}")
    if rounding == EDEN and (outer, tuple(tile)) != ("tensor", (1, 16)):
        raise ValueError(f"MS-EDEN (rounding='eden') is defined with a per-tensor scale and 1x16 blocks, as in "
                         f"Quartet II; got outer={outer!r}, tile={tuple(tile)}")
    if rht_signs is not None and rht_signs.shape not in ((n,) for n in RHT_SIZES):
        raise ValueError(f"rht_signs must hold 16 (RHT-16) or 128 (RHT-128) signs, got shape {tuple(rht_signs.shape)}")


def k_multiple(fmt, outer, rounding, rht_signs=None):
    """The block K is zero-padded to: 32 (MXFP4), 16 (NVFP4, per-tensor), 128 (double-block, MS-EDEN's
    correction groups, or RHT-128's chunks)."""
    if fmt == "mxfp4":
        return MX_BLOCK
    big = outer == OUTER_BLOCK or rounding == EDEN or (rht_signs is not None and len(rht_signs) == OUTER_BLOCK)
    return OUTER_BLOCK if big else NVFP4_BLOCK


def _check_four_over_six(four_over_six, rounding="nearest", rht_signs=None, fmt="nvfp4"):
    """four_over_six: None, "mae" or "mse". 4/6 is defined (as TE has it) for NVFP4 with round to nearest and
    no RHT only; anything else is one ValueError."""
    if four_over_six is None:
        return
    if four_over_six not in FOUR_OVER_SIX_ERRORS:
        raise ValueError(f"four_over_six must be None or one of {FOUR_OVER_SIX_ERRORS}, got {four_over_six!r}")
    if fmt != "nvfp4" or rounding != "nearest" or rht_signs is not None:
        raise ValueError(f"Four Over Six (four_over_six={four_over_six!r}) is for NVFP4 with rounding='nearest' "
                         f"and no RHT only, as in TE (got fmt={fmt!r}, rounding={rounding!r}, "
                         f"rht_signs={'set' if rht_signs is not None else None})")


def tensor_scales(A, amax_to_scale=NVFP4_AMAX_TO_SCALE):
    """Per-tensor amax A (0-dim fp32) -> (S_enc, S_dec) of §2: S_enc = min(2688 ⊘ A, FLT_MAX), 1 if A = 0;
    S_dec = 1 ⊘ S_enc. Four Over Six (§10) passes amax_to_scale = 1536 (6 x 256). (Not `2688 / A`: torch
    evaluates a Python-number numerator as A.reciprocal() * 2688, rounding twice.)"""
    S_enc = torch.where(A == 0, 1.0, (A.new_full((), amax_to_scale) / A).clamp(max=FLT_MAX))
    return S_enc, 1.0 / S_enc


def _nvfp4_scales(x2, outer, tile):
    """fp32 (Mp, Kp), padded -> (block_scale e4m3 (Mp, Kp/16), scale fp32 (Mp, Kp/16): each 16-block's decode
    scale, outer_scale: S_dec (0-dim) or s_o (Mp, Kp/128)). The formulas are quantize_nvfp4's docstring."""
    Mp, Kp = x2.shape
    amax16 = _tile_amax(x2, tile)                                                     # (Mp, Kp/16)
    if outer == "tensor":
        S_enc, S_dec = tensor_scales(amax16.amax())                                    # () fp32 each
        block_scale = (amax16 * (S_enc * FP32_ONE_SIXTH)).clamp(max=F8E4M3_MAX).to(torch.float8_e4m3fn)
        return block_scale, block_scale.float() * S_dec, S_dec
    s_o, s_o16 = _outer_scales(amax16, NVFP4_AMAX_TO_SCALE)
    s_i = _div(amax16 / s_o16, F4_E2M1_MAX).clamp(max=F8E4M3_MAX)
    block_scale = torch.where(amax16 == 0, DOUBLE_BLOCK_ZERO_SCALE, s_i).to(torch.float8_e4m3fn)
    return block_scale, s_o16 * block_scale.float(), s_o


def _outer_scales(amax16, amax_to_scale):
    """Double-block's fp32 outer scales (§3): amax_16 (Mp, Kp/16) -> (s_o = amax_128 ⊘ amax_to_scale, 1 where
    amax_128 = 0, (Mp, Kp/128); s_o repeated on its 8 inner blocks, (Mp, Kp/16)). amax_to_scale: 2688, or 1536
    with Four Over Six (§10)."""
    Mp, n16 = amax16.shape
    amax128 = amax16.view(Mp, n16 * NVFP4_BLOCK // OUTER_BLOCK, OUTER_BLOCK // NVFP4_BLOCK).amax(-1)
    s_o = torch.where(amax128 == 0, 1.0, _div(amax128, amax_to_scale))
    return s_o, s_o.repeat_interleave(OUTER_BLOCK // NVFP4_BLOCK, dim=-1)


def _four_over_six_scales(x2, outer, tile):
    """4/6's two candidates (§10) for fp32 (Mp, Kp), padded -> ((s6, scale6), (s4, scale4), outer_scale, A):
    each candidate's E4M3 block scale (Mp, Kp/16) and decode scale as _nvfp4_scales; A is the tensor's amax
    (0-dim, for TE's error expression), or None with outer=128. The formulas are quantize_nvfp4's docstring."""
    Mp, Kp = x2.shape
    amax16 = _tile_amax(x2, tile)                                                     # (Mp, Kp/16)
    if outer == "tensor":
        A = amax16.amax()
        S_enc, S_dec = tensor_scales(A, FOUR_OVER_SIX_AMAX_TO_SCALE)                   # 1536 ⊘ A
        base = _div(amax16, F4_E2M1_MAX) * S_enc                                       # TE's 4/6 order
        s6, s4 = (b.clamp(max=F8E4M3_MAX).to(torch.float8_e4m3fn) for b in (base, base * MAP_TO_4))
        return (s6, s6.float() * S_dec), (s4, s4.float() * S_dec), S_dec, A
    s_o, s_o16 = _outer_scales(amax16, FOUR_OVER_SIX_AMAX_TO_SCALE)
    base = _div(amax16 / s_o16, F4_E2M1_MAX)
    s6, s4 = (torch.where(amax16 == 0, DOUBLE_BLOCK_ZERO_SCALE, b.clamp(max=F8E4M3_MAX)).to(torch.float8_e4m3fn)
              for b in (base, base * MAP_TO_4))
    return (s6, s_o16 * s6.float()), (s4, s_o16 * s4.float()), s_o, None


def _four_over_six_error(x2, magnitude, negative, block_scale, scale, A, tile, error):
    """One 4/6 candidate's error per block, fp32 (Mp, Kp/16) (a 16x16 tile's replicated on its 16 rows), in
    TE's order: x̂ = ((±e2m1 ⊗ fp32(s)) ⊗ A) ⊘ 1536 per element (with outer=128: x̂ = ±e2m1 ⊗ (s_o ⊗ s_i), the
    dequantized value), d = |x̂ - x| ("mae") or (x̂ - x)² ("mse"), summed over the 16 elements of a row block
    left to right; over a 16x16 tile the 16 row sums are then added as a tree (rows i + i+8, then i + i+4, ...),
    the order of TE's CUDA warp reduction."""
    Mp = x2.shape[0]
    q = torch.where(negative, -magnitude, magnitude)                                  # (Mp, Kp/16, 16)
    x_hat = (_div((q * block_scale.float()[..., None]) * A, FOUR_OVER_SIX_AMAX_TO_SCALE) if A is not None
             else q * scale[..., None])
    diff = x_hat - x2.view(q.shape)
    d = diff.abs() if error == "mae" else diff * diff
    err = d[..., 0]
    for i in range(1, NVFP4_BLOCK):
        err = err + d[..., i]                                                         # (Mp, Kp/16)
    if tile[0] == 1:
        return err
    rows = err.view(Mp // NVFP4_BLOCK, NVFP4_BLOCK, -1)                               # (Mp/16, 16, Kp/16)
    while rows.shape[1] > 1:
        half = rows.shape[1] // 2
        rows = rows[:, :half] + rows[:, half:]
    return rows.repeat_interleave(NVFP4_BLOCK, dim=0).view(err.shape)


def _scaled_blocks(x2, scale):
    """§2 step 3: fp32 (Mp, Kp) and each 16-block's decode scale (Mp, Kp/16) -> the scaled values
    v = x ⊗ min(1 ⊘ scale, FLT_MAX), (Mp, Kp/16, 16), which E2M1 rounding sees."""
    encode = (1.0 / scale).clamp(max=FLT_MAX)                                         # (Mp, Kp/16)
    return x2.view(x2.shape[0], -1, NVFP4_BLOCK) * encode[..., None]


def _round_blocks(x2, block_scale, scale, noise=None):
    """§2 steps 3-4 on fp32 (Mp, Kp) with its E4M3 block scales and decode scales (Mp, Kp/16) -> (magnitude
    fp32, negative bool), both (Mp, Kp/16, 16)."""
    v = _scaled_blocks(x2, scale)                                                     # (Mp, Kp/16, 16)
    magnitude = round_e2m1_magnitude(v.abs(), None if noise is None else noise.view(v.shape))
    keep = (block_scale.float() != 0)[..., None]         # a block whose E4M3 scale is 0 is all code 0 (+0)
    return torch.where(keep, magnitude, 0.0), (v < 0) & keep


def _round_four_over_six(x2, outer, tile, error):
    """_round_nvfp4 with Four Over Six (§10): both candidates rounded (RTN) and decoded, each block keeping
    map-to-4 iff its error is strictly smaller (a tie keeps map-to-6)."""
    (s6, scale6), (s4, scale4), outer_scale, A = _four_over_six_scales(x2, outer, tile)
    m6, n6 = _round_blocks(x2, s6, scale6)
    m4, n4 = _round_blocks(x2, s4, scale4)
    pick4 = (_four_over_six_error(x2, m4, n4, s4, scale4, A, tile, error)
             < _four_over_six_error(x2, m6, n6, s6, scale6, A, tile, error))          # (Mp, Kp/16)
    block_scale = torch.where(pick4, s4.view(torch.uint8), s6.view(torch.uint8)).view(torch.float8_e4m3fn)
    p = pick4[..., None]
    return (torch.where(p, m4, m6), torch.where(p, n4, n6), block_scale, torch.where(pick4, scale4, scale6),
            outer_scale)


def _tree_sum(t):
    """(..., n), n a power of two -> (...,) Σ over the last dim in a fixed order: halves added elementwise
    (t[:n/2] + t[n/2:]) until one is left. The order every implementation uses for MS-EDEN's sums (a SIMD
    register adds its halves the same way), so they all give the same bits."""
    while t.shape[-1] > 1:
        half = t.shape[-1] // 2
        t = t[..., :half] + t[..., half:]
    return t[..., 0]


def _stochastic_e4m3(t, noise):
    """fp32 t >= 0 (or NaN), any shape -> E4M3 (same shape): t itself where it is an E4M3 value, else one of its
    two E4M3 neighbours down < t < up, up iff noise < (t - down) ⊘ (up - down), so E[result] = t (§11 step 5).
    The neighbours are the nearest E4M3 value r = e4m3(t) and the byte next to it (r's byte - 1 if r > t, else
    + 1), as Quartet II finds them. t is clamped to 448 first (never reached in practice: the 255.99 bound
    leaves a factor 1.75 of room). NaN stays NaN."""
    t = t.clamp(max=F8E4M3_MAX)
    r = t.to(torch.float8_e4m3fn)
    rb = r.view(torch.uint8).to(torch.int32)
    above = r.float() > t
    down_b, up_b = torch.where(above, rb - 1, rb), torch.where(above, rb, rb + 1)
    down, up = (b.to(torch.uint8).view(torch.float8_e4m3fn).float() for b in (down_b, up_b))
    pick = torch.where(r.float() == t, rb, torch.where(noise < (t - down) / (up - down), up_b, down_b))
    return pick.to(torch.uint8).view(torch.float8_e4m3fn)


def _round_eden(x2, seed):
    """MS-EDEN (Quartet II, §11) on fp32 (Mp, Kp), Kp a multiple of 128 (already rotated by the caller) ->
    the outputs of _round_nvfp4: (magnitude, negative (Mp, Kp/16, 16), block_scale e4m3 (Mp, Kp/16), scale
    (Mp, Kp/16), S_dec). See quantize_nvfp4 for the formulas; the noise is uniform_noise(seed, (Mp, Kp/16)),
    one uniform per 16-block (the row-major index of its scale)."""
    Mp, Kp = x2.shape
    A = x2.abs().amax()
    S_dec = torch.where(A == 0, 1.0, _div(_div(A, EDEN_SCALE_BOUND), EDEN_VAL_MAX))   # ()
    amax16 = _tile_amax(x2, (1, NVFP4_BLOCK))                                          # (Mp, Kp/16)
    s = (_div(amax16, EDEN_VAL_MAX) / S_dec).clamp(max=F8E4M3_MAX).to(torch.float8_e4m3fn).float()
    s = torch.where(s == 0, 1.0, s)                                                    # Quartet II: 0 -> 1
    z = _scaled_blocks(x2, s * S_dec)                                                  # (Mp, Kp/16, 16)
    magnitude = round_e2m1_magnitude(z.abs())
    q = torch.where(z < 0, -magnitude, magnitude)
    per_group = (Mp, Kp // EDEN_GROUP, EDEN_GROUP)
    num, den = _tree_sum((z * z).view(per_group)), _tree_sum((z * q).view(per_group))     # (Mp, Kp/128)
    c = torch.where(den == 0, 1.0, num / den)
    t = s * c.repeat_interleave(EDEN_GROUP // NVFP4_BLOCK, dim=-1)                     # (Mp, Kp/16)
    block_scale = _stochastic_e4m3(t, uniform_noise(seed, tuple(t.shape)))
    return magnitude, z < 0, block_scale, block_scale.float() * S_dec, S_dec


def _round_nvfp4(x2, outer, tile, rounding, seed, four_over_six=None):
    """The body shared by quantize_nvfp4 and fake_quant: fp32 (Mp, Kp), padded -> (magnitude fp32 and
    negative bool, both (Mp, Kp/16, 16), then block_scale, scale, outer_scale as _nvfp4_scales).
    four_over_six: None, or "mae"/"mse" for Four Over Six's per-block choice of scale (§10, RTN only).
    rounding "eden": MS-EDEN (§11)."""
    if four_over_six is not None:
        return _round_four_over_six(x2, outer, tile, four_over_six)
    if rounding == EDEN:
        return _round_eden(x2, seed)
    block_scale, scale, outer_scale = _nvfp4_scales(x2, outer, tile)
    noise = uniform_noise(seed, tuple(x2.shape)) if rounding == "stochastic" else None
    return (*_round_blocks(x2, block_scale, scale, noise), block_scale, scale, outer_scale)


def quantize_nvfp4(x, *, outer="tensor", tile=(1, 16), rounding="nearest", generator=None, rht_signs=None,
                   four_over_six=None):
    """x (..., K) float -> NVFP4, quantized along the last dim; Kp = K rounded up to 16 (outer="tensor") or
    128 (outer=128), zero-padded. With tile=(16, 16) the leading dims are flattened into rows, padded to 16,
    and amax_16 is taken over 16x16 tiles (with outer=128, amax_128 then over 16x128 tiles).

    outer="tensor" (docs/numerics.md §2, bit-exact to TE's reference; ⊗ ⊘ are fp32 ops):
        A = amax|x|;  S_enc = min(2688 ⊘ A, FLT_MAX) (1 if A = 0);  S_dec = 1 ⊘ S_enc
        s_b = e4m3(min(amax_b ⊗ (S_enc ⊗ fl(1/6)), 448))      zero and subnormal scales kept, no lower clamp
        q = E2M1(x ⊗ min(1 ⊘ (s_b ⊗ S_dec), FLT_MAX));  x_dq = e2m1(q) ⊗ (s_b ⊗ S_dec)
    outer=128 (§3, TetraJet-v2 double-block):
        s_o = amax_128 ⊘ 2688 (1 if 0);  s_i = e4m3(min((amax_16 ⊘ s_o) ⊘ 6, 448)) (2^-9 if amax_16 = 0)
        q = E2M1(x ⊗ (1 ⊘ (s_o ⊗ s_i)));  x_dq = e2m1(q) ⊗ (s_o ⊗ s_i)
    A block whose E4M3 scale is 0 gets all codes 0. E2M1 rounds to nearest even, or stochastically
    (round_e2m1_magnitude) with uniform_noise(draw_seed(generator), (Mp, Kp)). rht_signs: None, or 16 or 128
    ±1 signs: quantize rht(x) instead (RHT-16 or RHT-128, §5), x zero-padded to whole chunks first.

    rounding="eden" (MS-EDEN, Quartet II, §11; outer="tensor", 1x16 only; Kp = K rounded up to 128; meant for
    an x already rotated by a fresh RHT-128, rht_signs of 128, which is what makes it unbiased):
        A = amax|x|;  S_dec = (A ⊘ 255.99) ⊘ v (1 if A = 0), v = fl(6 / 0.988125) = 6.072106
        s_b = e4m3(min((amax_b ⊘ v) ⊘ S_dec, 448)), 1 where that is 0
        z = x ⊗ min(1 ⊘ (s_b ⊗ S_dec), FLT_MAX);  q = E2M1(z), round to nearest even
        per 128-group g (8 blocks): c_g = Σ z² ⊘ Σ z·q (1 if Σ z·q = 0), sums in _tree_sum's order
        t_b = s_b ⊗ c_g;  s'_b = t_b stochastically rounded to a neighbouring E4M3 value (_stochastic_e4m3,
        one uniform per block: uniform_noise(draw_seed(generator), (Mp, Kp/16)))
        x_dq = e2m1(q) ⊗ (s'_b ⊗ S_dec)
    Where this departs from Quartet II's kernel (eden_1x16s_fp4_kernel), all deliberate: E2M1 ties go to even
    (theirs away from zero: hardware and every other quantizer here round to even; ties have probability ~0
    on real data); z multiplies by the rounded reciprocal instead of dividing (TE's order, as for plain NVFP4:
    1 ulp); the sums run in _tree_sum's order (theirs is tl.sum's, the compiler's); S_dec is stored as the
    outer scale (theirs is folded into the bf16 output).

    four_over_six="mae" or "mse" (Four Over Six, §10, bit-exact to TE's _quantize_blockwise_4over6_reference;
    RTN only, no RHT, else ValueError): two candidate scales per block b (1x16 or 16x16 tile), the better kept.
    outer="tensor":
        S_enc = min(1536 ⊘ A, FLT_MAX) (1 if A = 0), S_dec = 1 ⊘ S_enc      (1536 = 6 x 256, not 6 x 448)
        base = (amax_b ⊘ 6) ⊗ S_enc;  s6 = e4m3(min(base, 448));  s4 = e4m3(min(base ⊗ 1.5, 448))
        each s: q = E2M1(x ⊗ min(1 ⊘ (s ⊗ S_dec), FLT_MAX)) (RTN), x̂ = ((e2m1(q) ⊗ fp32(s)) ⊗ A) ⊘ 1536
        err = Σ_b |x̂ - x| ("mae", TE's default) or Σ_b (x̂ - x)² ("mse"), 16 values added left to right (a 16x16
        tile: its 16 row sums added as a tree); keep s4 and its codes iff err4 < err6 (a tie keeps s6)
    outer=128 (our extension, TE has none): s_o = amax_128 ⊘ 1536 (1 if 0), so the largest block's map-to-4
        scale, 256 x 1.5 = 384, still fits E4M3 (with 2688 it would clamp at 448 and 4/6 could not map that
        block to 4); s6 = e4m3(min((amax_16 ⊘ s_o) ⊘ 6, 448)), s4 = e4m3(min(((amax_16 ⊘ s_o) ⊘ 6) ⊗ 1.5, 448))
        (2^-9 if amax_16 = 0), and the error is measured on the dequantized x̂ = e2m1(q) ⊗ (s_o ⊗ s).
    The result is an ordinary NVFP4 (outer_scale = S_dec or s_o) and dequantizes as usual, x_dq = e2m1(q) ⊗
    (s ⊗ S_dec): that is not TE's error expression bit for bit (S_dec = 1 ⊘ (1536 ⊘ A) is not A ⊘ 1536, and
    the products are grouped differently), they differ by fp32 rounding (a few ulp); the choice uses TE's
    expression, the output ours (as for plain NVFP4, TE's own GEMM applies A_x A_w ⊘ (6·6·256·256) instead)."""
    tile = tuple(tile)
    x2, seed = pad_codes_operand(x, outer, tile, rounding, generator, rht_signs, four_over_six)  # (Mp, Kp)
    if rht_signs is not None:
        x2 = rht(x2, rht_signs)                                                        # c -> (c ∘ s) H / √n
    magnitude, negative, block_scale, _, outer_scale = _round_nvfp4(x2, outer, tile, rounding, seed, four_over_six)
    codes = pack_e2m1(e2m1_codes(magnitude, negative).reshape(x2.shape))               # (Mp, Kp/2)
    return codes_result(codes, block_scale, outer_scale, x, outer)


def pad_codes_operand(x, outer, tile, rounding, generator, rht_signs=None, four_over_six=None):
    """quantize_nvfp4's prologue, shared with every implementation: check the arguments, then x (..., K) ->
    (x2 fp32 (Mp, Kp), zero-padded to whole 16- or 128-blocks (and 16 rows with 16x16 tiles); the int64 (2,) SR
    seed drawn from `generator`, or None for RTN)."""
    _check(outer, tile, rounding, rht_signs)
    _check_four_over_six(four_over_six, rounding, rht_signs)
    x2 = _as_padded_2d(x, tile[0], k_multiple("nvfp4", outer, rounding, rht_signs)).float()
    return x2, (draw_seed(generator, x2.device) if rounding != "nearest" else None)


def codes_result(codes, block_scale, outer_scale, x, outer):
    """quantize_nvfp4's epilogue: packed codes (Mp, Kp/2), E4M3 block scales (or their bytes) (Mp, Kp/16) and
    S_dec or s_o of the padded view -> NVFP4 with x's leading shape (padded rows dropped)."""
    M = x.numel() // x.shape[-1]
    outer_scale = outer_scale if outer == "tensor" else _restore(outer_scale, x, M)
    return NVFP4(_restore(codes.to(torch.uint8), x, M), _restore(block_scale.view(torch.float8_e4m3fn), x, M),
                 outer_scale)


def dequantize_nvfp4(q, dtype=torch.float32):
    """NVFP4 -> (..., Kp) tensor: x_dq = e2m1(code) ⊗ (fp32(block_scale) ⊗ outer_scale), computed in fp32."""
    values = decode_e2m1(unpack_e2m1(q.codes))                                        # (..., Kp)
    scale = q.block_scale.float()                                                     # (..., Kp/16)
    if q.outer_scale.dim() == 0:
        scale = scale * q.outer_scale                                                 # s_b ⊗ S_dec
    else:
        scale = q.outer_scale.repeat_interleave(OUTER_BLOCK // NVFP4_BLOCK, dim=-1) * scale  # s_o ⊗ s_i
    x = values.unflatten(-1, (-1, NVFP4_BLOCK)) * scale[..., None]
    return x.flatten(-2).to(dtype)

# -----------------------------------------------------------------------------
# MXFP4 and MXFP8 (§4, OCP Microscaling v1.0)

class MX(NamedTuple):
    codes: torch.Tensor  # MXFP4: uint8 (..., Kp/2) packed E2M1; MXFP8: float8_e4m3fn (..., Kp)
    scale: torch.Tensor  # float8_e8m0fnu (..., Kp/32): X = 2^(byte - 127)


def _round_mxfp4(x2, rounding, seed):
    """fp32 (M, Kp), padded -> (magnitude, negative (M, Kp/32, 32), scale: E8M0 bytes (M, Kp/32)); see
    quantize_mxfp4."""
    M, Kp = x2.shape
    blocks = x2.view(M, -1, MX_BLOCK)                                                 # (M, Kp/32, 32)
    amax = blocks.abs().amax(-1)                                                      # (M, Kp/32)
    scale = _e8m0(_fp32_exponent(amax) - E2M1_MAX_POW2, amax)                         # uint8 bytes
    v = blocks / _e8m0_value(scale)[..., None]
    noise = uniform_noise(seed, (M, Kp)).view(v.shape) if rounding == "stochastic" else None
    return round_e2m1_magnitude(v.abs(), noise), v < 0, scale


def quantize_mxfp4(x, rounding="nearest", generator=None):
    """x (..., K) -> MX, blocks of 32 along the last dim (Kp = K rounded up to 32, zero-padded).
    X = 2^(floor(log2 amax) - 2), the exponent read from the fp32 bits (OCP "floor" rule; amax = 0 gives
    2^-127); q = E2M1(x ⊘ X), saturating at ±6. Equals torchao to_mx(..., ScaleCalculationMode.FLOOR).
    Why MXFP4 trails NVFP4: a power-of-two scale cannot fit the block max to 6, so amax ⊘ X lands anywhere in
    [4, 8): up to 8 it saturates to 6 (clipping the largest values), and the grid is used less fully than
    with NVFP4's E4M3 scale, which maps every block's amax to ~6. Blocks of 32 also share one scale."""
    _check("tensor", (1, 16), rounding)
    x2 = _as_padded_2d(x, 1, MX_BLOCK).float()                                        # (M, Kp)
    seed = draw_seed(generator, x2.device) if rounding == "stochastic" else None
    magnitude, negative, scale = _round_mxfp4(x2, rounding, seed)
    codes = e2m1_codes(magnitude, negative).view(x2.shape)
    M = x2.shape[0]
    return MX(_restore(pack_e2m1(codes), x, M), _restore(scale.view(torch.float8_e8m0fnu), x, M))


def dequantize_mxfp4(q, dtype=torch.float32):
    """MX (E2M1 codes) -> (..., Kp): x_dq = e2m1(code) ⊗ X."""
    values = decode_e2m1(unpack_e2m1(q.codes)).unflatten(-1, (-1, MX_BLOCK))
    return (values * q.scale.float()[..., None]).flatten(-2).to(dtype)


def quantize_mxfp8(x):
    """x (..., K) -> MX with E4M3 elements (OutControl's high-precision channels, §8), blocks of 32.
    X = 2^ceil(log2(amax ⊘ 448)): the exponent of r = amax ⊘ 448 plus 1 if r's mantissa is non-zero, so the
    block max never exceeds 448 after scaling (beyond fp32 rounding of r; the cast saturates anyway).
    Elements: e4m3(clamp(x ⊘ X, ±448)), round to nearest even."""
    x2 = _as_padded_2d(x, 1, MX_BLOCK).float()
    M, Kp = x2.shape
    blocks = x2.view(M, -1, MX_BLOCK)
    amax = blocks.abs().amax(-1)
    r = _div(amax, F8E4M3_MAX)
    exponent = _fp32_exponent(r) + ((r.view(torch.int32) & 0x7FFFFF) != 0).int()
    scale = _e8m0(exponent, amax)                                                     # uint8 bytes
    codes = (blocks / _e8m0_value(scale)[..., None]).clamp(-F8E4M3_MAX, F8E4M3_MAX).to(torch.float8_e4m3fn)
    return MX(_restore(codes.view(M, Kp), x, M), _restore(scale.view(torch.float8_e8m0fnu), x, M))


def dequantize_mxfp8(q, dtype=torch.float32):
    """MX (E4M3 codes) -> (..., Kp): x_dq = fp32(code) ⊗ X."""
    values = q.codes.float().unflatten(-1, (-1, MX_BLOCK))
    return (values * q.scale.float()[..., None]).flatten(-2).to(dtype)


def sqnr(x, x_dq):
    """Signal-to-quantization-noise ratio in dB (§9): 10·log10(‖x‖² / ‖x - x_dq‖²), in fp64."""
    x, x_dq = x.double(), x_dq.double()
    return (10 * torch.log10(x.square().sum() / (x - x_dq).square().sum())).item()

# -----------------------------------------------------------------------------
# Random Hadamard transform (§5)

def random_signs(generator=None, device=None, n=NVFP4_BLOCK):
    """n (16 or 128) random ±1 fp32 signs for rht, drawn as torch.randint(0, 2, (n,), generator=generator)."""
    bits = torch.randint(0, 2, (n,), generator=generator, device=device)
    return (1 - 2 * bits).float()


def hadamard16(signs):
    """16 ±1 signs s -> H = ¼ · diag(s) · H₁₆ (16, 16) fp32, H₁₆ the Sylvester ±1 Hadamard matrix
    (H_2n = [[H, H], [H, -H]]), so that a chunk c (a 1x16 row) becomes c H = ((c ∘ s) H₁₆) / 4: the signs
    flip the *inputs*, then the rotation mixes them (TE's `x @ (diag(s)·H₁₆)/4`; the official TetraJet-v2
    kernel negates the 16 inputs, then runs the butterfly). Every entry is ±¼, so H is orthogonal: H Hᵀ = I.
    Why input-side: with the signs on the output side (¼·H₁₆·diag(s)), c H would be the plain rotation
    c H₁₆/4 with its outputs' signs flipped; every quantizer here is symmetric (Q(-v) = -Q(v), SR included,
    as it rounds |v|), so those flips pass through Q unchanged and cancel in the GEMM, (A H)(B H)ᵀ with the
    same flips on both operands: every sign vector would give bit-identical GEMMs, a plain Hadamard."""
    return signs.float()[:, None] * _sylvester16(signs.device)   # row i scaled by signs[i]


@functools.cache
def _sylvester16(device):
    """¼ · H₁₆ (16, 16) fp32 on `device`, built once: H_2n = [[H, H], [H, -H]] from H_1 = [1]."""
    h = torch.ones(1, 1, device=device)
    for _ in range(4):
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return 0.25 * h


def rht16(x, signs):
    """x (..., K), K a multiple of 16 -> fp32, every contiguous 16-chunk c of the last dim replaced by c H,
    H = hadamard16(signs). Applied to both operands of a GEMM along K it leaves the product unchanged:
    (A H)(B H)ᵀ = A Bᵀ.
    Why: each output is a ±¼-weighted sum of all 16 inputs, so a single outlier is spread over the whole
    chunk (|16| -> sixteen values of |4|) and the block's values look Gaussian, which a 16-element FP4 block
    with one scale represents far better than one spike among near-zeros. Random signs make the rotation,
    and so its effect on the quantization error, independent of the data (TetraJet-v2 §3, NVIDIA §4.2).
    Exactly: out[:, j] = Σ_i c[i]·H[i, j] summed in the order i = 0, 1, ..., 15 in fp32. Each product is
    exact (a multiple of ±¼), so fixing the order fixes every bit: every implementation adds in this order
    (a butterfly or a matmul would add in another, so give other bits)."""
    if x.shape[-1] % NVFP4_BLOCK:
        raise ValueError(f"rht16 needs the last dim to be a multiple of 16, got {x.shape[-1]}; zero-pad it first")
    return _rotate16(x, hadamard16(signs.to(x.device)))


def _rotate16(x, H):
    """rht16 with H = hadamard16(signs) already built (the quantizers take H, built once per call)."""
    c = x.float().reshape(*x.shape[:-1], -1, NVFP4_BLOCK)
    out = c[..., 0:1] * H[0]
    for i in range(1, NVFP4_BLOCK):
        out = out + c[..., i:i + 1] * H[i]                   # (..., 1) * (16,) -> (..., 16)
    return out.reshape(x.shape)


def rht128(x, signs):
    """x (..., K), K a multiple of 128, and 128 ±1 signs s -> fp32, every contiguous 128-chunk c of the last
    dim replaced by ((c ∘ s) H₁₂₈) ⊗ fl(1/√128): Quartet II's RHT-128 (§5, §11), H₁₂₈ the Sylvester ±1 matrix,
    signs on the inputs as for RHT-16. (A H)(B H)ᵀ = A Bᵀ up to rounding (H is orthogonal).
    Why 128 points: MS-EDEN's correction is unbiased only in expectation over the rotation, and it is
    computed per 128-group, so the rotation must mix exactly that group.
    Exactly: c ∘ s (exact), then the fast Walsh-Hadamard butterfly in fp32, stages h = 1, 2, 4, ..., 64: within
    every 2h-block, the pair (a, b) = (y[j], y[j + h]) becomes (a + b, a - b); then one multiply by
    RHT128_NORM = fl(2^-3.5). 7 adds per element instead of a matmul's 128, in an order every implementation
    can follow (not RHT-16's matrix order: its products by ±¼ are exact, these by 2^-3.5 would not be)."""
    if x.shape[-1] % OUTER_BLOCK:
        raise ValueError(f"rht128 needs the last dim to be a multiple of 128, got {x.shape[-1]}; zero-pad it first")
    return _rotate128(x, signs.to(x.device).float())


def _rotate128(x, signs):
    """rht128's body: x (..., K) -> fp32 (..., K), signs (128,) fp32 on x's device."""
    y = x.float().reshape(-1, OUTER_BLOCK) * signs                          # (n, 128)
    n, h = y.shape[0], 1
    while h < OUTER_BLOCK:
        y = y.view(n, OUTER_BLOCK // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]                                       # (n, 128/2h, h) each
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(x.shape) * RHT128_NORM)


def rht(x, signs):
    """rht16 or rht128, by the number of signs (16 or 128)."""
    return rht16(x, signs) if len(signs) == NVFP4_BLOCK else rht128(x, signs)


def _rotate(x, R):
    """The quantizers' RHT: R = hadamard16(signs) (16, 16) for RHT-16, or the 128 signs (128,) for RHT-128."""
    return _rotate16(x, R) if R.dim() == 2 else _rotate128(x, R)


def rht_operator(signs, device):
    """16 or 128 signs -> what _fake_quant_2d takes as H: hadamard16(signs) or the 128 signs (None -> None)."""
    if signs is None:
        return None
    signs = signs.to(device).float()
    return hadamard16(signs) if len(signs) == NVFP4_BLOCK else signs

# -----------------------------------------------------------------------------
# Recipes: which quantizer each operand of each GEMM gets (§6). Every knob is independent and has an
# "off" value, so an ablation is one line: `dataclasses.replace(RECIPES["tetrajet"], rht=())`.

@dataclass(frozen=True)
class Recipe:
    name: str
    fmt: str = "nvfp4"                 # element/scale format: "nvfp4" or "mxfp4"
    outer: object = "tensor"           # NVFP4 outer scale: "tensor" (NVIDIA) or 128 (TetraJet-v2 double-block)
    weight_tile: tuple = (1, 16)       # W's scale tile in fprop and dgrad: (1, 16) or (16, 16) (NVFP4 only)
    grad_rounding: str = "stochastic"  # dY in dgrad and wgrad: "nearest", "stochastic" or "eden" (MS-EDEN, §11)
    other_rounding: str = "nearest"    # the other backward operand: W (dgrad) and X (wgrad), same choices
    rht: tuple = ()                    # backward GEMMs that get an RHT: subset of ("dgrad", "wgrad")
    rht_signs: str = "fixed"           # "fixed" (NVIDIA_RHT_SIGNS) or "random" (fresh per GEMM per step)
    rht_size: int = 16                 # RHT points: 16 (NVIDIA, TetraJet-v2) or 128 (Quartet II)
    aligned: bool = False              # backward quantizes the dequantized forward X̂, Ŵ instead of X, W
    four_over_six: str = "none"        # forward operands with Four Over Six scales (§10): none, weights, activations, all
    four_over_six_error: str = "mae"   # the error 4/6 picks by: "mae" (TE's default) or "mse"

    def __post_init__(self):
        for ok, what in ((self.fmt in ("nvfp4", "mxfp4"), "fmt must be 'nvfp4' or 'mxfp4'"),
                         (self.outer in ("tensor", OUTER_BLOCK), f"outer must be 'tensor' or {OUTER_BLOCK}"),
                         (self.weight_tile in ((1, 16), (16, 16)), "weight_tile must be (1, 16) or (16, 16)"),
                         (self.fmt == "nvfp4" or (self.outer, self.weight_tile) == ("tensor", (1, 16)),
                          "mxfp4 has no outer scale and no 2-D tiles: keep outer='tensor', weight_tile=(1, 16)"),
                         ({self.grad_rounding, self.other_rounding} <= set(QUANTIZER_ROUNDINGS),
                          f"roundings must be in {QUANTIZER_ROUNDINGS}"),
                         (EDEN not in (self.grad_rounding, self.other_rounding) or
                          (self.fmt, self.outer) == ("nvfp4", "tensor"),
                          "MS-EDEN (rounding 'eden') needs fmt='nvfp4' and outer='tensor', as in Quartet II"),
                         (self.other_rounding != EDEN or self.weight_tile == (1, 16),
                          "MS-EDEN on the other operand needs weight_tile=(1, 16) (dgrad quantizes Wᵀ with W's tile)"),
                         (set(self.rht) <= {"dgrad", "wgrad"}, "rht must be a subset of ('dgrad', 'wgrad')"),
                         (self.rht_signs in ("fixed", "random"), "rht_signs must be 'fixed' or 'random'"),
                         (self.rht_size in RHT_SIZES, f"rht_size must be one of {RHT_SIZES}"),
                         (self.rht_size == NVFP4_BLOCK or self.rht_signs == "random",
                          "RHT-128 needs rht_signs='random' (the fixed signs are NVIDIA's 16)"),
                         (self.rht_size == NVFP4_BLOCK or self.fmt == "nvfp4", "RHT-128 is for NVFP4 recipes"),
                         (self.four_over_six in FOUR_OVER_SIX_SCOPES,
                          f"four_over_six must be one of {FOUR_OVER_SIX_SCOPES}"),
                         (self.four_over_six_error in FOUR_OVER_SIX_ERRORS,
                          f"four_over_six_error must be one of {FOUR_OVER_SIX_ERRORS}"),
                         (self.fmt == "nvfp4" or self.four_over_six == "none",
                          "Four Over Six (four_over_six) is an NVFP4 scale rule: mxfp4 has none")):
            if not ok:
                raise ValueError(f"FP4 recipe {self.name!r}: {what}")


RECIPES = {
    # NVIDIA (arXiv 2509.25149 §4): 2-D weight tiles, SR on gradients only, RHT on wgrad only, fixed signs
    "nvidia": Recipe("nvidia", weight_tile=(16, 16), rht=("wgrad",)),
    # TetraJet-v2 (arXiv 2510.27527 §3): double-block scales, SR and random RHT on every backward operand,
    # and the backward starts from the forward's dequantized tensors
    "tetrajet": Recipe("tetrajet", outer=OUTER_BLOCK, other_rounding="stochastic", rht=("dgrad", "wgrad"),
                       rht_signs="random", aligned=True),
    # Quartet II (arXiv 2601.22813, §11): forward per-tensor RTN with Four Over Six (MSE); backward from the
    # forward's X̂, Ŵ, every operand MS-EDEN after a fresh RHT-128
    "quartet2": Recipe("quartet2", grad_rounding=EDEN, other_rounding=EDEN, rht=("dgrad", "wgrad"),
                       rht_signs="random", rht_size=OUTER_BLOCK, aligned=True, four_over_six="all",
                       four_over_six_error="mse"),
    # OCP MXFP4: power-of-two scales per 32, SR on gradients
    "mxfp4": Recipe("mxfp4", fmt="mxfp4"),
}


def get_recipe(recipe):
    """A Recipe, or the name of one in RECIPES."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown FP4 recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[recipe]


def quantize(x, recipe, rounding="nearest", tile=(1, 16), generator=None, four_over_six=None):
    """x (..., K) -> the recipe's quantized tuple (NVFP4 or MX) along the last dim."""
    if recipe.fmt == "mxfp4":
        _check_four_over_six(four_over_six, fmt=recipe.fmt)
        return quantize_mxfp4(x, rounding=rounding, generator=generator)
    return quantize_nvfp4(x, outer=recipe.outer, tile=tile, rounding=rounding, generator=generator,
                          four_over_six=four_over_six)


def four_over_six_of(recipe, operand):
    """-> the four_over_six argument for forward operand "activations" (X) or "weights" (W) under `recipe`:
    its four_over_six_error if recipe.four_over_six is that operand or "all", else None (§10)."""
    return recipe.four_over_six_error if recipe.four_over_six in (operand, "all") else None


def dequantize(q, width):
    """NVFP4 or MX tuple -> fp32 (..., width), the padding cropped."""
    if isinstance(q, NVFP4):
        x = dequantize_nvfp4(q)
    else:
        x = dequantize_mxfp8(q) if q.codes.dtype == torch.float8_e4m3fn else dequantize_mxfp4(q)
    return x[..., :width]


def _fake_quant_2d(x2, fmt, outer, tile, rounding, seed, H=None, four_over_six=None):
    """(Mp, Kp) padded, any float dtype and strides -> fp32 (Mp, Kp): bit for bit
    dequantize(quantize(rht(x2) or x2)), H = rht_operator(signs) (hadamard16(signs), or the 128 signs of
    RHT-128) or None, but without building the codes: x_dq = ±magnitude ⊗ scale.
    One function of elementwise math, the RHT's multiply-adds and block reductions, with no cast or RHT pass
    of its own, so that a faster implementation can fuse all of it into a few loops (fastpaths.py)."""
    x2 = x2.float()
    if H is not None:
        x2 = _rotate(x2, H)
    if fmt == "mxfp4":
        magnitude, negative, scale = _round_mxfp4(x2, rounding, seed)
        scale = _e8m0_value(scale)                                                    # (Mp, Kp/32)
    else:
        magnitude, negative, _, scale, _ = _round_nvfp4(x2, outer, tile, rounding, seed, four_over_six)
    x_dq = magnitude * scale[..., None]
    return torch.where(negative, -x_dq, x_dq).view(x2.shape)


def fake_quant(x, recipe, rounding="nearest", tile=(1, 16), generator=None, *, rht_signs=None, dtype=torch.float32,
               four_over_six=None):
    """x (..., K) -> (..., K) in `dtype`: quantize along the last dim with the recipe's format, then
    dequantize; equal bit for bit to dequantize(quantize(x, ...)) (tests/test_nvfp4.py), without building the
    codes. rounding: "nearest", "stochastic" or "eden" (MS-EDEN, §11, NVFP4 per-tensor only). rht_signs: None,
    or 16 or 128 ±1 signs to quantize rht(x) instead (x zero-padded to whole chunks first); the result then
    keeps that padded width, K rounded up to 16 or 128, since rotated padding is not zero.
    four_over_six: None, "mae" or "mse": Four Over Six block scales (§10, quantize_nvfp4; NVFP4 RTN only)."""
    recipe, tile = get_recipe(recipe), tuple(tile)
    _check_four_over_six(four_over_six, rounding, rht_signs, recipe.fmt)
    x2, seed = pad_operand(x, recipe, rounding, tile, generator, rht_signs)            # (Mp, Kp), seed or None
    H = rht_operator(rht_signs, x2.device)
    out = _fake_quant_2d(x2, recipe.fmt, recipe.outer, tile, rounding, seed, H, four_over_six)   # (Mp, Kp) fp32
    return crop_result(out.to(dtype), x, rht_signs)


def pad_operand(x, recipe, rounding, tile, generator, rht_signs=None):
    """fake_quant's prologue, shared with every implementation: x (..., K) -> (x2 (Mp, Kp) zero-padded to
    whole blocks (k_multiple), in x's dtype; the int64 (2,) seed drawn from `generator` for SR and MS-EDEN,
    or None for RTN)."""
    _check(recipe.outer, tile, rounding, rht_signs)
    if recipe.fmt == "mxfp4" and rounding == EDEN:
        raise ValueError("MS-EDEN (rounding='eden') is an NVFP4 quantizer; recipe "
                         f"{recipe.name!r} is mxfp4")
    x2 = _as_padded_2d(x, tile[0], k_multiple(recipe.fmt, recipe.outer, rounding, rht_signs))
    return x2, (draw_seed(generator, x2.device) if rounding != "nearest" else None)


def crop_result(out, x, rht_signs):
    """fake_quant's epilogue: (Mp, Kp) -> (*x.shape[:-1], K), or K rounded up to 16 or 128 after an RHT."""
    width = x.shape[-1] if rht_signs is None else -(-x.shape[-1] // len(rht_signs)) * len(rht_signs)
    return _restore(out, x, x.numel() // x.shape[-1])[..., :width]


def fake_quant_mxfp8(x, dtype=torch.float32):
    """x (..., K) -> (..., K) in `dtype`: MXFP8 along the last dim, then dequantized (OutControl's channels)."""
    return dequantize(quantize_mxfp8(x), x.shape[-1]).to(dtype)


def fake_quant_split(x, recipe, tile=(1, 16), outliers=None, impl=None, dtype=torch.float32, four_over_six=None):
    """x (M, K) -> (M, K) in `dtype`, round to nearest: FP4 (the recipe's format) on every column except the
    outliers, which get MXFP8 (OutControl, §8). `outliers`: None, a LongTensor of MXFP8 column indices
    (the FP4 columns are then the rest, in ascending order), or a pair (outliers, inliers) of LongTensors
    (as select_outlier_channels returns them, both in descending-norm order). Each part is quantized as its
    own contiguous matrix with its columns in that order, as a real kernel sees it after gathering them: the
    order decides which channels share a 16-block (and a 128-block), so it is part of the numerics.
    impl: the implementation of fake_quant (REFERENCE if None; fastpaths.py has faster ones). four_over_six:
    passed to the FP4 part's fake_quant (§10; the MXFP8 columns have no 4/6)."""
    impl = impl or REFERENCE
    if outliers is None:
        return impl.fake_quant(x, recipe, tile=tile, dtype=dtype, four_over_six=four_over_six)
    outliers, inliers = split_columns(outliers, x.shape[1])
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    out[:, inliers] = impl.fake_quant(x[:, inliers], recipe, tile=tile, dtype=dtype, four_over_six=four_over_six)
    out[:, outliers] = fake_quant_mxfp8(x[:, outliers], dtype)
    return out


def split_columns(outliers, n):
    """outliers (LongTensor) or (outliers, inliers) -> (outliers, inliers); inliers default to the other
    columns of n, ascending."""
    if isinstance(outliers, (tuple, list)):
        return tuple(outliers)
    keep = torch.ones(n, dtype=torch.bool, device=outliers.device)
    keep[outliers] = False
    return outliers, keep.nonzero().squeeze(1)


class Reference:
    """The implementation of the quantizers an FP4 layer calls: this file's functions, run eagerly. Faster
    ones (fastpaths.py: compiled, cpu, triton) have the same members and give the same bits; fastpaths.select
    chooses one at start-up and the layers hold it (FP4Linear.impl)."""
    name = "reference"
    fake_quant = staticmethod(fake_quant)
    quantize_nvfp4 = staticmethod(quantize_nvfp4)

    def tensor_core_gemm(self, device):
        """-> None: every GEMM multiplies the dequantized operands (the simulation). An implementation with
        FP4 tensor cores on `device` returns a function (qa, qb: NVFP4) -> qa·qbᵀ from the codes instead."""
        return None


REFERENCE = Reference()


def _backward_gemm(gemm, a, b, recipe, generator, b_tile=(1, 16), stats=None, impl=REFERENCE, dtype=torch.float32):
    """a (M, K), b (P, K) -> (M, P) in `dtype` = Q(a H) Q(b H)ᵀ ≈ a bᵀ. `a` is the gradient dY (rounded with
    grad_rounding), `b` the other operand (other_rounding); H is the recipe's RHT-16 or RHT-128 if it applies
    one to this GEMM (both operands zero-padded to whole chunks, the same signs for both), else the identity. Random draws from `generator`, in this
    order: signs, noise for a, noise for b (each SR operand draws its own, independent noise). `stats`: a
    dict that receives the SQNR of the dY operand."""
    signs = None
    if gemm in recipe.rht:
        signs = (random_signs(generator, a.device, recipe.rht_size) if recipe.rht_signs == "random"
                 else torch.tensor(NVIDIA_RHT_SIGNS, dtype=torch.float32, device=a.device))
    width = a.shape[1] if signs is None else -(-a.shape[1] // len(signs)) * len(signs)   # RHT: K up to 16 or 128
    gemm_from_codes = impl.tensor_core_gemm(a.device) if recipe.fmt == "nvfp4" else None
    if gemm_from_codes is not None:                          # the same draws, then a GEMM from the codes
        qa = impl.quantize_nvfp4(a, outer=recipe.outer, rounding=recipe.grad_rounding, generator=generator,
                                 rht_signs=signs)
        qb = impl.quantize_nvfp4(b, outer=recipe.outer, tile=b_tile, rounding=recipe.other_rounding,
                                 generator=generator, rht_signs=signs)
        out = gemm_from_codes(qa, qb).to(dtype)
        a_dq = dequantize(qa, width) if stats is not None else None
    else:
        a_dq = impl.fake_quant(a, recipe, recipe.grad_rounding, generator=generator, rht_signs=signs, dtype=dtype)
        b_dq = impl.fake_quant(b, recipe, recipe.other_rounding, b_tile, generator, rht_signs=signs, dtype=dtype)
        out = a_dq @ b_dq.t()
    if stats is not None:                                    # against what the quantizer saw: a H
        a_seen = a if signs is None else rht(torch.nn.functional.pad(a.float(), (0, width - a.shape[1])), signs)
        stats[f"sqnr_dy_{gemm}"] = sqnr(a_seen, a_dq)
    return out


def _fprop(x2, weight, recipe, outliers, impl, dtype):
    """GEMM 1 of FP4LinearFunction: x2 (N, in), weight (out, in) -> (Y = X̂ Ŵᵀ (N, out), X̂ (N, in), Ŵ (out, in)),
    all in `dtype`, X and W quantized along `in` with round to nearest. With FP4 tensor cores (an `impl` whose
    tensor_core_gemm gives a function: kernels.py on a Blackwell GPU) and no OutControl channels, the GEMM
    multiplies the codes themselves (fp32 accumulation) and X̂, Ŵ are dequantized for the backward; everywhere
    else it is fake-quant, then a matmul in `dtype` (the simulation: the same numbers up to summation order
    and the bf16 rounding of X̂, Ŵ). Four Over Six (§10) goes to X and/or W as recipe.four_over_six says."""
    fx, fw = four_over_six_of(recipe, "activations"), four_over_six_of(recipe, "weights")
    gemm_from_codes = impl.tensor_core_gemm(x2.device) if recipe.fmt == "nvfp4" else None
    if outliers is None and gemm_from_codes is not None:
        qx = impl.quantize_nvfp4(x2, outer=recipe.outer, four_over_six=fx)
        qw = impl.quantize_nvfp4(weight, outer=recipe.outer, tile=recipe.weight_tile, four_over_six=fw)
        y = gemm_from_codes(qx, qw).to(dtype)
        return y, dequantize(qx, x2.shape[1]).to(dtype), dequantize(qw, weight.shape[1]).to(dtype)
    x_hat = fake_quant_split(x2, recipe, (1, 16), outliers, impl, dtype, fx)                # (N, in)
    w_hat = fake_quant_split(weight, recipe, recipe.weight_tile, outliers, impl, dtype, fw)  # (out, in)
    return x_hat @ w_hat.t(), x_hat, w_hat


# -----------------------------------------------------------------------------
# The quantized linear: Y = X Wᵀ with all three GEMMs in FP4 (§6), optionally with OutControl's
# outlier input channels in MXFP8 (§8)

class FP4LinearFunction(torch.autograd.Function):
    """Y = Q(X) Q(W)ᵀ forward, FP4 dgrad and wgrad backward, for one Recipe. High precision in, high out:
    x (..., in) any float dtype, weight (out, in) -> y (..., out) in x.dtype; grads in the inputs' dtypes.
    The quantizers compute in fp32, exactly as docs/numerics.md says; each GEMM then multiplies the dequantized
    operands in x.dtype, as torch.matmul does it (fp32 accumulation for bf16 inputs). So an FP4 run and the
    bf16 baseline multiply at the same precision and differ only by the quantization. For bf16 this rounds
    each dequantized value to 8 significant bits: exact for E2M1 x E4M3/E8M0 products (<= 6 bits), a
    relative error <= 2^-9 once an fp32 outer scale is folded in, ~30 dB below FP4's own error.
    outliers: None, or the input channels kept in MXFP8 (OutControl): a LongTensor, or (outliers, inliers) as
    fake_quant_split takes them. stats: None or a dict the
    call fills with diagnostics (SQNR of X, W, dY; saturated/underflowed block fractions); it draws no noise.
    impl: which implementation runs the quantizers (REFERENCE, or one of fastpaths.py's); all give the same bits."""

    # The three GEMMs quantize differently because they do different jobs. fprop must be accurate (RTN): its
    # output is the network. dgrad and wgrad feed the optimizer, which averages over steps, so unbiased SR
    # noise is better than a small bias; and their K (out features, tokens) is where gradient outliers live,
    # hence the RHT. "Aligned" (TetraJet-v2 §3): the network that ran used X̂ and Ŵ, so its true gradients are
    # dY Ŵ and dYᵀ X̂; starting the backward from X and W instead adds a bias of dY (W - Ŵ) that no amount of
    # SR removes.

    @staticmethod
    def forward(ctx, x, weight, recipe, generator, outliers=None, stats=None, impl=REFERENCE):
        in_f, dtype = x.shape[-1], x.dtype
        x2 = x.reshape(-1, in_f)                                               # (N, in)
        # === GEMM 1: fprop  Y = X̂ Ŵᵀ, both quantized along `in`, round to nearest ===
        # (with outliers: = Q4(X[:, F]) Q4(W[:, F])ᵀ + Q8(X[:, O]) Q8(W[:, O])ᵀ, §8)
        y, x_hat, w_hat = _fprop(x2, weight, recipe, outliers, impl, dtype)  # (N, out), (N, in), (out, in)
        if stats is not None:
            stats.update(sqnr_x=sqnr(x2, x_hat), sqnr_w=sqnr(weight, w_hat))
            stats.update(zip(("saturated_x", "underflow_x"),
                             block_health(x2, recipe, four_over_six=four_over_six_of(recipe, "activations"))))
            stats.update(zip(("saturated_w", "underflow_w"), block_health(weight, recipe, recipe.weight_tile,
                                                                          four_over_six_of(recipe, "weights"))))
        # What the backward keeps. NVIDIA's 16x16 tiles make Q(Wᵀ) = Q(W)ᵀ (§2): when dgrad would
        # re-quantize W exactly as the forward did (RTN, no RHT), it reuses the forward Ŵ instead. Aligned
        # recipes keep the dequantized X̂, Ŵ (as the GEMM saw them, in x.dtype); the others keep X and W.
        ctx.reuse_w = (recipe.weight_tile == (16, 16) and "dgrad" not in recipe.rht
                       and recipe.other_rounding == "nearest" and not recipe.aligned)
        ctx.save_for_backward(x_hat if recipe.aligned else x2, w_hat if (recipe.aligned or ctx.reuse_w) else weight)
        ctx.columns = None if outliers is None else split_columns(outliers, in_f)   # (outliers, inliers)
        ctx.recipe, ctx.generator, ctx.stats, ctx.impl = recipe, generator, stats, impl
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        recipe, gen, stats, impl, dtype = ctx.recipe, ctx.generator, ctx.stats, ctx.impl, ctx.x_dtype
        (x_src, w_src), columns = ctx.saved_tensors, ctx.columns                           # X̂ or X (N, in), Ŵ or W (out, in)
        dy2 = dy.reshape(-1, dy.shape[-1])                                     # (N, out)
        dx = dw = None
        # === GEMM 2: dgrad  dX = dY W, reduces over `out`: operands dY (N, out) and Wᵀ (in, out) ===
        # (always fully FP4, with outliers too: W's source is then the mixed Ŵ, §8)
        if ctx.needs_input_grad[0] and ctx.reuse_w:
            dy_dq = impl.fake_quant(dy2, recipe, recipe.grad_rounding, generator=gen, dtype=dtype)  # (N, out)
            dx = dy_dq @ w_src                                                 # the forward's Ŵ, (N, in)
            if stats is not None:
                stats["sqnr_dy_dgrad"] = sqnr(dy2, dy_dq)
        elif ctx.needs_input_grad[0]:
            dx = _backward_gemm("dgrad", dy2, w_src.t(), recipe, gen, recipe.weight_tile, stats, impl, dtype)
        # === GEMM 3: wgrad  dW = dYᵀ X, reduces over tokens: operands dYᵀ (out, N) and Xᵀ (in, N) ===
        if ctx.needs_input_grad[1] and columns is None:
            dw = _backward_gemm("wgrad", dy2.t(), x_src.t(), recipe, gen, stats=stats, impl=impl, dtype=dtype)
        elif ctx.needs_input_grad[1]:                        # FP4 on channels F, MXFP8 on the outliers O
            outliers, keep = columns
            dw = torch.empty(dy2.shape[1], x_src.shape[1], dtype=dtype, device=dy2.device)    # (out, in)
            dw[:, keep] = _backward_gemm("wgrad", dy2.t(), x_src[:, keep].t(), recipe, gen, stats=stats, impl=impl,
                                         dtype=dtype)
            dw[:, outliers] = fake_quant_mxfp8(dy2.t(), dtype) @ fake_quant_mxfp8(x_src[:, outliers].t(), dtype).t()
        dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype) if dx is not None else None
        return dx, (dw.to(ctx.w_dtype) if dw is not None else None), None, None, None, None, None


SATURATION_LIMIT = 7.0   # a scaled |x| above 7 loses more to the clamp at 6 than rounding loses anywhere in range


def block_health(x, recipe, tile=(1, 16), four_over_six=None):
    """-> (saturated, underflow): among the non-zero blocks of x (..., K) under the recipe's quantizer,
    the fraction whose scale is too small for the block (scaled amax > SATURATION_LIMIT, so the clamp at ±6
    costs more than half the top step: MXFP4's power-of-two floor scale does this in 17% of the blocks of
    randn; NVFP4's fitted E4M3 scale only rounds and never does), and the fraction whose scale underflowed to
    an E4M3 subnormal or zero (< 2^-6: under 4 significant bits, the per-tensor scale's failure mode) or to
    E8M0's smallest value. four_over_six: as the forward quantized x (§10)."""
    q = quantize(x, recipe, tile=tile, four_over_six=four_over_six)
    x2 = x.reshape(-1, x.shape[-1]).float()                                   # (M, K)
    if isinstance(q, MX):
        block, scale = MX_BLOCK, q.scale.float().view(x2.shape[0], -1)         # (M, Kp/32)
        tiny = q.scale.view(torch.uint8).view(scale.shape) == 0
    else:
        block, s = NVFP4_BLOCK, q.block_scale.float().view(x2.shape[0], -1)   # (M, Kp/16)
        outer = q.outer_scale if q.outer_scale.dim() == 0 else \
            q.outer_scale.view(x2.shape[0], -1).repeat_interleave(OUTER_BLOCK // NVFP4_BLOCK, dim=-1)
        scale, tiny = s * outer, s < 2.0 ** -6
    x2 = torch.nn.functional.pad(x2, (0, scale.shape[1] * block - x2.shape[1]))
    amax = x2.abs().view(x2.shape[0], -1, block).amax(-1)                     # same shape as scale
    nonzero = amax > 0
    n = nonzero.sum().clamp(min=1)
    saturated = (amax * (1.0 / scale).clamp(max=FLT_MAX) > SATURATION_LIMIT) & nonzero
    return (saturated.sum() / n).item(), ((tiny & nonzero).sum() / n).item()

# -----------------------------------------------------------------------------
# Modules last: FP4Linear and the converter


class FP4Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in simulated FP4 (FP4LinearFunction); the weight stays the fp32
    master. Stochastic rounding and random RHT signs come from this layer's own torch.Generator, seeded with
    `seed + NOISE_SEED_OFFSET` on first use on a device; its state rides in the state_dict (extra_state), so
    --resume continues the exact random stream. (Calling FP4LinearFunction directly, pass any generator, or None for torch's.)
    OutControl state: `outliers` (input channels kept in MXFP8, or None) and, while `calibrating`, the running
    `channel_norm`; both are saved in extra_state too. `impl`: the implementation of the quantizers
    (REFERENCE, or the one fastpaths.select chose). `stats`: see fp4_training.record_stats."""

    def __init__(self, in_features, out_features, bias=False, *, recipe="tetrajet", seed=0, impl=REFERENCE,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe, self.seed, self.impl = get_recipe(recipe), seed, impl
        self._generator, self._rng_state = None, None
        self.outliers = self.inliers = self.channel_norm = self.stats = None
        self.calibrating = False
        self.high_precision = False          # True inside fp4_training.high_precision(): plain, no FP4 at all

    @classmethod
    def from_linear(cls, linear, recipe="tetrajet", seed=0, impl=REFERENCE):
        """Wrap an existing nn.Linear; the weight and bias Parameters are shared, not copied."""
        m = cls(linear.in_features, linear.out_features, bias=False, recipe=recipe, seed=seed, impl=impl,
                device="meta")
        m.weight, m.bias = linear.weight, linear.bias
        return m

    def generator(self, device):
        device = torch.device(device)
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device).manual_seed(self.seed + NOISE_SEED_OFFSET)
            if self._rng_state is not None and self._rng_state["device"] == device.type:
                self._generator.set_state(self._rng_state["state"])     # resume the saved stream
            self._rng_state = None
        return self._generator

    def quantize_weight(self):
        """Ŵ (out, in) fp32, the forward's quantized weight: what OsciReset tracks (docs/numerics.md §7)."""
        return fake_quant_split(self.weight.detach(), self.recipe, self.recipe.weight_tile, self.columns(), self.impl,
                                four_over_six=four_over_six_of(self.recipe, "weights"))

    def columns(self):
        """OutControl's split of the input channels: None, or (outliers, inliers) in descending-norm order."""
        if self.outliers is None or not len(self.outliers):
            return None
        return split_columns(self.outliers if self.inliers is None else (self.outliers, self.inliers),
                             self.in_features)

    def forward(self, x):
        if self.high_precision:                              # the shadow network of fp4_training.high_precision
            y = nn.functional.linear(x, self.weight.to(x.dtype))
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if self.calibrating and self.training:               # OutControl: per-channel L2 norm over tokens
            norm = x.detach().reshape(-1, self.in_features).float().norm(dim=0)    # (in,)
            self.channel_norm = norm if self.channel_norm is None else self.channel_norm + norm
        y = FP4LinearFunction.apply(x, self.weight, self.recipe, self.generator(x.device), self.columns(), self.stats,
                                    self.impl)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def get_extra_state(self):
        rng = self._rng_state
        if self._generator is not None:
            rng = {"device": self._generator.device.type, "state": self._generator.get_state()}
        return {"recipe": self.recipe.name, "seed": self.seed, "rng_state": rng, "outliers": self.outliers,
                "inliers": self.inliers, "channel_norm": self.channel_norm}

    def set_extra_state(self, state):
        self.seed, self._generator, self._rng_state = state["seed"], None, state["rng_state"]
        device = self.weight.device
        self.outliers, self.inliers, self.channel_norm = (
            None if t is None else t.to(device) for t in (state.get("outliers"), state.get("inliers"),
                                                          state.get("channel_norm")))

    def extra_repr(self):
        return f"{super().extra_repr()}, recipe={self.recipe.name}, impl={self.impl.name}"


def convert_to_fp4(model, recipe="tetrajet", *, bf16_first_k=0, bf16_last_k=0, blocks="transformer.h", seed=0,
                   impl=REFERENCE):
    """Swap every nn.Linear (or subclass) inside the transformer blocks (`model.<blocks>`, an nn.ModuleList) for an
    FP4Linear sharing its weight, except in the first `bf16_first_k` and last `bf16_last_k` blocks. Linears
    outside the blocks (LM head) stay high precision (docs/numerics.md §6). Layer i gets generator seed `seed + i`;
    all run their quantizers on `impl` (REFERENCE, or what fastpaths.select chose).
    Prints what it converted and what it kept; returns the model (changed in place)."""
    recipe = get_recipe(recipe)
    try:
        block_list = model.get_submodule(blocks)
    except AttributeError:
        block_list = None
    if not isinstance(block_list, nn.ModuleList):
        raise ValueError(f"convert_to_fp4: model has no nn.ModuleList of blocks at '{blocks}'; pass blocks=<its path>")
    n = len(block_list)
    if bf16_first_k < 0 or bf16_last_k < 0 or bf16_first_k + bf16_last_k > n:
        raise ValueError(f"convert_to_fp4: bf16_first_k={bf16_first_k} + bf16_last_k={bf16_last_k} must be >= 0 "
                         f"and at most the {n} blocks")
    converted, kept_blocks = [], []
    for i, block in enumerate(block_list):
        if i < bf16_first_k or i >= n - bf16_last_k:
            kept_blocks.append(i)
            continue
        for name, child in list(block.named_modules()):
            if isinstance(child, nn.Linear) and not isinstance(child, FP4Linear):
                parent = block.get_submodule(name.rpartition(".")[0])
                setattr(parent, name.rpartition(".")[2],
                        FP4Linear.from_linear(child, recipe, seed=seed + len(converted), impl=impl))
                converted.append(f"{blocks}.{i}.{name}")
    kept = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, FP4Linear)]
    in_kept_blocks = [n for n in kept if any(n.startswith(f"{blocks}.{i}.") for i in kept_blocks)]
    others = [n for n in kept if n not in in_kept_blocks]
    print(f"convert_to_fp4: {len(converted)}/{len(converted) + len(kept)} Linear layers -> FP4Linear "
          f"(recipe {recipe.name}); kept high precision: {', '.join(others) or 'nothing else'}"
          + (f"; the {len(in_kept_blocks)} Linear of blocks {kept_blocks} (bf16_first_k={bf16_first_k}, "
             f"bf16_last_k={bf16_last_k})" if kept_blocks else ""))
    return model


# =============================================================================
# Appendix: exactness tricks. Each computes a documented value in a way that gives the same bits on every
# implementation and device: exponents read from the fp32 bits (not log2), E8M0 bytes built as integers, true
# division by device tensors, and stochastic-rounding noise as a pure function of (seed, element index).
def _fp32_exponent(a):
    """Unbiased exponent field of fp32 a: floor(log2 a) for normal a, exactly, from the bits (-127 for 0)."""
    return ((a.view(torch.int32) >> 23) & 0xFF) - 127

def _e8m0(exponent, amax):
    """int exponent -> uint8 E8M0 byte b = exponent + 127, clamped to [0, 254]; 255 (NaN) where amax is not
    finite, so a NaN/Inf block dequantizes to NaN instead of a saturated finite value."""
    b = (exponent.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)
    return torch.where(torch.isfinite(amax), b, E8M0_NAN).to(torch.uint8)


def _e8m0_value(b):
    """uint8 E8M0 bytes -> fp32 2^(b - 127) (NaN for 255), built from the fp32 bits: exponent field b for
    b >= 1, the subnormal 2^-127 = 0x00400000 for b = 0. Equals b.view(float8_e8m0fnu).float(), but with
    plain integer ops, which every implementation can compute the same way (not every one has an e8m0 type)."""
    bits = torch.where(b == 0, 0x00400000, torch.where(b == E8M0_NAN, 0x7FC00000, b.int() << 23))
    return bits.int().view(torch.float32)


def _div(a, b):
    """a ⊘ b for a Python number b, IEEE-rounded on every device. Not `a / b`: on CUDA torch evaluates a
    Python-number divisor as a * fl(1/b), rounding twice (on the CPU it divides); dividing by a 0-dim tensor on
    a's device is a true division everywhere, so the reference gives the same bits on CPU and GPU."""
    return a / a.new_full((), b)


# -----------------------------------------------------------------------------
# Stochastic-rounding noise. A counter-based generator: the uniform for element i is a pure function of
# (seed, i), so the reference and every faster implementation (fastpaths.py) produce the very
# same codes for SR too, in any evaluation order, and the noise is computed inside the fused quantizer
# instead of read from memory. (torch.rand is none of these: its CPU generator is a sequential Mersenne
# Twister, single-threaded, and was 13% of an FP4 training step.) A torch.Generator still owns the
# randomness: it draws each quantization's seed, so seeding and checkpointing it replays the noise exactly.

def _pcg_hash(h):
    """int64 tensor of uint32 values -> their PCG-RXS-M-XS hash, uint32 values in int64 (O'Neill 2014, the
    hash Jarzynski & Olano 2020 recommend for GPU noise): state = h·747796405 + 2891336453; word =
    ((state >> ((state >> 28) + 4)) ^ state)·277803737; out = (word >> 22) ^ word, all mod 2^32.
    Every product is < 2^62, so int64 arithmetic is exact and `& U32_MASK` gives what a kernel's wrapping
    uint32 arithmetic gives."""
    state = (h * PCG_MULTIPLIER + PCG_INCREMENT) & U32_MASK
    word = (((state >> ((state >> 28) + 4)) ^ state) * PCG_OUTPUT_MULTIPLIER) & U32_MASK
    return (word >> 22) ^ word


def draw_seed(generator=None, device=None):
    """-> int64 (2,): the two uint32 seeds (s0, s1) of one quantization, torch.randint(0, 2^32, (2,), generator)."""
    return torch.randint(0, 1 << 32, (2,), generator=generator, device=device or torch.device("cpu"))


def uniform_noise(seed, shape):
    """int64 (2,) seed -> fp32 tensor of `shape`, uniform on [0, 1) in steps of 2^-24 (like torch.rand):
    u[i] = (pcg(pcg(i ^ s0) ^ s1) >> 8) · 2^-24, i the element's row-major index mod 2^32 (for a 2-D quantizer
    view (Mp, Kp): i = row·Kp + col). Two chained hashes so that different seeds give unrelated streams, not
    shifted copies of one; the top 24 bits are the best mixed and fit fp32 exactly."""
    seed = seed.to(torch.int64)
    i = torch.arange(math.prod(shape), device=seed.device, dtype=torch.int64).view(shape) & U32_MASK
    h = _pcg_hash(_pcg_hash(i ^ seed[0]) ^ seed[1])
    return (h >> 8).float() * NOISE_ULP


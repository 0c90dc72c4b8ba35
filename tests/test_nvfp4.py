"""NVFP4 quantizer against a literal, element-by-element transcription of numerics.md §2-§3 (bit for bit), and
against torchao when it is installed. Run: python -m pytest tests/test_nvfp4.py -q"""
import bisect

import numpy as np
import pytest
import torch

import fp4

f32 = np.float32
FLT_MAX = f32(3.4028235e38)
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
# every non-negative finite E4M3 value, indexed by its 7-bit code (exponent << 3 | mantissa); 0x7F is NaN
E4M3 = [(m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7) for e in range(16) for m in range(8)][:127]


def e4m3(v):
    """RNE to E4M3 for 0 <= v <= 448, found by search in the value table (ties to the even code)."""
    i = bisect.bisect_left(E4M3, v)
    if i == len(E4M3) or E4M3[i] == v:
        return f32(E4M3[min(i, 126)])
    lo, hi = E4M3[i - 1], E4M3[i]
    return f32(lo if (v - lo < hi - v or (v - lo == hi - v and (i - 1) % 2 == 0)) else hi)


def e2m1_code(v):
    """RTN to an E2M1 code: clamp, nearest grid point, ties to the even code, sign bit iff v < 0."""
    a = min(abs(float(v)), 6.0)
    k = min(range(8), key=lambda j: (abs(a - E2M1[j]), j % 2))
    return k | (8 if v < 0 else 0)


def reference_nvfp4(x, outer, tile):
    """x (M, K) fp32 torch, K a multiple of 128, M of tile[0] -> (codes (M, K) int, scales (M, K/16) fp32)."""
    X = x.numpy().astype(f32)
    M, K = X.shape
    tr = tile[0]
    codes, scales = np.zeros((M, K), np.int64), np.zeros((M, K // 16), f32)
    with np.errstate(over="ignore", divide="ignore"):
        A = f32(np.abs(X).max())
        S_enc = f32(1) if A == 0 else min(f32(2688) / A, FLT_MAX)
        S_dec = f32(1) / S_enc
        for r0 in range(0, M, tr):
            for c0 in range(0, K, 16):
                tile_x = X[r0:r0 + tr, c0:c0 + 16]
                amax_b = f32(np.abs(tile_x).max())
                if outer == "tensor":
                    s_b = e4m3(min(amax_b * (S_enc * (f32(1) / f32(6))), f32(448)))
                    scale = f32(s_b) * S_dec
                    enc = min(f32(1) / scale, FLT_MAX)
                else:
                    amax_o = f32(np.abs(X[r0:r0 + tr, c0 // 128 * 128:c0 // 128 * 128 + 128]).max())
                    s_o = f32(1) if amax_o == 0 else amax_o / f32(2688)
                    s_b = f32(2.0 ** -9) if amax_b == 0 else e4m3(min((amax_b / s_o) / f32(6), f32(448)))
                    enc = f32(1) / (s_o * f32(s_b))
                scales[r0:r0 + tr, c0 // 16] = s_b
                for r in range(r0, r0 + tr):
                    for c in range(c0, c0 + 16):
                        codes[r, c] = 0 if s_b == 0 else e2m1_code(X[r, c] * enc)
    return torch.from_numpy(codes), torch.from_numpy(scales)


def _cases():
    torch.manual_seed(0)                            # torch.distributions draws from the global generator
    g = torch.Generator().manual_seed(0)
    randn = torch.randn(32, 256, generator=g)
    student = torch.distributions.StudentT(torch.tensor(2.0)).sample((32, 256))
    bf16 = (torch.randn(32, 256, generator=g) * 3).bfloat16()
    zero_block = randn.clone()
    zero_block[:16, :16] = 0
    zero_block[5, 128:] = 0                         # a whole 1x128 block of zeros
    tiny_block = randn.clone()
    tiny_block[3:20, 32:48] = 1e-7 * torch.randn(17, 16, generator=g)   # E4M3 scale underflows to 0/subnormal
    return {"randn": randn, "student_t": student, "bf16": bf16, "zero_block": zero_block, "tiny_block": tiny_block,
            "all_zero": torch.zeros(16, 128)}


@pytest.mark.parametrize("outer", ["tensor", 128])
@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
@pytest.mark.parametrize("case", list(_cases()))
def test_nvfp4_matches_the_literal_reference_bit_for_bit(case, tile, outer):
    x = _cases()[case]
    q = fp4.quantize_nvfp4(x, outer=outer, tile=tile)
    ref_codes, ref_scales = reference_nvfp4(x.float(), outer, tile)
    assert torch.equal(fp4.unpack_e2m1(q.codes).long(), ref_codes)
    assert torch.equal(q.block_scale.view(torch.uint8), ref_scales.to(torch.float8_e4m3fn).view(torch.uint8))


def test_16x16_tiles_commute_with_transpose():
    w = torch.distributions.StudentT(torch.tensor(3.0)).sample((80, 48))   # 80x48: rows and K both padded
    for outer in ("tensor",):
        a = fp4.dequantize_nvfp4(fp4.quantize_nvfp4(w, outer=outer, tile=(16, 16)))[:, :48]
        b = fp4.dequantize_nvfp4(fp4.quantize_nvfp4(w.t().contiguous(), outer=outer, tile=(16, 16)))[:, :80]
        assert torch.equal(a, b.t())


def test_double_block_largest_inner_scale_is_448_and_zero_blocks_get_2_pow_minus_9():
    x = torch.randn(8, 512) * torch.logspace(-20, 20, 8)[:, None]   # scale-invariant across 40 decades
    x[2, 16:32] = 0
    q = fp4.quantize_nvfp4(x, outer=128)
    s = q.block_scale.float().view(8, 4, 8)
    assert (s.amax(-1) == 448).all()
    assert s[2, 0, 1] == 2.0 ** -9
    assert q.outer_scale.shape == (8, 4)


def test_padding_gives_the_same_numbers_as_explicit_zeros():
    x = torch.randn(3, 5, 100)                      # K = 100: padded to 112 (tensor) or 128 (double-block)
    for outer, kp in (("tensor", 112), (128, 128)):
        q = fp4.quantize_nvfp4(x, outer=outer)
        assert q.codes.shape == (3, 5, kp // 2) and q.block_scale.shape == (3, 5, kp // 16)
        q0 = fp4.quantize_nvfp4(torch.nn.functional.pad(x, (0, kp - 100)), outer=outer)
        assert torch.equal(fp4.dequantize_nvfp4(q), fp4.dequantize_nvfp4(q0))


@pytest.mark.parametrize("outer", ["tensor", 128])
def test_non_finite_input_dequantizes_to_nan_not_garbage(outer):
    for bad in (float("nan"), float("inf")):
        x = torch.randn(4, 256)
        x[1, 5] = bad
        x_dq = fp4.dequantize_nvfp4(fp4.quantize_nvfp4(x, outer=outer))
        if outer == "tensor":
            assert x_dq.isnan().all()               # the per-tensor scale is NaN
        else:
            assert x_dq[1, :128].isnan().all() and x_dq[1, 128:].isfinite().all() and x_dq[[0, 2, 3]].isfinite().all()


SQNR_BANDS = {  # dB on randn(1024, 1024): RTN ~20.4, SR ~17.25 (SR's error variance is ~twice RTN's, -3 dB)
    "nvfp4_tensor": (19.5, 21.5, dict(outer="tensor")), "nvfp4_128": (19.5, 21.5, dict(outer=128)),
    "nvfp4_16x16": (18.5, 20.0, dict(tile=(16, 16))),
    "nvfp4_sr": (17.0, 17.5, dict(rounding="stochastic", generator=torch.Generator().manual_seed(1))),
}


@pytest.mark.parametrize("name", list(SQNR_BANDS))
def test_nvfp4_sqnr_on_randn_is_in_the_expected_band(name):
    lo, hi, kw = SQNR_BANDS[name]
    # (data and noise from different seeds: the same seed would correlate the noise with the data)
    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    assert lo < fp4.sqnr(x, fp4.dequantize_nvfp4(fp4.quantize_nvfp4(x, **kw))) < hi


def test_mx_sqnr_on_randn_is_in_the_expected_band():
    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    assert 18.0 < fp4.sqnr(x, fp4.dequantize_mxfp4(fp4.quantize_mxfp4(x))) < 19.5    # coarser pow-2 scale
    assert 31.0 < fp4.sqnr(x, fp4.dequantize_mxfp8(fp4.quantize_mxfp8(x))) < 32.0


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="outer"):
        fp4.quantize_nvfp4(torch.zeros(2, 16), outer=64)
    with pytest.raises(ValueError, match="tile"):
        fp4.quantize_nvfp4(torch.zeros(2, 16), tile=(4, 4))
    with pytest.raises(TypeError, match="floating"):
        fp4.quantize_nvfp4(torch.zeros(2, 16, dtype=torch.int32))

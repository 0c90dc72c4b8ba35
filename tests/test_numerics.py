"""The formats (docs/numerics.md §1-§4): E2M1 elements, packing, stochastic rounding and its noise; the minimal
NVFP4 against the full quantizer; NVFP4 per-tensor and double-block against a literal element-by-element
transcription; MXFP4 and MXFP8; SQNR bands. Property tests (hypothesis) and the torchao oracle live in
tests/test_oracles.py. Run: python -m pytest tests/test_numerics.py -q"""
import bisect
import math

import numpy as np
import pytest
import torch

import fp4
from conftest import sqnr

GRID = fp4.E2M1_GRID


def codes_of(v, noise=None):
    """E2M1 codes of v (any sign): the element rounding the quantizers use, round_e2m1 on |v| then encode_e2m1."""
    return fp4.encode_e2m1(fp4.round_e2m1(v.abs(), noise), v < 0)


def sr_codes(v, generator):
    return codes_of(v, fp4.uniform_noise(fp4.draw_seed(generator), v.shape))


def bits(t):
    return t.view(torch.int32)

# -----------------------------------------------------------------------------
# E2M1 (§1)


def test_every_e2m1_grid_value_round_trips_exactly():
    values = torch.tensor(GRID + tuple(-g for g in GRID[1:]))
    for noise in (None, torch.rand(values.shape, generator=torch.Generator().manual_seed(0))):
        assert torch.equal(fp4.decode_e2m1(codes_of(values, noise)), values)
    assert codes_of(values).tolist() == list(range(8)) + list(range(9, 16))


def test_e2m1_ties_go_to_the_even_code():
    # numerics.md §1 tie table, both signs
    ties = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0}
    v = torch.tensor(list(ties))
    assert fp4.round_e2m1(v).tolist() == list(ties.values())
    assert fp4.decode_e2m1(codes_of(-v)).tolist() == [-t for t in ties.values()]


def test_e2m1_clamps_and_signs_zero_like_te():
    v = torch.tensor([7.0, -100.0, -0.0, 0.0, -0.1, float("inf")])
    assert codes_of(v).tolist() == [7, 15, 0, 0, 8, 7]   # -0.0 -> code 0; small negative -> -0 (code 8)
    assert fp4.round_e2m1(torch.tensor([float("nan")])).isnan().all()
    assert fp4.encode_e2m1(torch.tensor([float("nan")]), torch.tensor([False])).tolist() == [0]


def test_packing_puts_element_2j_in_the_low_nibble():
    codes = torch.tensor([[1, 2, 3, 15]], dtype=torch.uint8)
    packed = fp4.pack_e2m1(codes)
    assert packed.tolist() == [[0x21, 0xF3]]
    assert torch.equal(fp4.unpack_e2m1(packed), codes)


def test_stochastic_rounding_is_unbiased_and_reproducible():
    # 20000 draws of each value: mean error must be within 5 standard errors of 0 (p(fail) < 1e-6 each)
    v = torch.tensor([0.1, 0.3, 0.7, 1.2, 1.9, 2.2, 2.9, 3.3, 4.5, 5.9, -0.4, -5.2])
    n = 20000
    draws = fp4.decode_e2m1(sr_codes(v.expand(n, -1).contiguous(), torch.Generator().manual_seed(1)))
    mean, std = draws.mean(0), draws.std(0)
    assert ((mean - v).abs() <= 5 * std / math.sqrt(n) + 1e-6).all(), (mean - v)
    assert set(draws[:, 3].unique().tolist()) == {1.0, 1.5}          # only the two neighbouring grid values
    again = sr_codes(v.expand(n, -1).contiguous(), torch.Generator().manual_seed(1))
    assert torch.equal(fp4.decode_e2m1(again), draws)


def test_stochastic_rounding_rounds_up_exactly_when_the_uniform_draw_is_below_p():
    # the contract kernels must meet: u = uniform_noise(draw_seed(generator), shape), round up iff u < p
    v = torch.randn(64, 64, generator=torch.Generator().manual_seed(5)) * 3
    codes = sr_codes(v, torch.Generator().manual_seed(6))
    u = fp4.uniform_noise(fp4.draw_seed(torch.Generator().manual_seed(6)), v.shape)
    for x, ui, c in zip(v.flatten().tolist(), u.flatten().tolist(), codes.flatten().tolist()):
        a = min(abs(x), 6.0)
        lo = max(g for g in GRID if g <= a)
        hi = min([g for g in GRID if g > a] or [6.0])
        mag = hi if hi > lo and ui < (a - lo) / (hi - lo) else lo
        assert c == GRID.index(mag) | (8 if x < 0 else 0)


def pcg_literal(h):
    # PCG-RXS-M-XS on Python ints, mod 2^32 after every operation, as a C uint32 kernel computes it
    state = (h * 747796405 + 2891336453) % 2**32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) % 2**32
    return (word >> 22) ^ word


def test_uniform_noise_is_the_literal_pcg_hash_and_uniform():
    seed = fp4.draw_seed(torch.Generator().manual_seed(3))
    s0, s1 = seed.tolist()
    u = fp4.uniform_noise(seed, (300, 1000))
    for i in (0, 1, 2, 999, 1000, 123456, 299999):
        assert u.flatten()[i].item() == (pcg_literal(pcg_literal(i ^ s0) ^ s1) >> 8) * 2.0 ** -24
    # 300k draws: mean, variance, 64-bin chi-square (63 dof: 5 sigma ~ 125) and neighbour correlations
    x = u.double().flatten()
    assert abs(x.mean() - 0.5) < 5 * (1 / 12 / len(x)) ** 0.5 and abs(x.var() - 1 / 12) < 1e-3
    counts = torch.bincount((x * 64).long(), minlength=64).double()
    assert ((counts - len(x) / 64) ** 2 / (len(x) / 64)).sum() < 125
    for a, b in ((x[:-1], x[1:]), (u[:-1].flatten().double(), u[1:].flatten().double()),
                 (x, fp4.uniform_noise(fp4.draw_seed(torch.Generator().manual_seed(4)), (300, 1000)).double().flatten())):
        assert abs(torch.corrcoef(torch.stack((a, b)))[0, 1]) < 5 / len(a) ** 0.5

# -----------------------------------------------------------------------------
# The minimal NVFP4 (fp4.nvfp4_minimal) is the full quantizer wherever it applies: per-tensor, 1x16, K % 16 = 0


def minimal_cases():
    torch.manual_seed(0)                            # torch.distributions draws from the global generator
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(48, 256, generator=g)
    zero_blocks = gauss.clone()
    zero_blocks[:16, :16] = 0                       # all-zero 1x16 blocks, a whole zero row, and -0.0
    zero_blocks[5] = 0
    zero_blocks[7, 32:48] = -0.0
    # E4M3 rounding ties: with A = 3 (S_enc = 896) these block amaxes give a different E4M3 scale from TE's
    # amax ⊗ (S_enc ⊗ fl(1/6)) (§2) than from (amax ⊗ S_enc) ⊘ 6 (found by search), both signs
    ties = (torch.rand(8, 128, generator=g) * 2 - 1) * 0.004
    ties[0, 0] = 3.0
    ties[1:8, 0:64:16] = torch.tensor([0.00439453125, 1.0178570747375488, -2.0357141494750977, 0.140625])
    return {"gaussian": gauss, "student_t": torch.distributions.StudentT(torch.tensor(2.0)).sample((48, 256)),
            "bf16_values": (torch.randn(48, 256, generator=g) * 3).bfloat16().float(), "zero_blocks": zero_blocks,
            "e4m3_ties": ties, "all_zero": torch.zeros(16, 64)}


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("case", list(minimal_cases()))
def test_minimal_nvfp4_is_the_full_quantizer_bit_for_bit(case, stochastic):
    x = minimal_cases()[case]
    recipe = fp4.RECIPES["nvidia"]                  # per-tensor outer scale; tile (1, 16) given explicitly
    got = fp4.nvfp4_minimal(x, stochastic, torch.Generator().manual_seed(5))
    ref = fp4.fake_quant(x, recipe, "stochastic" if stochastic else "nearest", (1, 16), torch.Generator().manual_seed(5))
    assert torch.equal(bits(got), bits(ref))
    if stochastic:                                  # the noise really is used: another seed differs
        assert case == "all_zero" or not torch.equal(got, fp4.nvfp4_minimal(x, True, torch.Generator().manual_seed(6)))


def underflowing_blocks():
    """Gaussian with 1x16 blocks 1e-7 beside an amax of ~100, so their E4M3 block scale rounds to 0."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 128, generator=g)
    x[0, 0] = 100.0
    x[3:9, 32:48] = 1e-7 * torch.randn(6, 16, generator=g)
    assert (fp4.quantize_nvfp4(x).block_scale.float()[3:9, 2] == 0).all()       # the case is exercised
    return x


@pytest.mark.parametrize("stochastic", [False, True])
def test_minimal_nvfp4_zeroes_a_block_whose_scale_underflows_as_the_full_quantizer_does(stochastic):
    # +0.0 where the full quantizer writes code 0, also for the negative elements: bit for bit, not just as numbers
    x = underflowing_blocks()
    got = fp4.nvfp4_minimal(x, stochastic, torch.Generator().manual_seed(5))
    ref = fp4.fake_quant(x, "nvidia", "stochastic" if stochastic else "nearest", generator=torch.Generator().manual_seed(5))
    assert torch.equal(bits(got), bits(ref)) and not bits(got[3:9, 32:48]).any()


def test_minimal_nvfp4_equals_the_full_quantizer_on_a_tiny_tensor():
    # amax below 2688 / FLT_MAX (~7.9e-36): S_enc = min(2688 / A, FLT_MAX), not inf (which would zero the tensor)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(2)) * 1e-37
    assert torch.equal(fp4.nvfp4_minimal(x), fp4.fake_quant(x, "nvidia"))

# -----------------------------------------------------------------------------
# NVFP4 against a literal, element-by-element transcription of numerics.md §2-§3 (bit for bit)

f32 = np.float32
FLT_MAX = f32(3.4028235e38)
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
    k = min(range(8), key=lambda j: (abs(a - GRID[j]), j % 2))
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
                amax_b = f32(np.abs(X[r0:r0 + tr, c0:c0 + 16]).max())
                if outer == "tensor":
                    s_b = e4m3(min(amax_b * (S_enc * (f32(1) / f32(6))), f32(448)))
                    enc = min(f32(1) / (f32(s_b) * S_dec), FLT_MAX)
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
    a = fp4.dequantize_nvfp4(fp4.quantize_nvfp4(w, tile=(16, 16)))[:, :48]
    b = fp4.dequantize_nvfp4(fp4.quantize_nvfp4(w.t().contiguous(), tile=(16, 16)))[:, :80]
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
        assert fp4.dequantize_nvfp4(q).dtype == torch.float32 and fp4.dequantize(q).shape == (3, 5, kp)


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
    "nvfp4_16x16": (18.5, 20.0, dict(tile=(16, 16))), "nvfp4_sr": (17.0, 17.5, dict(rounding="stochastic")),
}


@pytest.mark.parametrize("name", list(SQNR_BANDS))
def test_nvfp4_sqnr_on_randn_is_in_the_expected_band(name):
    lo, hi, kw = SQNR_BANDS[name]
    # (data and noise from different seeds: the same seed would correlate the noise with the data)
    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    q = fp4.quantize_nvfp4(x, generator=torch.Generator().manual_seed(1), **kw)
    assert lo < sqnr(x, fp4.dequantize_nvfp4(q)) < hi

# -----------------------------------------------------------------------------
# MXFP4 and MXFP8 (§4)


def _mx_reference_scale(amax, emax):
    return 2.0 ** max(math.floor(math.log2(amax)) - emax, -127) if amax > 0 else 2.0 ** -127


def test_mxfp4_scale_follows_the_ocp_floor_rule():
    x = torch.randn(8, 96) * torch.logspace(-3, 3, 8)[:, None]
    q = fp4.quantize_mxfp4(x)
    amax = x.view(8, 3, 32).abs().amax(-1)
    ref = torch.tensor([[_mx_reference_scale(a, 2) for a in row] for row in amax.tolist()])
    assert torch.equal(q.scale.float(), ref)
    x_dq = fp4.dequantize_mxfp4(q)
    assert (x_dq.view(8, 3, 32).abs() <= 6 * ref[..., None]).all()


def test_mxfp8_scale_rounds_up_so_nothing_saturates():
    x = torch.randn(16, 64) * torch.logspace(-4, 4, 16)[:, None]
    x[0, :32] = 448.0                           # amax/448 = 1 exactly: X = 1, not 2
    q = fp4.quantize_mxfp8(x)
    assert q.scale.float()[0, 0] == 1.0
    assert (q.codes.float().abs() <= 448).all()
    assert sqnr(x, fp4.dequantize_mxfp8(q)) > 30   # E4M3: ~31.5 dB on Gaussian data
    assert torch.equal(fp4.dequantize(q), fp4.dequantize_mxfp8(q))


def test_mx_zero_block_gets_the_smallest_scale_and_zero_codes():
    q = fp4.quantize_mxfp4(torch.zeros(2, 32))
    assert (q.scale.view(torch.uint8) == 0).all() and (q.codes == 0).all()   # 2^-127


def test_mx_sqnr_on_randn_is_in_the_expected_band():
    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    assert 18.0 < sqnr(x, fp4.dequantize_mxfp4(fp4.quantize_mxfp4(x))) < 19.5    # coarser pow-2 scale
    assert 31.0 < sqnr(x, fp4.dequantize_mxfp8(fp4.quantize_mxfp8(x))) < 32.0

"""E2M1 elements, packing, stochastic rounding, MX formats and the RHT (numerics.md §1, §4, §5).
Run: python -m pytest tests/test_formats.py -q"""
import math

import pytest
import torch

import fp4

GRID = fp4.E2M1_GRID


def test_every_e2m1_grid_value_round_trips_exactly():
    values = torch.tensor(GRID + tuple(-g for g in GRID[1:]))
    for rounding in fp4.ROUNDINGS:
        codes = fp4.round_e2m1(values, rounding, torch.Generator().manual_seed(0))
        assert torch.equal(fp4.decode_e2m1(codes), values)
    assert fp4.round_e2m1(values).tolist() == list(range(8)) + list(range(9, 16))


def test_e2m1_ties_go_to_the_even_code():
    # numerics.md §1 tie table, both signs
    ties = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0}
    v = torch.tensor(list(ties))
    assert fp4.decode_e2m1(fp4.round_e2m1(v)).tolist() == list(ties.values())
    assert fp4.decode_e2m1(fp4.round_e2m1(-v)).tolist() == [-t for t in ties.values()]


def test_e2m1_clamps_and_signs_zero_like_te():
    v = torch.tensor([7.0, -100.0, -0.0, 0.0, -0.1, float("inf")])
    codes = fp4.round_e2m1(v)
    assert codes.tolist() == [7, 15, 0, 0, 8, 7]   # -0.0 -> code 0; small negative -> -0 (code 8)


def test_packing_puts_element_2j_in_the_low_nibble():
    codes = torch.tensor([[1, 2, 3, 15]], dtype=torch.uint8)
    packed = fp4.pack_e2m1(codes)
    assert packed.tolist() == [[0x21, 0xF3]]
    assert torch.equal(fp4.unpack_e2m1(packed), codes)


def test_stochastic_rounding_is_unbiased_and_reproducible():
    # 20000 draws of each value: mean error must be within 5 standard errors of 0 (p(fail) < 1e-6 each)
    v = torch.tensor([0.1, 0.3, 0.7, 1.2, 1.9, 2.2, 2.9, 3.3, 4.5, 5.9, -0.4, -5.2])
    n = 20000
    g = torch.Generator().manual_seed(1)
    draws = fp4.decode_e2m1(fp4.round_e2m1(v.expand(n, -1).contiguous(), "stochastic", g))
    mean, std = draws.mean(0), draws.std(0)
    assert ((mean - v).abs() <= 5 * std / math.sqrt(n) + 1e-6).all(), (mean - v)
    # only the two neighbouring grid values ever appear
    assert set(draws[:, 3].unique().tolist()) == {1.0, 1.5}
    again = fp4.round_e2m1(v.expand(n, -1).contiguous(), "stochastic", torch.Generator().manual_seed(1))
    assert torch.equal(fp4.decode_e2m1(again), draws)


def test_stochastic_rounding_rounds_up_exactly_when_the_uniform_draw_is_below_p():
    # the contract kernels must meet: u = uniform_noise(draw_seed(generator), shape), round up iff u < p
    v = torch.randn(64, 64, generator=torch.Generator().manual_seed(5)) * 3
    codes = fp4.round_e2m1(v, "stochastic", torch.Generator().manual_seed(6))
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


def test_unknown_rounding_is_an_error():
    with pytest.raises(ValueError, match="rounding"):
        fp4.round_e2m1(torch.zeros(2), "floor")


def _mx_reference_scale(amax, emax):
    return 2.0 ** max(math.floor(math.log2(amax)) - emax, -127) if amax > 0 else 2.0 ** -127


def test_mxfp4_scale_follows_the_ocp_floor_rule():
    x = torch.randn(8, 96) * torch.logspace(-3, 3, 8)[:, None]
    q = fp4.quantize_mxfp4(x)
    amax = x.view(8, 3, 32).abs().amax(-1)
    ref = torch.tensor([[_mx_reference_scale(a, 2) for a in row] for row in amax.tolist()])
    assert torch.equal(q.scale.float(), ref)
    x_dq = fp4.dequantize_mxfp4(q)
    assert ((x_dq.view(8, 3, 32).abs() <= 6 * ref[..., None]).all())


def test_mxfp8_scale_rounds_up_so_nothing_saturates():
    x = torch.randn(16, 64) * torch.logspace(-4, 4, 16)[:, None]
    x[0, :32] = 448.0                           # amax/448 = 1 exactly: X = 1, not 2
    q = fp4.quantize_mxfp8(x)
    assert q.scale.float()[0, 0] == 1.0
    assert (q.codes.float().abs() <= 448).all()
    assert fp4.sqnr(x, fp4.dequantize_mxfp8(q)) > 30   # E4M3: ~31.5 dB on Gaussian data


def test_mx_zero_block_gets_the_smallest_scale_and_zero_codes():
    q = fp4.quantize_mxfp4(torch.zeros(2, 32))
    assert (q.scale.view(torch.uint8) == 0).all() and (q.codes == 0).all()   # 2^-127


def sylvester16():
    """The 16x16 Sylvester ±1 Hadamard matrix, built here independently of fp4.py: H_2n = [[H, H], [H, -H]]."""
    h = torch.ones(1, 1)
    for _ in range(4):
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def test_rht_flips_the_inputs_then_rotates_each_chunk():
    # c -> (c * s) @ H16 / 4, chunk by chunk, written out here (TE's x @ (diag(s) H16)/4): fails on the old
    # output-side form 1/4 H16 diag(s), which gives (c @ H16 / 4) * s
    g = torch.Generator().manual_seed(0)
    signs, x = fp4.random_signs(g), torch.randn(5, 48, generator=g)
    expected = torch.cat([(x[:, j:j + 16] * signs) @ sylvester16() / 4 for j in range(0, 48, 16)], dim=1)
    torch.testing.assert_close(fp4.rht16(x, signs), expected, atol=1e-6, rtol=0)
    assert torch.equal(fp4.hadamard16(signs), signs[:, None] * sylvester16() / 4)   # = 1/4 diag(s) H16


def test_rht_is_orthogonal_and_preserves_gemms():
    g = torch.Generator().manual_seed(0)
    signs = fp4.random_signs(g)
    assert set(signs.tolist()) <= {-1.0, 1.0}
    H, eye = fp4.hadamard16(signs), torch.eye(16)
    torch.testing.assert_close(H @ H.t(), eye, atol=1e-6, rtol=0)
    a, b = torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g)
    torch.testing.assert_close(fp4.rht16(a, signs) @ fp4.rht16(b, signs).t(), a @ b.t(), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of 16"):
        fp4.rht16(torch.zeros(3, 20), signs)


def test_different_rht_signs_give_different_codes_and_different_unbiased_gemms():
    # With output-side signs every sign vector gave the very same codes up to sign flips and bit-identical
    # GEMMs (the flips cancel); input-side signs really change what the quantizer sees.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 128, generator=g)
    s1, s2 = torch.tensor(fp4.NVIDIA_RHT_SIGNS, dtype=torch.float32), fp4.random_signs(g)
    q1, q2 = (fp4.quantize_nvfp4(x, rht_signs=s) for s in (s1, s2))
    assert not torch.equal(q1.codes & 0x77, q2.codes & 0x77)        # magnitudes differ, not just signs
    a, b = torch.randn(32, 256, generator=g), torch.randn(24, 256, generator=g)
    exact = a.double() @ b.double().t()
    recipe = fp4.RECIPES["tetrajet"]
    means = []
    for signs in (s1, s2):
        draws = torch.stack([(fp4.fake_quant(a, recipe, "stochastic", generator=torch.Generator().manual_seed(k),
                                             rht_signs=signs).double()
                              @ fp4.fake_quant(b, recipe, "stochastic", generator=torch.Generator().manual_seed(
                                  k + 1000), rht_signs=signs).double().t()) for k in range(64)])
        mean, se = draws.mean(0), draws.std(0) / 64 ** 0.5
        assert ((mean - exact).abs() < 4.5 * se + 1e-9).float().mean() > 0.999      # unbiased, elementwise
        means.append(mean)
    assert not torch.equal(means[0], means[1])                                       # different GEMMs


def test_rht_spreads_an_outlier_across_its_chunk():
    x = torch.zeros(1, 16)
    x[0, 3] = 16.0
    y = fp4.rht16(x, torch.tensor(fp4.NVIDIA_RHT_SIGNS, dtype=torch.float32))
    assert torch.equal(y.abs(), torch.full((1, 16), 4.0))   # one spike -> 16 values of |16|/4

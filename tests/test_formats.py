"""E2M1 elements, packing, stochastic rounding and the MX formats (numerics.md §1, §4).
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

"""The random Hadamard transform RHT-16 (numerics.md §5): the signs flip the inputs, the rotation is orthogonal
and keeps GEMMs exact, different signs really change the quantized operands (and keep SR GEMMs unbiased), and
an outlier is spread over its chunk. Run: python -m pytest tests/test_rht.py -q"""
import pytest
import torch

import fp4


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

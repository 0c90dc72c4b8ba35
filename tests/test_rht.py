"""The random Hadamard transform fp4.rht (docs/numerics.md §5), RHT-16 and RHT-128: the signs flip the inputs, the
rotation is orthogonal and keeps GEMMs exact, different signs really change the quantized operands (and keep SR
GEMMs unbiased), an outlier is spread over its chunk, and quantizing with rht_signs is quantizing rht(x).
Run: python -m pytest tests/test_rht.py -q"""
import torch

import fp4


def sylvester(n):
    """The n x n Sylvester ±1 Hadamard matrix in fp64, built here independently of fp4.py: H_2n = [[H, H], [H, -H]]."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def test_rht16_flips_the_inputs_then_rotates_each_chunk():
    # c -> (c * s) @ H16 / 4, chunk by chunk, written out here (TE's x @ (diag(s) H16)/4): fails on the old
    # output-side form 1/4 H16 diag(s), which gives (c @ H16 / 4) * s
    g = torch.Generator().manual_seed(0)
    signs, x = fp4.random_signs(g), torch.randn(5, 48, generator=g)
    H = sylvester(16).float()
    expected = torch.cat([(x[:, j:j + 16] * signs) @ H / 4 for j in range(0, 48, 16)], dim=1)
    torch.testing.assert_close(fp4.rht(x, signs), expected, atol=1e-6, rtol=0)
    assert torch.equal(fp4.sylvester(16, "cpu"), H)
    # its matrix, H = diag(s) · H16 / 4 (what kernels.py reads), is orthogonal
    M = signs[:, None] * 0.25 * fp4.sylvester(16, "cpu")
    assert torch.equal(fp4.rht(torch.eye(16), signs), M)                            # every product exact
    torch.testing.assert_close(M @ M.t(), torch.eye(16), atol=1e-6, rtol=0)


def test_rht128_is_the_normalized_hadamard_with_signs_on_the_inputs():
    g = torch.Generator().manual_seed(0)
    x, signs = torch.randn(6, 256, generator=g), fp4.random_signs(g, n=128)
    H = sylvester(128) / 128 ** 0.5
    expected = ((x.double().view(6, 2, 128) * signs.double()) @ H).view(6, 256)
    torch.testing.assert_close(fp4.rht(x, signs).double(), expected, atol=1e-5, rtol=0)
    other = -signs * torch.arange(128).remainder(2).mul(2).sub(1)
    assert not torch.equal(fp4.rht(x, signs), fp4.rht(x, other))


def test_rht_signs_are_random_and_the_rotation_preserves_gemms():
    g = torch.Generator().manual_seed(0)
    for n in (16, 128):
        signs = fp4.random_signs(g, n=n)
        assert signs.shape == (n,) and set(signs.tolist()) == {-1.0, 1.0}
        a, b = torch.randn(32, 256, generator=g), torch.randn(48, 256, generator=g)
        torch.testing.assert_close(fp4.rht(a, signs) @ fp4.rht(b, signs).t(), a @ b.t(), atol=1e-4, rtol=1e-5)
    again = fp4.random_signs(torch.Generator().manual_seed(3))
    assert torch.equal(again, fp4.random_signs(torch.Generator().manual_seed(3)))


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
    y = fp4.rht(x, torch.tensor(fp4.NVIDIA_RHT_SIGNS, dtype=torch.float32))
    assert torch.equal(y.abs(), torch.full((1, 16), 4.0))   # one spike -> 16 values of |16|/4
    x = torch.zeros(1, 128)
    x[0, 77] = 128 ** 0.5
    y = fp4.rht(x, fp4.random_signs(torch.Generator().manual_seed(2), n=128))
    torch.testing.assert_close(y.abs(), torch.ones(1, 128), atol=1e-6, rtol=0)     # RHT-128: over all 128


def test_quantize_with_rht_signs_equals_rht_then_quantize():
    # (K = 200: zero-padded to the chunk first, then rotated, so the rotated padding is not zero)
    x = torch.randn(40, 200, generator=torch.Generator().manual_seed(0))
    for n, outer, rounding in ((16, "tensor", "stochastic"), (16, 128, "stochastic"), (128, "tensor", "eden"),
                               (128, 128, "nearest")):
        signs = fp4.random_signs(torch.Generator().manual_seed(3), n=n)
        rotated = fp4.rht(fp4.pad_2d(x, 1, fp4.k_multiple("nvfp4", outer, rounding, signs)), signs)
        got = fp4.quantize_nvfp4(x, outer=outer, rounding=rounding, rht_signs=signs, generator=torch.Generator().manual_seed(1))
        ref = fp4.quantize_nvfp4(rotated, outer=outer, rounding=rounding, generator=torch.Generator().manual_seed(1))
        assert all(torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b) for a, b in zip(got, ref))
        fq = fp4.fake_quant(x, "tetrajet" if outer == 128 else "nvidia", rounding, rht_signs=signs,
                            generator=torch.Generator().manual_seed(1))
        assert fq.shape == (40, -(-200 // n) * n) and torch.equal(fq, fp4.dequantize(ref)[:, :fq.shape[1]])

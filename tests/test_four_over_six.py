"""Four Over Six (docs/numerics.md §10): fp4.quantize_nvfp4(four_over_six=...) against an independent per-element
fp32 transcription of TE's _quantize_blockwise_4over6_reference, the paths, the recipe and the flags.
Run: python -m pytest tests/test_four_over_six.py -q"""
import dataclasses
import types

import numpy as np
import pytest
import torch

import fastpaths
import fp4
import train

f32 = np.float32
GRID = [f32(g) for g in fp4.E2M1_GRID]
E4M3 = [f32(m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)) for e in range(16) for m in range(8)][:-1]


def nearest(v, grid):
    """Index of the grid value nearest to v >= 0, a tie to the even index (= even code / even mantissa)."""
    d = [abs(float(v) - float(g)) for g in grid]
    return min(range(len(grid)), key=lambda k: (d[k], k % 2))


def candidate(xs, s, S_dec, A, error):
    """One candidate scale s on a tile's rows xs (list of 16-lists of f32) -> (codes, row errors)."""
    with np.errstate(divide="ignore", over="ignore"):
        enc = min(f32(1) / (f32(s) * S_dec), f32(fp4.FLT_MAX))
    codes, errs = [], []
    for row in xs:
        err, rc = f32(0), []
        for x in row:
            v = x * enc
            k = nearest(min(abs(v), f32(6)), GRID) if s != 0 else 0
            rc.append(k + 8 * int(v < 0 and s != 0))
            q = GRID[k] * (f32(-1) if v < 0 else f32(1))
            diff = f32(f32(f32(q * f32(s)) * A) / f32(1536)) - x
            err = err + (abs(diff) if error == "mae" else diff * diff)
        codes.append(rc)
        errs.append(err)
    while len(errs) > 1:                                   # a 16x16 tile's row sums: TE's tree order
        h = len(errs) // 2
        errs = [errs[i] + errs[i + h] for i in range(h)]
    return codes, errs[0]


def transcription(x, tile, error):
    """x (M, K) fp32 torch, M a multiple of tile[0], K of 16 -> (codes (M, K) uint8, scale bytes (M, K/16), S_dec)."""
    a = x.numpy().astype(f32)
    M, K = a.shape
    A = f32(np.abs(a).max())
    S_enc = f32(1) if A == 0 else min(f32(1536) / A, f32(fp4.FLT_MAX))
    S_dec = f32(1) / S_enc
    codes, scales = np.zeros((M, K), np.uint8), np.zeros((M, K // 16), np.uint8)
    for r in range(0, M, tile[0]):
        for c in range(0, K, 16):
            xs = [list(a[i, c:c + 16]) for i in range(r, r + tile[0])]
            base = f32(max(abs(v) for row in xs for v in row) / f32(6)) * S_enc
            i6, i4 = nearest(min(base, f32(448)), E4M3), nearest(min(base * f32(1.5), f32(448)), E4M3)
            (c6, e6), (c4, e4) = (candidate(xs, E4M3[i], S_dec, A, error) for i in (i6, i4))
            codes[r:r + tile[0], c:c + 16], scales[r:r + tile[0], c // 16] = (c4, i4) if e4 < e6 else (c6, i6)
    return torch.from_numpy(codes), torch.from_numpy(scales), S_dec


def data(kind, seed):
    """(32, 64): Gaussian or heavy-tailed (bf16 values: E4M3/E2M1 ties) on the left, uniform on the right (where
    16x16 tiles pick map-to-4 too), a zero block, and a block whose map-to-6 scale underflows to 0 (map-to-4's not)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 64, generator=g)
    if kind == "heavy":
        x = (x / torch.randn(32, 64, generator=g).abs().clamp(min=0.05)).bfloat16().float()
    x[:, 32:] = (torch.rand(32, 32, generator=g) * 4 - 2).bfloat16().float()
    x[0, :16] = 0
    x[3, 16:32] *= x.abs().max() * 0.8 * 2.0 ** -18 / x[3, 16:32].abs().max()   # base = 0.8 x 2^-10
    return x


@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
@pytest.mark.parametrize("error", ["mae", "mse"])
@pytest.mark.parametrize("kind", ["gauss", "heavy"])
def test_bit_exact_against_an_element_by_element_transcription(tile, error, kind):
    x = data(kind, 7)
    q = fp4.quantize_nvfp4(x, tile=tile, four_over_six=error)
    codes, scales, S_dec = transcription(x, tile, error)
    assert torch.equal(fp4.unpack_e2m1(q.codes), codes)
    assert torch.equal(q.block_scale.view(torch.uint8), scales) and q.outer_scale.item() == S_dec
    assert torch.equal(fp4.fake_quant(x, "nvidia", tile=tile, four_over_six=error), fp4.dequantize_nvfp4(q))


def test_ties_keep_map_to_6_and_a_strictly_better_map_to_4_wins():
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([6.0, 3.0, -1.5, 0.0])           # on both grids: err4 = err6 = 0 -> map-to-6 (256)
    x[0, 16:20] = torch.tensor([6.0, 4.5, 1.5, -3.0])         # 4.5 = 3 x 1.5: only map-to-4 (384) is exact
    for error in fp4.FOUR_OVER_SIX_ERRORS:
        q = fp4.quantize_nvfp4(x, four_over_six=error)
        assert q.block_scale.float().tolist() == [[256.0, 384.0]]
        assert torch.equal(fp4.dequantize_nvfp4(q), x)


def test_all_zero_tensor_and_refusals():
    q = fp4.quantize_nvfp4(torch.zeros(4, 32), tile=(16, 16), four_over_six="mse")
    assert not q.codes.any() and not q.block_scale.float().any() and q.outer_scale.item() == 1.0
    x = torch.randn(4, 32)
    for kw in (dict(rounding="stochastic"), dict(rht_signs=torch.ones(16))):
        for f in (lambda: fp4.quantize_nvfp4(x, four_over_six="mae", **kw),
                  lambda: fp4.fake_quant(x, "nvidia", four_over_six="mae", **kw)):
            with pytest.raises(ValueError, match="Four Over Six .* rounding='nearest' and no RHT"):
                f()
    with pytest.raises(ValueError, match="mxfp4 has none"):
        dataclasses.replace(fp4.RECIPES["mxfp4"], four_over_six="all")


def test_lowers_mse_on_gaussian_data():
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(3))
    plain = fp4.sqnr(x, fp4.fake_quant(x, "nvidia"))
    assert fp4.sqnr(x, fp4.fake_quant(x, "nvidia", four_over_six="mse")) > plain + 0.5      # measured +0.77 dB
    assert fp4.sqnr(x, fp4.fake_quant(x, "nvidia", four_over_six="mae")) > plain + 0.4      # measured +0.64 dB


def test_forward_gets_it_on_the_operands_the_recipe_names():
    recipe = dataclasses.replace(fp4.RECIPES["nvidia"], name="n46", four_over_six="weights")
    x, w = torch.randn(8, 64, requires_grad=True), torch.randn(32, 64, requires_grad=True)
    y = fp4.FP4LinearFunction.apply(x, w, recipe, torch.Generator().manual_seed(0))
    xq, wq = fp4.fake_quant(x, recipe), fp4.fake_quant(w, recipe, tile=(16, 16), four_over_six="mae")
    assert torch.equal(y, xq @ wq.t()) and not torch.equal(wq, fp4.fake_quant(w, recipe, tile=(16, 16)))
    y.sum().backward()                                     # the backward has no 4/6 and runs as before
    assert x.grad.isfinite().all() and w.grad.isfinite().all()


def test_paths_auto_takes_one_that_has_it_and_a_kernel_without_it_is_refused_by_name():
    import cpu_kernels
    recipe = dataclasses.replace(fp4.RECIPES["nvidia"], name="nvidia-4over6", four_over_six="all")
    impl, line = fastpaths.select("auto", "cpu", recipe)   # its probe checks a 16x16 "mae" 4/6 fake_quant
    cpu_builds = fastpaths.probe("cpu", torch.device("cpu"), fp4.RECIPES["nvidia"]) is None
    if cpu_builds and "four_over_six" in cpu_kernels.SUPPORTS:
        assert impl.name == "cpu" and "FP4 path: cpu" in line
    else:
        assert impl.name == "compiled" and "FP4 path: compiled" in line
        assert "not cpu: ValueError: path 'cpu' has no Four Over Six kernel yet" in line or not cpu_builds
    x = data("heavy", 1)
    got, want = impl.quantize_nvfp4(x, four_over_six="mse"), fp4.quantize_nvfp4(x, four_over_six="mse")
    assert torch.equal(got.codes, want.codes) and torch.equal(got.outer_scale, want.outer_scale)
    assert torch.equal(got.block_scale.view(torch.uint8), want.block_scale.view(torch.uint8))
    for cls in (fastpaths.CPU, fastpaths.Triton):          # an adapter refuses before touching kernels that lack it
        adapter = object.__new__(cls)
        adapter.kernels = types.SimpleNamespace(SUPPORTS=frozenset())
        with pytest.raises(ValueError, match=f"path '{cls.name}' has no Four Over Six kernel yet"):
            adapter._fake_quant_2d(x, recipe, (1, 16), "nearest", None, None, torch.float32, "mae")
        with pytest.raises(ValueError, match="no Four Over Six kernel yet"):
            adapter._quantize_nvfp4_2d(x, "tensor", (1, 16), "nearest", None, None, "mae")


def test_flags_round_trip_and_a_bad_combination_exits_with_one_line():
    cfg = train.TrainConfig(**train.parse_args(["--fp4", "--fp4-recipe", "nvidia", "--fp4-4over6", "weights"]))
    recipe = train.resolve_recipe(cfg)
    assert recipe.name == "nvidia[4over6=weights]" and recipe.four_over_six == "weights"
    cfg = dataclasses.replace(cfg, fp4_4over6="all", fp4_4over6_error="mse")
    recipe = train.resolve_recipe(cfg)
    assert recipe.name == "nvidia[4over6=all,4over6-error=mse]" and recipe.four_over_six_error == "mse"
    for argv in (["--fp4", "--fp4-recipe", "mxfp4", "--fp4-4over6", "all"], ["--fp4", "--fp4-4over6-error", "mse"]):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert "error:" in str(e.value) and "\n" not in str(e.value)

"""The 2026 variants of the NVFP4 quantizer: Four Over Six (docs/numerics.md §10) and MS-EDEN (§11, Quartet II),
each bit for bit against an independent element-by-element transcription, with the statistics they are chosen
for (4/6 lowers the error; MS-EDEN is unbiased over rotations with an error close to RTN's), defined results on
edge inputs, the recipes that use them and the --fp4-recipe strings that build them. (Their kernels: test_paths.py;
RHT-128: test_rht.py.) Run: python -m pytest tests/test_variants.py -q"""
import dataclasses

import numpy as np
import pytest
import torch

import config
import fp4
import train
from conftest import awkward, equal_with_nan, sqnr

f32 = np.float32
GRID = [f32(g) for g in fp4.E2M1_GRID]
# every non-negative finite E4M3 value, indexed by its byte (0x7F is NaN)
E4M3 = [f32(m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)) for e in range(16) for m in range(8)][:-1]
R = fp4.RECIPES["quartet2"]


def nearest(v, grid):
    """Index of the grid value nearest to v >= 0, a tie to the even index (= even code / even mantissa)."""
    d = [abs(float(v) - float(g)) for g in grid]
    return min(range(len(grid)), key=lambda k: (d[k], k % 2))


def exits_with(argv, message):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)

# -----------------------------------------------------------------------------
# Four Over Six: fp4.quantize_nvfp4(four_over_six=...) against a per-element fp32 transcription of TE's
# _quantize_blockwise_4over6_reference


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
def test_four_over_six_is_bit_exact_against_an_element_by_element_transcription(tile, error, kind):
    x = data(kind, 7)
    q = fp4.quantize_nvfp4(x, tile=tile, four_over_six=error)
    codes, scales, S_dec = transcription(x, tile, error)
    assert torch.equal(fp4.unpack_e2m1(q.codes), codes)
    assert torch.equal(q.block_scale.view(torch.uint8), scales) and q.outer_scale.item() == S_dec
    assert torch.equal(fp4.fake_quant(x, "nvidia", tile=tile, four_over_six=error), fp4.dequantize_nvfp4(q))


@pytest.mark.parametrize("kw", [dict(), dict(outer=128, tile=(16, 16), rounding="stochastic"), dict(rounding="eden"),
                                dict(tile=(16, 16), four_over_six="mse"),
                                dict(four_over_six="mae"),
                                dict(outer=128, four_over_six="mse")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_transposed_operand_quantizes_as_its_contiguous_copy(kw, dtype):
    # wgrad and dgrad quantize transposed views (dYᵀ, Xᵀ, Wᵀ); K = 384 needs no padding, so the view goes in as it is
    xt = data("heavy", 2).repeat(12, 1).to(dtype).t()                             # (64, 384), strides (1, 64)
    got, ref = (fp4.quantize_nvfp4(t, generator=torch.Generator().manual_seed(1), **kw) for t in (xt, xt.contiguous()))
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.block_scale.view(torch.uint8), ref.block_scale.view(torch.uint8))
    assert torch.equal(fp4.fake_quant(xt, "nvidia", tile=kw.get("tile", (1, 16)), four_over_six=kw.get("four_over_six")),
                       fp4.dequantize_nvfp4(fp4.quantize_nvfp4(xt.contiguous(), tile=kw.get("tile", (1, 16)),
                                                               four_over_six=kw.get("four_over_six"))))


def test_four_over_six_ties_keep_map_to_6_and_a_strictly_better_map_to_4_wins():
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([6.0, 3.0, -1.5, 0.0])           # on both grids: err4 = err6 = 0 -> map-to-6 (256)
    x[0, 16:20] = torch.tensor([6.0, 4.5, 1.5, -3.0])         # 4.5 = 3 x 1.5: only map-to-4 (384) is exact
    for error in ("mae", "mse"):
        q = fp4.quantize_nvfp4(x, four_over_six=error)
        assert q.block_scale.float().tolist() == [[256.0, 384.0]]
        assert torch.equal(fp4.dequantize_nvfp4(q), x)


def test_four_over_six_of_an_all_zero_tensor_is_zero_and_only_nvfp4_recipes_have_it():
    q = fp4.quantize_nvfp4(torch.zeros(4, 32), tile=(16, 16), four_over_six="mse")
    assert not q.codes.any() and not q.block_scale.float().any() and q.outer_scale.item() == 1.0
    with pytest.raises(ValueError, match="Four Over Six is an nvfp4 scale rule"):
        dataclasses.replace(fp4.RECIPES["mxfp4"], four_over_six="all")


def test_four_over_six_lowers_the_error_on_gaussian_data():
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(3))
    plain = sqnr(x, fp4.fake_quant(x, "nvidia"))
    assert sqnr(x, fp4.fake_quant(x, "nvidia", four_over_six="mse")) > plain + 0.5      # measured +0.77 dB
    assert sqnr(x, fp4.fake_quant(x, "nvidia", four_over_six="mae")) > plain + 0.4      # measured +0.64 dB


def test_the_forward_gets_four_over_six_on_the_operands_the_recipe_names():
    recipe = dataclasses.replace(fp4.RECIPES["nvidia"], four_over_six="weights")
    x, w = torch.randn(8, 64, requires_grad=True), torch.randn(32, 64, requires_grad=True)
    y = fp4.FP4LinearFunction.apply(x, w, recipe, torch.Generator().manual_seed(0))
    xq, wq = fp4.fake_quant(x, recipe), fp4.fake_quant(w, recipe, tile=(16, 16), four_over_six="mae")
    assert torch.equal(y, xq @ wq.t()) and not torch.equal(wq, fp4.fake_quant(w, recipe, tile=(16, 16)))
    assert fp4.four_over_six_of(recipe, "weights") == "mae" and fp4.four_over_six_of(recipe, "activations") is None
    y.sum().backward()                                     # the backward has no 4/6 and runs as before
    assert x.grad.isfinite().all() and w.grad.isfinite().all()


def test_four_over_six_recipe_strings_build_it_and_a_bad_one_exits_with_one_line():
    recipe = config.check(config.TrainConfig(fp4=True, fp4_recipe="nvidia[four_over_six=weights]"), {})
    assert str(recipe) == "nvidia[four_over_six=weights]" and recipe.four_over_six == "weights"
    recipe = config.check(config.TrainConfig(fp4=True, fp4_recipe="nvidia[four_over_six=all,four_over_six_error=mse]"), {})
    assert recipe.four_over_six_error == "mse" and fp4.parse_recipe(str(recipe)) == recipe
    assert fp4.RECIPES["nvidia-4over6"] == dataclasses.replace(fp4.RECIPES["nvidia"], name="nvidia-4over6",
                                                               four_over_six="all")
    exits_with(["--fp4", "--fp4-recipe", "mxfp4[four_over_six=all]"], "Four Over Six is an nvfp4 scale rule")
    exits_with(["--fp4", "--fp4-recipe", "nvidia[four_over_six=some]"], "four_over_six must be one of")

# -----------------------------------------------------------------------------
# MS-EDEN: an independent, element-by-element transcription (numpy fp32 scalars, Python loops)


def eden_transcribed(x, u):
    """x: (M, K) fp32 numpy, K a multiple of 128; u: (M, K/16) uniforms -> (codes (M, K) 0..15, scale bytes)"""
    M, K = x.shape
    A = f32(np.abs(x).max())
    S_dec = f32(1.0) if A == 0 else f32(f32(A / f32(fp4.EDEN_SCALE_BOUND)) / f32(fp4.EDEN_VAL_MAX))
    codes, scales = np.zeros((M, K), np.int64), np.zeros((M, K // 16), np.int64)
    for r in range(M):
        for g in range(K // 128):
            s, z, q = [], [], []
            for b in range(8):
                block = x[r, g * 128 + b * 16: g * 128 + (b + 1) * 16]
                amax = f32(np.abs(block).max())
                sb = E4M3[nearest(float(f32(f32(amax / f32(fp4.EDEN_VAL_MAX)) / S_dec)), E4M3)] or 1.0
                enc = f32(f32(1.0) / f32(f32(sb) * S_dec))
                for v in block:
                    zv = f32(v * enc)
                    k = nearest(min(abs(float(zv)), 6.0), GRID)
                    z.append(zv)
                    q.append(f32(-GRID[k] if zv < 0 else GRID[k]))
                    codes[r, g * 128 + len(z) - 1] = k + 8 * bool(zv < 0)
                s.append(sb)
            num, den = [f32(a * a) for a in z], [f32(a * b) for a, b in zip(z, q)]
            while len(num) > 1:                                   # halves added elementwise
                h = len(num) // 2
                num = [f32(num[i] + num[i + h]) for i in range(h)]
                den = [f32(den[i] + den[i + h]) for i in range(h)]
            c = f32(1.0) if den[0] == 0 else f32(num[0] / den[0])
            for b in range(8):
                t = float(f32(f32(s[b]) * c))
                lo = max(i for i in range(127) if E4M3[i] <= t)
                if E4M3[lo] == t:
                    pick = lo
                else:
                    p = f32(f32(t - E4M3[lo]) / f32(E4M3[lo + 1] - E4M3[lo]))
                    pick = lo + 1 if u[r, g * 8 + b] < p else lo
                scales[r, g * 8 + b] = pick
    return codes, scales


def test_ms_eden_equals_an_element_by_element_transcription():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 256, generator=g) * torch.tensor([[1.0], [1e-3], [40.0]])
    x[1, :16] = 0.0                                              # an all-zero block: scale 0 -> 1
    q = fp4.quantize_nvfp4(x, rounding="eden", generator=torch.Generator().manual_seed(3))
    u = fp4.uniform_noise(fp4.draw_seed(torch.Generator().manual_seed(3)), (3, 16)).numpy()
    codes, scales = eden_transcribed(x.numpy(), u)
    assert torch.equal(fp4.unpack_e2m1(q.codes).long(), torch.from_numpy(codes))
    assert torch.equal(q.block_scale.view(torch.uint8).long(), torch.from_numpy(scales))
    A = x.abs().max()
    assert q.outer_scale.item() == f32(f32(A.item() / f32(fp4.EDEN_SCALE_BOUND)) / f32(fp4.EDEN_VAL_MAX))


def relative_bias_and_floor(estimates, exact):
    """estimates (N, ...) -> (‖mean - exact‖ / ‖exact‖, the same for pure noise of that size: the rms error over
    sqrt(N), relative)"""
    N, norm = estimates.shape[0], exact.double().norm().item()
    mse = (estimates - exact).double().square().sum().item() / N
    return (estimates.mean(0) - exact).double().norm().item() / norm, (mse / N) ** 0.5 / norm


@pytest.mark.parametrize("rounding", ["eden", "nearest"])
@pytest.mark.parametrize("recipe", ["nvidia", "tetrajet"])        # MS-EDEN per tensor; EDEN on double-block (§13)
def test_eden_gemm_is_unbiased_over_rotations_and_rtn_is_not(recipe, rounding):
    # Q(a H) Q(b H)ᵀ with a fresh RHT-128 per draw: MS-EDEN's mean stays within ~its finite-N floor; RTN's
    # (the same rotation, no correction) shrinks every product and its bias stands out at the same N. The N
    # draws run as one quantization of N stacked copies, each rotated by its own signs first (so they share
    # one per-tensor scale: still an MS-EDEN quantization of the stacked operand).
    g, N = torch.Generator().manual_seed(2), 1200
    a, b = torch.randn(16, 256, generator=g), torch.randn(12, 256, generator=g)
    signs = torch.stack([fp4.random_signs(g, n=128) for _ in range(N)]).repeat(1, 2)[:, None]   # (N, 1, 256)
    ones = torch.ones(128)
    qa, qb = (fp4.fake_quant(fp4.rht(t * signs, ones), recipe, rounding, generator=g) for t in (a, b))
    bias, floor = relative_bias_and_floor(qa @ qb.transpose(1, 2), a @ b.t())          # (N, 16, 12)
    if rounding == "eden":
        assert bias < 1.5 * floor, (bias, floor)
    else:
        assert bias > 2.5 * floor, (bias, floor)


def small_value_gain(largest, rounding, draws=400):
    """One 128-group: 64 unit Gaussians, one value `largest`, zeros; `draws` fresh RHT-128 rotations of it quantized
    as one tensor, rotated back -> (mean, s.e.) over draws of the gain ⟨x̂_s, x_s⟩ / ⟨x_s, x_s⟩ on the 64 small values."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(128)
    x[1:65], x[0] = torch.randn(64, generator=g), largest
    signs = torch.stack([fp4.random_signs(g, n=128) for _ in range(draws)])                 # (draws, 128)
    ones = torch.ones(128)
    q = fp4.fake_quant(fp4.rht(x * signs, ones), "nvidia", rounding, generator=g)
    back = (fp4.rht(q, ones) * signs)[:, 1:65].double()                                    # H is its own inverse
    gains = back @ x[1:65].double() / x[1:65].double().square().sum()
    return gains.mean().item(), gains.std().item() / draws ** 0.5


def test_ms_eden_is_unbiased_on_a_gaussian_group_and_overestimates_the_small_values_of_a_dominated_one():
    # (docs/numerics.md §11) the per-group correction Σz²/Σzq is exact on average while no element
    # dominates the group; when one holds 97% of its energy (50 beside 64 unit Gaussians) the rotation cannot spread
    # it, the RTN errors of the small values stay correlated with them and the correction scales them up ~11%
    gain, se = small_value_gain(0.0, "eden")
    assert abs(gain - 1) < 4 * se and se < 0.002, (gain, se)
    gain, se = small_value_gain(50.0, "eden")
    assert 0.05 < gain - 1 < 0.2 and gain - 1 > 10 * se, (gain, se)
    gain, se = small_value_gain(50.0, "stochastic")                  # element SR, the same rotations: within 2%
    assert abs(gain - 1) < 0.02, (gain, se)


@pytest.mark.parametrize("dist", ["gaussian", "student-t"])
def test_ms_eden_error_is_close_to_rtn_and_about_half_of_sr(dist):
    # published (Quartet II's notebook, RHT-128, relative MSE x1e-3): RTN 9.0, element SR 23.5, MS-EDEN 9.8
    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, 512, generator=g) if dist == "gaussian" else \
        torch.distributions.StudentT(3.0).sample((128, 512))
    err = {}
    for rounding in ("nearest", "stochastic", "eden"):
        s = fp4.random_signs(g, n=128)
        y = fp4.rht(x, s)
        err[rounding] = ((fp4.fake_quant(x, "nvidia", rounding, generator=g, rht_signs=s) - y).square().sum()
                         / y.square().sum()).item()
    assert 8e-3 < err["nearest"] < 1e-2 and 1.0 < err["eden"] / err["nearest"] < 1.15, err
    assert err["stochastic"] / err["eden"] > 1.8, err


def test_eden_on_double_block_keeps_rtns_codes_and_scales_and_carries_the_correction_in_the_outer_scale():
    # (§13) the same codes and E4M3 s_i as double-block RTN; s_o ⊗ c with c = Σz²/Σzq per 128-group, recomputed
    # here in fp64 from the codes; no randomness: the generator is not read beyond fake_quant's seed draw
    g = torch.Generator().manual_seed(5)
    x = awkward(rows=24, cols=256)
    signs = fp4.random_signs(g, n=128)
    q = fp4.quantize_nvfp4(x, outer=128, rounding="eden", rht_signs=signs, generator=torch.Generator().manual_seed(1))
    r = fp4.quantize_nvfp4(x, outer=128, rounding="nearest", rht_signs=signs)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.block_scale.view(torch.uint8), r.block_scale.view(torch.uint8))
    again = fp4.quantize_nvfp4(x, outer=128, rounding="eden", rht_signs=signs, generator=torch.Generator().manual_seed(2))
    assert equal_with_nan(again.outer_scale, q.outer_scale)                         # deterministic
    y = fp4.rht(x, signs).double()
    s = r.outer_scale.double().repeat_interleave(8, -1) * r.block_scale.double()     # (24, 16) decode scales
    z = (y.view(24, 16, 16) / s[..., None]).where(r.block_scale.double()[..., None] != 0, 0.0)
    codes = fp4.decode_e2m1(fp4.unpack_e2m1(r.codes)).double().view(24, 16, 16)
    c = (z * z).view(24, 2, 128).sum(-1) / (z * codes).view(24, 2, 128).sum(-1)
    c = torch.where((z * codes).view(24, 2, 128).sum(-1) == 0, 1.0, c)
    want = r.outer_scale.double() * c
    ok = torch.isfinite(want)
    assert torch.allclose(q.outer_scale.double()[ok], want[ok], rtol=1e-6) and (q.outer_scale[~ok].isnan().all())


def test_ms_eden_edge_inputs_give_defined_results():
    s = fp4.random_signs(torch.Generator().manual_seed(4), n=128)
    g = torch.Generator().manual_seed(5)
    eden = lambda x: fp4.fake_quant(x, "nvidia", "eden", generator=g, rht_signs=s)      # noqa: E731
    assert not eden(torch.zeros(4, 128)).view(torch.int32).any()                         # exact zeros, +0.0
    for scale in (1e-30, 1e30):                                                          # tiny, huge
        x = torch.randn(4, 128, generator=g) * scale
        y = eden(x)
        assert torch.isfinite(y).all() and 0.8 < (y.double().norm() / fp4.rht(x, s).double().norm()).item() < 1.2, scale
    # above FLT_MAX / 128 the unnormalized butterfly overflows (it normalizes at the end): Inf, so all NaN
    assert eden(torch.full((4, 128), 1e37)).isnan().all()
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(4, 256, generator=g)
        x[2, 9] = bad
        assert eden(x).isnan().all(), bad                      # one per-tensor scale: the whole tensor is NaN
        q = fp4.quantize_nvfp4(x, rounding="eden", generator=g)
        assert q.outer_scale.isnan() or q.outer_scale.isinf()


def test_quartet2_backward_gemms_are_unbiased_against_the_aligned_products():
    # dgrad and wgrad of a quartet2 layer over fresh draws: within their floors of dY Ŵ and dYᵀ X̂ (aligned)
    g = torch.Generator().manual_seed(6)
    x, w, dy = torch.randn(128, 128, generator=g), torch.randn(32, 128, generator=g) / 8, torch.randn(128, 32, generator=g)
    x_hat = fp4.fake_quant(x, R, four_over_six="mse")
    w_hat = fp4.fake_quant(w, R, four_over_six="mse")
    dxs, dws = [], []
    for _ in range(64):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        fp4.FP4LinearFunction.apply(xi, wi, R, g).backward(dy)
        dxs.append(xi.grad)
        dws.append(wi.grad)
    for name, got, exact in (("dgrad", dxs, dy @ w_hat), ("wgrad", dws, dy.t() @ x_hat)):
        bias, floor = relative_bias_and_floor(torch.stack(got), exact)
        assert bias < 2.0 * floor, (name, bias, floor)
    y = fp4.FP4LinearFunction.apply(x, w, R, g)
    assert torch.equal(y, x_hat @ w_hat.t())                  # the forward: 4/6 (MSE) RTN on both operands


def test_quartet2_draws_fresh_signs_per_backward_and_replays_from_the_seed():
    def dw(gen_seed, calls):
        g = torch.Generator().manual_seed(gen_seed)
        out = []
        for _ in range(calls):
            w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0)).requires_grad_()
            x = torch.randn(128, 128, generator=torch.Generator().manual_seed(1))
            fp4.FP4LinearFunction.apply(x, w, R, g).sum().backward()
            out.append(w.grad)
        return out
    first, second = dw(7, 2)
    assert not torch.equal(first, second)                     # a new rotation and new scale noise each call
    assert all(equal_with_nan(a, b) for a, b in zip(dw(7, 2), (first, second)))


def test_ms_eden_recipe_strings_and_the_combinations_it_refuses():
    exits_with(["--fp4", "--fp4-recipe", "mxfp4[grad_rounding=eden]"], "eden needs fmt=nvfp4")
    exits_with(["--fp4", "--fp4-recipe", "tetrajet[grad_rounding=eden]"], "eden needs a fresh RHT-128")   # RHT-16
    exits_with(["--fp4", "--fp4-recipe", "nvidia[rht_size=128]"], "RHT-128 needs rht_signs=random")
    # MS-EDEN is unbiased only over a fresh RHT-128 of both backward GEMMs' operands: anything less is refused
    for spec in ("nvidia[grad_rounding=eden]", "nvidia[grad_rounding=eden,rht=wgrad,rht_signs=random,rht_size=128]",
                 "quartet2[rht_size=16]", "quartet2[rht_signs=fixed,rht_size=16]", "quartet2[rht=dgrad]"):
        with pytest.raises(ValueError, match="eden needs a fresh RHT-128 on both backward GEMMs"):
            fp4.parse_recipe(spec)
    exits_with(["--fp4", "--fp4-recipe", "quartet2[rht=wgrad]"], "eden needs a fresh RHT-128")
    cfg = config.TrainConfig(fp4=True, fp4_recipe="nvidia[rht=dgrad+wgrad,rht_signs=random,rht_size=128,grad_rounding=eden]")
    recipe = config.check(cfg, {})
    assert (recipe.rht_size, recipe.grad_rounding, recipe.rht) == (128, "eden", ("dgrad", "wgrad"))

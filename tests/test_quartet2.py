"""Quartet II (fp4.py §11 in docs/numerics.md): RHT-128, the MS-EDEN quantizer and the quartet2 recipe. MS-EDEN
bit for bit against an element-by-element transcription; unbiased over draws where RTN is not; its error close
to RTN's and well below SR's (the published factors); defined results on zero, tiny, huge, NaN and Inf input;
the recipe's backward GEMMs unbiased; the flags. Run: python -m pytest tests/test_quartet2.py -q"""
import numpy as np
import pytest
import torch

import fp4
from conftest import TINY, equal_with_nan

F32 = np.float32
R = fp4.RECIPES["quartet2"]


def sylvester(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def test_rht128_is_the_normalized_hadamard_with_signs_on_the_inputs():
    g = torch.Generator().manual_seed(0)
    x, signs = torch.randn(6, 256, generator=g), fp4.random_signs(g, n=128)
    H = sylvester(128) / 128 ** 0.5
    expected = ((x.double().view(6, 2, 128) * signs.double()) @ H).view(6, 256)
    torch.testing.assert_close(fp4.rht128(x, signs).double(), expected, atol=1e-5, rtol=0)
    a, b = torch.randn(5, 256, generator=g), torch.randn(7, 256, generator=g)
    torch.testing.assert_close(fp4.rht(a, signs) @ fp4.rht(b, signs).t(), a @ b.t(), atol=1e-4, rtol=1e-5)
    assert not torch.equal(fp4.rht128(x, signs), fp4.rht128(x, -signs * torch.arange(128).remainder(2).mul(2).sub(1)))
    with pytest.raises(ValueError, match="multiple of 128"):
        fp4.rht128(torch.zeros(2, 200), signs)


# --- an independent, element-by-element transcription of MS-EDEN (numpy fp32 scalars, Python loops) ---

E4M3 = [(b >> 3 and (1 + (b & 7) / 8) * 2.0 ** ((b >> 3) - 7)) or (b & 7) * 2.0 ** -9 for b in range(127)]
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def nearest(v, grid):
    """index of the grid value nearest to v >= 0 (ties to the even index), clamped to the grid's top"""
    best = min(range(len(grid)), key=lambda i: (abs(grid[i] - v), i % 2))
    return best


def eden_transcribed(x, u):
    """x: (M, K) fp32 numpy, K a multiple of 128; u: (M, K/16) uniforms -> (codes (M, K) 0..15, scale bytes)"""
    M, K = x.shape
    A = F32(np.abs(x).max())
    S_dec = F32(1.0) if A == 0 else F32(F32(A / F32(fp4.EDEN_SCALE_BOUND)) / F32(fp4.EDEN_VAL_MAX))
    codes, scales = np.zeros((M, K), np.int64), np.zeros((M, K // 16), np.int64)
    for r in range(M):
        for g in range(K // 128):
            s, z, q = [], [], []
            for b in range(8):
                block = x[r, g * 128 + b * 16: g * 128 + (b + 1) * 16]
                amax = F32(np.abs(block).max())
                sb = E4M3[nearest(float(F32(F32(amax / F32(fp4.EDEN_VAL_MAX)) / S_dec)), E4M3)] or 1.0
                enc = F32(F32(1.0) / F32(F32(sb) * S_dec))
                for v in block:
                    zv = F32(v * enc)
                    k = nearest(min(abs(float(zv)), 6.0), E2M1)
                    z.append(zv)
                    q.append(F32(-E2M1[k] if zv < 0 else E2M1[k]))
                    codes[r, g * 128 + len(z) - 1] = k + 8 * bool(zv < 0)
                s.append(sb)
            num, den = [F32(a * a) for a in z], [F32(a * b) for a, b in zip(z, q)]
            while len(num) > 1:                                   # halves added elementwise
                h = len(num) // 2
                num = [F32(num[i] + num[i + h]) for i in range(h)]
                den = [F32(den[i] + den[i + h]) for i in range(h)]
            c = F32(1.0) if den[0] == 0 else F32(num[0] / den[0])
            for b in range(8):
                t = float(F32(F32(s[b]) * c))
                lo = max(i for i in range(127) if E4M3[i] <= t)
                if E4M3[lo] == t:
                    pick = lo
                else:
                    p = F32(F32(t - E4M3[lo]) / F32(E4M3[lo + 1] - E4M3[lo]))
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
    assert q.outer_scale.item() == F32(F32(A.item() / F32(fp4.EDEN_SCALE_BOUND)) / F32(fp4.EDEN_VAL_MAX))


def relative_bias_and_floor(estimates, exact):
    """estimates (N, ...) -> (‖mean - exact‖ / ‖exact‖, the same for pure noise of that size: the rms error over
    sqrt(N), relative)"""
    N, norm = estimates.shape[0], exact.double().norm().item()
    mse = (estimates - exact).double().square().sum().item() / N
    return (estimates.mean(0) - exact).double().norm().item() / norm, (mse / N) ** 0.5 / norm


@pytest.mark.parametrize("rounding", ["eden", "nearest"])
def test_ms_eden_gemm_is_unbiased_over_rotations_and_rtn_is_not(rounding):
    # Q(a H) Q(b H)ᵀ with a fresh RHT-128 per draw: MS-EDEN's mean stays within ~its finite-N floor; RTN's
    # (the same rotation, no correction) shrinks every product and its bias stands out at the same N. The N
    # draws run as one quantization of N stacked copies, each rotated by its own signs first (so they share
    # one per-tensor scale: still an MS-EDEN quantization of the stacked operand).
    g, N = torch.Generator().manual_seed(2), 1200
    a, b = torch.randn(16, 256, generator=g), torch.randn(12, 256, generator=g)
    signs = torch.stack([fp4.random_signs(g, n=128) for _ in range(N)]).repeat(1, 2)[:, None]   # (N, 1, 256)
    ones = torch.ones(128)
    qa, qb = (fp4.fake_quant(fp4.rht128(t * signs, ones), "nvidia", rounding, generator=g) for t in (a, b))
    bias, floor = relative_bias_and_floor(qa @ qb.transpose(1, 2), a @ b.t())          # (N, 16, 12)
    if rounding == "eden":
        assert bias < 1.5 * floor, (bias, floor)
    else:
        assert bias > 2.5 * floor, (bias, floor)


@pytest.mark.parametrize("data", ["gaussian", "student-t"])
def test_ms_eden_error_is_close_to_rtn_and_about_half_of_sr(data):
    # published (Quartet II's notebook, RHT-128, relative MSE x1e-3): RTN 9.0, element SR 23.5, MS-EDEN 9.8
    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, 512, generator=g) if data == "gaussian" else \
        torch.distributions.StudentT(3.0).sample((128, 512))
    err = {}
    for rounding in ("nearest", "stochastic", "eden"):
        s = fp4.random_signs(g, n=128)
        y = fp4.rht(x, s)
        err[rounding] = ((fp4.fake_quant(x, "nvidia", rounding, generator=g, rht_signs=s) - y).square().sum()
                         / y.square().sum()).item()
    assert 8e-3 < err["nearest"] < 1e-2 and 1.0 < err["eden"] / err["nearest"] < 1.15, err
    assert err["stochastic"] / err["eden"] > 1.8, err


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


def test_quartet2_flags_and_bad_combinations(tmp_path, dataset):
    import train
    with pytest.raises(SystemExit, match="MS-EDEN .* needs fmt='nvfp4' and outer='tensor'"):
        train.main(["--fp4", "--fp4-recipe", "tetrajet", "--fp4-grad-rounding", "eden", "--dataset", dataset,
                    "--out-dir", str(tmp_path), "--max-iters", "2", *TINY])
    with pytest.raises(SystemExit, match="RHT-128 needs rht_signs='random'"):
        train.main(["--fp4", "--fp4-recipe", "nvidia", "--fp4-rht-size", "128", "--dataset", dataset,
                    "--out-dir", str(tmp_path), "--max-iters", "2", *TINY])
    cfg, _ = train.load_config(train.parse_args(["--fp4", "--fp4-recipe", "nvidia", "--fp4-rht", "both",
                                                 "--fp4-rht-signs", "random", "--fp4-rht-size", "128",
                                                 "--fp4-grad-rounding", "eden"]))
    recipe = train.resolve_recipe(cfg)
    assert (recipe.rht_size, recipe.grad_rounding, recipe.rht) == (128, "eden", ("dgrad", "wgrad"))

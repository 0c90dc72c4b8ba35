"""The FP4 linear (numerics.md §6): shapes, fidelity to a high-precision linear, which operands each recipe's
backward uses, NaN behaviour, determinism and convert_to_fp4. Run: python -m pytest tests/test_linear.py -q"""
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fp4

ABLATIONS = {  # every knob of a Recipe runs on its own
    "tetrajet_no_rht": dataclasses.replace(fp4.RECIPES["tetrajet"], rht=()),
    "tetrajet_2d_weight": dataclasses.replace(fp4.RECIPES["tetrajet"], weight_tile=(16, 16)),
    "nvidia_1d_weight": dataclasses.replace(fp4.RECIPES["nvidia"], weight_tile=(1, 16)),
    "nvidia_no_sr": dataclasses.replace(fp4.RECIPES["nvidia"], grad_rounding="nearest"),
}
ALL = {**fp4.RECIPES, **ABLATIONS}


def cos(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def run(recipe, x, w, dy, seed=0):
    """-> y, dx, dw of the FP4 linear (fresh leaf copies of x and w)."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fp4.FP4LinearFunction.apply(x, w, recipe, torch.Generator().manual_seed(seed))
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def data(n=96, k_in=160, k_out=80, seed=12345):   # a seed no noise generator uses
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k_in, generator=g), torch.randn(k_out, k_in, generator=g) / k_in ** 0.5,
            torch.randn(n, k_out, generator=g))


@pytest.mark.parametrize("name", list(ALL))
def test_fp4_linear_shapes_and_dtypes_with_unaligned_sizes(name):
    layer = fp4.FP4Linear(100, 40, bias=True, recipe=ALL[name])       # 100, 40, 10 tokens: no dim is a block multiple
    x = torch.randn(2, 5, 100).bfloat16().requires_grad_()
    y = layer(x)
    assert y.shape == (2, 5, 40) and y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.shape == x.shape and x.grad.dtype == torch.bfloat16
    assert layer.weight.grad.dtype == torch.float32 and layer.bias.grad.shape == (40,)
    assert all(t.isfinite().all() for t in (y, x.grad, layer.weight.grad))


# Tolerances, from the quantizers' SQNR on Gaussian data (tests/test_nvfp4.py): a GEMM of two operands with
# independent relative errors 1/s1, 1/s2 has cos ≈ 1/sqrt(1 + 1/s1 + 1/s2). NVFP4 RTN is 20.4 dB (s = 110), SR
# 17.3 dB (s = 54), MXFP4 RTN 18.8 dB, so: forward ≈ 0.991 (NVFP4) / 0.987 (MXFP4), and the worst backward,
# TetraJet's three errors (X̂, then SR on both operands) ≈ 0.978. Measured: 0.989-0.991 / 0.977-0.986. SR noise
# averages out over steps, so the mean over 16 seeds must reach the floor of 0.99.
@pytest.mark.parametrize("name", list(fp4.RECIPES))
def test_fp4_linear_matches_high_precision_within_quantization_noise(name):
    x, w, dy = data()
    y_ref, dx_ref, dw_ref = x @ w.t(), dy @ w, dy.t() @ x
    y, dx, dw = run(fp4.RECIPES[name], x, w, dy)
    assert cos(y, y_ref) > 0.985
    assert cos(dx, dx_ref) > 0.97 and cos(dw, dw_ref) > 0.97
    runs = [run(fp4.RECIPES[name], x, w, dy, seed) for seed in range(16)]
    assert cos(sum(r[1] for r in runs), dx_ref) > 0.99 and cos(sum(r[2] for r in runs), dw_ref) > 0.99


def test_nvidia_dgrad_uses_exactly_the_forward_weight():
    # dY built so its quantization is exact: one entry 2688 makes S_enc = 1, and row 1 holds grid values with a
    # block amax of 6, so its E4M3 scale is 1 and SR has nothing to round. Then dX[1] = dY[1] Ŵ exactly.
    x, w, _ = data(32, 64, 48)
    dy = torch.zeros(32, 48)
    dy[0, 0] = 2688.0
    dy[1] = torch.tensor([6.0, -0.5, 1.5, 3.0, 0.0, -2.0, 4.0, 1.0] * 6)
    _, dx, _ = run(fp4.RECIPES["nvidia"], x, w, dy)
    w_hat = fp4.fake_quant(w, "nvidia", tile=(16, 16))
    torch.testing.assert_close(dx[1], dy[1] @ w_hat, rtol=1e-6, atol=1e-6)
    assert (dx[1] - dy[1] @ w).abs().max() > 100 * (dx[1] - dy[1] @ w_hat).abs().max()


def test_tetrajet_backward_is_unbiased_for_the_dequantized_forward_operands():
    # "Aligned" (TetraJet-v2 §3): E[dX] = dY Ŵ and E[dW] = dYᵀ X̂ exactly (SR unbiased, RHT orthogonal).
    # One draw has ~21% relative noise (13.3 dB), 256 draws ~1.3%; X̂ vs X differ by ~9.5%.
    x, w, dy = data(32, 64, 48)
    recipe = fp4.RECIPES["tetrajet"]
    x_hat, w_hat = fp4.fake_quant(x, recipe), fp4.fake_quant(w, recipe)
    runs = [run(recipe, x, w, dy, seed) for seed in range(256)]
    dx_mean, dw_mean = (torch.stack([r[i] for r in runs]).mean(0) for i in (1, 2))
    for mean, aligned, plain in ((dx_mean, dy @ w_hat, dy @ w), (dw_mean, dy.t() @ x_hat, dy.t() @ x)):
        assert (mean - aligned).norm() < 0.3 * (aligned - plain).norm()


@pytest.mark.parametrize("name", list(fp4.RECIPES))
def test_nan_or_inf_in_the_input_makes_its_output_row_nan(name):
    x, w, _ = data(32, 256, 48)
    for bad in (float("nan"), float("inf")):
        x_bad = x.clone()
        x_bad[3, 17] = bad
        y = fp4.FP4Linear(256, 48, recipe=name)(x_bad)
        assert y[3].isnan().all()                   # never finite garbage
        if fp4.RECIPES[name].outer != "tensor" or fp4.RECIPES[name].fmt == "mxfp4":   # a per-tensor scale
            # (nvidia, quartet2) poisons every row; per-128 and MX block scales only their own row
            assert y[torch.arange(32) != 3].isfinite().all()


def test_fp4_linear_is_deterministic_given_its_seed():
    x, w, dy = data()
    a, b, c = (run(fp4.RECIPES["tetrajet"], x, w, dy, seed) for seed in (7, 7, 8))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert torch.equal(a[0], c[0]) and not torch.equal(a[2], c[2])  # forward is RTN; backward is random


def test_fp4_linear_random_stream_survives_a_state_dict_round_trip():
    x, _, dy = data(32, 64, 48)
    layer = fp4.FP4Linear(64, 48, recipe="tetrajet", seed=3)
    layer(x).backward(dy)                           # advance the generator
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in layer.state_dict().items()}
    layer.weight.grad = None
    layer(x).backward(dy)
    expected = layer.weight.grad.clone()
    fresh = fp4.FP4Linear(64, 48, recipe="tetrajet", seed=999)
    fresh.load_state_dict(state)
    fresh(x).backward(dy)
    assert torch.equal(fresh.weight.grad, expected)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(d, 3 * d, bias=False), "c_proj": nn.Linear(d, d, bias=False)})
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.GELU(), nn.Linear(4 * d, d, bias=False))


class Toy(nn.Module):
    def __init__(self, n_layer=4, d=32):
        super().__init__()
        self.transformer = nn.ModuleDict({"h": nn.ModuleList(Block(d) for _ in range(n_layer))})
        self.lm_head = nn.Linear(d, 50, bias=False)


def test_convert_to_fp4_swaps_block_linears_shares_weights_and_reports(capsys):
    model = Toy()
    weights = {n: p for n, p in model.named_parameters()}
    fp4.convert_to_fp4(model, "nvidia", bf16_first_k=1, bf16_last_k=1)
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert [n for n, k in kinds.items() if k is fp4.FP4Linear] == [
        f"transformer.h.{i}.{s}" for i in (1, 2) for s in ("attn.c_attn", "attn.c_proj", "mlp.0", "mlp.2")]
    assert kinds["lm_head"] is nn.Linear and kinds["transformer.h.0.mlp.0"] is nn.Linear
    assert all(p is weights[n] for n, p in model.named_parameters())   # shared, not copied
    out = capsys.readouterr().out
    assert "8/17 Linear layers -> FP4Linear (recipe nvidia)" in out and "lm_head" in out


def test_convert_to_fp4_rejects_bad_arguments():
    with pytest.raises(ValueError, match="blocks"):
        fp4.convert_to_fp4(nn.Sequential(nn.Linear(4, 4)), "tetrajet")
    with pytest.raises(ValueError, match="bf16_first_k"):
        fp4.convert_to_fp4(Toy(), "tetrajet", bf16_first_k=3, bf16_last_k=2)
    with pytest.raises(ValueError, match="unknown FP4 recipe"):
        fp4.convert_to_fp4(Toy(), "fp8")


def test_recipe_rejects_inconsistent_knobs():
    with pytest.raises(ValueError, match="mxfp4 has no outer scale"):
        dataclasses.replace(fp4.RECIPES["mxfp4"], weight_tile=(16, 16))
    with pytest.raises(ValueError, match="rht must be"):
        dataclasses.replace(fp4.RECIPES["tetrajet"], rht=("fprop",))

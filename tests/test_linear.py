"""The FP4 linear (docs/numerics.md §6, §9): recipes and their strings; the three GEMMs (shapes, fidelity to a
high-precision linear, which operands each recipe's backward uses, the backward GEMM's draws, NaN behaviour,
determinism); FP4Linear's state; convert_to_fp4; FP4 health, which reads a model without changing it.
(OsciReset and OutControl: test_osci_outcontrol.py.) Run: python -m pytest tests/test_linear.py -q"""
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fp4
import health
from conftest import sqnr
from model import GPT, GPTConfig

ABLATIONS = {  # every knob of a Recipe runs on its own
    "tetrajet_no_rht": dataclasses.replace(fp4.RECIPES["tetrajet"], rht=()),
    "tetrajet_2d_weight": dataclasses.replace(fp4.RECIPES["tetrajet"], weight_tile=(16, 16)),
    "nvidia_1d_weight": dataclasses.replace(fp4.RECIPES["nvidia"], weight_tile=(1, 16)),
    "nvidia_no_sr": dataclasses.replace(fp4.RECIPES["nvidia"], grad_rounding="nearest"),
    "nvidia_rht128": fp4.parse_recipe("nvidia[rht=dgrad+wgrad,rht_signs=random,rht_size=128]"),
}
ALL = {**fp4.RECIPES, **ABLATIONS}

# -----------------------------------------------------------------------------
# recipes: every knob independent, printed as preset[field=value,...], read back by parse_recipe


@pytest.mark.parametrize("spec", [*fp4.RECIPES, "tetrajet[rht=none,aligned=false]", "nvidia[weight_tile=1x16]",
                                  "tetrajet[outer=tensor,rht=wgrad,rht_signs=fixed]", "mxfp4[grad_rounding=nearest]",
                                  "nvidia[rht=dgrad+wgrad,rht_signs=random,rht_size=128]", "quartet2[aligned=false]",
                                  "nvidia-4over6[four_over_six=weights,four_over_six_error=mse]",
                                  "tetrajet[gemms=fprop]", "quartet2[gemms=dgrad+wgrad]"])
def test_a_recipe_prints_as_the_string_that_builds_it(spec):
    recipe = fp4.parse_recipe(spec)
    assert fp4.parse_recipe(str(recipe)) == recipe and fp4.parse_recipe(recipe) is recipe
    assert str(recipe) == (spec if "[" in spec else recipe.name)        # the preset alone prints as its name
    if spec in fp4.RECIPES:
        assert recipe == fp4.RECIPES[spec]
    assert torch.equal(fp4.fake_quant(torch.ones(2, 32), spec), torch.ones(2, 32))  # fake_quant takes the string


def test_overrides_print_in_field_order_and_only_what_differs():
    assert str(fp4.parse_recipe("tetrajet[aligned=false,rht=none]")) == "tetrajet[rht=none,aligned=false]"
    assert str(fp4.parse_recipe("tetrajet[aligned=true,outer=128]")) == "tetrajet"
    assert str(fp4.parse_recipe("nvidia[gemms=wgrad+fprop]")) == "nvidia[gemms=fprop+wgrad]"     # in GEMM order
    assert fp4.parse_recipe("tetrajet[rht=none]") == dataclasses.replace(fp4.RECIPES["tetrajet"], rht=())


@pytest.mark.parametrize("spec, message", [
    ("fp8", "unknown FP4 recipe 'fp8'"), ("tetrajet[rht=none", "unknown FP4 recipe 'tetrajet[rht=none'"),
    ("nvidia-4over6[", "unknown FP4 recipe 'nvidia-4over6['"),                # (was: read as the preset)
    ("tetrajet[bogus=1]", "'bogus=1' is not field=value"), ("tetrajet[rht]", "'rht' is not field=value"),
    ("nvidia[aligned=yes]", "aligned must be true or false"),
    ("nvidia[gemms=none]", "gemms must be one or more of fprop, dgrad, wgrad"),
    ("nvidia[gemms=fprop+fwd]", "gemms must be one or more of fprop, dgrad, wgrad"),
    ("nvidia[outer=64]", "outer must be tensor or 128"),
    ("nvidia[weight_tile=4x4]", "weight_tile must be 1x16 or 16x16"),
    ("nvidia[grad_rounding=floor]", "roundings must be in ('nearest', 'stochastic', 'eden')"),
    ("mxfp4[weight_tile=16x16]", "mxfp4 has no outer scale and no 2-D tiles"),
    ("mxfp4[outer=128]", "mxfp4 has no outer scale"),
    ("tetrajet[rht=fprop]", "rht must be a subset of dgrad, wgrad"),
    ("nvidia[rht_signs=sometimes]", "rht_signs must be fixed or random"),
    ("nvidia[rht_size=64]", "rht_size must be 16 or 128"),
    ("nvidia[rht_size=128]", "RHT-128 needs rht_signs=random"),
    ("mxfp4[rht_signs=random,rht_size=128]", "RHT-128 is for nvfp4"),
    ("nvidia[fmt=fp8]", "fmt must be nvfp4 or mxfp4"),
    ("nvidia[four_over_six_error=max]", "four_over_six_error must be mae or mse"),
    ("quartet2[weight_tile=16x16]", "MS-EDEN on the other operand needs weight_tile=1x16")])
def test_a_bad_recipe_is_one_value_error_naming_the_fix(spec, message):
    with pytest.raises(ValueError) as e:
        fp4.parse_recipe(spec)
    assert message in str(e.value) and "\n" not in str(e.value)
    if "unknown" in message:                       # the fix: the presets and the override form
        assert all(name in str(e.value) for name in fp4.RECIPES) and "[field=value,...]" in str(e.value)
    if "field=value" in message:                   # the fix: the fields
        assert all(f in str(e.value) for f in ("fmt", "outer", "weight_tile", "rht_size", "four_over_six_error"))


# -----------------------------------------------------------------------------
# the FP4 linear's three GEMMs


def cos(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def run(recipe, x, w, dy, seed=0, columns=None):
    """-> y, dx, dw of the FP4 linear (fresh leaf copies of x and w)."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fp4.FP4LinearFunction.apply(x, w, recipe, torch.Generator().manual_seed(seed), columns)
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


# Tolerances, from the quantizers' SQNR on Gaussian data (test_numerics.py): a GEMM of two operands with
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


@pytest.mark.parametrize("name", ["tetrajet", "nvidia", "quartet2", "nvidia_no_sr"])
def test_the_backward_gemms_are_backward_gemm_with_its_draws_in_order(name):
    # dgrad, then wgrad, each drawing from the layer's generator: its RHT signs, dY's noise, the other's noise
    recipe = ALL[name]
    x, w, dy = data(48, 128, 64)
    _, dx, dw = run(recipe, x, w, dy, seed=4)
    g = torch.Generator().manual_seed(4)
    x_src, w_src = (fp4.fake_quant(x, recipe, four_over_six=fp4.four_over_six_of(recipe, "activations")),
                    fp4.fake_quant(w, recipe, tile=recipe.weight_tile, four_over_six=fp4.four_over_six_of(recipe, "weights"))
                    ) if recipe.aligned else (x, w)
    if recipe.weight_tile == (16, 16) and not recipe.aligned and recipe.other_rounding == "nearest" and "dgrad" not in recipe.rht:
        want_dx = fp4.fake_quant(dy, recipe, recipe.grad_rounding, generator=g) @ fp4.fake_quant(w, recipe, tile=(16, 16))
    else:
        want_dx = fp4.backward_gemm("dgrad", dy, w_src.t(), recipe, g, recipe.weight_tile)
    assert torch.equal(dx, want_dx)
    assert torch.equal(dw, fp4.backward_gemm("wgrad", dy.t(), x_src.t(), recipe, g))
    signs = fp4.random_signs(torch.Generator().manual_seed(9), n=recipe.rht_size)      # the order, spelled out
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    if recipe.rht_signs == "random" and recipe.rht:
        assert torch.equal(fp4.random_signs(g2, n=recipe.rht_size), signs)
        gemm = recipe.rht[0]
        a_dq = fp4.fake_quant(dy.t(), recipe, recipe.grad_rounding, generator=g2, rht_signs=signs)
        b_dq = fp4.fake_quant(x.t(), recipe, recipe.other_rounding, (1, 16), g2, rht_signs=signs)
        assert torch.equal(fp4.backward_gemm(gemm, dy.t(), x.t(), recipe, g1), a_dq @ b_dq.t())


@pytest.mark.parametrize("name", ["nvidia", "tetrajet", "quartet2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gemm_left_out_of_gemms_multiplies_in_high_precision_and_the_others_keep_their_bits(name, dtype):
    # (SPEC §14) each GEMM's result is the full recipe's when it stays in FP4 and draws as it did (dgrad draws first),
    # and the plain product in the run's dtype when it is left out: from X, W, or with aligned from X̂ = X, Ŵ = W
    x, w, dy = (t.to(dtype) for t in data(48, 128, 64))
    w = w.float()                                                       # the fp32 master weight
    full = run(fp4.RECIPES[name], x, w, dy, seed=3)
    for gemms in (("fprop",), ("dgrad", "wgrad"), ("fprop", "dgrad"), ("wgrad",)):
        y, dx, dw = run(dataclasses.replace(fp4.RECIPES[name], gemms=gemms), x, w, dy, seed=3)
        assert torch.equal(y, full[0]) == ("fprop" in gemms)
        if "fprop" not in gemms:
            assert torch.equal(y, x @ w.to(dtype).t())
        if "dgrad" not in gemms:
            w_src = w if "fprop" not in gemms or not fp4.RECIPES[name].aligned else full_forward_weight(name, w, dtype)
            assert torch.equal(dx, dy @ w_src.to(dtype))
        else:
            assert torch.equal(dx, full[1]) == ("fprop" in gemms or not fp4.RECIPES[name].aligned), gemms
        if "wgrad" not in gemms:
            x_src = x if "fprop" not in gemms or not fp4.RECIPES[name].aligned else fp4.fake_quant(
                x, name, dtype=dtype, four_over_six=fp4.four_over_six_of(fp4.RECIPES[name], "activations"))
            assert torch.equal(dw, (dy.t() @ x_src.to(dtype)).float())
        elif "dgrad" in gemms and "fprop" in gemms:
            assert torch.equal(dw, full[2])


def full_forward_weight(name, w, dtype):
    recipe = fp4.RECIPES[name]
    return fp4.fake_quant(w, recipe, tile=recipe.weight_tile, dtype=dtype, four_over_six=fp4.four_over_six_of(recipe, "weights"))


def test_te_backward_overrides_are_gemms_fprop_with_aligned_false_or_true():
    # Transformer Engine's backward_override: high_precision (backward from X, W), dequantized (from X̂, Ŵ)
    x, w, dy = data(48, 128, 64)
    for aligned in (False, True):
        recipe = fp4.parse_recipe(f"nvidia[gemms=fprop,aligned={str(aligned).lower()}]")
        y, dx, dw = run(recipe, x, w, dy)
        x_src, w_src = (fp4.fake_quant(x, "nvidia"), fp4.fake_quant(w, "nvidia", tile=(16, 16))) if aligned else (x, w)
        assert torch.equal(dx, dy @ w_src) and torch.equal(dw, dy.t() @ x_src)
        assert torch.equal(y, fp4.fake_quant(x, "nvidia") @ fp4.fake_quant(w, "nvidia", tile=(16, 16)).t())


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

# -----------------------------------------------------------------------------
# FP4Linear and convert_to_fp4


def test_fp4_linear_seeds_its_generator_on_first_use_and_its_stream_survives_a_state_dict_round_trip():
    x, _, dy = data(32, 64, 48)
    layer = fp4.FP4Linear(64, 48, recipe="tetrajet", seed=3)
    assert layer.generator is None and layer.columns is None and layer.channel_norm is None
    layer(x).backward(dy)                           # advance the generator
    fresh_gen = torch.Generator().manual_seed(3)
    assert layer.generator is not None and not torch.equal(layer.generator.get_state(), fresh_gen.get_state())
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in layer.state_dict().items()}
    extra = state["_extra_state"]
    assert set(extra) == {"recipe", "seed", "rng", "columns", "channel_norm"} and extra["recipe"] == "tetrajet"
    layer.weight.grad = None
    layer(x).backward(dy)
    expected = layer.weight.grad.clone()
    fresh = fp4.FP4Linear(64, 48, recipe="tetrajet", seed=999)
    fresh.load_state_dict(state)
    fresh(x).backward(dy)
    assert torch.equal(fresh.weight.grad, expected) and fresh.seed == 3
    first = fp4.FP4Linear(64, 48, recipe="tetrajet", seed=3)                 # the stream starts at its seed
    first.weight.data.copy_(layer.weight.data)
    first(x.clone().requires_grad_()).backward(dy)                          # (dgrad draws first, as in run)
    assert torch.equal(first.weight.grad, run(fp4.RECIPES["tetrajet"], x, layer.weight, dy, 3)[2])


def test_high_precision_runs_the_layer_as_a_plain_linear_and_quantize_weight_is_the_forwards():
    x, w, _ = data(16, 64, 32)
    layer = fp4.FP4Linear(64, 32, bias=True, recipe="nvidia")
    layer.weight.data.copy_(w)
    layer.high_precision = True
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), rtol=0, atol=0)
    assert layer.generator is None                                            # nothing drawn
    assert torch.equal(layer.quantize_weight(), fp4.fake_quant(w, "nvidia", tile=(16, 16)))
    assert "recipe=nvidia" in repr(layer)


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
    fp4.convert_to_fp4(model, "nvidia", keep_first_k=1, keep_last_k=1, seed=10)
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    converted = [f"transformer.h.{i}.{s}" for i in (1, 2) for s in ("attn.c_attn", "attn.c_proj", "mlp.0", "mlp.2")]
    assert [n for n, k in kinds.items() if k is fp4.FP4Linear] == converted
    assert [model.get_submodule(n).seed for n in converted] == list(range(10, 18))      # layer i: seed + i
    assert kinds["lm_head"] is nn.Linear and kinds["transformer.h.0.mlp.0"] is nn.Linear
    assert all(p is weights[n] for n, p in model.named_parameters())   # shared, not copied
    out = capsys.readouterr().out
    assert "8/17 Linear layers -> FP4Linear (recipe nvidia)" in out and "lm_head" in out


def test_convert_to_fp4_rejects_bad_arguments():
    with pytest.raises(AttributeError, match="transformer"):
        fp4.convert_to_fp4(nn.Sequential(nn.Linear(4, 4)), "tetrajet")
    with pytest.raises(ValueError, match="keep_first_k 3 \\+ keep_last_k 2 must fit the model's 4 blocks"):
        fp4.convert_to_fp4(Toy(), "tetrajet", keep_first_k=3, keep_last_k=2)
    with pytest.raises(ValueError, match="unknown FP4 recipe"):
        fp4.convert_to_fp4(Toy(), "fp8")


def test_model_quantizes_exactly_the_block_linears():
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=32, mlp_hidden=64))
    fp4.convert_to_fp4(model, "tetrajet", keep_last_k=1)
    fp4_layers = sorted(n for n, m in model.named_modules() if isinstance(m, fp4.FP4Linear))
    assert fp4_layers == sorted(f"transformer.h.{i}.{s}" for i in (0, 1)
                                for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))

# -----------------------------------------------------------------------------
# FP4 health (§9): read at eval time, outside autograd, changing nothing


def test_block_health_sees_mxfp4_saturate_and_per_tensor_scales_underflow():
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    sat, under = health.block_health(x, "mxfp4")
    assert 0.12 < sat < 0.22 and under == 0                  # MXFP4's floor scale: ~17% of randn's blocks
    assert health.block_health(x, "nvidia") == (0.0, 0.0)       # NVFP4's fitted scale never saturates
    x[0, 0] = 1e6                                            # one spike: per-tensor E4M3 scales underflow
    assert health.block_health(x, "nvidia")[1] > 0.9 and health.block_health(x, "tetrajet")[1] < 0.01


def tiny_fp4_model(recipe="tetrajet"):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, mlp_hidden=64))
    fp4.convert_to_fp4(model, recipe, seed=5)
    batch = tuple(torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    return model, {n: m for n, m in model.named_modules() if isinstance(m, fp4.FP4Linear)}, batch


@pytest.mark.parametrize("recipe", ["tetrajet", "nvidia", "mxfp4"])
def test_fp4_health_reports_every_layer_and_touches_nothing_the_run_continues_with(recipe):
    model, layers, batch = tiny_fp4_model(recipe)
    model(*batch)[1].backward()                              # a training step's gradients and generator draws
    grads = [p.grad.clone() for p in model.parameters()]
    rng = {n: l.generator.get_state() for n, l in layers.items()}
    report, probe = health.measure(model, layers, batch)
    assert probe is None and set(report) == set(layers)
    for h in report.values():
        assert set(h) == {"sqnr_x", "sqnr_w", "sqnr_dy_dgrad", "sqnr_dy_wgrad", "saturated_x", "saturated_w",
                          "underflow_x", "underflow_w"}
        assert 10 < h["sqnr_x"] < 30 and 10 < h["sqnr_w"] < 30 and 5 < h["sqnr_dy_wgrad"] < 30
    report2, probe = health.measure(model, layers, batch, probe=True)
    assert report2 == report                                 # the same numbers: nothing it drew carried over
    assert 0.5 < probe["grad_cosine"] <= 1 and 0 < probe["grad_rel_error"] < 1 and set(probe) == {"grad_cosine", "grad_rel_error"}
    assert model.training and all(not l.high_precision for l in layers.values())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(l.generator.get_state(), rng[n]) for n, l in layers.items())


def test_layer_health_quantizes_each_operand_as_its_gemm_does():
    x, w, dy = data(64, 128, 48)
    layer = fp4.FP4Linear(128, 48, recipe="nvidia")
    layer.weight.data.copy_(w)
    h = health.layer_health(layer, x, dy, torch.Generator().manual_seed(0))
    assert h["sqnr_x"] == sqnr(x, fp4.fake_quant(x, "nvidia"))
    assert h["sqnr_w"] == sqnr(w, fp4.fake_quant(w, "nvidia", tile=(16, 16)))
    g = torch.Generator().manual_seed(0)                     # dgrad: no RHT; wgrad: dYᵀ after NVIDIA's fixed RHT
    assert h["sqnr_dy_dgrad"] == sqnr(dy, fp4.fake_quant(dy, "nvidia", "stochastic", generator=g))
    signs = torch.tensor(fp4.NVIDIA_RHT_SIGNS, dtype=torch.float32)
    assert h["sqnr_dy_wgrad"] == sqnr(fp4.rht(dy.t(), signs),
                                          fp4.fake_quant(dy.t(), "nvidia", "stochastic", generator=g, rht_signs=signs))

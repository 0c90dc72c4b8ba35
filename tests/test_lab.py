"""The lab's study tools, where the answer is known. dev/estimator.py (snr.py --grad), every recipe as a gradient
estimator: an exact GEMM; an unbiased estimator whose bias falls like 1/√N inside its floor; a biased one whose bias
does not; the JSON's fields, from an FP4 and from a baseline checkpoint. dev/snr.py, the operator-level report: the
qualitative facts on small seeded tensors, the ablations, and recipe strings as --variant.
Run: python -m pytest tests/test_lab.py -q"""
import dataclasses
import json
import math
import os

import pytest
import torch

import fp4
import train
from conftest import TINY
from dev import estimator, snr


pytestmark = pytest.mark.usefixtures("one_thread")   # (conftest.py)

# -----------------------------------------------------------------------------
# dev/estimator.py


def test_an_exact_gemm_has_gain_one_bias_zero_noise_zero():
    g = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    s = estimator.estimator_stats(g.expand(5, 8, 6), g)                         # (5 draws, all exact)
    assert s == pytest.approx({"bias": 0.0, "bias_floor": 0.0, "noise": 0.0, "gain": 1.0, "cosine": 1.0}, abs=1e-12)


def estimator_operands(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(256, 128, generator=gen), torch.randn(64, 128, generator=gen), torch.randn(256, 64, generator=gen)


def test_the_bias_holds_no_noise_term_and_lands_within_its_standard_error_of_a_known_bias():
    # (SPEC §12; the bug: the raw ‖Ḡ − G‖ carried noise/√N, so a true 0.005 at N = 32 read ~0.010 beside the noise)
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(4096, generator=gen, dtype=torch.float64)
    u = torch.randn(4096, generator=gen, dtype=torch.float64)
    for true_bias in (0.0, 0.005, 0.02):
        for trial in range(3):
            eps = torch.randn(32, 4096, generator=gen, dtype=torch.float64) * (0.05 * G.norm() / 64)  # noise 0.05
            s = estimator.estimator_stats(G + true_bias * G.norm() * u / u.norm() + eps, G)
            assert s["noise"] == pytest.approx(0.05, rel=0.03)
            se = s["noise"] / math.sqrt(32) / math.sqrt(2)    # of b when b >> noise/√N: the projection's spread, √2 margin
            if true_bias == 0:
                assert s["bias"] < s["bias_floor"]
            else:
                assert abs(s["bias"] - true_bias) < max(se / 4, 0.0012), (true_bias, s["bias"])


@pytest.mark.parametrize("dist", ["gaussian", "student-t"])
def test_the_running_statistics_equal_the_two_pass_formulas_on_the_kept_draws(dist):
    # estimator_stats folds the draws in one at a time (Welford, two vectors): its twin here keeps all N
    gen = torch.Generator().manual_seed(4)
    x, w, dy = (snr.make_tensor(shape, dist, gen) for shape in ((256, 128), (64, 128), (256, 64)))
    got, x_hat, _ = estimator.layer_draws(fp4.RECIPES["quartet2"], x, w, dy, 12)
    for D, G in ((got["wgrad"], dy.double().t() @ x_hat.double()), (got["dgrad"], dy.double() @ w.double())):
        D, G = D.reshape(12, -1).double(), G.reshape(-1)
        mean, norm = D.mean(0), G.norm().item()
        noise = math.sqrt((D - mean).square().sum().item() / 11) / norm
        two_pass = {"noise": noise, "bias_floor": 2 * noise / math.sqrt(12),
                    "bias": math.sqrt(max(0.0, ((mean - G).norm().item() / norm) ** 2 - noise ** 2 / 12)),
                    "gain": (mean @ G).item() / norm ** 2, "cosine": (D @ G / (D.norm(dim=1) * norm)).mean().item()}
        assert estimator.estimator_stats(D, G) == pytest.approx(two_pass, rel=1e-9, abs=1e-12)
        assert two_pass["noise"] > 0 and two_pass["gain"] != 1          # (not a comparison of zeros)
    assert two_pass["bias"] > 0                                         # dgrad against dY W, not dY Ŵ: biased


def test_a_layer_report_holds_one_draw_at_a_time(monkeypatch):
    # (the bug: every draw was kept until the end, and 800 draws of a captured model's GEMMs took 23 GB)
    import weakref
    x, w, dy = estimator_operands(3)
    alive, most, real = set(), [0], estimator.each_draw

    def watched(*args, **kwargs):
        for k, draw in enumerate(real(*args, **kwargs)):
            for g, t in draw.items():
                alive.add((k, g))
                weakref.finalize(t, alive.discard, (k, g))
            most[0] = max(most[0], len(alive))
            yield draw
    monkeypatch.setattr(estimator, "each_draw", watched)
    estimator.layer_report(fp4.RECIPES["tetrajet"], x, w, dy, 8)
    assert 0 < most[0] <= 2 * len(estimator.GEMMS)                    # this draw's and at most the last one's


def test_an_unbiased_estimator_stays_inside_its_floor_and_a_biased_one_does_not():
    x, w, dy = estimator_operands()
    # tetrajet's wgrad (SR on both operands, random RHT, aligned) against its own operands dYᵀ X̂: unbiased
    got, x_hat, _ = estimator.layer_draws(fp4.RECIPES["tetrajet"], x, w, dy, 64)
    exact = dy.double().t() @ x_hat.double()
    few, many = (estimator.estimator_stats(got["wgrad"][:n], exact) for n in (4, 64))
    assert 2.0 < few["bias_floor"] / many["bias_floor"] < 8.0                # √16 = 4
    assert few["bias"] < few["bias_floor"] and many["bias"] < many["bias_floor"] and abs(many["gain"] - 1) < 0.01
    # nvidia's wgrad rounds X to nearest from X itself: a bias that stays while its floor shrinks
    got, _, _ = estimator.layer_draws(fp4.RECIPES["nvidia"], x, w, dy, 64)
    exact = dy.double().t() @ x.double()
    few, many = (estimator.estimator_stats(got["wgrad"][:n], exact) for n in (4, 64))
    assert many["bias"] == pytest.approx(few["bias"], rel=0.3) and many["bias"] > 2 * many["bias_floor"]


def test_an_aligned_recipe_is_unbiased_against_its_own_operands_but_not_the_networks():
    x, w, dy = estimator_operands(1)
    r = estimator.layer_report(fp4.RECIPES["tetrajet"], x, w, dy, 24)
    for gemm in ("dgrad", "wgrad"):
        assert r[gemm]["bias"] < r[gemm]["bias_floor"] < r[gemm]["vs_network"]["bias"], gemm
    assert r["fprop"]["noise"] == 0 and r["fprop"]["bias"] == r["fprop"]["vs_network"]["bias"] > 0


def test_the_draws_are_the_fp4_linears_own_and_its_forward_operands():
    x, w, dy = estimator_operands(2)
    recipe = fp4.RECIPES["quartet2"]
    got, x_hat, w_hat = estimator.layer_draws(recipe, x, w, dy, 2, seed=3)
    assert torch.equal(x_hat, fp4.fake_quant(x, recipe, four_over_six="mse"))
    assert torch.equal(w_hat, fp4.fake_quant(w, recipe, four_over_six="mse"))
    assert torch.equal(got["fprop"][0], x_hat @ w_hat.t()) and torch.equal(got["fprop"][0], got["fprop"][1])
    xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
    y, g = fp4.FP4LinearFunction.apply(xi, wi, recipe, torch.Generator().manual_seed(3)), []
    for _ in range(2):                       # each draw continues the one generator: fresh signs and noise
        g.append(torch.autograd.grad(y, (xi, wi), dy, retain_graph=True))
    assert all(torch.equal(got["dgrad"][k], g[k][0]) and torch.equal(got["wgrad"][k], g[k][1]) for k in range(2))
    assert not torch.equal(got["wgrad"][0], got["wgrad"][1])


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    train.main(["--dataset", dataset, "--out-dir", str(out), *TINY, "--fp4", "--max-iters", "4"])
    return os.path.join(out, "ckpt.pt")


def test_snr_grad_json_has_every_field(checkpoint, tmp_path):
    path = str(tmp_path / "grad.json")
    kernel = fp4.KERNEL
    snr.main(["--grad", "--checkpoint", checkpoint, "--draws", "2", "--loss-batches", "1", "--recipes", "nvidia",
              "quartet2", "--json", path])
    assert fp4.KERNEL is kernel                                               # the run puts the kernel hook back
    with open(path) as f:
        report = json.load(f)
    assert set(report["recipes"]) == {"nvidia", "quartet2"} and report["draws"] == 2
    for entry in report["recipes"].values():
        assert len(entry["layers"]) == 8                                       # 2 blocks x 4 linears
        for layer in entry["layers"].values():
            for gemm in estimator.GEMMS:
                assert set(estimator.FIELDS) <= set(layer[gemm]) and set(estimator.FIELDS) == set(layer[gemm]["vs_network"])
        assert set(entry["model"]) == set(estimator.MODEL_FIELDS) and isinstance(entry["forward_loss_delta"], float)
        assert 0 < entry["model"]["cosine"] <= 1 and entry["model"]["noise"] > 0


def test_the_model_report_leaves_the_layers_in_fp4_with_a_fresh_stream_per_draw(checkpoint):
    cfg, model, layers, splits = estimator.fp4_model(checkpoint, fp4.RECIPES["tetrajet"])
    assert len(layers) == 8 and cfg.fp4 and not any(l.high_precision for l in layers)
    batch = estimator.batches(cfg, splits, "train", 1, 0)[0]
    stats, delta, se = estimator.model_report(model, layers, batch, estimator.batches(cfg, splits, "val", 2, 1), 3)
    assert not any(l.high_precision for l in layers) and all(p.grad is None for p in model.parameters())
    assert [l.seed for l in layers] == [2 * 1009 + i for i in range(8)]          # the last draw's seeds
    assert 0 < stats["deterministic"] < stats["rel_error"] and 0 < stats["cosine"] < 1 and se >= 0
    # the mean squared error splits into the mean's and the spread around it (noise over N, not N - 1)
    assert stats["rel_error"] ** 2 == pytest.approx(stats["deterministic"] ** 2 + stats["noise"] ** 2, rel=1e-9)
    again = estimator.model_report(model, layers, batch, estimator.batches(cfg, splits, "val", 2, 1), 3)
    assert again == (stats, delta, se)                                         # each draw reseeded: reproducible


def test_snr_grad_reads_a_baseline_checkpoint_as_the_layers_fp4_would_convert(dataset, tmp_path):
    # a checkpoint trained without FP4 is the recipe-neutral point to compare recipes at (no recipe's bins in its
    # weights); it has no FP4 layer state, and the layers were once found only from that (an empty report)
    train.main(["--dataset", dataset, "--out-dir", str(tmp_path), *TINY, "--max-iters", "4"])
    path = str(tmp_path / "grad.json")
    snr.main(["--grad", "--checkpoint", str(tmp_path / "ckpt.pt"), "--draws", "2", "--loss-batches", "1",
              "--recipes", "nvidia", "--json", path])
    with open(path) as f:
        layers = json.load(f)["recipes"]["nvidia"]["layers"]
    assert sorted(layers) == [f"transformer.h.{i}.{n}" for i in (0, 1)
                              for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_a_checkpoint_from_before_the_redesign_is_read_with_its_kept_layers(checkpoint, tmp_path):
    ckpt = torch.load(checkpoint, weights_only=False)
    config = {k: v for k, v in ckpt["config"].items() if k not in ("keep_first_k", "keep_last_k")}
    ckpt["config"] = dict(config, bf16_first_k=1, bf16_last_k=0, fp4_outer="")          # the old names
    torch.save(ckpt, tmp_path / "old.pt")
    cfg, _, layers, _ = estimator.fp4_model(str(tmp_path / "old.pt"), fp4.RECIPES["nvidia"])
    assert (cfg.keep_first_k, cfg.keep_last_k) == (1, 0) and len(layers) == 4                # block 0 kept

# -----------------------------------------------------------------------------
# dev/snr.py

M, N, K = 256, 128, 256


def operands(dist, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(snr.make_tensor(s, dist, gen) for s in ((M, K), (N, K), (M, N)))


def test_nvfp4_forward_beats_mxfp4_forward_on_gaussian_data():
    x, w, dy = operands("gaussian")
    nv = snr.measure(fp4.RECIPES["nvidia"], x, w, dy, seeds=1)["O"][0]
    mx = snr.measure(fp4.RECIPES["mxfp4"], x, w, dy, seeds=1)["O"][0]
    assert nv > mx + 0.5, (nv, mx)                # measured 16.8 vs 15.8 dB


def test_rht_is_neutral_on_gaussian_data_and_costs_snr_on_iid_spikes():
    # Measured, and the opposite of the intuition "RHT helps with outliers": an i.i.d. spike is its block's
    # max, which the fitted scale represents almost exactly; the RHT spreads it over 16 values that each carry
    # FP4's ~10% error. Gaussian: +-0.1 dB; outlier protocol: wgrad -2.2 to -2.8 dB (K, M, N 128-1024). The RHT
    # pays off on structured outliers (whole channels or tokens), the paper's case, not on Bernoulli spikes.
    recipe = fp4.RECIPES["tetrajet"]
    no_rht = dataclasses.replace(recipe, rht=())
    x, w, dy = operands("gaussian")
    assert abs(snr.measure(recipe, x, w, dy, 2)["dW"][0] - snr.measure(no_rht, x, w, dy, 2)["dW"][0]) < 0.3
    x, w, dy = operands("outlier")
    assert snr.measure(recipe, x, w, dy, 2)["dW"][0] < snr.measure(no_rht, x, w, dy, 2)["dW"][0] - 1


def test_double_block_scaling_survives_a_spike_that_underflows_per_tensor_scales():
    x, w, dy = operands("gaussian")
    x[0, 0] = 1e6                 # amax_b / A ~ 2.5e-6: E4M3 block scales (>= 2^-9 of 448) round to 0 or 2^-9
    ref = x.double() @ w.double().t()
    per_tensor = dataclasses.replace(fp4.RECIPES["tetrajet"], outer="tensor")
    o_double, o_tensor = (snr.fp4_gemms(r, x, w, dy, 0)[0] for r in (fp4.RECIPES["tetrajet"], per_tensor))
    assert snr.snr_db(ref[1:], o_double[1:]) > 17 > 5 > snr.snr_db(ref[1:], o_tensor[1:])   # rows without it


def test_stochastic_rounding_error_averages_out_over_seeds():
    # TetraJet's backward is unbiased for the aligned reference dYᵀ X̂, so averaging S seeds divides the
    # error power by ~S: 16 seeds should gain close to 12 dB (assert 9).
    x, w, dy = operands("gaussian")
    recipe = fp4.RECIPES["tetrajet"]
    ref = dy.t() @ fp4.fake_quant(x, recipe)
    draws = [snr.fp4_gemms(recipe, x, w, dy, seed)[2] for seed in range(16)]
    assert snr.snr_db(ref, torch.stack(draws).mean(0)) > snr.snr_db(ref, draws[0]) + 9


def test_outcontrol_columns_raise_the_forward_snr_on_channel_outliers():
    x, w, dy = operands("gaussian")
    x[:, :8] *= 50                                                  # eight outlier channels
    columns = fp4.select_outlier_channels(x.norm(dim=0), 0.1)
    assert set(range(8)) <= set(columns[0].tolist())
    plain, oc = (snr.measure(fp4.RECIPES["tetrajet"], x, w, dy, 1, c)["O"][0] for c in (None, columns))
    assert oc > plain + 3, (plain, oc)


def test_report_runs_end_to_end_with_ablations_and_variants(capsys):
    results = snr.main(["--k", "128", "--m", "64", "--n", "64", "--seeds", "2", "--dist", "gaussian",
                        "--no-rht", "--no-sr", "--weight-tile", "16x16", "--aligned", "off",
                        "--variant", "nv-1x16=nvidia[weight_tile=1x16]"])
    assert set(results) == {("gaussian", 128, r) for r in ("nvidia", "nvidia-4over6", "tetrajet", "tetrajet+oc",
                                                           "quartet2", "mxfp4", "nv-1x16")}
    assert all(v["dX"][1] == 0.0 for k, v in results.items() if k[2] != "nv-1x16")   # no SR, no random RHT: seeds agree
    out = capsys.readouterr().out
    assert "| tetrajet+oc" in out and "| nv-1x16" in out


@pytest.mark.parametrize("argv, message", [
    (["--variant", "nv"], "--variant wants NAME=SPEC"), (["--variant", "x=nvidia[outer=64]"], "outer must be tensor or 128"),
    (["--recipes", "quartet2", "--no-rht"], "eden needs a fresh RHT-128")])
def test_bad_recipes_exit_with_one_clear_line(argv, message):
    with pytest.raises(SystemExit) as e:
        snr.main(["--k", "128", "--m", "64", "--n", "64", "--seeds", "1", *argv])
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)


def test_the_heavy_tailed_protocols_are_what_they_say():
    g = torch.Generator().manual_seed(0)
    t = snr.make_tensor((256, 512), "student-t", g)                       # 2 dof: a heavy tail everywhere
    assert (t.abs() > 10).float().mean() > 0.005 and (t - t.mean()).pow(4).mean() / t.var() ** 2 > 30
    c = snr.make_tensor((256, 512), "channels", g)                        # outlier columns and rows, x20
    big_cols = c.norm(dim=0) > 5 * c.norm(dim=0).median()
    big_rows = c.norm(dim=1) > 5 * c.norm(dim=1).median()
    assert 1 <= big_cols.sum() <= 15 and 1 <= big_rows.sum() <= 8
    assert torch.equal(snr.make_tensor((256, 512), "channels", torch.Generator().manual_seed(1)),
                       snr.make_tensor((256, 512), "channels", torch.Generator().manual_seed(1)))

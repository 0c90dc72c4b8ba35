"""The gradient-estimator report (tools/estimator.py, snr.py --grad) and train.py --fp4-probe, where the answer is
known: an exact GEMM; an unbiased estimator whose bias falls like 1/√N inside its floor; a biased one whose bias
does not; the JSON's fields; the probe changes no bit of training. Run: python -m pytest tests/test_estimator.py -q"""
import json
import os

import pytest
import torch

import fp4
from conftest import TINY
from tools import estimator, snr


def test_an_exact_gemm_has_gain_one_bias_zero_noise_zero():
    g = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    s = estimator.estimator_stats(g.expand(5, 8, 6), g)
    assert s == pytest.approx({"bias": 0.0, "bias_floor": 0.0, "noise": 0.0, "gain": 1.0, "cosine": 1.0}, abs=1e-12)


def operands(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(256, 128, generator=gen), torch.randn(64, 128, generator=gen), torch.randn(256, 64, generator=gen)


def test_unbiased_bias_falls_like_one_over_sqrt_n_inside_its_floor_and_a_biased_one_does_not():
    x, w, dy = operands()
    # tetrajet's wgrad (SR on both operands, random RHT, aligned) against its own operands dYᵀ X̂: unbiased
    got, x_hat, _ = estimator.layer_draws(fp4.RECIPES["tetrajet"], x, w, dy, 64, fp4.REFERENCE)
    exact = dy.double().t() @ x_hat.double()
    few, many = (estimator.estimator_stats(got["wgrad"][:n], exact) for n in (4, 64))
    assert 2.0 < few["bias"] / many["bias"] < 8.0                            # √16 = 4
    assert many["bias"] < 2 * many["bias_floor"] and abs(many["gain"] - 1) < 0.01
    # nvidia's wgrad rounds X to nearest from X itself: a bias that stays while its floor shrinks
    got, _, _ = estimator.layer_draws(fp4.RECIPES["nvidia"], x, w, dy, 64, fp4.REFERENCE)
    exact = dy.double().t() @ x.double()
    few, many = (estimator.estimator_stats(got["wgrad"][:n], exact) for n in (4, 64))
    assert many["bias"] > 0.6 * few["bias"] and many["bias"] > 3 * many["bias_floor"]


def test_an_aligned_recipe_is_unbiased_against_its_own_operands_but_not_the_networks():
    x, w, dy = operands(1)
    r = estimator.layer_report(fp4.RECIPES["tetrajet"], x, w, dy, 24, fp4.REFERENCE)
    for gemm in ("dgrad", "wgrad"):
        assert r[gemm]["bias"] < 2 * r[gemm]["bias_floor"] < r[gemm]["vs_network"]["bias"], gemm
    assert r["fprop"]["noise"] == 0 and r["fprop"]["bias"] == r["fprop"]["vs_network"]["bias"] > 0


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory):
    import train
    out = tmp_path_factory.mktemp("ckpt")
    train.main(["--dataset", dataset, "--out-dir", str(out), *TINY, "--fp4", "--max-iters", "4"])
    return os.path.join(out, "ckpt.pt")


def test_snr_grad_json_has_every_field(checkpoint, tmp_path):
    path = str(tmp_path / "grad.json")
    snr.main(["--grad", "--checkpoint", checkpoint, "--draws", "2", "--loss-batches", "1", "--recipes", "nvidia",
              "quartet2", "--json", path])
    with open(path) as f:
        report = json.load(f)
    assert set(report["recipes"]) == {"nvidia", "quartet2"}
    for entry in report["recipes"].values():
        assert len(entry["layers"]) == 8                                       # 2 blocks x 4 linears
        for layer in entry["layers"].values():
            for gemm in estimator.GEMMS:
                assert set(estimator.FIELDS) <= set(layer[gemm]) and set(estimator.FIELDS) == set(layer[gemm]["vs_network"])
        assert set(entry["model"]) == set(estimator.MODEL_FIELDS) and isinstance(entry["forward_loss_delta"], float)
        assert 0 < entry["model"]["cosine"] <= 1 and entry["model"]["noise"] > 0


def test_snr_grad_reads_a_baseline_checkpoint_as_the_layers_fp4_would_convert(dataset, tmp_path):
    # a checkpoint trained without FP4 is the recipe-neutral point to compare recipes at (no recipe's bins in its
    # weights); it has no FP4 layer state, and the layers were once found only from that (an empty report)
    import train
    train.main(["--dataset", dataset, "--out-dir", str(tmp_path), *TINY, "--max-iters", "4"])
    path = str(tmp_path / "grad.json")
    snr.main(["--grad", "--checkpoint", str(tmp_path / "ckpt.pt"), "--draws", "2", "--loss-batches", "1",
              "--recipes", "nvidia", "--json", path])
    with open(path) as f:
        layers = json.load(f)["recipes"]["nvidia"]["layers"]
    assert sorted(layers) == [f"transformer.h.{i}.{n}" for i in (0, 1)
                              for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_fp4_probe_logs_gradient_fidelity_and_changes_no_bit_of_training(dataset, tmp_path):
    import train

    def run(out, *flags):
        train.main(["--dataset", dataset, "--out-dir", str(out), *TINY, "--fp4", "--max-iters", "4",
                    "--eval-interval", "2", *flags])
        with open(os.path.join(out, "log.jsonl")) as f:
            return [json.loads(line) for line in f]
    plain, probed = run(tmp_path / "a"), run(tmp_path / "b", "--fp4-probe")
    assert [r["val_loss"] for r in plain] == [r["val_loss"] for r in probed]
    assert [r["train_loss"] for r in plain[1:]] == [r["train_loss"] for r in probed[1:]]
    for r in probed:
        p = r["fp4"]["probe"]
        assert 0.5 < p["grad_cosine"] <= 1 and 0 < p["grad_rel_error"] < 1
    assert "probe" not in plain[0]["fp4"]

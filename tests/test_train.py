"""train.py, model.py and sample.py: the config (one dataclass, one --flag per field, one-line refusals, recipe strings),
every recipe learns, exact resume, determinism, FP4 health and the probe change no bit of training, faults never lose
work, DDP (2 gloo processes), and sampling from a baseline and an FP4 checkpoint.
Run: python -m pytest tests/test_train.py -q"""
import json
import os
import signal
import subprocess
import sys
from dataclasses import fields, replace

import numpy as np
import pytest
import torch

import config
import fastpaths
import fp4
import health
import model
import sample
import train
from conftest import REPO, TINY
from model import GPT, GPTConfig

DROP = ("tok_per_s", "elapsed_s")


pytestmark = pytest.mark.usefixtures("one_thread")   # (conftest.py)


def run(dataset, out, *flags):
    train.main(["--dataset", dataset, "--out-dir", str(out), *TINY, *flags])
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def strip(records):
    return [{k: v for k, v in r.items() if k not in DROP} for r in records]

# -----------------------------------------------------------------------------
# the config


@pytest.mark.parametrize("argv, message", [
    (["--osci-reset"], "--osci-reset needs --fp4"), (["--fp4-recipe", "nvidia"], "--fp4-recipe needs --fp4"),
    (["--bogus", "1"], "unrecognized arguments: --bogus"), (["--lr", "fast"], "invalid float"),
    (["--fp4", "--fp4-recipe", "fp8"], "unknown FP4 recipe 'fp8'"),
    (["--fp4-rec", "nvidia"], "unrecognized arguments: --fp4-rec"),               # no abbreviations
    (["--bf16-first-k", "1"], "unrecognized arguments: --bf16-first-k"),          # renamed --keep-first-k
    (["--fp4", "--fp4-outer", "128"], "unrecognized arguments: --fp4-outer"),     # a recipe field: --fp4-recipe
    (["--max-iters", "10", "--stop-iter", "20"], "--stop-iter"),
    (["--fp4", "--fp4-recipe", "mxfp4[outer=128]"], "mxfp4 has no outer scale"),
    (["--fp4", "--fp4-recipe", "tetrajet[aligned=yes]"], "aligned must be true or false"),
    (["--fp4", "--keep-first-k", "3", "--keep-last-k", "2"], "--keep-first-k + --keep-last-k must be between 0 and"),
    (["--beta1", "1.5"], "--beta1 and --beta2 must be in"), (["--beta2", "nan"], "--beta1 and --beta2 must be in"),
    (["--grad-clip", "-1"], "--grad-clip and --weight-decay must be >= 0"),   # (was: trained, clipping to -1)
    (["--weight-decay", "-0.1"], "--grad-clip and --weight-decay must be >= 0"),
    (["--fp4", "--osci-period", "0"], "--osci-window must be between 1 and --osci-period - 1"),
    (["--fp4", "--osci-start", "-1"], "--osci-start and --out-control-step must be >= 0"),
    (["--fp4", "--osci-threshold", "nan"], "--osci-threshold must be a positive number"),
    (["--fp4", "--fp4-gemms", "fwd"], "gemms must be one or more of fprop, dgrad, wgrad"),
    (["--fp4", "--fp4-recipe", "tetrajet[gemms=fprop]", "--fp4-gemms", "dgrad"], "name different GEMMs; give them once"),
    (["--fp4", "--fp4-gemms", "dgrad,wgrad", "--osci-reset"], "--osci-reset snaps weights to the forward's FP4 grid"),
    (["--fp4", "--fp4-gemms", "dgrad", "--out-control"], "--out-control keeps columns of fprop and wgrad"),
    (["--n-head", "3"], "must split into --n-head 3 heads"), (["--n-layer", "-1"], "must be >= 0"),
    (["--fp4", "--out-control-choice", "random"], "no effect without --out-control"),
    (["--fp4", "--out-control", "--out-control-choice", "top"], "invalid choice"),
    (["--fp4", "--out-control", "--out-control-frac", "0.7"], "--out-control-frac must be between 0 and 0.5"),
    (["--batch-size", "0"], "--batch-size must be >= 1"), (["--min-lr", "1", "--lr", "0.1"], "--min-lr must be between")])
def test_bad_or_contradictory_flags_exit_with_one_clear_line(argv, message):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_malformed_boolean_flag_exits_with_one_clear_line():
    with pytest.raises(SystemExit) as e:
        train.main(["--fp4", "maybe"])
    assert "--fp4" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--fp4", "--fp4-path", "triton", "--device", "cpu"], "FP4 path triton is not available"),
    (["--device", "cuda"], "--device cuda, but this torch sees no cuda device")])
def test_what_this_machine_cannot_run_exits_with_one_clear_line(argv, message, dataset, tmp_path):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", dataset, "--out-dir", str(tmp_path), *TINY, *argv])
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_every_config_field_is_a_flag_with_its_help_that_sets_it(capsys):
    with pytest.raises(SystemExit):
        config.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for f in fields(config.TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out and " ".join(f.metadata["help"].split())[:40] in out, f.name
        choices = f.metadata["choices"]
        value = (next(c for c in choices if c != f.default) if choices else "elsewhere" if f.type is str else
                 str(not f.default) if f.type is bool else str(f.type(f.default + 3)))
        parsed = config.parse_args([flag, value])[f.name]
        assert parsed != f.default and str(parsed).lower() == value.lower(), f.name
    assert config.parse_args(["--fp4", "--compile=false"]) == {"fp4": True, "compile": False}


def test_a_recipe_string_turns_one_preset_into_another_and_the_checkpoint_says_so(dataset, tmp_path, capsys):
    # nvidia's preset with every field set to tetrajet's value trains bit for bit like tetrajet
    spec = "nvidia[outer=128,weight_tile=1x16,rht=dgrad+wgrad,rht_signs=random,other_rounding=stochastic,aligned=true]"
    steps = ["--max-iters", "12", "--eval-interval", "4"]
    rebuilt = run(dataset, tmp_path / "a", "--fp4", "--fp4-recipe", spec, *steps)
    printed = "nvidia[outer=128,weight_tile=1x16,other_rounding=stochastic,rht=dgrad+wgrad,rht_signs=random,aligned=true]"
    assert f"FP4 recipe: {printed}" in capsys.readouterr().out                  # fields in Recipe's order
    tetrajet = run(dataset, tmp_path / "b", "--fp4", "--fp4-recipe", "tetrajet", *steps)
    assert [r["val_loss"] for r in rebuilt] == [r["val_loss"] for r in tetrajet]
    saved = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["recipe"]
    assert saved == printed and fp4.parse_recipe(saved) == replace(fp4.RECIPES["tetrajet"], name="nvidia")
    ablated = run(dataset, tmp_path / "c", "--fp4", "--fp4-recipe", "tetrajet[rht=none]", *steps)
    assert [r["val_loss"] for r in ablated] != [r["val_loss"] for r in tetrajet]


def test_dtype_auto_is_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    dtype, why = config.activation_dtype("auto", "cpu")
    assert dtype == torch.float32 and "no native bf16" in why
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    dtype, why = config.activation_dtype("auto", "cpu")
    assert dtype == torch.bfloat16 and why.startswith("auto: this CPU multiplies bf16 natively")
    assert config.activation_dtype("auto", "cuda")[0] == torch.bfloat16
    assert config.activation_dtype("bfloat16", "cpu") == (torch.bfloat16, "as requested")
    assert config.activation_dtype("auto", "mps")[0] == torch.float32


def test_fixed_eval_set_is_the_same_tokens_for_every_seed_and_the_seeded_one_is_not(dataset):
    from data.prepare import load_dataset
    _, splits = load_dataset(dataset, 32)
    val = splits["val"]

    def batches(seed, eval_set):
        cfg = config.TrainConfig(seed=seed, eval_set=eval_set, block_size=32, batch_size=4, eval_iters=3)
        return train.eval_batches(val, cfg, 0, 1, "cpu")
    fixed, seeded = [batches(s, "fixed") for s in (1, 2)], [batches(s, "seeded") for s in (1, 2)]
    assert len(fixed[0]) == 3 and fixed[0][0][0].shape == (4, 32)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*fixed))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(*seeded))
    x, y = fixed[0][0]
    assert torch.equal(x[:, 1:], y[:, :-1])                                   # targets: the next token
    assert torch.equal(x[0], torch.from_numpy(val[:32].astype("int64")))      # evenly spaced from the start
    assert len({tuple(x[i].tolist()) for x, _ in fixed[0] for i in range(4)}) == 12   # 12 distinct windows
    gen = torch.Generator().manual_seed(1 + train.EVAL_SEED_OFFSET)          # seeded: its own stream
    cfg = config.TrainConfig(seed=1, block_size=32, batch_size=4)
    assert torch.equal(seeded[0][0][0], train.get_batch(val, cfg, 0, 1, gen, "cpu")[0])
    offsets = (train.EVAL_SEED_OFFSET, train.HEALTH_SEED_OFFSET, train.LAYER_SEED_STRIDE, train.RANK_SEED_STRIDE)
    assert len(set(offsets)) == 4

# -----------------------------------------------------------------------------
# training


@pytest.mark.parametrize("recipe", [None, *fp4.RECIPES])
def test_each_recipe_overfits_one_batch(recipe):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, mlp_hidden=64),
              compute_dtype=torch.bfloat16)
    if recipe:
        fp4.convert_to_fp4(gpt, recipe)
    opt = gpt.configure_optimizer(1e-2, 0.0, (0.9, 0.95), "cpu")
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(30):
        _, loss = gpt(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses      # ln(64) = 4.2 -> well under half in 30 steps


def test_build_model_converts_and_seeds_the_fp4_layers_as_a_run_does(capsys):
    cfg = config.TrainConfig(fp4=True, fp4_recipe="nvidia", fp4_path="reference", keep_last_k=1, n_layer=3, seed=5)
    gpt, layers = train.build_model(cfg, 200, torch.float32, "cpu", rank=1, log=print)
    assert "FP4 path: reference" in capsys.readouterr().out and fp4.KERNEL is None
    assert gpt.config.vocab_size == 256 and sorted(layers) == sorted(
        f"transformer.h.{i}.{s}" for i in (0, 1) for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    seeds = sorted(l.seed for l in layers.values())
    assert seeds == list(range(5 * train.LAYER_SEED_STRIDE + train.RANK_SEED_STRIDE, 5 * train.LAYER_SEED_STRIDE
                               + train.RANK_SEED_STRIDE + 8))                  # independent noise per process
    assert all(str(l.recipe) == "nvidia" for l in layers.values())
    _, none = train.build_model(config.TrainConfig(n_layer=2), 200, torch.float32, "cpu", log=print)
    assert none == {}


def test_resume_continues_exactly(dataset, tmp_path):
    flags = ["--fp4", "--osci-reset", "--max-iters", "8", "--eval-interval", "2",   # osci windows at 4-5, 6-7
             "--out-control", "--out-control-step", "3", "--out-control-window", "2"]  # calibrates 3-4: spans the stop
    straight = run(dataset, tmp_path / "a", *flags)
    run(dataset, tmp_path / "b", *flags, "--stop-iter", "4")
    resumed = run(dataset, tmp_path / "b", "--resume")                # config comes from the checkpoint
    assert strip(straight) == strip(resumed)
    assert [r["step"] for r in resumed] == [0, 2, 4, 6, 8] and resumed[-1]["fp4"]["total"]["outliers"] > 0


def test_same_seed_same_losses_and_other_seed_differs(dataset, tmp_path):
    a = run(dataset, tmp_path / "a", "--fp4", "--max-iters", "4", "--eval-interval", "2")
    b = run(dataset, tmp_path / "b", "--fp4", "--max-iters", "4", "--eval-interval", "2")
    c = run(dataset, tmp_path / "c", "--fp4", "--max-iters", "4", "--eval-interval", "2", "--seed", "7")
    assert [r["val_loss"] for r in a] == [r["val_loss"] for r in b] != [r["val_loss"] for r in c]


def test_fp4_health_and_the_probe_change_no_bit_of_training(dataset, tmp_path, monkeypatch):
    # FP4 health runs at every eval on a fixed batch (and --fp4-probe adds a high-precision shadow gradient): a run
    # with either trains exactly like one whose health measurement is replaced by a stub that touches nothing
    flags = ["--fp4", "--max-iters", "4", "--eval-interval", "2", "--out-control", "--out-control-step", "1",
             "--out-control-window", "2"]
    plain, probed = run(dataset, tmp_path / "a", *flags), run(dataset, tmp_path / "b", *flags, "--fp4-probe")
    keys = ("sqnr_x", "sqnr_w", "sqnr_dy_dgrad", "sqnr_dy_wgrad", "saturated_x", "saturated_w", "underflow_x", "underflow_w")
    monkeypatch.setattr(health, "measure", lambda model, layers, batch, probe=False: (
        {n: dict.fromkeys(keys, 0.0) for n in layers}, None))
    stubbed = run(dataset, tmp_path / "c", *flags)
    for r in (probed, stubbed):
        assert [x["val_loss"] for x in r] == [x["val_loss"] for x in plain]
        assert [x["train_loss"] for x in r] == [x["train_loss"] for x in plain]
    for r in probed:
        p = r["fp4"]["probe"]
        assert 0.5 < p["grad_cosine"] <= 1 and 0 < p["grad_rel_error"] < 1
    assert "probe" not in plain[0]["fp4"] and set(keys) <= set(plain[-1]["fp4"]["total"])
    assert len(plain[-1]["fp4"]["layers"]) == 8 and 10 < plain[-1]["fp4"]["total"]["sqnr_x"] < 30


def test_log_and_checkpoint_have_what_the_reader_needs(dataset, tmp_path, capsys):
    records = run(dataset, tmp_path, "--fp4", "--max-iters", "6", "--eval-interval", "3", "--lr-schedule", "wsd")
    assert {"step", "tokens", "train_loss", "val_loss", "lr", "tok_per_s", "elapsed_s", "fp4"} <= set(records[-1])
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    out = capsys.readouterr().out
    assert f"final val_loss {records[-1]['val_loss']:.4f}" in out and "fp4      6 | sqnr(dB)" in out
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["config"]["fp4"] and ckpt["step"] == 6 and ckpt["recipe"] == "tetrajet" and ckpt["skipped"] == 0
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    assert any(k.endswith("_extra_state") for k in ckpt["model"])     # FP4 noise generator states
    assert not (tmp_path / "ckpt.pt.tmp").exists()


def test_a_checkpoint_holds_only_the_state_the_run_uses(dataset, tmp_path):
    # (the bug: OsciReset's open windows were saved without --osci-reset: an FP4 checkpoint was 2.2x the baseline's)
    size = {}
    for name, flags in (("baseline", []), ("fp4", ["--fp4"]), ("reset", ["--fp4", "--osci-reset"])):
        run(dataset, tmp_path / name, "--max-iters", "4", "--eval-interval", "4", *flags)   # a window opens at 4
        size[name] = os.path.getsize(tmp_path / name / "ckpt.pt")
        osci = torch.load(tmp_path / name / "ckpt.pt", weights_only=False)["osci"]
        if name == "fp4":
            assert osci["state"] == {} and osci["last"]                     # the last window's numbers stay
        if name == "reset":                                                   # w itself is the model's
            assert len(osci["state"]) == 8 and all(set(st) == {"prev_q", "sum_dq", "sum_dw"} for st in osci["state"].values())
    assert size["fp4"] < 1.1 * size["baseline"] < size["reset"]


def test_missing_data_and_corrupt_checkpoint_give_clear_errors(dataset, tmp_path):
    with pytest.raises(SystemExit, match="prepare it with: python data/prepare.py textfile"):
        train.main(["--dataset", "no_such_dataset", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.main(["--dataset", dataset, "--out-dir", str(tmp_path), "--resume"])
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="unreadable"):
        train.main(["--dataset", dataset, "--out-dir", str(tmp_path), "--resume"])


def test_two_process_gloo_run_with_torchrun(dataset, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--device", "cpu", "--dataset", dataset, "--out-dir", str(tmp_path), "--fp4", "--max-iters", "4",
           "--eval-interval", "2", "--fp4-path", "reference", *TINY]     # (compiling would dominate 4 steps)
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "device cpu x 2" in out.stdout and out.stdout.count("final val_loss") == 1   # rank 0 logs
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert records[-1]["tokens"] == 4 * 2 * 4 * 32                  # steps x processes x batch x block

# -----------------------------------------------------------------------------
# faults never lose work


def test_sigterm_mid_run_saves_and_resume_matches_an_uninterrupted_run(dataset, tmp_path):
    # (the C kernels where they build, else the reference: a fresh process would spend longer compiling than training)
    path = "cpu" if fastpaths.probe("cpu", torch.device("cpu"), fp4.RECIPES["tetrajet"]) is None else "reference"
    flags = ["--fp4", "--fp4-path", path, "--max-iters", "40", "--eval-interval", "10", "--log-interval", "1"]
    straight = run(dataset, tmp_path / "a", *flags)
    cmd = [sys.executable, "train.py", "--dataset", dataset, "--out-dir", str(tmp_path / "b"), *TINY, *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    for line in proc.stdout:                          # a real process, killed while it trains
        if line.startswith("step    15"):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert "interrupted at step" in out and "Traceback" not in out
    stopped_at = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"]
    assert 15 < stopped_at < 40                       # mid-run, between two evals
    resumed = run(dataset, tmp_path / "b", "--resume")
    assert strip(resumed) == strip(straight)


@pytest.fixture
def nan_at_training_call(monkeypatch):
    """Make the 6th training forward (step 5) return a NaN loss."""
    forward, calls = model.GPT.forward, []

    def patched(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if torch.is_grad_enabled() and self.training:
            calls.append(1)
            if len(calls) == 6:
                loss = loss * float("nan")
        return logits, loss
    monkeypatch.setattr(model.GPT, "forward", patched)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(dataset, tmp_path, nan_at_training_call,
                                                                            capsys):
    with pytest.raises(SystemExit, match="non-finite loss at step 5") as e:
        run(dataset, tmp_path, "--fp4", "--max-iters", "10", "--eval-interval", "4")
    assert "--skip-nonfinite" in str(e.value) and "\n" not in str(e.value)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 4     # the last good state
    out = capsys.readouterr().out                     # where a NaN came from: each FP4 weight's scales, one line each
    assert out.count(": weight blocks saturated ") == 8 and "transformer.h.1.mlp.c_proj: weight blocks" in out


def test_skip_nonfinite_skips_and_counts_the_bad_step(dataset, tmp_path, nan_at_training_call):
    records = run(dataset, tmp_path, "--fp4", "--max-iters", "10", "--eval-interval", "5", "--skip-nonfinite")
    assert records[-1]["skipped_nonfinite"] == 1 and records[-1]["step"] == 10
    assert all(r["val_loss"] is not None for r in records)


def test_unwritable_out_dir_fails_before_training(dataset, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="cannot write to --out-dir"):
        train.main(["--dataset", dataset, "--out-dir", str(tmp_path / "a_file" / "out")])


def test_resume_refuses_a_flag_that_changes_the_run_unless_allowed(dataset, tmp_path, capsys):
    # (the bug: --resume --fp4-recipe nvidia on a tetrajet run trained on as nvidia and said nothing)
    run(dataset, tmp_path, "--fp4", "--max-iters", "4", "--eval-interval", "2", "--stop-iter", "2")
    for flags, named in ((["--fp4-recipe", "nvidia"], "--fp4-recipe nvidia (the checkpoint's: tetrajet)"),
                         (["--lr", "0.02"], "--lr 0.02 (the checkpoint's: 0.01)"),
                         (["--compile"], "--compile True (the checkpoint's: False)"),
                         (["--dtype", "bfloat16"], "--dtype bfloat16 (the checkpoint's: float32)")):
        with pytest.raises(SystemExit, match="--allow-config-change") as e:
            run(dataset, tmp_path, "--resume", *flags)
        assert named in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="does not fit the model"):            # allowed, and still cannot load
        run(dataset, tmp_path, "--resume", "--n-layer", "3", "--allow-config-change")
    capsys.readouterr()
    records = run(dataset, tmp_path, "--resume", "--lr", "0.02", "--allow-config-change", "--osci-start", "0.6")
    assert "resumed with --lr 0.02 (the checkpoint's: 0.01)" in capsys.readouterr().out   # (0.6 of 4 = the saved 2)
    assert [r["step"] for r in records] == [0, 2, 4]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["config"]["lr"] == 0.02


def test_fp4_gemms_becomes_the_recipe_strings_gemms_and_a_resume_repeating_it_is_no_change(dataset, tmp_path):
    flags = ["--fp4", "--fp4-gemms", "dgrad,fprop", "--max-iters", "4", "--eval-interval", "2"]
    run(dataset, tmp_path, *flags, "--stop-iter", "2")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["recipe"] == ckpt["config"]["fp4_recipe"] == "tetrajet[gemms=fprop+dgrad]" and not ckpt["config"]["fp4_gemms"]
    assert [r["step"] for r in run(dataset, tmp_path, *flags, "--resume")] == [0, 2, 4]


def test_resume_of_a_finished_run_needs_a_longer_max_iters_and_logs_it(dataset, tmp_path, capsys):
    # (the bug: resuming a finished run wrote its last step to log.jsonl a second time)
    run(dataset, tmp_path, "--max-iters", "2", "--eval-interval", "2")
    with pytest.raises(SystemExit, match="already at step 2 .*give a larger --max-iters"):
        run(dataset, tmp_path, "--resume")
    with pytest.raises(SystemExit, match="--max-iters 1 is below the checkpoint's step 2"):
        run(dataset, tmp_path, "--resume", "--max-iters", "1")
    capsys.readouterr()
    records = run(dataset, tmp_path, "--resume", "--max-iters", "4")
    assert "resumed with --max-iters 4 (the checkpoint's: 2): the LR schedule now spans" in capsys.readouterr().out
    assert [r["step"] for r in records] == [0, 2, 4]

# -----------------------------------------------------------------------------
# sampling: model.GPT.generate and sample.py


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """-> {"baseline": out_dir, "fp4": out_dir}: two tiny CPU runs of 6 steps each."""
    out = {}
    for name, flags in (("baseline", []), ("fp4", ["--fp4", "--fp4-path", "reference"])):
        out[name] = str(tmp_path_factory.mktemp(name))
        train.main(["--dataset", dataset, "--out-dir", out[name], "--device", "cpu", "--dtype", "float32",
                    "--max-iters", "6", "--eval-interval", "6", *TINY, *flags])
    return out


@pytest.mark.parametrize("kind", ["baseline", "fp4"])
def test_generate_shape_valid_ids_and_seeded(runs, kind):
    gpt, ckpt, cfg = sample.load_model(runs[kind], "cpu", torch.float32)
    assert any(isinstance(m, fp4.FP4Linear) for m in gpt.modules()) == (kind == "fp4") == cfg.fp4
    assert not gpt.training and ckpt["step"] == 6
    idx = torch.tensor([[10, 97, 98], [32, 32, 61]])                       # (2, 3)
    draw = lambda seed, n=30, **kw: gpt.generate(idx, n, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    out = draw(0)                       # 3 + 30 tokens > block_size 32: the context must be cropped
    assert out.shape == (2, 33) and out.dtype == torch.int64 and torch.equal(out[:, :3], idx)
    assert 0 <= out.min() and out.max() < gpt.config.vocab_size
    assert torch.equal(out, draw(0)) and not torch.equal(out, draw(1))
    top1 = draw(0, n=8, top_k=1)                                           # top-1 = greedy, whatever the seed
    assert torch.equal(top1, draw(5, n=8, top_k=1, temperature=0.5))
    assert draw(0, n=8, temperature=5.0, vocab_size=20)[:, 3:].max() < 20  # (the vocab padding is never drawn)


@pytest.mark.parametrize("kind", ["baseline", "fp4"])
def test_sample_py_prints_samples_and_the_same_seed_repeats(runs, kind, capsys):
    argv = ["--out-dir", runs[kind], "--device", "cpu", "--num-samples", "2", "--max-new-tokens", "20",
            "--start", "alpha"]
    sample.main(argv)
    out, err = capsys.readouterr()
    header, *body = out.splitlines()
    assert header.startswith("loaded ") and ("FP4 recipe tetrajet" if kind == "fp4" else "baseline") in header
    assert ("FP4 path: reference" in err) == (kind == "fp4")              # the run's path, said on stderr
    assert out.count("-" * 80) == 2 and out.count("alpha") >= 2           # each sample continues the start text
    sample.main(argv)
    assert capsys.readouterr().out == out
    if kind == "fp4" and fastpaths.probe("cpu", torch.device("cpu"), fp4.RECIPES["tetrajet"]) is None:
        sample.main(argv + ["--fp4-path", "cpu"])                          # another path: the same bits, samples
        out_cpu, err_cpu = capsys.readouterr()
        assert out_cpu == out and "FP4 path: cpu" in err_cpu
    sample.main(argv + ["--seed", "7"])
    assert capsys.readouterr().out != out


@pytest.mark.parametrize("argv, message", [
    (["--out-dir", "/nonexistent/run"], "no checkpoint at /nonexistent/run/ckpt.pt; train one first"),
    (["--out-dir", "{cut}"], "is unreadable"), (["--out-dir", "{cut}/ckpt.pt"], "is a file; pass the run's folder"),
    (["--temperature", "0"], "--temperature must be a finite number"), (["--temperature", "inf"], "finite"),
    (["--top-k", "many"], "invalid int value"), (["--num-sample", "3"], "unrecognized arguments: --num-sample"),
    (["--device", "cuda"], "--device cuda, but this torch sees no cuda device; use --device cpu or auto")])
def test_bad_input_exits_with_one_clear_line(argv, message, tmp_path):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")                 # cut short, or not one at all
    with pytest.raises(SystemExit) as e:
        sample.main([a.replace("{cut}", str(tmp_path)) for a in argv])
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)

# -----------------------------------------------------------------------------
# random flags: every run trains or ends in one line

VALID = {             # flags and values that are fine alone (None: the flag alone); the model stays tiny, runs short
    "--fp4": [None, "true"], "--fp4-recipe": ["nvidia", "tetrajet[rht=none]", "quartet2", "mxfp4", "nvidia-4over6"],
    "--fp4-path": ["reference", "cpu"], "--keep-first-k": ["0", "1"], "--keep-last-k": ["1"], "--osci-reset": [None],
    "--osci-period": ["2"], "--osci-window": ["5"], "--osci-start": ["0.5"], "--out-control": [None], "--out-control-frac": ["0.1", "0.5"],
    "--out-control-step": ["1"], "--lr": ["1e-2"], "--min-lr": ["1e-3", "0"], "--max-iters": ["3"],
    "--warmup-iters": ["1", "0"], "--batch-size": ["2"], "--block-size": ["16"], "--n-layer": ["1"],
    "--grad-accum": ["2"], "--device": ["cpu", "auto"], "--dtype": ["float32"], "--seed": ["1", "-5"],
    "--lr-schedule": ["wsd"], "--stop-iter": ["1"], "--grad-clip": ["0"], "--weight-decay": ["0"],
    "--eval-set": ["fixed"], "--eval-interval": ["1"], "--skip-nonfinite": [None], "--fp4-probe": [None],
}
INVALID = {          # each wrong alone, or wrong on this machine (no CUDA), or in the checks' blind spots once
    "--fp4": ["maybe"], "--fp4-recipe": ["fp8", "nvidia[grad_rounding=eden]", "tetrajet[outer=7]", "nvidia-4over6[",
    "quartet2[rht=dgrad]"], "--fp4-path": ["triton", "gpu"], "--keep-first-k": ["-1", "9"], "--keep-last-k": ["x"],
    "--osci-period": ["0", "-3"], "--osci-start": ["-1"], "--out-control-frac": ["0.7", "nan"],
    "--out-control-step": ["-2"], "--lr": ["-1", "nan", "inf", "0"], "--min-lr": ["1"], "--max-iters": ["0", "-2"],
    "--batch-size": ["0"], "--block-size": ["100000"], "--n-head": ["3"], "--n-layer": ["-1"], "--grad-accum": ["0"],
    "--device": ["cuda", "mps", "tpu"], "--dtype": ["float16"], "--lr-schedule": ["linear"],
    "--resume": [None], "--stop-iter": ["9"], "--model": ["huge"], "--grad-clip": ["-1"], "--weight-decay": ["-0.1"],
    "--beta1": ["1.5"], "--beta2": ["nan"], "--eval-set": ["bogus"], "--eval-interval": ["0"], "--max-iter": ["2"],
    "--allow-config-change": [None], "--compile": ["nope"], "--osci-threshold": ["nan"],
}


def test_random_flag_combinations_train_or_end_in_one_error_line(dataset, tmp_path, capsys):
    rng, outcomes = np.random.default_rng(0), {"trained": 0, "error": 0}
    for i in range(40):
        argv = ["--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1"]
        picks = [(name, VALID) for name in rng.choice(list(VALID), size=int(rng.integers(1, 6)), replace=False)]
        picks += [(rng.choice(list(INVALID)), INVALID)] * (i % 2)     # every other run one wrong flag
        for name, pool in picks:
            value = pool[name][int(rng.integers(len(pool[name])))]
            argv += [name] if value is None else [name, value]
        try:
            train.main(["--dataset", dataset, "--out-dir", str(tmp_path / str(i)), *TINY, *argv])
            outcomes["trained"] += 1
        except SystemExit as e:
            assert isinstance(e.code, str) and e.code.startswith("error: ") and "\n" not in e.code, (argv, e.code)
            outcomes["error"] += 1
        assert "Traceback" not in capsys.readouterr().err, argv
    assert min(outcomes.values()) >= 5, outcomes          # both kinds are exercised

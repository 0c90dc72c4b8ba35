"""train.py and model.py: flags, every recipe learns, exact resume, determinism, DDP (2 gloo processes).
Run: python -m pytest tests/test_train.py -q"""
import inspect
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import fp4
import train
from model import GPT, GPTConfig

from conftest import REPO, TINY


def run(dataset, out, *flags):
    train.main(["--dataset", dataset, "--out-dir", str(out), *TINY, *flags])
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("argv, message", [
    (["--osci-reset"], "need --fp4"), (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--fp4", "--fp4-recipe", "fp8"], "invalid choice"), (["--lr", "fast"], "invalid float"),
    (["--max-iters", "10", "--stop-iter", "20"], "--stop-iter"), (["--fp4", "maybe"], "expected true/false"),
    (["--fp4", "--fp4-recipe", "mxfp4", "--fp4-outer", "128"], "mxfp4 has no outer scale"),
    (["--fp4", "--fp4-rht", "none", "--fp4-rht-signs", "random"], "has no RHT"),
    (["--fp4", "--fp4-aligned", "yes"], "invalid choice"), (["--fp4-rht", "both"], "need --fp4"),
    (["--fp4", "--fp4-path", "triton", "--device", "cpu"], "FP4 path triton is not available"),
    (["--fp4", "--out-control-choice", "random"], "no effect without --out-control"),
    (["--fp4", "--out-control", "--out-control-choice", "top"], "invalid choice")])
def test_bad_or_contradictory_flags_exit_with_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_every_config_field_is_a_flag_that_sets_it(capsys):
    # each field appears in --help with its comment, and a non-default value given as its flag lands in that field
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for f in train.fields(train.TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = re.search(rf"^\s+{f.name}: .*?# (.*)$", inspect.getsource(train.TrainConfig), re.M).group(1)
        assert flag in out and help_text[:40] in out, f.name
        choices = train.CHOICES.get(f.name)
        value = (next(c for c in choices if c != f.default) if choices else "elsewhere" if f.type is str else
                 str(not f.default) if f.type is bool else str(f.type(f.default + 3)))
        parsed = train.parse_args([flag, value])[f.name]
        assert parsed != f.default and str(parsed).lower() == value.lower(), f.name
    assert train.parse_args(["--fp4", "--compile=false"]) == {"fp4": True, "compile": False}


@pytest.mark.parametrize("recipe", [None, *fp4.RECIPES])
def test_each_recipe_overfits_one_batch(recipe):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, mlp_hidden=64),
                compute_dtype=torch.bfloat16)
    if recipe:
        fp4.convert_to_fp4(model, recipe)
    opt = model.configure_optimizer(1e-2, 0.0, (0.9, 0.95), "cpu")
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(30):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses      # ln(64) = 4.2 -> well under half in 30 steps


def test_model_quantizes_exactly_the_block_linears(capsys):
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=32, mlp_hidden=64))
    fp4.convert_to_fp4(model, "tetrajet", bf16_last_k=1)
    fp4_layers = sorted(n for n, m in model.named_modules() if isinstance(m, fp4.FP4Linear))
    assert fp4_layers == sorted(f"transformer.h.{i}.{s}" for i in (0, 1)
                                for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))


def test_resume_continues_exactly(dataset, tmp_path):
    flags = ["--fp4", "--osci-reset", "--max-iters", "8", "--eval-interval", "2",   # osci windows at 4-5, 6-7
             "--out-control", "--out-control-step", "3", "--out-control-window", "2"]  # calibrates 3-4: spans the stop
    straight = run(dataset, tmp_path / "a", *flags)
    run(dataset, tmp_path / "b", *flags, "--stop-iter", "4")
    resumed = run(dataset, tmp_path / "b", "--resume")                # config comes from the checkpoint
    drop = ("tok_per_s", "elapsed_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in straight] == \
           [{k: v for k, v in r.items() if k not in drop} for r in resumed]
    assert [r["step"] for r in resumed] == [0, 2, 4, 6, 8]


def test_same_seed_same_losses_and_other_seed_differs(dataset, tmp_path):
    a = run(dataset, tmp_path / "a", "--fp4", "--max-iters", "4", "--eval-interval", "2")
    b = run(dataset, tmp_path / "b", "--fp4", "--max-iters", "4", "--eval-interval", "2")
    c = run(dataset, tmp_path / "c", "--fp4", "--max-iters", "4", "--eval-interval", "2", "--seed", "7")
    assert [r["val_loss"] for r in a] == [r["val_loss"] for r in b] != [r["val_loss"] for r in c]


def test_log_and_checkpoint_have_what_the_reader_needs(dataset, tmp_path, capsys):
    records = run(dataset, tmp_path, "--fp4", "--max-iters", "6", "--eval-interval", "3", "--lr-schedule", "wsd")
    assert {"step", "tokens", "train_loss", "val_loss", "lr", "tok_per_s", "elapsed_s"} <= set(records[-1])
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    assert f"final val_loss {records[-1]['val_loss']:.4f}" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["config"]["fp4"] and ckpt["step"] == 6
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    assert any(k.endswith("_extra_state") for k in ckpt["model"])     # FP4 noise generator states
    assert not (tmp_path / "ckpt.pt.tmp").exists()


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

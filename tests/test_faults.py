"""Faults never lose work: SIGTERM mid-run checkpoints and resumes exactly; a NaN stops the run (or is skipped)
without touching the last good checkpoint; an unwritable --out-dir fails before training.
Run: python -m pytest tests/test_faults.py -q"""
import os
import signal
import subprocess
import sys

import pytest
import torch

import model
import train
from conftest import REPO, TINY
from test_train import run

DROP = ("tok_per_s", "elapsed_s")


def strip(records):
    return [{k: v for k, v in r.items() if k not in DROP} for r in records]


def test_sigterm_mid_run_saves_and_resume_matches_an_uninterrupted_run(dataset, tmp_path):
    # (--fp4-path reference: a fresh process would spend longer compiling the quantizers than training)
    flags = ["--fp4", "--fp4-path", "reference", "--max-iters", "60", "--eval-interval", "20", "--log-interval", "1"]
    straight = run(dataset, tmp_path / "a", *flags)
    cmd = [sys.executable, "train.py", "--dataset", dataset, "--out-dir", str(tmp_path / "b"), *TINY, *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:                          # a real process, killed while it trains
        if line.startswith("step    25"):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert "interrupted at step" in out and "Traceback" not in out
    stopped_at = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"]
    assert 25 < stopped_at < 60
    resumed = run(dataset, tmp_path / "b", "--resume")
    assert strip(resumed) == strip(straight)


@pytest.fixture
def nan_at_training_call(monkeypatch):
    """Make the 6th training forward (step 5) return a NaN loss."""
    forward, calls = model.GPT.forward, []

    def patched(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 6:
                loss = loss * float("nan")
        return logits, loss
    monkeypatch.setattr(model.GPT, "forward", patched)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(dataset, tmp_path, nan_at_training_call,
                                                                            capsys):
    with pytest.raises(SystemExit, match="non-finite loss at step 5") as e:
        run(dataset, tmp_path, "--fp4", "--max-iters", "10", "--eval-interval", "4")
    assert "--skip-nonfinite" in str(e.value)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 4     # the last good state
    assert "FP4 health at the failure" in capsys.readouterr().out


def test_skip_nonfinite_skips_and_counts_the_bad_step(dataset, tmp_path, nan_at_training_call):
    records = run(dataset, tmp_path, "--fp4", "--max-iters", "10", "--eval-interval", "5", "--skip-nonfinite")
    assert records[-1]["skipped_nonfinite"] == 1 and records[-1]["step"] == 10
    assert all(r["val_loss"] is not None for r in records)


def test_unwritable_out_dir_fails_before_training(dataset, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="cannot write to --out-dir"):
        train.main(["--dataset", dataset, "--out-dir", str(tmp_path / "a_file" / "out")])


def test_resuming_with_a_different_model_is_a_clear_error(dataset, tmp_path):
    run(dataset, tmp_path, "--max-iters", "2", "--eval-interval", "2")
    with pytest.raises(SystemExit, match="does not fit the model"):
        run(dataset, tmp_path, "--resume", "--n-layer", "3")

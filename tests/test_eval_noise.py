"""tools/eval_noise.py: the per-window losses average to exactly train.py's val_loss, the pair statistics are
those of the per-window differences, and runs that saw different eval windows are not paired.
Run: python -m pytest tests/test_eval_noise.py -q"""
import json
import math
import os

import pytest

import train
from conftest import TINY
from tools import eval_noise


def run(dataset, out, *flags):
    train.main(["--dataset", dataset, "--out-dir", str(out), *TINY, "--max-iters", "4", "--eval-interval", "4",
                *flags])
    with open(os.path.join(out, "log.jsonl")) as f:
        return json.loads(f.read().splitlines()[-1])["val_loss"], os.path.join(out, "ckpt.pt")


def test_window_losses_average_to_the_runs_val_loss_and_pairs_need_the_same_windows(dataset, tmp_path, capsys):
    fp4_loss, fp4_ckpt = run(dataset, tmp_path / "fp4", "--fp4", "--eval-set", "fixed", "--seed", "1")
    base_loss, base_ckpt = run(dataset, tmp_path / "base", "--eval-set", "fixed", "--seed", "2")
    _, seeded_ckpt = run(dataset, tmp_path / "seeded", "--fp4", "--seed", "3")
    report = eval_noise.main([fp4_ckpt, base_ckpt, seeded_ckpt])
    fp4, base = report["models"][fp4_ckpt], report["models"][base_ckpt]
    assert fp4["windows"] == 2 * 4                                      # --eval-iters 2 x --batch-size 4
    assert fp4["val_loss"] == pytest.approx(fp4_loss, abs=1e-5)       # the FP4 forward as trained
    assert base["val_loss"] == pytest.approx(base_loss, abs=1e-5)
    assert fp4["se"] == pytest.approx(fp4["window_sd"] / math.sqrt(8))
    pair = report["pairs"][f"{fp4_ckpt} - {base_ckpt}"]
    assert pair["difference"] == pytest.approx(fp4_loss - base_loss, abs=1e-5)
    assert pair["se"] == pytest.approx(pair["pair_sd"] / math.sqrt(8))
    assert len(report["pairs"]) == 1                                    # the seeded run saw other windows
    assert "not the same eval windows" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no checkpoint at"):
        eval_noise.main([str(tmp_path / "nowhere" / "ckpt.pt")])

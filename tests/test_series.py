"""tools/series.py: the tokens-per-parameter series is the per-seed arithmetic on the committed sweeps' final val
losses, the parameter count the model's, and mixed models or unfinished runs are refused in one line.
Run: python -m pytest tests/test_series.py -q"""
import json
import os
import statistics

import pytest

from tools import series


def test_series_pairs_each_budgets_gaps_per_seed_from_the_committed_logs(tmp_path, capsys):
    # two committed sweeps of the same 4-block model at two budgets: every number of the series must be the
    # per-seed arithmetic on the runs' final val losses, the parameter count the model's; then the refusals
    import shutil
    runs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "runs")
    sweeps = [str(tmp_path / name) for name in ("quick", "pilot600")]
    configs = ["baseline", "nvidia", "tetrajet", "quartet2"]
    for name, dst in zip(("quick", "pilot600"), sweeps):
        for c in configs:
            shutil.copytree(os.path.join(runs, name, c), os.path.join(dst, c))
    table = series.main([*sweeps, "--out", str(tmp_path / "s"), "--configs", *configs, "--seeds", "1337", "1338",
                         "1339", "--no-plot"])
    final = {(d, c): [json.loads(open(os.path.join(d, c, f"seed{s}", "log.jsonl")).read().splitlines()[-1])["val_loss"]
                      for s in (1337, 1338, 1339)] for d in sweeps for c in configs}
    for d in sweeps:
        gap = [a - b for a, b in zip(final[d, "tetrajet"], final[d, "baseline"])]
        assert table[d]["tetrajet"]["gap"][0] == pytest.approx(statistics.fmean(gap))
        assert table[d]["tetrajet"]["gap"][1] == pytest.approx(statistics.stdev(gap) / 3 ** 0.5)
        vs = [a - b for a, b in zip(final[d, "quartet2"], final[d, "nvidia"])]
        assert table[d]["quartet2"]["vs"][0] == pytest.approx(statistics.fmean(vs))
        assert "vs" not in table[d]["nvidia"] and "gap" not in table[d]["baseline"]
    saved = json.load(open(tmp_path / "s" / "series.json"))
    assert [b["params"] for b in saved["budgets"]] == [723_072, 723_072]      # "0.72M parameters" in train.log
    assert [b["tokens"] for b in saved["budgets"]] == [409_600, 1_228_800]
    lo, hi = sweeps
    moved = [(final[hi, "nvidia"][i] - final[hi, "baseline"][i]) - (final[lo, "nvidia"][i] - final[lo, "baseline"][i])
             for i in range(3)]
    assert saved["moved"]["nvidia"][0] == pytest.approx(statistics.fmean(moved))
    assert "| nvidia | +0.0316 ± 0.0091 | +0.0467 ± 0.0161 |" in open(tmp_path / "s" / "series.md").read()

    log = os.path.join(hi, "baseline", "seed1337", "train.log")                # another model at one budget
    with open(log) as f:
        text = f.read()
    with open(log, "w") as f:
        f.write(text.replace("n_layer=4", "n_layer=2"))
    with pytest.raises(SystemExit, match="a series varies the tokens only"):
        series.main([*sweeps, "--out", str(tmp_path / "s"), "--configs", *configs, "--no-plot"])
    os.remove(os.path.join(lo, "quartet2", "seed1338", "done.json"))
    with pytest.raises(SystemExit, match="the series needs every run of every sweep finished; 1 are not"):
        series.main([*sweeps, "--out", str(tmp_path / "s"), "--configs", *configs, "--no-plot"])

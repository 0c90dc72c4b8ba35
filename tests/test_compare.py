"""compare.py: the table's numbers are the runs' own, a cut-off sweep resumes without redoing finished runs,
bad sweeps fail with one line. Two configs x two seeds x 4 steps of a tiny model (real train.py processes).
Run: python -m pytest tests/test_compare.py -q"""
import json
import os
import statistics

import pytest

import train
from conftest import TINY
from data.prepare import prepare_text
from tools import compare

STEPS = ["--max-iters", "4", "--eval-interval", "2", "--fp4-path", "reference"]   # compiling would dominate


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    text = "".join(f"line {i % 13} says {i * 7 % 31};\n" for i in range(3000))
    return str(prepare_text("cmp", text, "byte", "generated", root=tmp_path_factory.mktemp("data")))


def sweep(out, dataset, *extra):
    return compare.main(["--out", str(out), "--configs", "baseline", "tetrajet", "--seeds", "1", "2", "--versus",
                         "tetrajet", "--no-plot", *extra, "--", "--dataset", dataset, *TINY, *STEPS])


def final_losses(out, config):
    return [json.loads(open(os.path.join(out, config, f"seed{s}", "log.jsonl")).read().splitlines()[-1])["val_loss"]
            for s in (1, 2)]


def test_table_matches_the_runs_logs_and_a_cut_off_sweep_resumes(tmp_path, dataset, capsys):
    rows = sweep(tmp_path, dataset, "--config", "fast=--fp4 --lr 2e-2")
    for config in ("baseline", "tetrajet", "fast"):
        finals = final_losses(tmp_path, config)
        assert rows[config]["final"] == finals
        assert rows[config]["mean"] == pytest.approx(statistics.fmean(finals))
        assert rows[config]["std"] == pytest.approx(statistics.stdev(finals))
        assert f"| {compare.label(config, rows[config])} |" in open(tmp_path / "results.md").read()
    ran_in = str(train.activation_dtype("auto", "cpu")[0]).removeprefix("torch.")      # what --dtype auto chose here
    assert rows["baseline"]["dtype"] == ran_in
    assert f"| baseline ({compare.DTYPE_NAMES[ran_in]}) |" in open(tmp_path / "results.md").read()
    bf16, tj, fast = (final_losses(tmp_path, c) for c in ("baseline", "tetrajet", "fast"))
    mean = statistics.fmean
    assert rows["fast"]["gap_closed"] == pytest.approx((mean(tj) - mean(fast)) / (mean(tj) - mean(bf16)))
    assert rows["fast"]["minus_versus"] == pytest.approx(mean([fast[i] - tj[i] for i in range(2)]))
    assert rows["fast"]["gap"] == pytest.approx(mean([fast[i] - bf16[i] for i in range(2)]))
    assert rows["tetrajet"]["oscillating"] is not None and rows["baseline"]["oscillating"] is None
    assert f"{rows['fast']['mean']:.4f} ± {rows['fast']['std']:.4f}" in open(tmp_path / "results.md").read()

    # cut the sweep off: one run never finished (a checkpoint at step 2, no done.json), one never started
    cut = tmp_path / "tetrajet" / "seed2"
    stamp = os.path.getmtime(tmp_path / "baseline" / "seed1" / "log.jsonl")
    for f in cut.iterdir():
        f.unlink()
    compare.run_one(str(cut), "--fp4 --fp4-recipe tetrajet", ["--dataset", dataset, *TINY, *STEPS, "--stop-iter", "2"],
                    2, 1)
    os.remove(cut / "done.json")                       # as if the process had died after its step-2 checkpoint
    assert json.loads((cut / "log.jsonl").read_text().splitlines()[-1])["step"] == 2
    for f in (tmp_path / "fast" / "seed1").iterdir():
        f.unlink()
    capsys.readouterr()
    again = sweep(tmp_path, dataset, "--config", "fast=--fp4 --lr 2e-2")
    assert "4 already finished, 2 to run" in capsys.readouterr().out
    assert os.path.getmtime(tmp_path / "baseline" / "seed1" / "log.jsonl") == stamp      # not rerun
    assert "--resume" in [line for line in (cut / "train.log").read_text().splitlines() if line.startswith("$ ")][-1]
    assert again["tetrajet"]["final"] == rows["tetrajet"]["final"]                   # resumed = uninterrupted
    assert again["fast"]["final"] == rows["fast"]["final"]                           # same seed, same run


def test_loss_plot_is_written_or_the_missing_matplotlib_is_named(tmp_path, dataset):
    args = ["--out", str(tmp_path), "--configs", "baseline", "--seeds", "1", "--", "--dataset", dataset, *TINY, *STEPS]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="needs matplotlib"):
            compare.main(args)
        assert (tmp_path / "results.md").exists()
        return
    compare.main(args)
    assert (tmp_path / "loss.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["--configs", "fp8"], "unknown config 'fp8'"),
    (["--configs", "nvidia"], "needs the baseline config"),
    (["--config", "nameless"], "NAME=FLAGS"),
    (["--", "--seed", "3"], "--seed is set by compare.py"),
    (["--config", "x=--fp4 --out-dir y"], "--out-dir is set by compare.py")])
def test_bad_sweeps_fail_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        compare.main(argv)
    assert message in capsys.readouterr().err


def test_report_only_rebuilds_the_committed_sweep_table_from_its_logs_alone(tmp_path, capsys):
    # docs/runs/quick holds only log.jsonl, done.json and train.log per run: the table must come back from them,
    # line for line as committed, without training anything; an unfinished run is refused in one line
    import shutil
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "runs", "quick")
    out = tmp_path / "quick"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.png"))
    configs = ["baseline", "nvidia", "nvidia-paper", "nvidia-4over6", "tetrajet", "tetrajet+osci", "quartet2", "mxfp4"]
    compare.main(["--out", str(out), "--configs", *configs, "--report-only", "--no-plot"])
    with open(os.path.join(src, "results.md")) as a, open(out / "results.md") as b:
        assert a.read() == b.read()
    os.remove(out / "quartet2" / "seed1338" / "done.json")
    with pytest.raises(SystemExit, match="--report-only needs every run finished; 1 of 24"):
        compare.main(["--out", str(out), "--configs", *configs, "--report-only", "--no-plot"])


def test_gap_closed_is_the_ratio_of_means_with_a_leave_one_seed_out_error():
    # three seeds; B trails the baseline by 0.04, 0.00 and 0.08, M by 0.02, 0.01 and 0.03: a per-seed ratio would
    # divide by zero on the second seed, the ratio of means is 1 - 0.02 / 0.04 = 0.5
    base, b, m = [1.0, 2.0, 3.0], [1.04, 2.00, 3.08], [1.02, 2.01, 3.03]
    r, se = compare.gap_closed(m, b, base)
    assert r == pytest.approx(0.5)
    loo = [1 - 0.02 / 0.04, 1 - 0.025 / 0.06, 1 - 0.015 / 0.02]       # seeds (2, 3), (1, 3), (1, 2) kept
    assert se == pytest.approx((2 / 3 * sum((x - statistics.fmean(loo)) ** 2 for x in loo)) ** 0.5)
    assert compare.gap_closed([1.5], [2.0], [1.0]) == (0.5, 0.0)



def test_the_powered_sweep_names_only_built_in_configs():
    # tools/powered_sweep.sh runs for hours: a misspelt config must fail here, not after its first stages
    script = open(os.path.join(compare.REPO, "tools", "powered_sweep.sh")).read()
    named = {}
    for var in ("CORE", "REST", "TABLE"):
        value = script.split(f'\n{var}="', 1)[1].split('"', 1)[0]
        named[var] = value.split()
    assert all(name in compare.CONFIGS for names in named.values() for name in names)
    assert set(named["CORE"]) | set(named["REST"]) | {"tetrajet+oc-random"} == set(named["TABLE"]) == set(compare.CONFIGS)

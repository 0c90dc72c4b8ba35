"""The tools around the lesson, and the committed evidence they rebuild.

tools/compare.py: a sweep's table is its runs' own numbers, a cut-off sweep resumes without redoing finished runs,
bad sweeps fail with one line, a finished sweep packs into one file. The committed packs (dev/runs/*.jsonl.gz):
every committed table (each sweep's and the tokens-per-parameter series) rebuilds from them digit for digit,
they hold no machine's paths, and the same runs pack to the same bytes. dev/series.py: the series is the per-seed
arithmetic on the sweeps' final val losses. dev/eval_noise.py: per-window losses average to the run's val_loss.
dev/powered_sweep.sh names only built-in configs. Every script: --help says what it does, bad input is one line
`error: ...` (never a traceback or a usage dump), a plot without matplotlib is a note after the tables, a table
leaves out the columns no row fills. The live sweep is 3 configs x 2 seeds x 4 steps of a tiny model (real train.py
processes, two at a time); everything else reads the committed packs or calls each script's main in-process.
Run: python -m pytest tests/test_tools.py -q"""
import glob
import gzip
import importlib
import json
import math
import os
import re
import shutil
import statistics
import sys

import pytest
import torch

from conftest import REPO, TINY
from dev import estimator, series
from tools import compare

RUNS = os.path.join(REPO, "dev", "runs")
SWEEPS = ["quick", "pilot600", "l2-500", "l2-1400", "l2-4000", "attribution", "contest-l2-1400", "contest-l2-4000"]   # each a pack <name>.jsonl.gz, its table
SERIES = ["dev/runs/l2-500", "dev/runs/l2-1400", "dev/runs/l2-4000", "--configs", "baseline", "nvidia", "tetrajet",
          "quartet2", "--seeds", "1337", "1338", "1339", "1340", "1341", "1342"]     # dev/runs/l2-series.md's command
STEPS = ["--max-iters", "4", "--eval-interval", "2", "--fp4-path", "reference"]   # compiling would dominate


def pack(name):
    return os.path.join(RUNS, name + compare.PACK)


def read(path):
    with open(path) as f:
        return f.read()


def finals(runs, config, seeds):
    return [runs[config, s]["log"][-1]["val_loss"] for s in seeds]


# ---- the committed packs: every table digit for digit, no machine's paths, deterministic --------------------------

@pytest.mark.parametrize("name", SWEEPS)
def test_every_committed_sweep_table_rebuilds_digit_for_digit_from_its_pack(name, tmp_path):
    # the pack holds the table's inputs (configs and their flags as run, seeds, versus, common flags): no argument
    # but where the pack is, whatever compare.CONFIGS says today
    compare.main(["--out", str(tmp_path / name), "--pack", pack(name), "--report-only", "--no-plot"])
    assert read(tmp_path / f"{name}.md") == read(os.path.join(RUNS, f"{name}.md"))


def test_the_committed_series_rebuilds_digit_for_digit_from_the_packs(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)                              # the table names its sweeps as given: dev/runs/l2-500, ...
    series.main([*SERIES[:3], "--out", str(tmp_path / "l2-series"), *SERIES[3:], "--no-plot"])
    assert read(tmp_path / "l2-series.md") == read(os.path.join(RUNS, "l2-series.md"))


ABSOLUTE = re.compile(r"(?<![\w.~/<>-])/(?=[\w.~+@-])")         # a path from the root, as compare.scrub sees one


@pytest.mark.parametrize("name", SWEEPS)
def test_packs_hold_no_absolute_paths_and_commands_run_from_the_repo(name):
    with gzip.open(pack(name), "rt", encoding="utf-8") as f:
        text = f.read()
    assert not ABSOLUTE.findall(text), ABSOLUTE.findall(text)[:3]
    header, runs = compare.read_pack(pack(name))
    for (config, seed), run in runs.items():
        assert run["done"]["cmd"][:2] == ["python", "train.py"]
        assert run["train_log"].startswith("$ python train.py ") and f"--seed {seed}" in run["train_log"]
        assert set(run) == {"done", "train_log", "log"}                          # logs only, never checkpoints
    assert sorted(runs) == [(c, s) for c in sorted(header["configs"]) for s in header["seeds"]]


def test_scrub_makes_the_repos_paths_relative_and_hides_the_rest_idempotently():
    text = (f"$ /home/u/.venv/bin/python3.11 {REPO}/train.py --dataset /tmp/x/toy --out-dir runs/q/seed1 "
            f"| 8/9 layers, 120 ms/step, https://example.org/a/b")
    once = compare.scrub({"cmd": [text], "n": 3})
    assert once == {"cmd": ["$ python train.py --dataset .../toy --out-dir runs/q/seed1 | 8/9 layers, 120 ms/step, "
                            "https://example.org/a/b"], "n": 3}
    assert compare.scrub(once) == once


@pytest.mark.parametrize("name", SWEEPS)
def test_packing_is_deterministic_an_unpacked_pack_packs_to_the_same_bytes(name, tmp_path):
    out, again = tmp_path / name, str(tmp_path / f"again{compare.PACK}")
    compare.main(["--unpack", "--out", str(out), "--pack", pack(name)])
    compare.main(["--pack-only", "--out", str(out), "--pack", again])
    with open(pack(name), "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()
    assert read(tmp_path / "again.md") == read(os.path.join(RUNS, f"{name}.md"))     # its table, beside it


def test_a_report_from_run_folders_and_unfinished_runs_refused_in_one_line(tmp_path):
    # the committed quick sweep as run folders (log.jsonl, done.json, train.log: no checkpoints): its table comes
    # back from them, its configs named with their flags as run; an unfinished run is refused in one line
    out, configs = tmp_path / "quick", compare.read_pack(pack("quick"))[0]["configs"]
    compare.main(["--unpack", "--out", str(out), "--pack", pack("quick")])
    argv = ["--out", str(out), "--report-only", "--no-plot", "--configs", "baseline", "--seeds", "1337", "1338", "1339",
            *[arg for c, flags in configs.items() if c != "baseline" for arg in ("--config", f"{c}={flags}")]]
    compare.main(argv)
    no_flags = lambda table: re.sub(r"\| `[^`]*` \|", "| |", table, count=1)     # noqa: E731  (baseline's: today's)
    assert no_flags(read(out / "results.md")) == no_flags(read(os.path.join(RUNS, "quick.md")))
    for wrong in (["--", "--max-iters", "9"], ["--config", "nvidia=--fp4 --fp4-recipe tetrajet"]):
        with pytest.raises(SystemExit, match="ran with .*, not with the flags"):   # a table would name other flags
            compare.main(argv + wrong)
    log = out / "tetrajet" / "seed1337" / "train.log"         # resumed under another flag: the run is not the table's
    text = log.read_text()
    log.write_text(text + "$ python train.py --fp4 --fp4-recipe tetrajet --n-layer 1 --seed 1337 --out-dir x --resume\n")
    with pytest.raises(SystemExit, match="tetrajet seed 1337 ran with .*--n-layer 1"):
        compare.main(argv)
    log.write_text(text)
    os.remove(out / "quartet2" / "seed1338" / "done.json")
    with pytest.raises(SystemExit, match="--report-only needs every run finished; 1 of 24"):
        compare.main(argv)
    with pytest.raises(SystemExit, match="a pack holds finished runs only; 1 are not"):
        compare.main(["--pack-only", "--out", str(out), "--pack", str(tmp_path / f"p{compare.PACK}")])


@pytest.mark.parametrize("name", SWEEPS)
def test_every_committed_pack_unpacked_reports_from_its_folders_under_its_own_flags(name, tmp_path):
    # the flag check compares sets (l2-500's runs have their flags in another order than its header) and reads
    # every launch in train.log; the table from the folders is the pack's
    header = compare.read_pack(pack(name))[0]
    compare.main(["--unpack", "--out", str(tmp_path / name), "--pack", pack(name)])
    compare.main(["--out", str(tmp_path / name), "--report-only", "--no-plot", "--configs", "baseline",
                  *[a for c, flags in header["configs"].items() if c != "baseline" for a in ("--config", f"{c}={flags}")],
                  "--seeds", *map(str, header["seeds"]), "--versus", *compare.versus_list(header["versus"]),
                  "--", *header["common"]])
    assert compare.scrub(read(tmp_path / name / "results.md")) == read(os.path.join(RUNS, f"{name}.md"))


def test_a_table_leaves_out_the_columns_no_row_fills(tmp_path):
    # the committed quick sweep without its B (nvidia): no empty "vs nvidia" columns, nor the sentence about them
    argv = ["--out", str(tmp_path / "q"), "--pack", pack("quick"), "--report-only", "--no-plot", "--configs", "baseline",
            "tetrajet"]
    compare.main(argv)
    lines = read(tmp_path / "q.md").splitlines()
    assert lines[4] == "| config | flags | final val_loss (mean ± std) | L - L_baseline | tok/s | oscillating |"
    assert "nvidia" not in read(tmp_path / "q.md") and lines[6].count("|") == lines[4].count("|")
    compare.main(argv + ["quartet2", "--versus", "tetrajet"])      # with B and a third config they are filled
    assert "| L - L_baseline | L - L_tetrajet | gap closed vs tetrajet | tok/s |" in read(tmp_path / "q.md")


def test_each_recipe_named_after_versus_gets_its_own_paired_column(tmp_path):
    # the contest's table: paired differences against quartet2 and nvidia; the gap closed against the first only
    seeds = [1337, 1338, 1339, 1340, 1341, 1342]
    compare.main(["--out", str(tmp_path / "c"), "--pack", pack("contest-l2-1400"), "--report-only", "--no-plot",
                  "--versus", "quartet2", "nvidia"])
    lines = read(tmp_path / "c.md").splitlines()
    assert "| L - L_baseline | L - L_quartet2 | L - L_nvidia | gap closed vs quartet2 |" in lines[4]
    _, runs = compare.read_pack(pack("contest-l2-1400"))
    eden = finals(runs, "tetrajet-eden", seeds)
    for b in ("quartet2", "nvidia"):
        m, se = compare.mean_se([x - y for x, y in zip(eden, finals(runs, b, seeds))])
        assert f"{m:+.4f} ± {se:.4f}" in next(line for line in lines if line.startswith("| tetrajet-eden |"))
    row = next(line for line in lines if line.startswith("| nvidia |")).split(" | ")
    assert row[4] and not row[5] and row[6]            # nvidia: vs quartet2 and its gap closed, not vs itself
    compare.main(["--out", str(tmp_path / "c"), "--pack", pack("contest-l2-1400"), "--report-only", "--no-plot",
                  "--configs", "baseline", "nvidia", "tetrajet-eden"])          # the pack's B left out: the next is B
    assert "| L - L_baseline | L - L_nvidia | gap closed vs nvidia |" in read(tmp_path / "c.md")


# ---- every script: --help, bad input in one line, plots optional ------------------------------------------------

SCRIPTS = sorted({os.path.relpath(p, REPO) for d in ("tools", "dev", "data") for p in glob.glob(os.path.join(REPO, d, "*.py"))
                  if not p.endswith("__init__.py")} | {"train.py", "sample.py", "kernels.py"})
DOCS = ["README.md", *glob.glob(os.path.join(REPO, "docs", "*.md")),
        *[p for p in glob.glob(os.path.join(REPO, "dev", "*.md")) if not p.endswith("LOG.md")]]   # (LOG.md: history)


def script_main(script):
    if script == "kernels.py":
        pytest.importorskip("triton")
    return importlib.import_module(script[:-3].replace("/", ".")).main


def test_every_script_the_docs_name_is_one_of_them():
    named = {m for doc in DOCS for m in re.findall(r"python ([\w/]+\.py)", read(os.path.join(REPO, doc)))}
    assert named and named <= set(SCRIPTS), named - set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_a_help_that_says_what_it_does(script, capsys):
    main = script_main(script)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    doc = importlib.import_module(script[:-3].replace("/", ".")).__doc__.strip().splitlines()[0]
    assert e.value.code in (0, None) and out.startswith("usage: ") and doc[:60] in out


QUICK, PILOT = (os.path.join(RUNS, n) for n in ("quick", "pilot600"))
SMALL = ["--k", "16", "--m", "16", "--n", "16", "--seeds", "1", "--dist", "gaussian"]       # if it ran at all: fast
REPORT = ["--report-only", "--out", "{none}", "--pack", pack("quick")]         # never a live sweep, even unchecked
BAD = [   # (script, argv, what its one line says): {cut} a checkpoint cut short, {none} a folder that is not there
    ("dev/snr.py", ["--checkpoint", "{cut}", *SMALL], "is unreadable"),
    ("dev/snr.py", ["--checkpoint", "{none}/ckpt.pt", *SMALL], "no checkpoint at"),
    ("dev/snr.py", ["--seeds", "0"], "--seeds must be >= 1"), ("dev/snr.py", ["--k", "-5"], "must be >= 1"),
    ("dev/snr.py", ["--recipes", "fp8"], "invalid choice: 'fp8'"), ("dev/snr.py", ["--seed", "2", *SMALL], "unrecognized"),
    ("dev/estimator.py", ["--checkpoint", "{cut}", "--draws", "2"], "is unreadable"),
    ("dev/estimator.py", ["--draws", "-3"], "--draws must be at least 2"),
    ("dev/estimator.py", ["--loss-batches", "0"], "--loss-batches must be >= 1"),
    ("dev/estimator.py", ["--json", "{none}/grad.json"], "no writable folder"),
    ("dev/eval_noise.py", ["{cut}"], "is unreadable"), ("dev/eval_noise.py", ["{cut}", "--json", "{none}/x"], "no writable"),
    ("tools/compare.py", ["--report-only", "--out", "{none}"], "no pack"),
    ("tools/compare.py", ["--report-only", "--out", "{none}", "--pack", "{cutpack}"], "not a readable compare.py pack"),
    ("tools/compare.py", [*REPORT, "--seeds", "7"], "has no seed 7"),
    ("tools/compare.py", [*REPORT, "--configs", "baseline", "tetrajet", "--versus", "nvidia"], "--versus nvidia is not"),
    ("tools/compare.py", ["--configs", "baseline", "tetrajet", "--versus", "nvidia", "--parallel", "0"], "--versus nvidia"),
    ("tools/compare.py", [*REPORT, "--versus", "baseline"], "--versus baseline"),
    ("tools/compare.py", [*REPORT, "--seeds", "1337", "1337"], "names a seed twice"),
    ("tools/compare.py", ["--report", "--out", "{none}"], "unrecognized arguments: --report"),
    ("dev/series.py", ["{none}", QUICK, "--out", "{none}"], "neither a sweep folder nor a pack"),
    ("dev/series.py", [QUICK, PILOT, "--out", "{none}", "--seeds", "7"], "has no seed 7"),
    ("dev/series.py", [QUICK, PILOT, "--out", "{none}", "--versus", "fp8"], "--versus fp8 must be one of"),
    ("dev/series.py", [QUICK, "--out", "{none}"], "at least two sweeps"),
    ("tools/bench.py", ["--repeat", "0"], "--repeat must be >= 1"), ("tools/bench.py", ["--device", "tpu"], "no device"),
    ("tools/bench.py", ["--device", "cuda"], "this torch sees no cuda device"),
    ("tools/bench.py", ["--only", "step", "--repeat", "1", "--train-flags", "--batch-size 0"], "--batch-size must be"),
    ("data/prepare.py", ["fineweb"], "invalid choice: 'fineweb'"), ("data/prepare.py", ["textfile"], "needs --input"),
    ("kernels.py", [], "runs its Triton kernels on a CUDA GPU")]


@pytest.mark.parametrize("script, argv, message", BAD)
def test_bad_input_is_one_error_line_in_every_script(script, argv, message, tmp_path, monkeypatch, capsys):
    if ("cuda" in argv or script == "kernels.py") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)      # kernels.py: as run by hand (its kernels are defined)
    torch.save({"config": {}, "model": {"w": torch.zeros(4096)}}, tmp_path / "ckpt.pt")
    (tmp_path / "ckpt.pt").write_bytes((tmp_path / "ckpt.pt").read_bytes()[:3000])          # cut short
    (tmp_path / "cut.jsonl.gz").write_bytes(open(pack("quick"), "rb").read()[:3000])
    places = {"{cut}": str(tmp_path / "ckpt.pt"), "{none}": str(tmp_path / "none"), "{cutpack}": str(tmp_path / "cut.jsonl.gz")}
    main = script_main(script)
    with pytest.raises(SystemExit) as e:
        main([re.sub(r"\{\w+\}", lambda m: places[m.group()], a) for a in argv])
    err = capsys.readouterr().err
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and "\n" not in e.value.code, e.value.code
    assert message in e.value.code and "usage:" not in err and "Traceback" not in err


def test_a_missing_matplotlib_skips_each_plot_with_a_note_and_the_tables_are_the_result(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)              # as on a machine without it
    compare.main(["--out", str(tmp_path / "quick"), "--pack", pack("quick"), "--report-only"])    # returns: exit 0
    series.main([QUICK, PILOT, "--out", str(tmp_path / "s"), "--configs", "baseline", "nvidia"])
    estimator.plot({"draws": 2, "recipes": {}}, str(tmp_path / "grad.png"))
    err = capsys.readouterr().err
    for png in ("quick.png", "s.png", "grad.png"):
        assert f"note: {png} skipped (pip install matplotlib to draw it)\n" in err and not (tmp_path / png).exists()
    assert (tmp_path / "quick.md").exists() and (tmp_path / "s.md").exists() and (tmp_path / "s.json").exists()


# ---- dev/series.py ------------------------------------------------------------------------------------------------

def test_series_pairs_each_budgets_gaps_per_seed_and_refuses_mixed_models_and_unfinished_runs(tmp_path):
    # two committed sweeps of the same 4-block model at two budgets: every number of the series must be the
    # per-seed arithmetic on the runs' final val losses, the parameter count the model's; then the refusals
    seeds, configs = (1337, 1338, 1339), ["baseline", "nvidia", "tetrajet", "quartet2"]
    sweeps = [pack("quick"), pack("pilot600")]
    table = series.main([*sweeps, "--out", str(tmp_path / "s"), "--configs", *configs, "--seeds", *map(str, seeds),
                         "--no-plot"])
    runs = {compare.stem(p): compare.read_pack(p)[1] for p in sweeps}
    final = {(d, c): finals(runs[d], c, seeds) for d in runs for c in configs}
    for d in runs:
        gap = [a - b for a, b in zip(final[d, "tetrajet"], final[d, "baseline"])]
        assert table[d]["tetrajet"]["gap"][0] == pytest.approx(statistics.fmean(gap))
        assert table[d]["tetrajet"]["gap"][1] == pytest.approx(statistics.stdev(gap) / 3 ** 0.5)
        vs = [a - b for a, b in zip(final[d, "quartet2"], final[d, "nvidia"])]
        assert table[d]["quartet2"]["vs"][0] == pytest.approx(statistics.fmean(vs))
        assert "vs" not in table[d]["nvidia"] and "gap" not in table[d]["baseline"]
    saved = json.loads(read(tmp_path / "s.json"))
    assert [b["params"] for b in saved["budgets"]] == [723_072, 723_072]      # "0.72M parameters" in train.log
    assert compare.run_params(runs[compare.stem(sweeps[0])]["baseline", 1337]["train_log"]) == 723_072   # the model's
    assert [b["tokens"] for b in saved["budgets"]] == [409_600, 1_228_800]
    lo, hi = runs
    moved = [(final[hi, "nvidia"][i] - final[hi, "baseline"][i]) - (final[lo, "nvidia"][i] - final[lo, "baseline"][i])
             for i in range(3)]
    assert saved["moved"]["nvidia"][0] == pytest.approx(statistics.fmean(moved))
    assert "| nvidia | +0.0316 ± 0.0091 | +0.0467 ± 0.0161 |" in read(tmp_path / "s.md")

    folders = [str(tmp_path / name) for name in ("quick", "pilot600")]      # the same sweeps as run folders
    for p, d in zip(sweeps, folders):
        compare.unpack(p, d)
    run = os.path.join(folders[1], "baseline", "seed1337")                 # another model at one budget
    with open(os.path.join(run, "train.log")) as f:
        text = f.read()
    with open(os.path.join(run, "train.log"), "w") as f:
        f.write(text.replace("n_layer=4", "n_layer=2"))
    done = json.loads(read(os.path.join(run, "done.json")))
    with open(os.path.join(run, "done.json"), "w") as f:                    # its count from train.log, then
        json.dump({"cmd": done["cmd"]}, f)
    with pytest.raises(SystemExit, match="a series varies the tokens only"):
        series.main([*folders, "--out", str(tmp_path / "s"), "--configs", *configs, "--no-plot"])
    os.remove(os.path.join(folders[0], "quartet2", "seed1338", "done.json"))
    with pytest.raises(SystemExit, match="the series needs every run of every sweep finished; 1 are not"):
        series.main([*folders, "--out", str(tmp_path / "s"), "--configs", *configs, "--no-plot"])


# ---- tools/compare.py, live: a sweep of real train.py runs ---------------------------------------------------------

FAST = "--fp4 --lr 2e-2 --eval-set fixed"          # an extra config; its evals see the same windows at every seed


def run_sweep(out, dataset, *extra):
    return compare.main(["--out", str(out), "--configs", "baseline", "tetrajet", "--seeds", "1", "2", "--versus",
                         "tetrajet", "--config", f"fast={FAST}", "--parallel", "2", *extra, "--",
                         "--dataset", dataset, *TINY, *STEPS])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, dataset):
    """One finished live sweep (baseline, tetrajet, fast x seeds 1, 2), its table and loss.png: -> (folder, rows)."""
    out = tmp_path_factory.mktemp("sweep") / "s"
    return out, run_sweep(out, dataset)


def log_finals(out, config):
    return [json.loads(read(os.path.join(out, config, f"seed{s}", "log.jsonl")).splitlines()[-1])["val_loss"]
            for s in (1, 2)]


def test_the_table_is_the_runs_own_numbers(sweep):
    import config as train_config
    out, rows = sweep
    table = read(out / "results.md")
    for config in ("baseline", "tetrajet", "fast"):
        got = log_finals(out, config)
        assert rows[config]["final"] == got
        assert rows[config]["mean"] == pytest.approx(statistics.fmean(got))
        assert rows[config]["std"] == pytest.approx(statistics.stdev(got))
        assert f"| {compare.label(config, rows[config])} |" in table
    ran_in = str(train_config.activation_dtype("auto", "cpu")[0]).removeprefix("torch.")      # what --dtype auto chose here
    assert rows["baseline"]["dtype"] == ran_in
    assert f"| baseline ({compare.DTYPE_NAMES[ran_in]}) |" in table
    base, tj, fast = (log_finals(out, c) for c in ("baseline", "tetrajet", "fast"))
    mean = statistics.fmean
    assert rows["fast"]["gap_closed"] == pytest.approx((mean(tj) - mean(fast)) / (mean(tj) - mean(base)))
    assert rows["fast"]["minus"]["tetrajet"][0] == pytest.approx(mean([fast[i] - tj[i] for i in range(2)]))
    assert rows["fast"]["gap"] == pytest.approx(mean([fast[i] - base[i] for i in range(2)]))
    assert rows["tetrajet"]["oscillating"] is not None and rows["baseline"]["oscillating"] is None
    assert f"{rows['fast']['mean']:.4f} ± {rows['fast']['std']:.4f}" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "loss.png").stat().st_size > 1000


def test_a_finished_sweep_packs_into_one_file_that_rebuilds_its_table(sweep, tmp_path):
    out, rows = sweep
    packed = str(tmp_path / f"s{compare.PACK}")
    compare.main(["--pack-only", "--out", str(out), "--pack", packed])
    header, runs = compare.read_pack(packed)
    assert header["configs"] == {"baseline": "", "tetrajet": "--fp4 --fp4-recipe tetrajet", "fast": FAST}
    assert header["seeds"] == [1, 2] and header["versus"] == "tetrajet"
    assert [finals(runs, c, (1, 2)) for c in header["configs"]] == [rows[c]["final"] for c in header["configs"]]
    assert all(run["done"]["params"] == runs["baseline", 1]["done"]["params"] > 0 for run in runs.values())
    with gzip.open(packed, "rt") as f:
        text = f.read()
    assert not ABSOLUTE.findall(text) and str(tmp_path) not in text
    assert "--dataset .../toy" in text                                         # the dataset's path, scrubbed
    assert read(tmp_path / "s.md") == compare.scrub(read(out / "results.md"))


def test_a_cut_off_sweep_resumes_without_redoing_finished_runs(sweep, dataset, tmp_path, capsys):
    out, rows = sweep
    out = shutil.copytree(out, tmp_path / "s")
    # cut the sweep off: one run never finished (a checkpoint at step 2, no done.json), one never started
    cut = out / "tetrajet" / "seed2"
    stamp = os.path.getmtime(out / "baseline" / "seed1" / "log.jsonl")
    for f in cut.iterdir():
        f.unlink()
    compare.run_one(str(cut), "--fp4 --fp4-recipe tetrajet", ["--dataset", dataset, *TINY, *STEPS, "--stop-iter", "2"],
                    2, 1)
    os.remove(cut / "done.json")                       # as if the process had died after its step-2 checkpoint
    assert json.loads((cut / "log.jsonl").read_text().splitlines()[-1])["step"] == 2
    for f in (out / "fast" / "seed1").iterdir():
        f.unlink()
    capsys.readouterr()
    again = run_sweep(out, dataset, "--no-plot")
    assert "4 already finished, 2 to run" in capsys.readouterr().out
    assert os.path.getmtime(out / "baseline" / "seed1" / "log.jsonl") == stamp      # not rerun
    assert "--resume" in [line for line in (cut / "train.log").read_text().splitlines() if line.startswith("$ ")][-1]
    assert again["tetrajet"]["final"] == rows["tetrajet"]["final"]                   # resumed = uninterrupted
    assert again["fast"]["final"] == rows["fast"]["final"]                           # same seed, same run


def test_a_run_that_ended_before_the_sweep_was_cut_off_is_marked_done_not_rerun(sweep, dataset, tmp_path, monkeypatch):
    # killed after train.py's last step but before done.json: a rerun with --resume only stopped with "already at
    # step 4" (exit 1), and the sweep called a finished run failed
    out, rows = sweep
    run = shutil.copytree(out / "tetrajet" / "seed1", tmp_path / "seed1")
    log = (run / "train.log").read_text()
    os.remove(run / "done.json")
    monkeypatch.setattr(compare.subprocess, "run", lambda *a, **k: pytest.fail("a finished run was launched again"))
    assert compare.run_one(str(run), "--fp4 --fp4-recipe tetrajet", ["--dataset", dataset, *TINY, *STEPS], 1, 1) is None
    assert (run / "train.log").read_text() == log
    assert json.loads((run / "done.json").read_text())["cmd"][-2:] == ["--out-dir", str(out / "tetrajet" / "seed1")]


@pytest.mark.parametrize("argv, message", [
    (["--configs", "fp8"], "unknown config 'fp8'"),
    (["--configs", "nvidia"], "needs the baseline config"),
    (["--configs", "baseline", "nvidia", "--versus", "nvidia", "nvidia"], "--versus names a config twice"),
    (["--configs", "baseline", "nvidia", "--versus", "nvidia", "quartet2"], "--versus quartet2 is not among"),
    (["--config", "nameless"], "NAME=FLAGS"),
    (["--", "--seed", "3"], "--seed is set by compare.py"),
    (["--config", "x=--fp4 --out-dir y"], "--out-dir is set by compare.py"),
    (["--report-only", "--out", "no/such/sweep"], "no pack no/such/sweep.jsonl.gz and no run folder"),
    (["--pack-only", "--seeds", "1"], "--seeds is not for a sweep that exists already"),
    (["--report-only", "--out", os.path.join(RUNS, "quick"), "--", "--max-iters", "9"], "train.py flags after --"),
    (["--report-only", "--out", os.path.join(RUNS, "quick"), "--configs", "baseline", "fp8"], "has no config 'fp8'"),
    (["--report-only", "--out", os.path.join(RUNS, "quick"), "--configs", "nvidia"], "needs the baseline config")])
def test_bad_sweeps_fail_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as failed:
        compare.main(argv)
    assert message in capsys.readouterr().err + str(failed.value.code)


def test_gap_closed_is_the_ratio_of_means_with_a_leave_one_seed_out_error():
    # three seeds; B trails the baseline by 0.04, 0.00 and 0.08, M by 0.02, 0.01 and 0.03: a per-seed ratio would
    # divide by zero on the second seed, the ratio of means is 1 - 0.02 / 0.04 = 0.5
    base, b, m = [1.0, 2.0, 3.0], [1.04, 2.00, 3.08], [1.02, 2.01, 3.03]
    r, se = compare.gap_closed(m, b, base)
    assert r == pytest.approx(0.5)
    loo = [1 - 0.02 / 0.04, 1 - 0.025 / 0.06, 1 - 0.015 / 0.02]       # seeds (2, 3), (1, 3), (1, 2) kept
    assert se == pytest.approx((2 / 3 * sum((x - statistics.fmean(loo)) ** 2 for x in loo)) ** 0.5)
    assert compare.gap_closed([1.5], [2.0], [1.0]) == (0.5, 0.0)


# ---- dev/eval_noise.py and dev/powered_sweep.sh -------------------------------------------------------------------

def test_window_losses_average_to_the_runs_val_loss_and_pairs_need_the_same_windows(sweep, capsys):
    # the sweep's checkpoints: tetrajet and baseline at seed 1 saw the same (seeded) eval windows, fast's two seeds
    # the same fixed ones (--eval-set fixed), any other two not the same
    from dev import eval_noise
    out, rows = sweep
    fp4_ckpt, base_ckpt, fixed1, fixed2 = (str(out / c / f"seed{s}" / "ckpt.pt")
                                           for c, s in (("tetrajet", 1), ("baseline", 1), ("fast", 1), ("fast", 2)))
    report = eval_noise.main([fp4_ckpt, base_ckpt, fixed1, fixed2])
    fp4, base = report["models"][fp4_ckpt], report["models"][base_ckpt]
    assert fp4["windows"] == 2 * 4                                      # --eval-iters 2 x --batch-size 4
    assert fp4["val_loss"] == pytest.approx(rows["tetrajet"]["final"][0], abs=1e-5)   # the FP4 forward as trained
    assert base["val_loss"] == pytest.approx(rows["baseline"]["final"][0], abs=1e-5)
    assert fp4["se"] == pytest.approx(fp4["window_sd"] / math.sqrt(8))
    pair = report["pairs"][f"{fp4_ckpt} - {base_ckpt}"]
    assert pair["difference"] == pytest.approx(rows["tetrajet"]["final"][0] - rows["baseline"]["final"][0], abs=1e-5)
    assert pair["se"] == pytest.approx(pair["pair_sd"] / math.sqrt(8))
    fixed = report["pairs"][f"{fixed1} - {fixed2}"]                     # two seeds, one fixed eval set
    assert fixed["difference"] == pytest.approx(rows["fast"]["final"][0] - rows["fast"]["final"][1], abs=1e-5)
    assert len(report["pairs"]) == 2                                    # every other pair saw other windows
    assert "not the same eval windows" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no checkpoint at"):
        eval_noise.main([str(out / "nowhere" / "ckpt.pt")])


def test_the_powered_sweep_names_only_built_in_configs():
    # dev/powered_sweep.sh runs for hours: a misspelt config must fail here, not after its first stages
    script = read(os.path.join(REPO, "dev", "powered_sweep.sh"))
    named = {}
    for var in ("CORE", "REST", "TABLE"):
        value = script.split(f'\n{var}="', 1)[1].split('"', 1)[0]
        named[var] = value.split()
    assert all(name in compare.CONFIGS for names in named.values() for name in names)
    contest = {"tetrajet-eden", "tetrajet-eden+oc", "quartet2+oc"}       # dev/contest.sh runs this lab's own
    assert (set(named["CORE"]) | set(named["REST"]) | {"tetrajet+oc-random"} == set(named["TABLE"])
            == set(compare.CONFIGS) - contest)
    assert all(f" {name} " in read(os.path.join(REPO, "dev", "contest.sh")) for name in contest)


def test_bench_step_times_a_high_precision_baseline_and_each_path_with_and_without_outcontrol(monkeypatch, capsys):
    # --train-flags '--fp4 --out-control' once made table 3's baseline row an FP4 model (build_model converts under
    # --fp4): the baseline must stay high precision, and each path gets an OutControl row and its ratio
    from tools import bench
    import fp4
    import train
    built, build = [], train.build_model
    monkeypatch.setattr(bench.train, "build_model", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    monkeypatch.setattr(bench, "paths_here", lambda device, recipe: ["reference"])
    cfg = bench.train_config("--fp4 --out-control --n-layer 1 --batch-size 2 --block-size 32".split())
    results = bench.bench_step(torch.device("cpu"), 2, "tetrajet", cfg)
    assert not any(isinstance(m, fp4.FP4Linear) for m in built[0][0].modules())
    assert list(results)[1:] == ["fp4 tetrajet [reference]", "fp4 tetrajet +OutControl [reference]"]   # after fp32/bf16
    with_oc = [m for m in built[2][0].modules() if isinstance(m, fp4.FP4Linear)]
    assert with_oc and all(m.columns is not None and len(m.columns[0]) == 32 for m in with_oc)
    out = capsys.readouterr().out
    assert " without OutControl" in out and out.count("x ± ") == 4          # ratios paired per round, with an s.e.


def test_bench_path_times_one_path_alone(monkeypatch):
    from tools import bench
    monkeypatch.setattr(bench, "ONLY_PATH", "compiled")
    assert bench.paths_here(torch.device("cpu"), "tetrajet") == ["compiled"]

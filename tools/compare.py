"""
compare.py: FP4-versus-high-precision ablations. Runs named configurations x seeds through train.py with identical
data, tokens and schedule, then writes <out>/results.md (a table with error bars) and <out>/loss.png.

    python tools/compare.py --out runs/quick -- --max-iters 200            # every built-in config x 3 seeds
    python tools/compare.py --configs baseline nvidia tetrajet --seeds 1 2 --config "lr1e-3=--fp4 --lr 1e-3" -- --model 70m
    python tools/compare.py --out runs/quick --parallel 2 -- --max-iters 200   # 2 runs at a time, threads split
    python tools/compare.py --out runs/quick --pack-only                   # the finished sweep as one file to commit
    python tools/compare.py --out dev/runs/l2-1400 --report-only --no-plot # a committed table, rebuilt from its pack

Everything after `--` goes to every run unchanged (model, data, steps, ...). Each run lives in
<out>/<config>/seed<s>/ (train.py's log.jsonl and ckpt.pt, plus train.log, its console output); a run is
finished when compare.py wrote its done.json. Rerunning the same command resumes the sweep: finished runs
are skipped, an interrupted run continues from its checkpoint (train.py --resume), the rest start.

A finished sweep is committed as one file, its pack (--pack-only): <out>.jsonl.gz or --pack FILE, gzip (mtime 0,
no name) of JSON lines. The first holds the table's inputs as the sweep's last report (<out>/results.json) had
them: {"format", "configs": {name: train.py flags, in table order}, "seeds", "versus", "common"}; then one line
per run, sorted by config and seed: {"config", "seed", "done": done.json plus "params" (the model's parameter
count), "train_log": train.log, "log": log.jsonl's records}; never checkpoints. The machine's paths are scrubbed
(the repo's become repo-relative, the interpreter `python`, any other absolute path .../its-last-part), and the
same runs always pack to the same bytes. Beside the pack goes its table, rebuilt from it: FILE without .jsonl.gz,
plus .md. With --report-only nothing runs: the table and plot are rebuilt from the finished runs' logs alone, on
any machine: from <out>'s run folders where <out> is a folder, else from the pack, the table then going to
<out>.md and the plot to <out>.png (for --out dev/runs/l2-1400, beside its pack). A pack's report takes the
configs, their flags, seeds, versus and common flags from the pack (--configs, --seeds and --versus pick among
them), so it rebuilds the committed table whatever CONFIGS says today. --unpack writes a pack's runs back into
<out>/<config>/seed<s>/ (logs, no checkpoints): a live sweep there reruns nothing finished, so more seeds or
configs extend a committed sweep. Before it runs anything and before any table from run folders, compare.py checks
that every finished run was launched (first and on each resume, train.log's `$ ` lines) with the flags its table
will name, in any order, and stops in one line if not.

The baseline config runs without FP4 in train.py's default dtype and is named for it in the table ("baseline
(fp32)" on a CPU without native bf16). The table: final val loss mean ± std over seeds; L - L_baseline and
L - L_B against a recipe B (--versus, default nvidia; --versus B C ... adds a paired column per recipe, the first
is B), each paired per seed (same seed = same init and data order) and given as mean ± standard error; the gap
closed versus B, 1 - gap_M / gap_B = (L̄_B - L̄_M) / (L̄_B -
L̄_baseline) of the means over seeds, ± its jackknife (leave-one-seed-out) standard error; tok/s (median over
evals after the first, which holds compile time); the oscillation ratio at the last eval (FP4 runs). The gap
closed is a ratio of means, not a mean of per-seed ratios: a seed where B barely trails the baseline would
put a near-zero denominator into the latter (it did in dev/runs/l2-1400, seed 1337). A column no row fills (the
B columns of a sweep without B, the oscillation of one without FP4) is left out. loss.png needs matplotlib: without
it compare.py says so in one line and the tables are its result.
"""

import argparse
import gzip
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed

if __package__ in (None, ""):                   # run as a script (python tools/X.py): the repo root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repo root: train.py
CONFIGS = {                       # name -> train.py flags; the default sweep, in table order
    "baseline": "",               # no FP4: train.py's --dtype auto (bf16 where the machine multiplies it natively, else fp32)
    "nvidia": "--fp4 --fp4-recipe nvidia",
    # NVIDIA as published keeps ~16% of the linears in bf16 (the first 2 and last 8 of 62 blocks, arXiv 2509.25149
    # §4); of the 4 blocks of the default model the last one (25%) is the nearest that keeps the same side heavier
    "nvidia-paper": "--fp4 --fp4-recipe nvidia --keep-last-k 1",
    # NVIDIA's recipe with Four Over Six block scales (docs/numerics.md §10) on both forward operands, X and W
    # (TE's nvfp4_4over6="all"; our 4/6 is forward only, so the backward stays the nvidia recipe's)
    "nvidia-4over6": "--fp4 --fp4-recipe nvidia-4over6",
    # Quartet II (docs/numerics.md §11): 4/6 (MSE) forward, MS-EDEN after a fresh RHT-128 in both backward GEMMs
    "quartet2": "--fp4 --fp4-recipe quartet2",
    "mxfp4": "--fp4 --fp4-recipe mxfp4",
    "tetrajet": "--fp4 --fp4-recipe tetrajet",
    "tetrajet+osci": "--fp4 --fp4-recipe tetrajet --osci-reset",
    "tetrajet+oc": "--fp4 --fp4-recipe tetrajet --out-control",
    "tetrajet+all": "--fp4 --fp4-recipe tetrajet --osci-reset --out-control",
    # OutControl's control: as many input channels in MXFP8, drawn at random instead of the top by norm (on a
    # narrow model the 32-channel rounding puts 25% of them there: is the gain the share or the choice?)
    "tetrajet+oc-random": "--fp4 --fp4-recipe tetrajet --out-control --out-control-choice random",
    # the two ablations the gradient report (docs/estimator.md) makes most telling: TetraJet-v2 with its second
    # backward operand (W^ in dgrad, X^ in wgrad) rounded to nearest, ~15% less gradient noise at a bias still at
    # the floor; and 4/6 on 1x16 weight tiles, where it lowers the forward loss (on NVIDIA's 16x16 tiles it raises it)
    "tetrajet-rtn2": "--fp4 --fp4-recipe tetrajet[other_rounding=nearest]",
    "nvidia-w1x16-4over6": "--fp4 --fp4-recipe nvidia-4over6[weight_tile=1x16]",
    # this lab's own candidates (docs/numerics.md §13): TetraJet-v2's forward with an EDEN backward on double-block
    # scales (no SR), alone and with OutControl, the part of tetrajet+all that measured a gain (OsciReset's 0.002 did
    # not resolve: dev/sweep.md); no 4/6 forward: it measured no gain here (nvidia-4over6, quartet2's forward alone)
    "tetrajet-eden": "--fp4 --fp4-recipe tetrajet-eden",
    "tetrajet-eden+oc": "--fp4 --fp4-recipe tetrajet-eden --out-control",
    # the contest's lesson (dev/sweep.md §9): the forward decides and OutControl is its one measured gain, so the
    # next candidate keeps Quartet II's forward and backward and adds OutControl
    "quartet2+oc": "--fp4 --fp4-recipe quartet2 --out-control",
}
OWNED_FLAGS = ("--seed", "--out-dir", "--resume")          # compare.py sets these per run

PACK, PACK_FORMAT = ".jsonl.gz", "nanofp4 compare.py sweep pack 1"      # a sweep's pack: <out>.jsonl.gz
DEFAULT_SEEDS, DEFAULT_VERSUS = [1337, 1338, 1339], "nvidia"


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="tools/compare.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (see python tools/compare.py --help)")
    p.add_argument("--out", default="runs/compare", help="sweep folder (default: runs/compare)")
    p.add_argument("--configs", nargs="+", help=f"configs to run, of {list(CONFIGS)} (default: all; a pack's "
                   "report: the pack's)")
    p.add_argument("--config", action="append", default=[], metavar="NAME=FLAGS",
                   help="an extra configuration: a name and its train.py flags (repeatable)")
    p.add_argument("--seeds", nargs="+", type=int, help="default: 1337 1338 1339 (a pack's report: the pack's)")
    p.add_argument("--versus", nargs="+", help="the B of 'gap closed' and of the paired difference, then any more "
                   "recipes to pair with (default: nvidia; a pack's report: the pack's)")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (the CPU threads are split among them)")
    p.add_argument("--no-plot", action="store_true", help="skip loss.png")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--report-only", action="store_true", help="run nothing: rebuild the table and plot from the "
                      "finished runs' logs alone: <out>'s run folders, or where <out> is no folder its pack")
    mode.add_argument("--pack-only", action="store_true", help="run nothing: write the finished sweep in <out> as "
                      "one file, its pack, and beside it the table of its last report, rebuilt from the pack")
    mode.add_argument("--unpack", action="store_true", help="run nothing: write the pack's runs into "
                      "<out>/<config>/seed<s>/ (logs, no checkpoints)")
    p.add_argument("--pack", metavar="FILE", help=f"the sweep's pack (default: <out>{PACK})")
    args = p.parse_args(argv)
    if args.seeds and len(set(args.seeds)) < len(args.seeds):
        p.error(f"--seeds names a seed twice ({' '.join(map(str, args.seeds))}); each seed is one run per config")
    if args.versus and len(set(args.versus)) < len(args.versus):
        p.error(f"--versus names a config twice ({' '.join(args.versus)})")
    if args.versus and "baseline" in args.versus:
        p.error("--versus baseline: every gap is measured against the baseline already; name an FP4 config")
    out = os.path.normpath(args.out)
    args.pack = args.pack or (out if out.endswith(PACK) else out + PACK)
    args.from_pack = args.report_only and not os.path.isdir(args.out)
    if args.pack_only or args.unpack or args.from_pack:          # the runs and the table's inputs exist already
        given = [("--config", args.config), ("train.py flags after --", common)]
        if not args.from_pack:                      # a pack's report may pick among the pack's configs and seeds
            given += [("--configs", args.configs), ("--seeds", args.seeds), ("--versus", args.versus)]
        given = [name for name, value in given if value]
        if given:
            p.error(f"{given[0]} is not for a sweep that exists already: its configs, flags and seeds are its own")
        if (args.unpack or args.from_pack) and not os.path.exists(args.pack):
            p.error(f"no pack {args.pack}" + (f" and no run folder {args.out}" if args.from_pack else ""))
        return args, None, None
    given_versus = args.versus or []
    args.seeds, args.versus = args.seeds or DEFAULT_SEEDS, versus_list(args.versus or DEFAULT_VERSUS)
    args.configs = args.configs or list(CONFIGS)
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config {unknown[0]!r}; built-in: {list(CONFIGS)} (or add one with --config NAME=FLAGS)")
    configs = {name: CONFIGS[name] for name in args.configs}
    for spec in args.config:
        name, sep, flags = spec.partition("=")
        if not sep or not name or "/" in name:
            p.error(f"--config wants NAME=FLAGS with a plain name, got {spec!r}")
        configs[name] = flags
    owned = [f for f in common + [t for flags in configs.values() for t in shlex.split(flags)]
             if f.split("=")[0] in OWNED_FLAGS]
    if owned:
        p.error(f"{owned[0]} is set by compare.py for every run (--seeds, --out); remove it")
    if "baseline" not in configs:
        p.error("the sweep needs the baseline config (no FP4): every gap is measured against it")
    absent = [v for v in given_versus if v not in configs]  # (the default's columns just go when it is not run)
    if absent:
        p.error(f"--versus {absent[0]} is not among the sweep's configs {list(configs)}; add it or name one of them")
    if args.parallel < 1:
        p.error("--parallel must be at least 1")
    return args, configs, common


def run_one(run_dir, flags, common, seed, threads):
    """Train one (config, seed) in run_dir, resuming from its checkpoint if an earlier sweep was cut off.
    -> None on success, else a one-line reason. done.json marks success (written last, so atomic enough)."""
    os.makedirs(run_dir, exist_ok=True)
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *common, *shlex.split(flags), "--seed", str(seed),
           "--out-dir", run_dir]
    if ran_to_the_end(run_dir, cmd):             # the sweep was cut off after train.py ended, before done.json
        with open(os.path.join(run_dir, "train.log")) as f:
            cmd = shlex.split([line for line in f if line.startswith("$ ")][-1][2:])    # what ran last
    else:
        if os.path.exists(os.path.join(run_dir, "ckpt.pt")):
            cmd.append("--resume")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        with open(os.path.join(run_dir, "train.log"), "a") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0:
            return f"exit code {rc}; see {os.path.join(run_dir, 'train.log')}"
    with open(os.path.join(run_dir, "done.json"), "w") as f:
        json.dump({"cmd": cmd}, f)
    return None


def ran_to_the_end(run_dir, cmd):
    """Whether run_dir's checkpoint and log.jsonl already reach the step cmd ends at (--stop-iter, else --max-iters,
    else train.py's default): a resume would only stop with "already at step". The log's last row is that step's."""
    if not (os.path.exists(os.path.join(run_dir, "ckpt.pt")) and os.path.exists(os.path.join(run_dir, "log.jsonl"))):
        return False
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--max-iters", type=int)
    p.add_argument("--stop-iter", type=int)
    given = p.parse_known_args(cmd)[0]
    if given.stop_iter is None and given.max_iters is None:
        from config import TrainConfig                               # (imports torch: only here)
        given.max_iters = TrainConfig.max_iters
    rows = read_log(run_dir)
    return bool(rows) and rows[-1].get("step", -1) >= (given.stop_iter or given.max_iters)


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def folder_runs(out, configs, seeds):
    """-> {(config, seed): {"done", "train_log", "log"}} of the finished runs (done.json written) among configs x
    seeds in <out>'s run folders: what a pack holds of each run."""
    runs = {}
    for c in configs:
        for s in seeds:
            d = os.path.join(out, c, f"seed{s}")
            if os.path.exists(os.path.join(d, "done.json")):
                with open(os.path.join(d, "done.json")) as f, open(os.path.join(d, "train.log")) as g:
                    runs[c, s] = {"done": json.load(f), "train_log": g.read(), "log": read_log(d)}
    return runs


def check_flags(runs, configs, common):
    """Exit in one line if a finished run was launched (any `$ ` line of its train.log: the first run and every
    resume) with other train.py flags than the table would name, the common ones and its config's: a table of runs
    under other flags would be wrong without a word. Flags compare as a set of (flag, its values), in any order,
    `--flag=v` as `--flag v`, paths scrubbed, without what compare.py sets per run (OWNED_FLAGS)."""
    for (c, s), run in sorted(runs.items()):
        named = [*common, *shlex.split(configs[c])]
        want = flag_set(named)
        launches = [line[2:] for line in run["train_log"].splitlines() if line.startswith("$ ")]
        for launch in launches or [shlex.join(run["done"]["cmd"])]:
            got = shlex.split(launch)[2:]                                    # (python, train.py)
            if flag_set(got) != want:
                sys.exit(f"error: {c} seed {s} ran with `{shlex.join(got)}`, not with the flags "
                         f"`{shlex.join(named) or '(none)'}` this table would name; "
                         f"give the train.py flags it ran with (the common ones after --)")


def flag_set(args):
    """train.py arguments -> the set of (flag, its values...) they set, in any order; OWNED_FLAGS left out, and
    --stop-iter, which only stops a run early to be resumed (the same numbers as a run straight through)."""
    pairs, args = [], [p for a in scrub(list(args)) for p in (a.split("=", 1) if a.startswith("--") else [a])]
    for a in args:
        if a.startswith("--") or not pairs:
            pairs.append([a])
        else:
            pairs[-1].append(a)
    return {tuple(p) for p in pairs if p[0] not in (*OWNED_FLAGS, "--stop-iter")}


def unfinished(runs, configs, seeds):
    return [(c, s) for c in configs for s in seeds if (c, s) not in runs]


def run_params(train_log):
    """-> the model's parameter count (embeddings included, as train.py prints it), rebuilt on the meta device from
    the last GPTConfig(...) line of a run's console log: no data, no weights; None without such a line."""
    found = re.findall(r"GPTConfig\((.*?)\)", train_log)
    if not found:
        return None
    import torch
    from model import GPT, GPTConfig
    fields = dict(kv.split("=") for kv in found[-1].split(", "))
    with torch.device("meta"):
        return GPT(GPTConfig(**{k: (float if "." in v else int)(v) for k, v in fields.items()})).num_params()


PATH_CHARS = r"[\w.~+@-]"
PYTHON = re.compile(rf"(?<![\w.~/<>-])/(?:{PATH_CHARS}+/)*bin/python[\d.]*(?!{PATH_CHARS}|/)")
ABS_PATH = re.compile(rf"(?<![\w.~/<>-])/(?={PATH_CHARS})(?:{PATH_CHARS}+/)*({PATH_CHARS}*)")


def scrub(x):
    """A run's records without this machine's paths: the repo's become repo-relative, the interpreter `python`,
    any other absolute path .../its-last-part (shell-safe). Idempotent, so a repacked pack is the same bytes."""
    if isinstance(x, dict):
        return {k: scrub(v) for k, v in x.items()}
    if isinstance(x, list):
        return [scrub(v) for v in x]
    if not isinstance(x, str):
        return x
    x = PYTHON.sub("python", x.replace(REPO + os.sep, ""))
    return ABS_PATH.sub(lambda m: ".../" + m.group(1), x)


def write_pack(path, header, runs):
    """The header line, then one line per run sorted by (config, seed), gzip with mtime 0 and no file name: the
    same runs give the same bytes."""
    lines = [{"format": PACK_FORMAT, **header}] + [{"config": c, "seed": s, **runs[c, s]} for c, s in sorted(runs)]
    data = "".join(json.dumps(scrub(x), ensure_ascii=False) + "\n" for x in lines).encode()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as z:
        z.write(data)
    os.replace(path + ".tmp", path)


def read_pack(path):
    """-> (the pack's header: configs, seeds, versus, common; {(config, seed): {"done", "train_log", "log"}})."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            header, *runs = [json.loads(line) for line in f if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as e:       # not gzip, cut short, not JSON lines, empty
        sys.exit(f"error: {path} is not a readable compare.py pack ({type(e).__name__}: {e}); restore it or pack "
                 f"its sweep again (--pack-only)")
    if not isinstance(header, dict) or header.pop("format", None) != PACK_FORMAT:
        sys.exit(f"error: {path} is not a compare.py pack (its first line has no format {PACK_FORMAT!r})")
    return header, {(r.pop("config"), r.pop("seed")): r for r in runs}


def stem(path):
    """dev/runs/l2-1400.jsonl.gz -> dev/runs/l2-1400 (other paths unchanged): where a pack's table goes."""
    return path[:-len(PACK)] if path.endswith(PACK) else path


def pack_sweep(out, pack):
    """Write the finished sweep in <out> as one file, its pack (module docstring), with the inputs of its last
    report (<out>/results.json), and beside it that table rebuilt from the pack. -> the table's path."""
    try:
        with open(os.path.join(out, "results.json")) as f:
            last = json.load(f)
    except FileNotFoundError:
        sys.exit(f"error: no {out}/results.json: report the sweep first (its command again, or with --report-only)")
    header = {"configs": {c: r["flags"] for c, r in last["rows"].items()}, "seeds": last["seeds"],
              "versus": last["versus"], "common": last["common"]}
    runs = folder_runs(out, header["configs"], header["seeds"])
    todo = unfinished(runs, header["configs"], header["seeds"])
    if todo:
        sys.exit(f"error: a pack holds finished runs only; {len(todo)} are not (first: {todo[0][0]} seed {todo[0][1]})")
    for run in runs.values():
        if "params" not in run["done"]:
            run["done"]["params"] = run_params(run["train_log"])
    write_pack(pack, header, runs)
    header, runs = read_pack(pack)                          # the table from the pack: proof it holds what it needs
    md = stem(pack) + ".md"
    report(runs, header["configs"], header["seeds"], header["versus"], header["common"], md)
    if os.path.exists(os.path.join(out, "results.md")):
        with open(os.path.join(out, "results.md")) as a, open(md) as b:
            if scrub(a.read()) != b.read():
                sys.exit(f"error: {md}, the table from the pack, differs from {out}/results.md")
    print(f"wrote {pack} ({os.path.getsize(pack):,} bytes, {len(runs)} runs) and {md}")
    return md


def unpack(pack, out):
    """Write a pack's runs into <out>/<config>/seed<s>/ (done.json last), with <out>/results.json naming the
    table's inputs (so --pack-only packs them again)."""
    header, runs = read_pack(pack)
    configs = header.pop("configs")
    for (c, s), run in runs.items():
        d = os.path.join(out, c, f"seed{s}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "log.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in run["log"]))
        with open(os.path.join(d, "train.log"), "w") as f:
            f.write(run["train_log"])
        with open(os.path.join(d, "done.json"), "w") as f:
            json.dump(run["done"], f)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({**header, "rows": {c: {"flags": flags} for c, flags in configs.items()}}, f, indent=1)
    print(f"unpacked {len(runs)} runs of {pack} into {out}")


def mean_std(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def mean_se(xs):
    """-> (mean, standard error sd/√n) of per-seed values (0 for one seed)."""
    m, sd = mean_std(xs)
    return m, sd / math.sqrt(len(xs))


def gap_closed(m, b, base):
    """Per-seed finals of a config M, of B and of the baseline (same seeds, same order) -> (1 - gap_M / gap_B of
    the means, its jackknife s.e.): r = (L̄_B - L̄_M) / (L̄_B - L̄_base); each r_i leaves seed i out, and
    s.e. = sqrt((n-1)/n · Σ (r_i - r̄)²) (0 for one seed)."""
    def ratio(keep):
        lb = statistics.fmean(b[i] for i in keep)
        return (lb - statistics.fmean(m[i] for i in keep)) / (lb - statistics.fmean(base[i] for i in keep))
    n = len(m)
    if n < 2:
        return ratio(range(n)), 0.0
    loo = [ratio([j for j in range(n) if j != i]) for i in range(n)]
    return ratio(range(n)), math.sqrt((n - 1) / n * sum((r - statistics.fmean(loo)) ** 2 for r in loo))


def versus_list(versus):
    """--versus's names as a list: a pack or results.json holds one name as a string (how older sweeps wrote it)."""
    return [versus] if isinstance(versus, str) else list(versus)


def versus_field(versus):
    """The inverse of versus_list, for results.json and packs: one name stays a string, so older packs repack to
    the same bytes."""
    return versus[0] if len(versus) == 1 else list(versus)


def summarize(runs, configs, seeds, versus):
    """{(config, seed): run} (folder_runs or read_pack) -> ({config: row dict}, {config: {seed: log records}}).
    versus: a name or a list of names (--versus); the first is the B of the gap closed, and every one's paired
    difference goes in row["minus"][name] = (mean, s.e.)."""
    versus = versus_list(versus)
    logs = {c: {s: runs[c, s]["log"] for s in seeds} for c in configs}
    final = {c: {s: logs[c][s][-1]["val_loss"] for s in seeds} for c in configs}
    rows = {}
    for c in configs:
        row = {"flags": configs[c], "final": [final[c][s] for s in seeds]}
        row["mean"], row["std"] = mean_std(row["final"])
        row["gap"], row["gap_se"] = mean_se([final[c][s] - final["baseline"][s] for s in seeds])   # paired
        row["dtype"] = logs[c][seeds[0]][-1].get("dtype", "bfloat16")       # what the run's activations were
        b = versus[0]
        if b in configs and c not in ("baseline", b):
            row["gap_closed"], row["gap_closed_se"] = gap_closed(*([final[k][s] for s in seeds]
                                                                   for k in (c, b, "baseline")))
        for v in versus:
            if v in configs and c not in ("baseline", v):
                diff = [final[c][s] - final[v][s] for s in seeds]       # paired: same seed, same data order
                row.setdefault("minus", {})[v] = mean_se(diff)
        speeds = [statistics.median([r["tok_per_s"] for r in logs[c][s][1:]] or [logs[c][s][-1]["tok_per_s"]])
                  for s in seeds]
        row["tok_per_s"] = statistics.fmean(speeds)
        osc = [logs[c][s][-1].get("fp4", {}).get("total", {}).get("oscillating") for s in seeds]
        row["oscillating"] = statistics.fmean(osc) if None not in osc else None
        rows[c] = row
    return rows, logs


def label(config, row):
    """The table's name for a row: the baseline is named for the dtype it ran in ("baseline (fp32)")."""
    return f"baseline ({DTYPE_NAMES.get(row['dtype'], row['dtype'])})" if config == "baseline" else config


DTYPE_NAMES = {"bfloat16": "bf16", "float32": "fp32"}


def write_table(md, rows, seeds, versus, common, json_path=None):
    ref = label("baseline", rows["baseline"])
    all_versus = versus_list(versus)
    versus = all_versus[0]                          # the B of the gap closed
    minus = {f"L - L_{v}": (lambda c, r, v=v: "{:+.4f} ± {:.4f}".format(*r["minus"][v]) if v in r.get("minus", {})
                            else "") for v in all_versus}
    columns = {                                     # header -> a row's cell; a column no row fills is left out
        "config": lambda c, r: label(c, r), "flags": lambda c, r: f"`{r['flags']}`",
        "final val_loss (mean ± std)": lambda c, r: f"{r['mean']:.4f} ± {r['std']:.4f}",
        "L - L_baseline": lambda c, r: f"{r['gap']:+.4f} ± {r['gap_se']:.4f}" if c != "baseline" else "",
        **minus,
        f"gap closed vs {versus}": lambda c, r:
            f"{r['gap_closed']:+.0%} ± {r['gap_closed_se']:.0%}" if "gap_closed" in r else "",
        "tok/s": lambda c, r: f"{r['tok_per_s']:,.0f}",
        "oscillating": lambda c, r: f"{r['oscillating']:.2%}" if r["oscillating"] is not None else ""}
    cells = {h: [cell(c, r) for c, r in rows.items()] for h, cell in columns.items()}
    heads = [h for h in columns if any(cells[h])]
    diffs = ", ".join(h for h in ("L - L_baseline", *minus) if h in heads)
    lines = [f"# FP4 vs {ref}: {len(rows)} configurations x {len(seeds)} seeds ({', '.join(map(str, seeds))})", "",
             f"Common train.py flags: `{shlex.join(common) or '(defaults)'}`."
             + (f" {diffs}: the loss differences paired per seed, mean ± standard error." if diffs else "")
             + (f" Gap closed vs `{versus}`: (L̄_{versus} - L̄) / (L̄_{versus} - L̄_baseline) of the means over seeds, "
                f"± its jackknife standard error." if f"gap closed vs {versus}" in heads else ""), "",
             "| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    lines += ["| " + " | ".join(cells[h][i] for h in heads) + " |" for i in range(len(rows))]
    b = rows.get(versus)
    if b is not None and versus != "baseline" and b["gap"] < 2 * b["gap_se"]:   # the ratio's denominator is noise
        lines += ["", f"Careful: {versus}'s own gap to {ref} ({b['gap']:+.4f} ± {b['gap_se']:.4f}) is under two "
                  f"standard errors, so the gap closed divides by noise; read L - L_{versus} instead."]
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"seeds": seeds, "versus": versus_field(all_versus), "common": common, "rows": rows}, f,
                      indent=1)
    return "\n".join(lines)


def plot(png, logs, seeds):
    """png: val loss against tokens, mean over seeds, shaded between the seeds' min and max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for c, by_seed in logs.items():
        runs = [by_seed[s] for s in seeds]
        tokens = [r["tokens"] for r in runs[0]]
        vals = [[r["val_loss"] for r in run] for run in runs]
        mean = [statistics.fmean(v) for v in zip(*vals)]
        line, = ax.plot(tokens, mean, label=label(c, {"dtype": runs[0][-1].get("dtype", "bfloat16")}))
        ax.fill_between(tokens, [min(v) for v in zip(*vals)], [max(v) for v in zip(*vals)], color=line.get_color(),
                        alpha=0.2)
    ax.set(xlabel="tokens", ylabel="val loss", title=f"val loss, mean and range over {len(seeds)} seeds")
    later = [r["val_loss"] for by_seed in logs.values() for s in seeds for r in by_seed[s][1:]]
    if later:                                       # leave out the untrained first eval, which dwarfs the rest
        ax.set_ylim(0.98 * min(later), 1.02 * max(later))
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def report(runs, configs, seeds, versus, common, md, json_path=None, png=None):
    """The table (md, and json_path if given) and the plot (png if given) from finished runs. -> the rows."""
    rows, logs = summarize(runs, configs, seeds, versus)
    print(write_table(md, rows, seeds, versus, common, json_path))
    if png:
        try:
            plot(png, logs, seeds)
        except ImportError:                             # optional: the tables are the result, the sweep succeeded
            print(f"note: {os.path.basename(png)} skipped (pip install matplotlib to draw it)", file=sys.stderr)
        else:
            print(f"wrote {md} and {png}")
    return rows


def main(argv=None):
    args, configs, common = parse_args(argv)
    if args.unpack:
        return unpack(args.pack, args.out)
    if args.pack_only:
        return pack_sweep(args.out, args.pack)
    if args.from_pack:                                       # a committed sweep: the table's inputs are the pack's
        header, runs = read_pack(args.pack)
        names = args.configs or list(header["configs"])
        missing = [c for c in names if c not in header["configs"]]
        if missing or "baseline" not in names:
            sys.exit(f"error: {args.pack} has no config {missing[0]!r} (it holds {list(header['configs'])})" if missing
                     else "error: the sweep needs the baseline config (no FP4): every gap is measured against it")
        lacking = [s for s in args.seeds or [] if s not in header["seeds"]]
        if lacking:
            sys.exit(f"error: {args.pack} has no seed {lacking[0]} (it holds {' '.join(map(str, header['seeds']))}); "
                     f"pick among those")
        absent = [v for v in args.versus or [] if v not in names]
        if absent:
            sys.exit(f"error: --versus {absent[0]} is not among the configs reported ({' '.join(names)}); add it to "
                     f"--configs or name one of them")
        configs = {c: header["configs"][c] for c in names}
        kept = [v for v in versus_list(header["versus"]) if v in names]     # a B left out: the next one is B
        args.seeds, args.versus = args.seeds or header["seeds"], args.versus or kept or versus_list(header["versus"])
        common, out = header["common"], stem(os.path.normpath(args.out))
        md, json_path, png = out + ".md", None, None if args.no_plot else out + ".png"
    else:
        runs = folder_runs(args.out, configs, args.seeds)
        check_flags(runs, configs, common)
        md, json_path = os.path.join(args.out, "results.md"), os.path.join(args.out, "results.json")
        png = None if args.no_plot else os.path.join(args.out, "loss.png")
    todo = unfinished(runs, configs, args.seeds)
    total = len(configs) * len(args.seeds)
    if args.report_only:
        if todo:
            sys.exit(f"error: --report-only needs every run finished; {len(todo)} of {total} are not (first: "
                     f"{todo[0][0]} seed {todo[0][1]}); rerun without --report-only to finish them")
        return report(runs, configs, args.seeds, args.versus, common, md, json_path, png)
    print(f"compare: {total} runs ({len(configs)} configs x {len(args.seeds)} seeds) in {args.out}; "
          f"{total - len(todo)} already finished, {len(todo)} to run, {args.parallel} at a time")
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    failed = []
    with ThreadPoolExecutor(args.parallel) as pool, tqdm(total=len(todo), desc="sweep", unit="run") as bar:
        jobs = {pool.submit(run_one, os.path.join(args.out, c, f"seed{s}"), configs[c], common, s, threads): (c, s)
                for c, s in todo}
        for job in as_completed(jobs):
            err = job.result()
            if err:
                failed.append(f"{jobs[job][0]} seed {jobs[job][1]}: {err}")
            bar.update()
    if failed:
        sys.exit("error: some runs failed (fix and rerun the same command to finish the sweep):\n  " + "\n  ".join(failed))
    runs = folder_runs(args.out, configs, args.seeds)
    check_flags(runs, configs, common)
    return report(runs, configs, args.seeds, args.versus, common, md, json_path, png)


if __name__ == "__main__":
    main()

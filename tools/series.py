"""
series.py: the tokens-per-parameter series. Each SWEEP is a finished tools/compare.py sweep of the same
configurations, seeds and model at one token budget (only --max-iters differs); from their logs alone it writes
<out>/series.md (per budget and config: final val_loss; L - L_baseline and L - L_versus, paired per seed, mean ±
standard error; how each gap moved from the smallest budget to the largest, per seed), series.json and series.png.

    python tools/series.py docs/runs/l2-500 docs/runs/l2-1400 docs/runs/l2-4000 --out docs/runs/l2-series \
        --configs baseline nvidia tetrajet quartet2 --seeds 1337 1338 1339 1340 1341 1342

Tokens per parameter counts every parameter (embeddings included, as train.py prints them), with the model rebuilt
on the meta device from the GPTConfig line of a run's train.log. "Moved" pairs a seed's runs across budgets: same
init and data order, a longer schedule.
"""

import argparse
import json
import os
import re
import sys

if __package__ in (None, ""):                   # run as a script (python tools/X.py): the repo root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch

from model import GPT, GPTConfig
from tools import compare


def run_params(run_dir):
    """-> the model's parameter count (embeddings included, as train.py prints it), rebuilt from the GPTConfig
    line of the run's train.log on the meta device: the logs alone, no data and no weights."""
    found = re.findall(r"GPTConfig\((.*?)\)", open(os.path.join(run_dir, "train.log")).read())
    if not found:
        sys.exit(f"error: no 'GPTConfig(...)' line in {run_dir}/train.log; it is not a train.py run's console log")
    fields = dict(kv.split("=") for kv in found[-1].split(", "))
    with torch.device("meta"):
        return GPT(GPTConfig(**{k: (float if "." in v else int)(v) for k, v in fields.items()})).num_params()


def series(args, configs):
    """The tokens-per-parameter series: every SWEEP is the same configs x seeds at one budget. Per budget and
    config: final val_loss, the gap to the baseline and L - L_versus (paired per seed); per config, how each
    moved from the smallest budget to the largest (per seed, then mean ± s.e.). -> {sweep: {config: row}}."""
    for c in configs:
        missing = [f"{d}/{c}/seed{s}" for d in args.sweeps for s in args.seeds
                   if not os.path.exists(os.path.join(d, c, f"seed{s}", "done.json"))]
        if missing:
            sys.exit(f"error: the series needs every run of every sweep finished; {len(missing)} are not (first: "
                     f"{missing[0]}); finish them with the sweep's own command first")
    budgets, finals, table = [], {}, {}
    for d in args.sweeps:
        first = os.path.join(d, "baseline", f"seed{args.seeds[0]}")
        tokens, params = compare.read_log(first)[-1]["tokens"], run_params(first)
        if budgets and params != budgets[0]["params"]:
            sys.exit(f"error: {d} trains a {params:,}-parameter model, {budgets[0]['sweep']} a "
                     f"{budgets[0]['params']:,}-parameter one; a series varies the tokens only")
        budgets.append({"sweep": d, "tokens": tokens, "params": params, "tpp": tokens / params})
        rows, logs = compare.summarize(d, dict.fromkeys(configs, ""), args.seeds, args.versus)   # reads each log once
        finals[d] = {c: rows[c]["final"] for c in configs}
        for c in configs:
            if logs[c][args.seeds[0]][-1]["tokens"] != tokens:
                sys.exit(f"error: {d}/{c} trained on a different number of tokens than {d}/baseline; a budget's "
                         f"configs must share one token count")
        table[d] = {}                                    # compare.summarize's paired gaps, as (mean, s.e.) pairs
        for c, r in rows.items():
            table[d][c] = {"final": r["final"], "mean_std": (r["mean"], r["std"])}
            if c != "baseline":
                table[d][c]["gap"] = (r["gap"], r["gap_se"])
            if "minus_versus" in r:
                table[d][c]["vs"] = (r["minus_versus"], r["minus_versus_se"])
    lo, hi = args.sweeps[0], args.sweeps[-1]
    move = {c: compare.mean_se([(h - hb) - (l - lb) for h, hb, l, lb in zip(finals[hi][c], finals[hi]["baseline"],
                                                                 finals[lo][c], finals[lo]["baseline"])])
            for c in configs if c != "baseline"}
    heads = " | ".join(f"{b['tpp']:.1f} tok/param ({b['tokens'] / 1e6:.2f}M)" for b in budgets)
    fmt = lambda ms: f"{ms[0]:+.4f} ± {ms[1]:.4f}"
    lines = [f"# Tokens per parameter: {len(configs)} configurations x {len(args.seeds)} seeds "
             f"({', '.join(map(str, args.seeds))}) x {len(budgets)} budgets", "",
             f"Sweeps: {', '.join(f'`{d}`' for d in args.sweeps)}; parameters {budgets[0]['params']:,} (embeddings "
             f"included). Every difference is paired per seed (same init and data order), mean ± standard error. "
             f"Moved: the gap at the largest budget minus the gap at the smallest, per seed.", "",
             "Final val_loss (mean ± std):", "", f"| config | {heads} |", "|---" * (len(budgets) + 1) + "|"]
    lines += [f"| {c} | " + " | ".join(f"{table[d][c]['mean_std'][0]:.4f} ± {table[d][c]['mean_std'][1]:.4f}"
                                         for d in args.sweeps) + " |" for c in configs]
    lines += ["", "L - L_baseline (paired):", "", f"| config | {heads} | moved |", "|---" * (len(budgets) + 2) + "|"]
    lines += [f"| {c} | " + " | ".join(fmt(table[d][c]["gap"]) for d in args.sweeps) + f" | {fmt(move[c])} |"
              for c in configs if c != "baseline"]
    if any("vs" in r for r in table[lo].values()):
        lines += ["", f"L - L_{args.versus} (paired):", "", f"| config | {heads} |", "|---" * (len(budgets) + 1) + "|"]
        lines += [f"| {c} | " + " | ".join(fmt(table[d][c]["vs"]) for d in args.sweeps) + " |"
                  for c in configs if "vs" in table[lo][c]]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "series.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "series.json"), "w") as f:
        json.dump({"seeds": args.seeds, "versus": args.versus, "budgets": budgets, "table": table, "moved": move},
                  f, indent=1)
    print("\n".join(lines))
    if not args.no_plot:
        try:
            plot_series(args.out, budgets, table, configs, args.versus)
        except ImportError:
            sys.exit(f"error: series.png needs matplotlib (pip install matplotlib); {args.out}/series.md is written")
        print(f"wrote {args.out}/series.md and {args.out}/series.png")
    return table


def plot_series(out, budgets, table, configs, versus):
    """series.png: each config's gap to the baseline (left) and to `versus` (right) against tokens per parameter,
    mean ± standard error over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100)
    x = [b["tpp"] for b in budgets]
    for ax, key, name in ((axes[0], "gap", "L - L_baseline"), (axes[1], "vs", f"L - L_{versus}")):
        for c in configs:
            rows = [table[b["sweep"]][c] for b in budgets]
            if key in rows[0]:
                ax.errorbar(x, [r[key][0] for r in rows], yerr=[r[key][1] for r in rows], marker="o", capsize=3,
                            label=c, color=f"C{configs.index(c)}")           # one colour per config, both panels
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xscale="log", xlabel="tokens per parameter", ylabel=f"{name} (paired, ± s.e.)")
        ax.set_xticks(x, [f"{v:.1f}" for v in x])
        ax.minorticks_off()
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "series.png"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweeps", nargs="+", metavar="SWEEP", help="finished compare.py sweep folders, smallest budget first")
    p.add_argument("--out", required=True, help="where series.md, series.json and series.png go")
    p.add_argument("--configs", nargs="+", default=["baseline", "nvidia", "tetrajet", "quartet2"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1337, 1338, 1339])
    p.add_argument("--versus", default="nvidia", help="the B of L - L_B (default: nvidia)")
    p.add_argument("--no-plot", action="store_true", help="skip series.png")
    args = p.parse_args(argv)
    if "baseline" not in args.configs:
        p.error("the series needs the baseline config: every gap is measured against it")
    if len(args.sweeps) < 2:
        p.error("a series needs at least two sweeps (token budgets)")
    return series(args, args.configs)


if __name__ == "__main__":
    main()

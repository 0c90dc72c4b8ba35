"""
series.py: the tokens-per-parameter series. Each SWEEP is a finished tools/compare.py sweep of the same
configurations, seeds and model at one token budget (only --max-iters differs), as its pack (dev/runs/l2-500, i.e.
dev/runs/l2-500.jsonl.gz) or its run folder; from their logs alone it writes <out>.md (per budget and config: final
val_loss; L - L_baseline and L - L_versus, paired per seed, mean ± standard error; how each gap moved from the
smallest budget to the largest, per seed), <out>.json and <out>.png.

    python dev/series.py dev/runs/l2-500 dev/runs/l2-1400 dev/runs/l2-4000 --out dev/runs/l2-series \
        --configs baseline nvidia tetrajet quartet2 --seeds 1337 1338 1339 1340 1341 1342

Tokens per parameter counts every parameter (embeddings included, as train.py prints them): the count a pack
records per run, else the model rebuilt on the meta device from the GPTConfig line of a run's train.log. "Moved"
pairs a seed's runs across budgets: same init and data order, a longer schedule. <out>.png needs matplotlib:
without it series.py says so in one line and the tables are its result.
"""

import argparse
import json
import os
import sys

if __package__ in (None, ""):                   # run as a script (python dev/X.py): the repo root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import compare


def open_sweep(path, configs, seeds):
    """A finished sweep -> (its name, {(config, seed): run}): the run folder <name> if it is one, else the pack
    <name>.jsonl.gz (path may name either)."""
    name = compare.stem(os.path.normpath(path))
    if os.path.isdir(name):
        return name, compare.folder_runs(name, configs, seeds)
    if not os.path.exists(name + compare.PACK):
        sys.exit(f"error: {path} is neither a sweep folder nor a pack ({name}{compare.PACK}); name a finished "
                 f"compare.py sweep")
    header, runs = compare.read_pack(name + compare.PACK)
    for what, asked, held in (("config", configs, list(header["configs"])), ("seed", seeds, header["seeds"])):
        if any(x not in held for x in asked):
            sys.exit(f"error: {name + compare.PACK} has no {what} {next(x for x in asked if x not in held)} (it holds "
                     f"{' '.join(map(str, held))}); pick among those (--{what}s)")
    return name, runs


def params_of(run, where):
    """-> the run's parameter count: recorded in its done.json (every pack's run), else rebuilt from train.log."""
    params = run["done"].get("params") or compare.run_params(run["train_log"])
    if params is None:
        sys.exit(f"error: no 'GPTConfig(...)' line in {where}/train.log; it is not a train.py run's console log")
    return params


def series(args, configs):
    """The tokens-per-parameter series: every SWEEP is the same configs x seeds at one budget. Per budget and
    config: final val_loss, the gap to the baseline and L - L_versus (paired per seed); per config, how each
    moved from the smallest budget to the largest (per seed, then mean ± s.e.). -> {sweep: {config: row}}."""
    sweeps = dict(open_sweep(d, configs, args.seeds) for d in args.sweeps)
    missing = [f"{d}/{c}/seed{s}" for c in configs for d, runs in sweeps.items() for s in args.seeds
               if (c, s) not in runs]
    if missing:
        sys.exit(f"error: the series needs every run of every sweep finished; {len(missing)} are not (first: "
                 f"{missing[0]}); finish them with the sweep's own command first")
    budgets, finals, table = [], {}, {}
    for d, runs in sweeps.items():
        first = runs["baseline", args.seeds[0]]
        tokens, params = first["log"][-1]["tokens"], params_of(first, f"{d}/baseline/seed{args.seeds[0]}")
        if budgets and params != budgets[0]["params"]:
            sys.exit(f"error: {d} trains a {params:,}-parameter model, {budgets[0]['sweep']} a "
                     f"{budgets[0]['params']:,}-parameter one; a series varies the tokens only")
        budgets.append({"sweep": d, "tokens": tokens, "params": params, "tpp": tokens / params})
        rows, logs = compare.summarize(runs, dict.fromkeys(configs, ""), args.seeds, args.versus)
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
            if args.versus in r.get("minus", {}):
                table[d][c]["vs"] = tuple(r["minus"][args.versus])
    names = list(sweeps)
    lo, hi = names[0], names[-1]
    move = {c: compare.mean_se([(h - hb) - (l - lb) for h, hb, l, lb in zip(finals[hi][c], finals[hi]["baseline"],
                                                                 finals[lo][c], finals[lo]["baseline"])])
            for c in configs if c != "baseline"}
    heads = " | ".join(f"{b['tpp']:.1f} tok/param ({b['tokens'] / 1e6:.2f}M)" for b in budgets)
    fmt = lambda ms: f"{ms[0]:+.4f} ± {ms[1]:.4f}"                                       # noqa: E731
    lines = [f"# Tokens per parameter: {len(configs)} configurations x {len(args.seeds)} seeds "
             f"({', '.join(map(str, args.seeds))}) x {len(budgets)} budgets", "",
             f"Sweeps: {', '.join(f'`{d}`' for d in names)}; parameters {budgets[0]['params']:,} (embeddings "
             f"included). Every difference is paired per seed (same init and data order), mean ± standard error. "
             f"Moved: the gap at the largest budget minus the gap at the smallest, per seed.", "",
             "Final val_loss (mean ± std):", "", f"| config | {heads} |", "|---" * (len(budgets) + 1) + "|"]
    lines += [f"| {c} | " + " | ".join(f"{table[d][c]['mean_std'][0]:.4f} ± {table[d][c]['mean_std'][1]:.4f}"
                                         for d in names) + " |" for c in configs]
    lines += ["", "L - L_baseline (paired):", "", f"| config | {heads} | moved |", "|---" * (len(budgets) + 2) + "|"]
    lines += [f"| {c} | " + " | ".join(fmt(table[d][c]["gap"]) for d in names) + f" | {fmt(move[c])} |"
              for c in configs if c != "baseline"]
    if any("vs" in r for r in table[lo].values()):
        lines += ["", f"L - L_{args.versus} (paired):", "", f"| config | {heads} |", "|---" * (len(budgets) + 1) + "|"]
        lines += [f"| {c} | " + " | ".join(fmt(table[d][c]["vs"]) for d in names) + " |"
                  for c in configs if "vs" in table[lo][c]]
    out = compare.stem(os.path.normpath(args.out))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(out + ".json", "w") as f:
        json.dump({"seeds": args.seeds, "versus": args.versus, "budgets": budgets, "table": table, "moved": move},
                  f, indent=1)
    print("\n".join(lines))
    if not args.no_plot:
        try:
            plot_series(out + ".png", budgets, table, configs, args.versus)
        except ImportError:                             # optional: the tables are the result, the series succeeded
            print(f"note: {os.path.basename(out)}.png skipped (pip install matplotlib to draw it)", file=sys.stderr)
        else:
            print(f"wrote {out}.md, {out}.json and {out}.png")
    return table


def plot_series(png, budgets, table, configs, versus):
    """png: each config's gap to the baseline (left) and to `versus` (right) against tokens per parameter,
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
    fig.savefig(png)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="dev/series.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (see python dev/series.py --help)")
    p.add_argument("sweeps", nargs="+", metavar="SWEEP",
                   help="finished compare.py sweeps (packs or run folders), smallest budget first")
    p.add_argument("--out", required=True, help="where the series goes: <out>.md, <out>.json and <out>.png")
    p.add_argument("--configs", nargs="+", default=["baseline", "nvidia", "tetrajet", "quartet2"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1337, 1338, 1339])
    p.add_argument("--versus", help="the B of L - L_B (default: nvidia; its table left out where it is not among "
                   "--configs)")
    p.add_argument("--no-plot", action="store_true", help="skip <out>.png")
    args = p.parse_args(argv)
    if "baseline" not in args.configs:
        p.error("the series needs the baseline config: every gap is measured against it")
    if len(args.sweeps) < 2:
        p.error("a series needs at least two sweeps (token budgets)")
    if args.versus and (args.versus == "baseline" or args.versus not in args.configs):
        p.error(f"--versus {args.versus} must be one of the FP4 configs of --configs "
                f"({' '.join(c for c in args.configs if c != 'baseline')})")
    args.versus = args.versus or "nvidia"
    if len(set(args.seeds)) < len(args.seeds) or len(set(args.configs)) < len(args.configs):
        p.error("--seeds and --configs name each seed and config once")
    return series(args, args.configs)


if __name__ == "__main__":
    main()

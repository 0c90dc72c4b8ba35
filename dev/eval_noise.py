"""
eval_noise.py: how much of a val loss, and of a paired difference between two runs, is eval sampling.

    python dev/eval_noise.py runs/l2-500/nvidia/seed1337/ckpt.pt runs/l2-500/tetrajet/seed1337/ckpt.pt

(checkpoints of a live sweep, such as dev/powered_sweep.sh's runs/l2-500/: a committed pack holds none)

Each checkpoint's model (its FP4 recipe and state as trained) scores every window of its run's eval set (train.py's
eval_batches: --eval-iters x --batch-size windows of --block-size tokens) one window at a time. A window's loss
is the mean cross-entropy of its tokens, so the mean over windows is exactly train.py's val_loss. With n windows
of per-window standard deviation sd, the eval measures one model's loss to ± sd/√n; two models scored on the
same windows (--eval-set fixed, or any two configs of one seed) differ per window with a smaller sd_pair, and
the eval's share of their difference is ± sd_pair/√n. A sweep's paired differences are trustworthy when that
share is small beside them (issue 20 asks for below a fifth). Prints one line per model and per pair; --json
saves them.
"""

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import statistics
import sys

if __package__ in (None, ""):                   # run as a script (python dev/X.py): the repo root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
import torch.nn.functional as F

import sample
import train
from data.prepare import dataset_dir, load_dataset


def trained_model(path):
    """ckpt.pt (or its run directory) -> (TrainConfig, the model as it trained: its dtype, FP4 recipe and layer
    state, as sample.py rebuilds it; the val split)."""
    out_dir = path if os.path.isdir(path) else os.path.dirname(path)
    with contextlib.redirect_stderr(io.StringIO()):                 # sample.py's start-up lines are for sampling
        model, _, cfg, *_ = sample.load_model(out_dir, "cpu")      # (model, checkpoint, TrainConfig, ...)
    _, splits = load_dataset(dataset_dir(cfg.dataset), cfg.block_size)
    return cfg, model, splits["val"]


@torch.no_grad()
def window_losses(path):
    """-> (TrainConfig, [loss of each eval window]) for the checkpoint at `path`."""
    cfg, model, val = trained_model(path)
    losses = []
    for x, y in train.eval_batches(val, cfg, 0, 1, "cpu"):
        logits, _ = model(x)
        tok = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        losses += tok.view(y.shape).mean(dim=1).tolist()
    return cfg, losses


def main(argv=None):
    p = argparse.ArgumentParser(prog="dev/eval_noise.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (see python dev/eval_noise.py --help)")
    p.add_argument("checkpoints", nargs="+", help="ckpt.pt files (or run dirs) of runs with the same eval flags")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    for path in args.checkpoints:                    # every path checked before the first is scored
        if not os.path.exists(path):
            sys.exit(f"error: no checkpoint at {path} (a run's out dir holds ckpt.pt until it is deleted)")
        if not os.path.isdir(path) and os.path.basename(path) != "ckpt.pt":
            sys.exit(f"error: {path}: pass a run's ckpt.pt or its out dir (train.py names the checkpoint ckpt.pt)")
    folder = os.path.dirname(os.path.abspath(args.json)) if args.json else None
    if folder and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
        sys.exit(f"error: --json {args.json}: no writable folder {folder}; create it or give another path")
    per, sets = {}, {}
    for path in args.checkpoints:
        cfg, per[path] = window_losses(path)
        sets[path] = (cfg.dataset, cfg.eval_set, cfg.eval_iters, cfg.batch_size, cfg.block_size,
                      cfg.seed if cfg.eval_set == "seeded" else None)
    report = {"models": {}, "pairs": {}}
    for path, losses in per.items():
        n, sd = len(losses), statistics.stdev(losses) if len(losses) > 1 else math.nan     # one window: no spread
        report["models"][path] = dict(windows=n, val_loss=statistics.fmean(losses), window_sd=sd, se=sd / math.sqrt(n))
        print(f"{path}: val_loss {statistics.fmean(losses):.4f} over {n} windows, per-window sd {sd:.4f}, "
              f"eval s.e. ± {sd / math.sqrt(n):.4f}")
    for a, b in itertools.combinations(per, 2):
        if sets[a] != sets[b]:
            print(f"{a} and {b}: not the same eval windows (dataset, eval set, sizes or seed differ): no pair")
            continue
        diff = [u - v for u, v in zip(per[a], per[b])]
        n, sd = len(diff), statistics.stdev(diff) if len(diff) > 1 else math.nan
        report["pairs"][f"{a} - {b}"] = dict(difference=statistics.fmean(diff), pair_sd=sd, se=sd / math.sqrt(n))
        print(f"{a} - {b}: {statistics.fmean(diff):+.4f}, per-window sd {sd:.4f}, eval share ± {sd / math.sqrt(n):.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()

"""
snr.py: operator-level fidelity of the FP4 linear. For each recipe, run the three GEMMs of one linear layer
(fprop O = X Wᵀ, dgrad dX = dY W, wgrad dW = dYᵀ X) through fp4.FP4LinearFunction and report each output's
SNR against an fp64 reference, 10·log10(‖ref‖² / ‖ref − out‖²) in dB. Stochastic rounding and random
Hadamard signs differ per seed: the table shows the mean ± standard deviation over --seeds.

    python dev/snr.py                                   # outlier + Gaussian protocols, K in {128, 512, 2048}
    python dev/snr.py --dist outlier --k 2048 --no-rht  # an ablation: every recipe without its RHT
    python dev/snr.py --checkpoint out/ckpt.pt          # real X, W, dY of every FP4 layer of a trained model
    python dev/snr.py --grad --checkpoint out/ckpt.pt   # bias, noise, gain, cosine per GEMM and of the whole
                                                          # model's gradient: dev/estimator.py
    python dev/snr.py --help                            # every flag

Protocols (tensors X (M, K), W (N, K), dY (M, N)):
  gaussian  every entry N(0, 1)
  outlier   N(0, 1) + Bernoulli(0.005) · N(0, 100²): rare huge values, the published anchor's protocol
            (AMD ALTO NVFP4 report), where one outlier sets a per-tensor scale for everything else.
  student-t every entry Student-t with 2 degrees of freedom (z / sqrt((z1² + z2²) / 2)): heavy tails everywhere
  channels  N(0, 1) with 1% of the columns and 1% of the rows ×20: outlier channels (X's input features, W's
            matching columns) and outlier tokens (dY's rows), shaped as real activations and gradients are
Besides fp4.RECIPES (nvidia, tetrajet, quartet2, mxfp4): `tetrajet+oc` is TetraJet-v2 with OutControl (the
top 10% of X's channels by L2 norm, rounded up to 32, computed on the same X, kept in MXFP8); the preset
`nvidia-4over6` is NVIDIA's recipe with Four Over Six scales on both forward operands (TE's nvfp4_4over6="all",
MAE); the TetraJet-v2 ablations `tetrajet-rtn2` (its second backward operand rounded to nearest), `tetrajet-norht` and
`tetrajet-unaligned` change one knob each; --variant NAME=SPEC adds any recipe string (train.py's --fp4-recipe).
"""

import argparse
import sys
import os
import dataclasses

if __package__ in (None, ""):                   # run as a script (python dev/X.py): the repo root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from tqdm import tqdm

import fp4

OUTLIER_P, OUTLIER_STD = 0.005, 100.0
CHANNEL_P, CHANNEL_GAIN = 0.01, 20.0
DISTS = ("outlier", "gaussian", "student-t", "channels")
HEADERS = ("O (dB)", "dX (dB)", "dW (dB)")
VARIANTS = {                                   # label -> (base recipe, the fields it changes)
    "tetrajet+oc": ("tetrajet", {}),
    "tetrajet-rtn2": ("tetrajet", {"other_rounding": "nearest"}), "tetrajet-norht": ("tetrajet", {"rht": ()}),
    "tetrajet-unaligned": ("tetrajet", {"aligned": False}),
}
GRAD_RECIPES = ["nvidia", "nvidia-4over6", "tetrajet", "quartet2", "mxfp4"]   # --grad's default set


def make_tensor(shape, dist, gen):
    """-> fp32 (rows, cols) drawn from the protocol `dist` (module docstring), all from `gen`."""
    x = torch.randn(shape, generator=gen)
    if dist == "outlier":
        mask = torch.rand(shape, generator=gen) < OUTLIER_P
        x = x + mask * torch.randn(shape, generator=gen) * OUTLIER_STD
    elif dist == "student-t":
        chi2 = torch.randn(shape, generator=gen).square() + torch.randn(shape, generator=gen).square()
        x = x / (chi2 / 2).sqrt()
    elif dist == "channels":
        rows, cols = (torch.rand(n, generator=gen) < CHANNEL_P for n in shape)
        x = x * torch.where(rows, CHANNEL_GAIN, 1.0)[:, None] * torch.where(cols, CHANNEL_GAIN, 1.0)[None, :]
    return x


def snr_db(ref, out):
    """10·log10(‖ref‖² / ‖ref − out‖²), computed in fp64."""
    ref, out = ref.double(), out.double()
    return (10 * torch.log10(ref.square().sum() / (ref - out).square().sum())).item()


def fp4_gemms(recipe, x, w, dy, seed, columns=None):
    """-> (O, dX, dW) of the FP4 linear for one seed of SR noise and RHT signs; columns: OutControl's
    (outliers, inliers) or None."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    o = fp4.FP4LinearFunction.apply(x, w, recipe, torch.Generator().manual_seed(seed), columns)
    o.backward(dy)
    return o.detach(), x.grad, w.grad


def measure(recipe, x, w, dy, seeds, columns=None):
    """-> {"O"|"dX"|"dW": (mean dB, std dB)} over `seeds` runs against the fp64 reference."""
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    refs = (x64 @ w64.t(), dy64 @ w64, dy64.t() @ x64)
    runs = [[snr_db(r, o) for r, o in zip(refs, fp4_gemms(recipe, x, w, dy, seed, columns))] for seed in range(seeds)]
    cols = list(zip(*runs))
    return {name: (sum(c) / len(c), torch.tensor(c).std().item() if len(c) > 1 else 0.0)
            for name, c in zip(("O", "dX", "dW"), cols)}


def recipes(args):
    """The recipes to compare, each with the requested ablations applied -> {label: (Recipe, use OutControl)}."""
    out = {}
    for name in args.recipes:
        base_name, changes = VARIANTS.get(name, (name, {}))
        base, changes = fp4.RECIPES[base_name], dict(changes, name=name)
        if args.no_rht:
            changes["rht"] = ()
        if args.no_sr:
            changes.update(grad_rounding="nearest", other_rounding="nearest")
        if args.weight_tile and base.fmt == "nvfp4":
            changes["weight_tile"] = {"1x16": (1, 16), "16x16": (16, 16)}[args.weight_tile]
        if args.aligned is not None:
            changes["aligned"] = args.aligned == "on"
        try:
            out[name] = (dataclasses.replace(base, **changes), name.endswith("+oc"))
        except ValueError as e:                    # e.g. --no-rht on quartet2: MS-EDEN needs its RHT-128
            sys.exit(f"error: {e}; leave {name} out of --recipes or change the ablation")
    for spec in args.variant:                      # NAME=SPEC, a recipe string as train.py's --fp4-recipe reads it
        import shlex
        import config
        name, sep, recipe = spec.partition("=")
        if not sep or not name:
            sys.exit(f"error: --variant wants NAME=SPEC (a recipe string, e.g. nvidia[weight_tile=1x16]), got {spec!r}")
        if recipe.startswith("-"):                 # NAME=--fp4-recipe SPEC, train.py's flag, also reads
            recipe = config.parse_args(["--fp4", *shlex.split(recipe)]).get("fp4_recipe", config.TrainConfig.fp4_recipe)
        try:
            out[name] = (dataclasses.replace(fp4.parse_recipe(recipe), name=name), False)
        except ValueError as e:
            sys.exit(f"error: --variant {name}: {e}")
    return out


def capture_from_checkpoint(path, batches=1):
    """Real operands: load a train.py checkpoint, run `batches` training batches through the model in bf16
    (no FP4) and capture X, W and dY of every layer that the checkpoint ran in FP4 (of a baseline checkpoint:
    every layer `--fp4` would run in FP4). -> {name: (X, W, dY)}."""
    from dev.estimator import load_checkpoint_model
    ckpt, cfg, model, splits = load_checkpoint_model(path)       # a missing or unfit checkpoint: one line
    names = sorted({k.rsplit(".", 1)[0] for k in ckpt["model"] if k.endswith("_extra_state")})
    if not cfg.fp4:             # a baseline checkpoint (no recipe's own bins in its weights): the layers --fp4 converts
        import copy, contextlib, io
        with contextlib.redirect_stdout(io.StringIO()):           # convert_to_fp4's report is for train.py
            probe = fp4.convert_to_fp4(copy.deepcopy(model), keep_first_k=cfg.keep_first_k, keep_last_k=cfg.keep_last_k)
        names = sorted(n for n, m in probe.named_modules() if isinstance(m, fp4.FP4Linear))
    captured = {n: [None, model.get_submodule(n).weight.detach(), None] for n in names}
    hooks = []
    for n in names:
        layer = model.get_submodule(n)
        hooks += [layer.register_forward_hook(lambda m, i, o, n=n: captured[n].__setitem__(0, i[0].detach())),
                  layer.register_full_backward_hook(lambda m, gi, go, n=n: captured[n].__setitem__(2, go[0]))]
    gen = torch.Generator().manual_seed(0)
    ix = torch.randint(0, len(splits["train"]) - cfg.block_size - 1, (cfg.batch_size * batches,), generator=gen)
    data = splits["train"]
    tokens = [torch.from_numpy(data[i:i + cfg.block_size + 1].astype("int64")) for i in ix.tolist()]
    x, y = torch.stack([t[:-1] for t in tokens]), torch.stack([t[1:] for t in tokens])
    model(x, y)[1].backward()
    for h in hooks:
        h.remove()
    return {n: (xi.reshape(-1, xi.shape[-1]), w, dyi.reshape(-1, dyi.shape[-1]))
            for n, (xi, w, dyi) in captured.items()}


def print_table(title, rows, labels):
    print(f"\n{title}")
    print(f"| {'recipe':<14} | " + " | ".join(f"{h:>13}" for h in HEADERS) + " |")
    print("|" + "---|" * 4)
    for label, res in zip(labels, rows):
        cells = (f"{res[k][0]:6.2f} ± {res[k][1]:4.2f}" for k in ("O", "dX", "dW"))
        print(f"| {label:<14} | " + " | ".join(cells) + " |")


def writable(path, flag):
    """Exits with one line, before any work, if `flag`'s file cannot be written where it is asked for."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        sys.exit(f"error: {flag} {path}: no writable folder {folder}; create it or give another path")


def main(argv=None, prog="dev/snr.py", doc=__doc__):
    """prog and doc: dev/estimator.py runs this as `snr.py --grad` under its own name and docstring."""
    grad_only = prog != "dev/snr.py"              # --grad implied; the flags of the SNR tables alone hidden
    hide = lambda text: argparse.SUPPRESS if grad_only else text                        # noqa: E731
    grad = lambda text: text if grad_only else "--grad: " + text                        # noqa: E731
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.error = lambda message: sys.exit(f"error: {message} (see python {prog} --help)")
    p.add_argument("--recipes", nargs="+", choices=[*fp4.RECIPES, *VARIANTS],
                   help="default: " + " ".join(GRAD_RECIPES) if grad_only else "default: nvidia nvidia-4over6 tetrajet "
                        "tetrajet+oc quartet2 mxfp4 (with --grad: " + " ".join(GRAD_RECIPES) + ")")
    p.add_argument("--dist", nargs="+", default=["outlier", "gaussian"], choices=DISTS)
    p.add_argument("--k", nargs="+", type=int, default=[128, 512, 2048], help="in features (fprop's K)")
    p.add_argument("--m", type=int, default=1024, help="tokens (wgrad's K)")
    p.add_argument("--n", type=int, default=1024, help="out features (dgrad's K)")
    p.add_argument("--seeds", type=int, default=3, help=hide("SR/RHT seeds to average over"))
    p.add_argument("--no-rht", action="store_true", help="ablation: no Hadamard transform in any recipe")
    p.add_argument("--no-sr", action="store_true", help="ablation: round to nearest everywhere")
    p.add_argument("--weight-tile", choices=["1x16", "16x16"], help="ablation: W's scale tile (NVFP4 recipes)")
    p.add_argument("--aligned", choices=["on", "off"], help="ablation: force backward operand alignment on/off")
    p.add_argument("--checkpoint", help="the real X, W, dY of every FP4 layer of this train.py checkpoint (a ckpt.pt "
                   "or its run's folder) instead of the synthetic protocols, and the whole model's gradient"
                   if grad_only else "also measure on real X, W, dY of this train.py checkpoint (a ckpt.pt or its "
                   "run's folder)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC",
                   help="an extra recipe: a name and a recipe string as train.py's --fp4-recipe reads it, e.g. "
                        "'nv-1x16=nvidia[weight_tile=1x16]' (repeatable)")
    p.add_argument("--grad", action="store_true", help=hide("the gradient-estimator report (dev/estimator.py) instead"))
    p.add_argument("--draws", type=int, default=32, help=grad("independent FP4 draws per GEMM and of the model"))
    p.add_argument("--loss-batches", type=int, default=32, help=grad("validation batches for the forward loss delta"))
    p.add_argument("--json", help=grad("write every number to this file"))
    p.add_argument("--plot", help=grad("bias against noise, one point per recipe and GEMM (needs matplotlib; "
                                       "without it a note, and the rest is written)"))
    args = p.parse_args(argv)
    for bad, name in ((min(args.k) < 1 or args.m < 1 or args.n < 1, "--k, --m and --n (tensor sizes)"),
                      (args.seeds < 1, "--seeds"), (args.loss_batches < 1, "--loss-batches")):
        if bad:
            p.error(f"{name} must be >= 1")
    for flag in ("json", "plot"):
        if getattr(args, flag):
            writable(getattr(args, flag), f"--{flag}")
    if args.recipes is None:
        args.recipes = GRAD_RECIPES if args.grad else ["nvidia", "nvidia-4over6", "tetrajet", "tetrajet+oc", "quartet2",
                                                       "mxfp4"]
    if args.grad:
        return grad_report(p, args)
    if args.json or args.plot:
        p.error("--json and --plot belong to --grad")
    chosen = recipes(args)
    captured = capture_from_checkpoint(args.checkpoint) if args.checkpoint else {}    # first: a bad one fails at once

    def tables():                  # (title, key, X, W, dY): the synthetic protocols, then the checkpoint's layers
        for dist in args.dist:
            for k in args.k:
                gen = torch.Generator().manual_seed(1234 + k)
                x, w, dy = (make_tensor(s, dist, gen) for s in ((args.m, k), (args.n, k), (args.m, args.n)))
                yield f"{dist}, M={args.m} N={args.n} K={k}, {args.seeds} seeds", (dist, k), x, w, dy
        for name, (x, w, dy) in captured.items():
            yield (f"{name}: X {tuple(x.shape)}, W {tuple(w.shape)}", ("checkpoint", name), x.float(), w.float(),
                   dy.float())
    results = {}
    total = (len(args.dist) * len(args.k) + len(captured)) * len(chosen)
    with tqdm(total=total, desc="snr.py", unit="recipe", disable=None) as bar:     # on stderr, on a terminal only
        for title, key, x, w, dy in tables():
            rows = []
            for label, (recipe, oc) in chosen.items():
                columns = fp4.select_outlier_channels(x.norm(dim=0), 0.1) if oc else None
                rows.append(measure(recipe, x, w, dy, args.seeds, columns))
                results[(*key, label)] = rows[-1]
                bar.update()
            with tqdm.external_write_mode():                               # the bar steps aside for the table
                print_table(title, rows, list(chosen))
    return results


def grad_report(p, args):
    """snr.py --grad: dev/estimator.py on the checkpoint's layers (and whole model), or on the synthetic protocols."""
    from dev import estimator
    if any(r.endswith("+oc") for r in args.recipes):
        p.error("--grad has no OutControl variant (its channels would be calibrated on the measured batch itself)")
    if args.draws < 2:
        p.error("--draws must be at least 2 (noise and the bias floor need two draws)")
    chosen = {label: recipe for label, (recipe, _) in recipes(args).items()}
    if args.checkpoint:
        operands = {n: (x.float(), w.float(), dy.float()) for n, (x, w, dy) in capture_from_checkpoint(args.checkpoint).items()}
    else:
        operands = {}
        for dist in args.dist:
            for k in args.k:
                gen = torch.Generator().manual_seed(1234 + k)
                operands[f"{dist} K={k}"] = tuple(make_tensor(s, dist, gen) for s in ((args.m, k), (args.n, k), (args.m, args.n)))
    report = estimator.run(args, chosen, operands)
    estimator.print_report(report)
    if args.json:
        estimator.write_json(report, args.json)
    if args.plot:
        estimator.plot(report, args.plot)
    return report


if __name__ == "__main__":
    main()

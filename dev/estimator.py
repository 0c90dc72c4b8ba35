"""
estimator.py: every FP4 recipe as a gradient estimator: how biased, how noisy and how aligned each GEMM is, and
the whole model's gradient, measured directly in a minute instead of inferred from hours of training runs.
`python dev/estimator.py FLAGS` is `python dev/snr.py --grad FLAGS` (one parser, snr.py's); the quantities are
docs/numerics.md §12; results and their reading: dev/estimator.md.

    python dev/estimator.py --checkpoint out/ckpt.pt --draws 32           # every FP4 layer of a trained model
    python dev/estimator.py --checkpoint out/ckpt.pt --json grad.json --plot grad.png
    python dev/estimator.py --dist gaussian outlier --k 512               # synthetic operands, layers only
    python dev/estimator.py --help                                        # every flag

For one GEMM with exact product G (fp64) and N independent draws Ĝ_1..Ĝ_N of the recipe's FP4 GEMM (fresh SR
noise and RHT signs each), Ḡ = mean_k Ĝ_k:
    noise       sqrt(Σ_k ‖Ĝ_k − Ḡ‖² / (N−1)) / ‖G‖ the random part, per draw (unbiased for the variance)
    bias        sqrt(max(0, ‖Ḡ − G‖²/‖G‖² − noise²/N))
                                                   systematic error: the raw ‖Ḡ − G‖/‖G‖ also holds the mean's own
                                                   noise, noise/√N (at N = 32 a true 0.005 reads 0.013), removed
    bias_floor  2 · noise / √N                     2 s.e. of a zero bias: below it, unresolved
    gain        ⟨Ḡ, G⟩ / ⟨G, G⟩                    1 for an unbiased estimator; < 1 is shrinkage
    cosine      mean_k ⟨Ĝ_k, G⟩ / (‖Ĝ_k‖ ‖G‖)
Two references per GEMM: (a) `own`, the exact product of the operands the recipe's GEMM quantizes (for an aligned
recipe's backward that is dY Ŵ and dYᵀ X̂, the forward's dequantized tensors), and (b) `vs_network`, the
high-precision network's operands (dY W, dYᵀ X), whose difference from (a) is the misalignment. fprop is round
to nearest: its noise is 0 and its bias is the forward's quantization error.
The whole model (`model`): the gradient of every parameter, concatenated, for one fixed batch, against the same
network without FP4 (every FP4Linear's high_precision flag set, same weights): rel_error = sqrt(mean_k ‖ĝ_k − g‖²)/‖g‖, split into
deterministic = ‖ḡ − g‖/‖g‖ and noise = sqrt(mean_k ‖ĝ_k − ḡ‖²)/‖g‖; forward_loss_delta is the FP4 forward's
loss minus the high-precision forward's, same weights, over --loss-batches validation batches.

Operands come from the checkpoint's model in high precision on one training batch (snr.capture_from_checkpoint);
the FP4 GEMMs run on the fast path fastpaths.use picks for each recipe (fp4.KERNEL: the same bits as fp4.py).
"""

import contextlib
import json
import math
import os
import sys
from dataclasses import fields, replace

if __package__ in (None, ""):                   # run as a script (python dev/X.py): the repo root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from tqdm import tqdm

import fastpaths
import fp4

GEMMS = ("fprop", "dgrad", "wgrad")
FIELDS = ("bias", "bias_floor", "noise", "gain", "cosine")
MODEL_FIELDS = ("rel_error", "deterministic", "noise", "cosine")


def estimator_stats(draws, exact):
    """draws (N >= 2, ...) and exact (...) -> {bias, bias_floor, noise, gain, cosine} as floats (module docstring,
    docs/numerics.md §12), in fp64 over the flattened tensors; Running below, fed the draws one by one."""
    running = Running({"exact": exact})
    for d in draws:
        running.add(d)
    return running.stats("exact")


class Running:
    """The draws of one estimator folded in one at a time, so that N draws cost two vectors, not N (800 draws of a
    captured model's GEMMs once took 23 GB): in fp64, the mean and Σ_k (Ĝ_k − Ḡ)² per element by Welford's update
        δ = Ĝ_k − Ḡ_{k−1};  Ḡ_k = Ḡ_{k−1} + δ / k;  M2 += δ · (Ĝ_k − Ḡ_k)
    (differences taken before squaring: identical draws give exactly 0 noise), and per reference G in `refs`
    ({name: tensor}) the sum of the draws' cosines to G. (Σ_k ‖Ĝ_k − G‖² follows: ΣM2 + N ‖Ḡ − G‖².)"""

    def __init__(self, refs):
        self.refs = {name: G.double().reshape(-1) for name, G in refs.items()}
        self.norms = {name: G.norm() for name, G in self.refs.items()}
        self.n, self.mean, self.m2 = 0, None, None
        self.cosines = dict.fromkeys(refs, 0.0)

    def add(self, draw):
        d = draw.double().reshape(-1)
        self.n += 1
        if self.mean is None:
            self.mean, self.m2 = d.clone(), torch.zeros_like(d)
        else:
            delta = d - self.mean
            self.mean += delta / self.n
            self.m2 += delta * (d - self.mean)
        norm = torch.linalg.vector_norm(d)
        for name, G in self.refs.items():
            self.cosines[name] += (d @ G / (norm * self.norms[name]).clamp(min=1e-300)).item()

    def stats(self, ref):
        """-> estimator_stats's {bias, bias_floor, noise, gain, cosine} against the reference `ref`."""
        G, N, norm = self.refs[ref], self.n, self.norms[ref].item()
        assert N >= 2, "the noise needs two draws or more"
        noise = math.sqrt(self.m2.sum().item() / (N - 1)) / norm
        bias = math.sqrt(max(0.0, ((self.mean - G).norm().item() / norm) ** 2 - noise ** 2 / N))
        return {"bias": bias, "bias_floor": 2 * noise / math.sqrt(N), "noise": noise,
                "gain": (self.mean @ G).item() / norm ** 2, "cosine": self.cosines[ref] / N}


def each_draw(recipe, x, w, dy, draws, seed=0):
    """One layer's three GEMMs, `draws` times with independent noise: yields {"fprop"|"dgrad"|"wgrad": fp32} per
    draw. The quantizers run on fp4.KERNEL."""
    # fprop is round to nearest, the same every draw: one forward, then `draws` backward passes through its saved
    # graph, each drawing fresh noise and signs from the layer's generator
    xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp4.FP4LinearFunction.apply(xi, wi, recipe, torch.Generator().manual_seed(seed))
    for k in range(draws):
        dx, dw = torch.autograd.grad(y, (xi, wi), dy, retain_graph=k < draws - 1)
        yield {g: t.float() for g, t in zip(GEMMS, (y.detach(), dx, dw))}


def forward_operands(recipe, x, w):
    """-> the forward's dequantized (X̂, Ŵ), what fprop multiplies (an aligned backward's operands)."""
    return (fp4.fake_quant(x, recipe, dtype=x.dtype, four_over_six=fp4.four_over_six_of(recipe, "activations")),
            fp4.fake_quant(w, recipe, tile=recipe.weight_tile, dtype=x.dtype,
                           four_over_six=fp4.four_over_six_of(recipe, "weights")))


def layer_draws(recipe, x, w, dy, draws, seed=0):
    """each_draw's draws kept: -> ({gemm: (N, ...) fp32}, X̂, Ŵ). For tests and small N; layer_report streams."""
    got = list(each_draw(recipe, x, w, dy, draws, seed))
    return {g: torch.stack([d[g] for d in got]) for g in GEMMS}, *forward_operands(recipe, x, w)


def layer_report(recipe, x, w, dy, draws, seed=0):
    """-> {gemm: {FIELDS..., "vs_network": {FIELDS...}}} for one layer's operands X (N, in), W (out, in), dY (N, out),
    the draws folded in as they come (Running)."""
    x_hat, w_hat = forward_operands(recipe, x, w)
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    network = {"fprop": x64 @ w64.t(), "dgrad": dy64 @ w64, "wgrad": dy64.t() @ x64}
    own = dict(network)
    if recipe.aligned:
        own.update(dgrad=dy64 @ w_hat.double(), wgrad=dy64.t() @ x_hat.double())
    running = {g: Running({"own": own[g], "network": network[g]}) for g in GEMMS}
    for draw in each_draw(recipe, x, w, dy, draws, seed):
        for g in GEMMS:
            running[g].add(draw[g])
    return {g: dict(running[g].stats("own"), vs_network=running[g].stats("network")) for g in GEMMS}


@contextlib.contextmanager
def high_precision(layers):
    """with high_precision(layers): the FP4Linear layers run as plain linears (FP4Linear.high_precision), the same
    network without FP4; nothing is drawn inside, so their noise streams continue unchanged after it."""
    for layer in layers:
        layer.high_precision = True
    try:
        yield
    finally:
        for layer in layers:
            layer.high_precision = False


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1).double() if p.grad is not None else torch.zeros(p.numel(), dtype=torch.float64)
                      for p in model.parameters()])


def model_report(model, layers, batch, val_batches, draws):
    """Whole-model gradient of `batch` over `draws` FP4 draws against high_precision's, and the forward loss
    delta over `val_batches` -> ({MODEL_FIELDS...}, forward_loss_delta, its standard error over the batches: each
    batch's FP4 loss minus its own high-precision loss, a paired difference). `layers`: the model's FP4Linear."""
    x, y = batch
    model.zero_grad(set_to_none=True)
    with high_precision(layers):
        model(x, y)[1].backward()
    g = flat_grad(model)
    running = Running({"network": g})
    for k in tqdm(range(draws), desc="whole model", unit="draw", leave=False, disable=None):   # stderr, terminal only
        for i, layer in enumerate(layers):                  # a fresh, independent noise stream per draw
            layer.set_extra_state(dict(layer.get_extra_state(), seed=k * 1009 + i, rng=None))
        model.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        running.add(flat_grad(model))
    model.zero_grad(set_to_none=True)
    N, norm = running.n, g.norm().item()
    spread, offset = running.m2.sum().item(), (running.mean - g).norm().item()     # Σ‖ĝ_k − ḡ‖², ‖ḡ − g‖
    stats = {"rel_error": math.sqrt(spread / N + offset ** 2) / norm,            # mean_k ‖ĝ_k − g‖² = spread/N + offset²
             "deterministic": offset / norm,
             "noise": math.sqrt(spread / N) / norm,
             "cosine": running.cosines["network"] / N}
    with torch.no_grad():
        fp4_loss = [model(*b)[1].item() for b in val_batches]
        with high_precision(layers):
            deltas = [a - model(*b)[1].item() for a, b in zip(fp4_loss, val_batches)]
    mean = sum(deltas) / len(deltas)
    se = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (len(deltas) - 1) / len(deltas)) if len(deltas) > 1 else 0.0
    return stats, mean, se


def checkpoint_config(ckpt):
    """A checkpoint's TrainConfig. One written before the redesign (cfeb258) has bf16_first_k/bf16_last_k, read as
    keep_first_k/keep_last_k, and per-field recipe flags, ignored (the tools take their recipes from --recipes)."""
    import config
    renamed = {"bf16_first_k": "keep_first_k", "bf16_last_k": "keep_last_k"}
    known = {f.name for f in fields(config.TrainConfig)}
    saved = {renamed.get(k, k): v for k, v in ckpt["config"].items()}
    return config.TrainConfig(**{k: v for k, v in saved.items() if k in known and k not in config.PER_INVOCATION})


def load_checkpoint_model(path):
    """path: a ckpt.pt or its run's folder -> (the checkpoint dict, its TrainConfig, an fp32 GPT with its weights
    (no FP4), its dataset splits). A missing, unreadable or unfit checkpoint exits with one line."""
    import config
    import train
    from data.prepare import dataset_dir, load_dataset
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    ckpt, _ = config.load_checkpoint(path, "pass --checkpoint a ckpt.pt that train.py wrote, or its run's folder",
                                    "--checkpoint")
    if "model" not in ckpt or "dataset_meta" not in ckpt:
        sys.exit(f"error: {path} is not a checkpoint train.py wrote (no model or dataset_meta); pass one that is")
    cfg = checkpoint_config(ckpt)
    model, _ = train.build_model(replace(cfg, fp4=False), ckpt["dataset_meta"]["vocab_size"], torch.float32, "cpu")
    try:
        model.load_state_dict({k: v for k, v in ckpt["model"].items() if not k.endswith("_extra_state")})
    except RuntimeError as e:
        sys.exit(f"error: {path} does not fit the model its config builds (written by another version of model.py?): "
                 f"{str(e).splitlines()[0]}")
    _, splits = load_dataset(dataset_dir(cfg.dataset), cfg.block_size)
    return ckpt, cfg, model, splits


def fp4_model(path, recipe):
    """The checkpoint's model with every block linear the checkpoint ran in FP4 converted to `recipe` (its
    keep_first_k / keep_last_k kept) -> (cfg, model, [FP4Linear], splits)."""
    _, cfg, model, splits = load_checkpoint_model(path)
    fp4.convert_to_fp4(model, recipe, keep_first_k=cfg.keep_first_k, keep_last_k=cfg.keep_last_k)
    return cfg, model, [m for m in model.modules() if isinstance(m, fp4.FP4Linear)], splits


def batches(cfg, splits, split, n, seed):
    import train
    gen = torch.Generator().manual_seed(seed)
    return [train.get_batch(splits[split], cfg, 0, 1, gen, "cpu") for _ in range(n)]


def run(args, chosen, layer_operands):
    """args: snr.py's parsed flags (--draws, --checkpoint, --loss-batches); chosen: {label: Recipe};
    layer_operands: {layer name: (X, W, dY)} -> the report dict (the JSON's shape)."""
    report, kernel = {"draws": args.draws, "recipes": {}}, fp4.KERNEL
    try:
        for label, recipe in chosen.items():
            line = fastpaths.use("auto", "cpu", recipe)                     # sets fp4.KERNEL for this recipe
            print(f"{label}: {line.strip('!').strip()}", file=sys.stderr)
            report["recipes"][label] = recipe_report(args, recipe, layer_operands)
    finally:
        fp4.KERNEL = kernel
    return report


def recipe_report(args, recipe, layer_operands):
    """run()'s entry for one recipe: its layers and, with --checkpoint, its whole model."""
    operands = tqdm(layer_operands.items(), desc=f"{recipe.name}: layers", unit="layer", leave=False, disable=None)
    entry = {"layers": {name: layer_report(recipe, x, w, dy, args.draws, seed)
                        for seed, (name, (x, w, dy)) in enumerate(operands)}}
    if args.checkpoint:
        cfg, model, layers, splits = fp4_model(args.checkpoint, recipe)
        train_batch = batches(cfg, splits, "train", 1, 0)[0]
        entry["model"], entry["forward_loss_delta"], entry["forward_loss_delta_se"] = model_report(
            model, layers, train_batch, batches(cfg, splits, "val", args.loss_batches, 1), args.draws)
    return entry


def layer_mean(entry, gemm, field, ref=None):
    """A field of one GEMM, averaged over the layers (ref "vs_network" for the second reference)."""
    vals = [(v[gemm][ref] if ref else v[gemm])[field] for v in entry["layers"].values()]
    return sum(vals) / len(vals)


def print_report(report):
    n = report["draws"]
    print(f"\nper GEMM, mean over layers, {n} draws; bias (its noise term removed) against the GEMM's own operands, and its floor (2·noise/√N), "
          f"and against the high-precision network's")
    print("| recipe | GEMM | bias (floor) | noise | gain | cosine | bias vs network |")
    print("|---|---|---|---|---|---|---|")
    for label, entry in report["recipes"].items():
        for g in GEMMS:
            m = {f: layer_mean(entry, g, f) for f in FIELDS}
            print(f"| {label} | {g} | {m['bias']:.4f} ({m['bias_floor']:.4f}) | {m['noise']:.4f} | {m['gain']:.4f} | "
                  f"{m['cosine']:.4f} | {layer_mean(entry, g, 'bias', 'vs_network'):.4f} |")
    rows = [(label, e) for label, e in report["recipes"].items() if "model" in e]
    if rows:
        print(f"\nwhole model: gradient of one batch against the same weights without FP4 ({n} draws); forward "
              f"loss delta at those weights")
        print("| recipe | rel. error | deterministic | noise | cosine | forward loss delta ± s.e. |")
        print("|---|---|---|---|---|---|")
        for label, e in rows:
            m = e["model"]
            print(f"| {label} | {m['rel_error']:.4f} | {m['deterministic']:.4f} | {m['noise']:.4f} | {m['cosine']:.4f} | "
                  f"{e['forward_loss_delta']:+.5f} ± {e['forward_loss_delta_se']:.5f} |")


def write_json(report, path):
    """The report as compact JSON, every float to 6 significant digits (more than any of them resolves)."""
    def rounded(v):
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        return float(f"{v:.6g}") if isinstance(v, float) else v
    with open(path, "w") as f:
        json.dump(rounded(report), f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path}")


def plot(report, path):
    """Bias against noise, one point per recipe and GEMM (mean over layers), one colour per recipe."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:                          # optional: the table and --json are written, the run succeeded
        print(f"note: {os.path.basename(path)} skipped (pip install matplotlib to draw it)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8.4, 4.8))
    markers = {"fprop": "s", "dgrad": "o", "wgrad": "^"}
    for i, (label, entry) in enumerate(report["recipes"].items()):
        color = plt.get_cmap("tab20")(i % 20)
        for g in GEMMS:
            ax.scatter(layer_mean(entry, g, "noise"), layer_mean(entry, g, "bias"), color=color, marker=markers[g],
                       label=label if g == "dgrad" else None)
    for g, m in markers.items():
        ax.scatter([], [], color="black", marker=m, label=g)
    top = max(layer_mean(e, g, "noise") for e in report["recipes"].values() for g in GEMMS)
    ax.plot([0, top], [0, 2 * top / math.sqrt(report["draws"])], "k--", lw=0.8,
            label=f"floor 2·noise/√{report['draws']}: unbiased within it")
    ax.set_xlabel("noise  sqrt(Σ ‖Ĝ − Ḡ‖² / (N−1)) / ‖G‖")
    ax.set_ylabel("bias  sqrt(‖Ḡ − G‖²/‖G‖² − noise²/N)")
    ax.set_title(f"FP4 GEMMs as gradient estimators ({report['draws']} draws, mean over layers)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    """python dev/estimator.py FLAGS: snr.py --grad FLAGS, under this file's name and docstring."""
    from dev import snr
    return snr.main(["--grad", *(sys.argv[1:] if argv is None else argv)], prog="dev/estimator.py", doc=__doc__)


if __name__ == "__main__":
    main()

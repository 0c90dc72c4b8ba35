"""
config.py: what a run can be told, and what it refuses. One dataclass, one --flag per field (help text beside it),
read by train.py and sample.py. The config a run prints and saves in its checkpoint is the resolved one: schedules in
steps, the device and the activation dtype as they ran; --resume starts from it and refuses, in one line, a flag that
would change what the run computes unless --allow-config-change says that is meant.
"""

import argparse
import math
import os
import sys
from dataclasses import dataclass, field, fields, replace

import torch

import fastpaths
import fp4
from model import PRESETS

PRESET_NAMES = ", ".join(fp4.RECIPES)    # (inside TrainConfig the name fp4 is the --fp4 field)


def flag(default, help, choices=None):
    return field(default=default, metadata=dict(help=help, choices=choices))


@dataclass
class TrainConfig:
    # data
    dataset: str = flag("pystdlib", "name under data/, or a path, holding train.bin, val.bin, meta.pkl (pystdlib is built on first use)")
    batch_size: int = flag(16, "sequences per micro-batch per process")
    block_size: int = flag(128, "context length in tokens")
    grad_accum: int = flag(1, "micro-batches per optimizer step (per process)")
    # model
    model: str = flag("tiny", "size preset (TetraJet-v2's OLMo 2 sizes and a CPU one)", list(PRESETS))
    n_layer: int = flag(0, "override the preset's layer count (0 = keep)")
    n_head: int = flag(0, "override the preset's head count (0 = keep)")
    n_embd: int = flag(0, "override the preset's width (0 = keep)")
    mlp_hidden: int = flag(0, "override the preset's SwiGLU hidden width (0 = keep)")
    # FP4
    fp4: bool = flag(False, "every Linear inside the blocks in simulated FP4 (off = the high-precision baseline)")
    fp4_recipe: str = flag("tetrajet", f"a preset ({PRESET_NAMES}), optionally with field overrides: "
                           "tetrajet[rht=none,aligned=false] (fields: fp4.Recipe)")
    fp4_gemms: str = flag("", "the GEMMs in FP4, a comma list of fprop, dgrad, wgrad (the rest in high precision; "
                          "empty = the recipe's, all three); it becomes the recipe's gemms field")
    fp4_path: str = flag("auto", "quantizer implementation, the same bits on each (fastpaths.py)", ["auto", *fastpaths.PATHS])
    keep_first_k: int = flag(0, "keep the Linears of the first k blocks in high precision")
    keep_last_k: int = flag(0, "keep the Linears of the last k blocks in high precision")
    osci_reset: bool = flag(False, "OsciReset: snap oscillating FP4 weights to their bin centre (TetraJet-v2)")
    osci_period: int = flag(200, "steps between oscillation windows (shrunk to fit short runs)")
    osci_window: int = flag(50, "steps each window accumulates over")
    osci_threshold: float = flag(8.0, "reset weights whose sum|dQ(w)| / sum|dw| >= this")
    osci_start: float = flag(0.6, "first window: a step, or a fraction (< 1) of max_iters (measured even without the reset)")
    out_control: bool = flag(False, "OutControl: keep each FP4 layer's outlier input channels in MXFP8 (TetraJet-v2)")
    out_control_frac: float = flag(0.1, "fraction of input channels kept in MXFP8 (rounded up to 32, at most half)")
    out_control_step: float = flag(0.1, "calibration starts at this step, or this fraction (< 1) of max_iters")
    out_control_window: int = flag(50, "calibration steps (input-channel norms summed over them)")
    out_control_choice: str = flag("norm", "norm (the top by L2 norm) or random (as many at random: a control)", ["norm", "random"])
    fp4_probe: bool = flag(False, "at every eval: cosine and relative error of the FP4 gradient vs the high-precision one")
    # optimizer (AdamW on fp32 master weights) and schedule
    lr: float = flag(3e-3, "peak learning rate")
    min_lr: float = flag(3e-4, "final learning rate")
    lr_schedule: str = flag("cosine", "cosine, or wsd (warmup-stable-decay: the last 20% decays linearly)", ["cosine", "wsd"])
    warmup_iters: int = flag(20, "linear warmup steps")
    weight_decay: float = flag(0.1, "decoupled weight decay on matrices")
    beta1: float = flag(0.9, "AdamW beta1")
    beta2: float = flag(0.95, "AdamW beta2")
    grad_clip: float = flag(1.0, "clip the global grad norm to this (0 = off)")
    max_iters: int = flag(200, "optimizer steps; the LR schedule spans them")
    stop_iter: int = flag(0, "save and exit after this step (0 = run to max_iters); --resume continues")
    skip_nonfinite: bool = flag(False, "skip (and count) steps whose loss or gradient is NaN/Inf instead of stopping")
    # evaluation and logging
    eval_interval: int = flag(50, "evaluate, log FP4 health and save a checkpoint every this many steps")
    eval_iters: int = flag(10, "val batches per evaluation (the same batches every time)")
    eval_set: str = flag("seeded", "val windows: seeded (random, from --seed) or fixed (evenly spaced, the same for every seed)", ["seeded", "fixed"])
    log_interval: int = flag(10, "print a train line every this many steps")
    # system
    seed: int = flag(1337, "model init, data order and FP4 noise all follow from it")
    device: str = flag("auto", "auto (cuda > mps > cpu), cuda, mps, cpu", ["auto", "cuda", "mps", "cpu"])
    dtype: str = flag("auto", "activations: auto (bf16 where matmuls run it natively, else fp32), bfloat16, float32", ["auto", "bfloat16", "float32"])
    compile: bool = flag(False, "torch.compile the model: the FP4 layers keep their bits, the rest rounds differently (docs/usage.md)")
    out_dir: str = flag("out", "log.jsonl and ckpt.pt go here")
    resume: bool = flag(False, "continue from <out_dir>/ckpt.pt with its config (flags given must not change it)")
    allow_config_change: bool = flag(False, "with --resume: accept flags that change what the run computes (each is logged)")



PER_INVOCATION = ("resume", "stop_iter", "allow_config_change")   # not inherited from a checkpoint
# flags a resumed run may change without --allow-config-change: they change what is logged or how fast, not what
# is computed (every FP4 path gives the same bits); a longer --max-iters extends the run (its LR schedule with it)
RESUME_MAY_CHANGE = ("out_dir", "fp4_path", "log_interval", "eval_interval", "fp4_probe", "max_iters")


def parse_args(argv, doc=None, prog="train.py"):
    """-> the flags given (only those), typed. Unknown, abbreviated or malformed flags: one line."""
    p = argparse.ArgumentParser(prog=prog, description=doc, argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.error = lambda message: sys.exit(f"error: {message} (see python {prog} --help)")
    def to_bool(s):                                  # a ValueError becomes argparse's one line
        if s.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError(s)
        return s.lower() in ("1", "true", "yes")
    for f in fields(TrainConfig):
        kw = dict(help=f"{f.metadata['help']} (default: {f.default})".replace("%", "%%"), choices=f.metadata["choices"])
        if f.type is bool:
            kw.update(nargs="?", const=True, metavar="BOOL")
        p.add_argument("--" + f.name.replace("_", "-"), type=to_bool if f.type is bool else f.type, **kw)
    return vars(p.parse_args(argv))


def load_checkpoint(path, what="run without --resume to start fresh", flag="--out-dir"):
    """-> (the checkpoint dict, its TrainConfig); a missing or unreadable file exits with one line (what: the fix
    for a missing one; flag: the flag that names another)."""
    if not os.path.exists(path):
        sys.exit(f"error: no checkpoint at {path}; {what}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        known = {f.name for f in fields(TrainConfig)}          # a field since removed is ignored
        return ckpt, TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in known and k not in PER_INVOCATION})
    except Exception as e:
        sys.exit(f"error: checkpoint {path} is unreadable ({type(e).__name__}: {e}); delete it or choose another {flag}")


def load_config(given):
    """The flags given -> (resolved cfg, checkpoint or None, [changes a resumed run accepted, as log lines]).
    --resume: the checkpoint's config with the flags given over it, each compared once resolved (so repeating the
    original command line, --osci-start 0.6 or --dtype auto included, changes nothing)."""
    cfg = replace(TrainConfig(), **given)
    if not cfg.resume:
        return resolve(cfg), None, []
    ckpt, saved = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    cfg = resolve(replace(saved, **given))
    changes, refused = [], []
    for k in given:
        old, new = getattr(saved, k, None), getattr(cfg, k)
        if k in PER_INVOCATION or old == new:
            continue
        line = f"--{k.replace('_', '-')} {new} (the checkpoint's: {old})"
        if k == "max_iters" and new < ckpt["step"]:
            sys.exit(f"error: --max-iters {new} is below the checkpoint's step {ckpt['step']}; give at least {ckpt['step']}")
        (changes if k in RESUME_MAY_CHANGE or cfg.allow_config_change else refused).append(line)
    if refused:
        sys.exit(f"error: --resume with {refused[0]} would change what the run computes; drop the flag, or add "
                 f"--allow-config-change if you mean it{f' ({len(refused) - 1} more changed)' if len(refused) > 1 else ''}")
    if ckpt["step"] >= (cfg.stop_iter or cfg.max_iters):
        sys.exit(f"error: {cfg.out_dir}/ckpt.pt is already at step {ckpt['step']} (--max-iters {cfg.max_iters}"
                 f"{f', --stop-iter {cfg.stop_iter}' if cfg.stop_iter else ''}); give a larger --max-iters to extend it")
    return cfg, ckpt, changes


def check(cfg, given):
    """Contradictory or impossible settings -> exit with one line naming the flag and the fix; else the recipe."""
    size = {k: getattr(cfg, k) or v for k, v in PRESETS[cfg.model].items()}   # the preset, with overrides
    n_layer, n_embd, n_head = size["n_layer"], size["n_embd"], size["n_head"]
    try:
        recipe = fp4.parse_recipe(cfg.fp4_recipe) if cfg.fp4 else None
    except ValueError as e:
        sys.exit(f"error: {e} (--fp4-recipe)")
    fp4_only = [k for k in given if k.startswith(("fp4_", "keep_", "osci_", "out_control")) and k != "fp4_path"]
    for bad, msg in (
            (not cfg.fp4 and fp4_only, f"--{fp4_only[0].replace('_', '-') if fp4_only else ''} needs --fp4 (without it the model is the baseline)"),
            (cfg.fp4 and not cfg.out_control and any(k.startswith("out_control_") for k in given),
             "--out-control-frac/-step/-window/-choice have no effect without --out-control: add it or drop them"),
            (recipe and cfg.osci_reset and "fprop" not in recipe.gemms,
             "--osci-reset snaps weights to the forward's FP4 grid: it needs fprop among the FP4 GEMMs"),
            (recipe and cfg.out_control and not {"fprop", "wgrad"} & set(recipe.gemms),
             "--out-control keeps columns of fprop and wgrad in MXFP8: it needs one of them among the FP4 GEMMs"),
            (cfg.allow_config_change and not cfg.resume, "--allow-config-change only means something with --resume"),
            (min(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.mlp_hidden) < 0, "--n-layer/-head/-embd, --mlp-hidden must be >= 0 (0 = the preset's)"),
            (n_embd % n_head or n_embd // n_head % 2, f"--n-embd {n_embd} must split into --n-head {n_head} heads of even size"),
            (not 0 <= cfg.out_control_frac <= 0.5, "--out-control-frac must be between 0 and 0.5"),
            (not (0 <= cfg.keep_first_k and 0 <= cfg.keep_last_k and cfg.keep_first_k + cfg.keep_last_k <= n_layer),
             f"--keep-first-k + --keep-last-k must be between 0 and the model's {n_layer} blocks"),
            *((getattr(cfg, k) < 1, f"--{k.replace('_', '-')} must be >= 1") for k in (
                "batch_size", "block_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval")),
            (not 0 <= cfg.stop_iter <= cfg.max_iters, "--stop-iter must be between 0 and --max-iters"),
            (not (math.isfinite(cfg.lr) and cfg.lr > 0), "--lr must be a positive number"),
            (not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1), "--beta1 and --beta2 must be in [0, 1)"),
            (not (cfg.grad_clip >= 0 and cfg.weight_decay >= 0), "--grad-clip and --weight-decay must be >= 0 (0 = off)"),
            (not (cfg.osci_start >= 0 and cfg.out_control_step >= 0), "--osci-start and --out-control-step must be >= 0"),
            (not 0 < cfg.osci_window < cfg.osci_period, f"--osci-window must be between 1 and --osci-period - 1 "
             f"(as they run: window {cfg.osci_window}, period {cfg.osci_period})"),
            (not cfg.osci_threshold > 0, "--osci-threshold must be a positive number"),
            (not (math.isfinite(cfg.min_lr) and 0 <= cfg.min_lr <= cfg.lr), "--min-lr must be between 0 and --lr"),
            (not 0 <= cfg.warmup_iters <= cfg.max_iters, "--warmup-iters must be between 0 and --max-iters")):
        if bad:
            sys.exit(f"error: {msg}")
    return recipe


def resolve(cfg):
    """-> cfg as it will run: the device (auto: cuda > mps > cpu), the activation dtype (activation_dtype), and the
    OsciReset and OutControl schedules in steps: if fewer than two OsciReset periods fit after its start, the period
    shrinks to half the remaining steps and the window to at most a quarter of it (--max-iters 200: start 120,
    period 40, window 10); the OutControl window ends before the last step. Resolving twice changes nothing."""
    device = cfg.device if cfg.device != "auto" else \
        "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available() or device == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"error: --device {device}, but this torch sees no {device} device; use --device cpu or auto")
    start_of = lambda v: int(v * cfg.max_iters) if v < 1 else int(v)       # a fraction of max_iters, or a step
    start, period, window = start_of(cfg.osci_start), cfg.osci_period, cfg.osci_window
    if cfg.max_iters - start < 2 * period:
        period = max(2, (cfg.max_iters - start) // 2)
        window = max(1, min(window, period // 4))
    oc_start = start_of(cfg.out_control_step)
    if cfg.fp4 and cfg.fp4_gemms:                      # folded into the recipe string: one place says what ran
        cfg = replace(cfg, fp4_recipe=with_gemms(cfg.fp4_recipe, cfg.fp4_gemms), fp4_gemms="")
    return replace(cfg, device=device, dtype=str(activation_dtype(cfg.dtype, device)[0]).removeprefix("torch."),
                   osci_start=start, osci_period=period, osci_window=window, out_control_step=oc_start,
                   out_control_window=max(1, min(cfg.out_control_window, cfg.max_iters - oc_start - 1)))


def with_gemms(spec, gemms):
    """--fp4-recipe spec and --fp4-gemms "fprop,dgrad" -> the recipe string with gemms=fprop+dgrad; one line if either
    is wrong or they disagree."""
    names = gemms.replace("+", ",").split(",")
    try:
        recipe = fp4.parse_recipe(spec)
        changed = replace(recipe, gemms=tuple(sorted(names, key=fp4.GEMM_ORDER)))
    except ValueError as e:
        sys.exit(f"error: {e} (--fp4-recipe {spec} --fp4-gemms {gemms})")
    if "gemms=" in spec and changed.gemms != recipe.gemms:
        sys.exit(f"error: --fp4-gemms {gemms} and --fp4-recipe {spec} name different GEMMs; give them once")
    return str(changed)


def activation_dtype(requested, device_type):
    """-> (dtype, why). auto: bf16 on CUDA, and on a CPU only where it multiplies bf16 natively (AVX512-BF16 or AMX:
    without them torch's CPU bf16 matmul is ~40x slower than fp32); else fp32. The FP4 quantizers compute in fp32
    either way; only the high-precision parts and the GEMMs' output rounding differ."""
    if requested != "auto":
        return getattr(torch, requested), "as requested"
    if device_type == "cuda":
        return torch.bfloat16, "auto: CUDA multiplies bf16 natively"
    if device_type == "cpu" and any(getattr(torch.cpu, f"_is_{isa}_supported", lambda: False)() for isa in ("avx512_bf16", "amx_tile")):
        return torch.bfloat16, "auto: this CPU multiplies bf16 natively (AVX512-BF16 or AMX)"
    return torch.float32, f"auto: no native bf16 matmul on this {device_type} ({torch.backends.cpu.get_cpu_capability()})"

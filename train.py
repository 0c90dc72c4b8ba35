"""
train.py: train a GPT with simulated 4-bit (NVFP4 / MXFP4) linear layers, or in high precision (bf16 or fp32) as the baseline.

    python train.py --fp4 --osci-reset          # TetraJet-v2 on the offline default corpus, ~1 min on a 2-core CPU
    python train.py                             # the baseline (bf16 or fp32: --dtype), same everything else
    python train.py --fp4 --fp4-recipe nvidia   # NVIDIA's NVFP4 recipe
    torchrun --standalone --nproc_per_node=8 train.py --fp4 --model 150m --dataset <name>

Every field of TrainConfig is a --flag (`python train.py --help`); the resolved config is printed and saved
in every checkpoint. Writes <out_dir>/log.jsonl (one JSON object per eval) and <out_dir>/ckpt.pt; --resume
continues from the checkpoint exactly (same losses as an uninterrupted run).
"""

import argparse
import inspect
import json
import math
import os
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import fastpaths
import fp4
import fp4_training
from data.prepare import dataset_dir, load_dataset, prepare_pystdlib
from model import GPT, GPTConfig, PRESETS

# -----------------------------------------------------------------------------
# config: one dataclass, one flag per field (help text = the field's comment)

@dataclass
class TrainConfig:
    # data
    dataset: str = "pystdlib"     # name under data/, or a path, holding train.bin, val.bin, meta.pkl (auto-built)
    batch_size: int = 16          # sequences per micro-batch per process
    block_size: int = 128         # context length in tokens
    grad_accum: int = 1           # micro-batches per optimizer step (per process)
    # model
    model: str = "tiny"           # size preset: tiny, 70m, 150m, 370m (TetraJet-v2's OLMo 2 sizes)
    n_layer: int = 0              # override the preset's layer count (0 = keep)
    n_head: int = 0               # override the preset's head count (0 = keep)
    n_embd: int = 0               # override the preset's width (0 = keep)
    mlp_hidden: int = 0           # override the preset's SwiGLU hidden width (0 = keep)
    # FP4
    fp4: bool = False             # quantize every Linear inside the blocks to simulated FP4 (False = the high-precision baseline)
    fp4_recipe: str = "tetrajet"  # tetrajet, nvidia, quartet2 or mxfp4 (see fp4.RECIPES): the preset the next ten flags override
    fp4_outer: str = ""           # NVFP4 outer scale: tensor (NVIDIA) or 128 (TetraJet-v2 double-block); "" = the preset's
    fp4_weight_tile: str = ""     # W's scale tile in fprop and dgrad: 1x16 or 16x16; "" = the preset's
    fp4_rht: str = ""             # backward GEMMs with a random Hadamard transform: none, dgrad, wgrad, both; "" = the preset's
    fp4_rht_signs: str = ""       # RHT signs: fixed (TE's vector) or random (fresh per GEMM per step); "" = the preset's
    fp4_rht_size: str = ""        # RHT points: 16 (NVIDIA, TetraJet-v2) or 128 (Quartet II); "" = the preset's
    fp4_grad_rounding: str = ""   # rounding of dY in dgrad and wgrad: nearest, stochastic or eden (MS-EDEN); "" = the preset's
    fp4_other_rounding: str = ""  # rounding of W (dgrad) and X (wgrad): nearest, stochastic or eden; "" = the preset's
    fp4_aligned: str = ""         # backward from the dequantized forward X^, W^ (true) or from X, W (false); "" = the preset's
    fp4_4over6: str = ""          # Four Over Six block scales (NVFP4, fprop only): none, weights, activations, all; "" = the preset's
    fp4_4over6_error: str = ""    # the error Four Over Six picks a block's scale by: mae (TE's default) or mse; "" = the preset's
    fp4_path: str = "auto"        # quantizer implementation: auto, reference, compiled, cpu, triton (same bits; fastpaths.select)
    bf16_first_k: int = 0         # keep the Linears of the first k blocks in high precision
    bf16_last_k: int = 0          # keep the Linears of the last k blocks in high precision
    osci_reset: bool = False      # OsciReset: snap oscillating FP4 weights to their bin centre (TetraJet-v2 §4)
    osci_period: int = 200        # steps between oscillation windows (shrunk to fit short runs: resolve_schedules)
    osci_window: int = 50         # steps each window accumulates over
    osci_threshold: float = 8.0   # reset weights whose ratio sum|dQ(w)| / sum|dw| >= this
    osci_start: float = 0.6       # first window: a step, or a fraction (< 1) of max_iters (also measured without reset)
    out_control: bool = False     # OutControl: keep each FP4 layer's outlier input channels in MXFP8 (TetraJet-v2 §4)
    out_control_frac: float = 0.1  # fraction of input channels kept in MXFP8 (rounded up to 32, at most half)
    out_control_step: float = 0.1  # calibration starts at this step, or this fraction (< 1) of max_iters
    out_control_window: int = 50  # calibration steps (input-channel norms summed over them)
    out_control_choice: str = "norm"  # which channels: norm (the top by L2 norm, the method) or random (as many at random: a control)
    fp4_probe: bool = False       # at every eval: cosine and relative error of the FP4 gradient vs the high-precision one, same batch
    # optimizer (AdamW on fp32 master weights)
    lr: float = 3e-3              # peak learning rate
    min_lr: float = 3e-4          # final learning rate
    lr_schedule: str = "cosine"   # cosine or wsd (warmup-stable-decay, last 20% decays linearly)
    warmup_iters: int = 20        # linear warmup steps
    weight_decay: float = 0.1     # decoupled weight decay on matrices
    beta1: float = 0.9            # AdamW beta1
    beta2: float = 0.95           # AdamW beta2
    grad_clip: float = 1.0        # clip the global grad norm to this (0 = off)
    max_iters: int = 200          # optimizer steps; the LR schedule spans them
    stop_iter: int = 0            # save and exit after this step (0 = run to max_iters); --resume continues
    skip_nonfinite: bool = False  # skip (and count) steps whose loss or gradient is NaN/Inf instead of stopping
    # evaluation and logging
    eval_interval: int = 50       # evaluate val loss and save a checkpoint every this many steps
    eval_iters: int = 10          # val batches per evaluation (the same batches every time)
    eval_set: str = "seeded"      # which val windows: seeded (random, drawn from --seed) or fixed (evenly spaced, the same for every seed)
    log_interval: int = 10        # print a train line every this many steps
    # system
    seed: int = 1337              # model init, data order and FP4 noise all follow from it
    device: str = "auto"          # auto (cuda > mps > cpu), cuda, mps, cpu
    dtype: str = "auto"           # activation dtype: auto (bfloat16 where matmuls run it natively, else float32), bfloat16, float32
    compile: bool = False         # torch.compile the model
    out_dir: str = "out"          # log.jsonl and ckpt.pt go here
    resume: bool = False          # continue from <out_dir>/ckpt.pt (its config, overridden by the flags given)


PER_INVOCATION = ("resume", "stop_iter")      # flags that a resumed run does not inherit from the checkpoint
CHOICES = {"eval_set": ["seeded", "fixed"], "model": list(PRESETS), "fp4_recipe": list(fp4.RECIPES), "fp4_path": ["auto", *fastpaths.PATHS], "lr_schedule": ["cosine", "wsd"], "out_control_choice": ["norm", "random"],
           "device": ["auto", "cuda", "mps", "cpu"], "dtype": ["auto", "bfloat16", "float32"]}
# The recipe flags: each value -> the fp4.Recipe field it sets ("" = keep the preset's)
RECIPE_FLAGS = {
    "fp4_outer": ("outer", {"tensor": "tensor", "128": fp4.OUTER_BLOCK}),
    "fp4_weight_tile": ("weight_tile", {"1x16": (1, 16), "16x16": (16, 16)}),
    "fp4_rht": ("rht", {"none": (), "dgrad": ("dgrad",), "wgrad": ("wgrad",), "both": ("dgrad", "wgrad")}),
    "fp4_rht_signs": ("rht_signs", {"fixed": "fixed", "random": "random"}),
    "fp4_rht_size": ("rht_size", {str(n): n for n in fp4.RHT_SIZES}),
    "fp4_grad_rounding": ("grad_rounding", {r: r for r in fp4.QUANTIZER_ROUNDINGS}),
    "fp4_other_rounding": ("other_rounding", {r: r for r in fp4.QUANTIZER_ROUNDINGS}),
    "fp4_aligned": ("aligned", {"true": True, "false": False}),
    "fp4_4over6": ("four_over_six", {s: s for s in fp4.FOUR_OVER_SIX_SCOPES}),
    "fp4_4over6_error": ("four_over_six_error", {e: e for e in fp4.FOUR_OVER_SIX_ERRORS}),
}
CHOICES.update({flag: list(values) for flag, (_, values) in RECIPE_FLAGS.items()})


def parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):                      # "error: <what>" and nothing else (no usage dump)
        sys.exit(f"error: {message} (see python train.py --help)")


def parse_args(argv):
    """-> dict of the flags given (only those), typed. Unknown or malformed flags exit with one line."""
    helps = dict(re.findall(r"^\s+(\w+): .*?# (.*)$", inspect.getsource(TrainConfig), re.M))
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    for f in fields(TrainConfig):
        help_text = f"{helps[f.name]} (default: {f.default})".replace("%", "%%")       # argparse formats %
        flag, kw = "--" + f.name.replace("_", "-"), dict(help=help_text)
        if f.type is bool:
            p.add_argument(flag, type=parse_bool, nargs="?", const=True, metavar="BOOL", **kw)
        else:
            p.add_argument(flag, type=f.type, choices=CHOICES.get(f.name), metavar=f.name.upper()
                           if f.name not in CHOICES else None, **kw)
    return vars(p.parse_args(argv))


def check(cfg, given):
    """Contradictory or impossible settings: exit with one line naming the flag and the fix."""
    errors = [
        (not cfg.fp4 and any(k.startswith(("fp4_", "bf16_", "osci_", "out_control")) and k != "fp4_path"
                             for k in given),          # (--fp4-path only picks an implementation: harmless)
         "--fp4-recipe/--bf16-*-k/--osci-*/--out-control* need --fp4 (without it the whole model is bf16)"),
        (not 0 <= cfg.out_control_frac <= 0.5, "--out-control-frac must be between 0 and 0.5"),
        (cfg.fp4 and not cfg.out_control and any(k.startswith("out_control_") for k in given),
         "--out-control-frac/-step/-window/-choice have no effect without --out-control: add it or drop them"),
        (cfg.osci_reset and not cfg.fp4, "--osci-reset needs --fp4"),
        (min(cfg.batch_size, cfg.block_size, cfg.grad_accum, cfg.max_iters, cfg.eval_interval, cfg.eval_iters,
             cfg.log_interval) < 1, "sizes, intervals and --max-iters must be >= 1"),
        (not 0 <= cfg.stop_iter <= cfg.max_iters, "--stop-iter must be between 0 and --max-iters"),
        (cfg.min_lr > cfg.lr, "--min-lr must not exceed --lr"),
        (cfg.warmup_iters > cfg.max_iters, "--warmup-iters must not exceed --max-iters"),
    ]
    for bad, msg in errors:
        if bad:
            sys.exit(f"error: {msg}")
    if cfg.fp4:
        resolve_recipe(cfg)                                # a recipe flag combination that cannot work


def resolve_recipe(cfg):
    """The preset --fp4-recipe with the recipe flags applied -> fp4.Recipe, named after what changed (e.g.
    "tetrajet[rht=none]"). A combination fp4.Recipe rejects exits with its one line."""
    preset, changes, named = fp4.RECIPES[cfg.fp4_recipe], {}, []
    for flag, (field, values) in RECIPE_FLAGS.items():
        value = getattr(cfg, flag)
        if value and values[value] != getattr(preset, field):
            changes[field] = values[value]
            named.append(f"{flag[4:].replace('_', '-')}={value}")       # e.g. rht=none
    name = preset.name + (f"[{','.join(named)}]" if named else "")
    try:
        recipe = replace(preset, name=name, **changes)
    except ValueError as e:
        sys.exit(f"error: {e} (set by --fp4-recipe {cfg.fp4_recipe} and the --fp4-* recipe flags)")
    for flag in ("fp4_rht_signs", "fp4_rht_size"):
        if getattr(cfg, flag) and not recipe.rht:
            sys.exit(f"error: --{flag.replace('_', '-')} {getattr(cfg, flag)} has no effect: recipe {name} has no "
                     f"RHT (--fp4-rht none); drop it or set --fp4-rht")
    if cfg.fp4_4over6_error and recipe.four_over_six == "none":
        sys.exit(f"error: --fp4-4over6-error {cfg.fp4_4over6_error} has no effect: recipe {name} has no Four Over "
                 f"Six; drop it or set --fp4-4over6")
    return recipe


def get_lr(step, cfg):
    """Linear warmup, then cosine to min_lr over the rest, or WSD: flat, then linear decay over the last 20%."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if cfg.lr_schedule == "wsd":
        decay_start = int(0.8 * cfg.max_iters)
        frac = max(0.0, (step - decay_start) / max(1, cfg.max_iters - decay_start))
        return cfg.lr - frac * (cfg.lr - cfg.min_lr)
    frac = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))) * (cfg.lr - cfg.min_lr)


def build_model(cfg, vocab_size, dtype):
    """The GPT of cfg's preset with its size overrides; the vocab padded to a multiple of 64 for matmul
    efficiency (nanoGPT: the extra logits are never targets)."""
    size = {k: getattr(cfg, k) or v for k, v in PRESETS[cfg.model].items()}
    config = GPTConfig(vocab_size=(vocab_size + 63) // 64 * 64, block_size=cfg.block_size, **size)
    return GPT(config, compute_dtype=dtype)


def activation_dtype(requested, device_type):
    """--dtype -> (torch dtype, why, for the start-up line). auto: bf16 on CUDA; on a CPU bf16 only where it
    multiplies bf16 natively (AVX512-BF16 or AMX), else fp32: without them torch's CPU bf16 matmul converts
    element by element and is ~40x slower than fp32 (AMD EPYC, AVX2: 2048x512 @ 512x512 638 vs 16 ms);
    fp32 on MPS. The FP4 numerics are the same bits in either (the quantizers compute in fp32); only the
    high-precision parts (attention, norms, LM head, the baseline) and the GEMMs' output rounding differ."""
    if requested != "auto":
        return {"bfloat16": torch.bfloat16, "float32": torch.float32}[requested], "as requested"
    if device_type == "cuda":
        return torch.bfloat16, "auto: CUDA multiplies bf16 natively"
    if device_type == "cpu":
        native = [name for name, probe in (("AVX512-BF16", "_is_avx512_bf16_supported"),
                                           ("AMX", "_is_amx_tile_supported"))
                  if getattr(torch.cpu, probe, lambda: False)()]
        if native:
            return torch.bfloat16, f"auto: this CPU multiplies bf16 natively ({', '.join(native)})"
        return torch.float32, (f"auto: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 "
                               f"matmul (no AVX512-BF16/AMX), where bf16 runs ~40x slower than fp32")
    return torch.float32, f"auto: float32 on {device_type}"


def start_step(value, cfg):
    """--osci-start / --out-control-step: a fraction (< 1) of max_iters, or a step."""
    return int(value * cfg.max_iters) if value < 1 else int(value)


def resolve_schedules(cfg):
    """-> cfg with the OsciReset and OutControl schedules it will run, in steps, so that the config printed
    and saved is what ran. A window must close inside the run: if fewer than two OsciReset periods fit after
    its start, the period shrinks to half the remaining steps and the window to at most a quarter of it (e.g.
    --max-iters 200: start 120, period 40, window 10, resets at steps 130 and 170); the OutControl window
    ends a step before the last."""
    start = start_step(cfg.osci_start, cfg)
    period, window = cfg.osci_period, cfg.osci_window
    if cfg.max_iters - start < 2 * period:
        period = max(2, (cfg.max_iters - start) // 2)
        window = max(1, min(window, period // 4))
    oc_start = start_step(cfg.out_control_step, cfg)
    oc_window = max(1, min(cfg.out_control_window, cfg.max_iters - oc_start - 1))
    return replace(cfg, osci_start=start, osci_period=period, osci_window=window, out_control_step=oc_start,
                   out_control_window=oc_window)


def load_config(given):
    """The flags given (and, with --resume, the checkpoint's config under them) -> (cfg, checkpoint or None)."""
    cfg = replace(TrainConfig(), **given)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not cfg.resume:
        return cfg, None
    if not os.path.exists(ckpt_path):
        sys.exit(f"error: --resume but no checkpoint at {ckpt_path}; run without --resume to start fresh")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = {k: v for k, v in ckpt["config"].items() if k not in PER_INVOCATION}
        return replace(TrainConfig(**saved), **given), ckpt
    except Exception as e:
        sys.exit(f"error: checkpoint {ckpt_path} is unreadable ({type(e).__name__}: {e}); "
                 f"delete it or choose another --out-dir")


def check_out_dir(out_dir):
    """Fail now, not after an hour of training, if out_dir cannot be written."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_test_{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        sys.exit(f"error: cannot write to --out-dir {out_dir} ({e.strerror or e}); choose a writable folder")


def setup_device(cfg):
    """-> (ddp, rank, world, device). Under torchrun every process computes on its own device; the ranks of
    one node share it by LOCAL_RANK."""
    ddp = int(os.environ.get("RANK", -1)) != -1             # launched by torchrun?
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if ddp:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if device == "cuda" else device
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return ddp, rank, world, device


def get_batch(data, cfg, rank, world, gen, device):
    """-> x, y (batch_size, block_size) int64: random windows of this process's contiguous shard of `data`
    (rank-disjoint), y shifted by one. Random offsets (nanoGPT) rather than epochs: simple, and the
    generator state is the data position."""
    lo, hi = len(data) * rank // world, len(data) * (rank + 1) // world - cfg.block_size - 1
    return windows(data, torch.randint(lo, hi, (cfg.batch_size,), generator=gen).tolist(), cfg.block_size, device)


def windows(data, starts, block_size, device):
    """-> x, y (len(starts), block_size) int64: the windows of `data` at `starts`, y shifted by one."""
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in starts])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in starts])
    return x.to(device), y.to(device)


def setup_fp4(cfg, model, device, rank, log):
    """Convert the model's block Linears to FP4 (before compile and DDP, so both see the final modules, as
    nanochat does) on the implementation fastpaths.select picks -> (recipe, {name: FP4Linear}, OsciReset,
    OutControl or None). The oscillation windows are measured always, the weights reset only with
    --osci-reset."""
    recipe = resolve_recipe(cfg)
    log(f"FP4 recipe: {recipe}")
    try:
        impl, why = fastpaths.select(cfg.fp4_path, device, recipe)
    except ValueError as e:                               # a path asked for by name that cannot run here
        sys.exit(f"error: {e}")
    log(why)
    fp4.convert_to_fp4(model, recipe, bf16_first_k=cfg.bf16_first_k, bf16_last_k=cfg.bf16_last_k,
                       seed=cfg.seed * 1000 + 100_000 * rank, impl=impl)   # independent SR noise per process
    layers = {n: m for n, m in model.named_modules() if isinstance(m, fp4.FP4Linear)}
    osci = fp4_training.OsciReset(layers, cfg.osci_period, cfg.osci_window, cfg.osci_threshold, cfg.osci_start,
                         reset=cfg.osci_reset)
    log(f"oscillation windows: {cfg.osci_window} steps every {cfg.osci_period} from step {cfg.osci_start}, "
        f"threshold {cfg.osci_threshold}, {'resetting' if cfg.osci_reset else 'measuring only'}")
    outctl = None
    if cfg.out_control:
        outctl = fp4_training.OutControl(layers, cfg.out_control_frac, cfg.out_control_step, cfg.out_control_window,
                                         cfg.out_control_choice, cfg.seed)
        log(f"out-control: calibrating steps {cfg.out_control_step}-{cfg.out_control_step + cfg.out_control_window - 1}"
            f", then {cfg.out_control_frac:.0%} of input channels (rounded up to 32; by {cfg.out_control_choice}) in MXFP8")
    return recipe, layers, osci, outctl


def eval_batches(data, cfg, rank, world, device):
    """The eval_iters val batches of every evaluation -> list of (x, y). --eval-set seeded: random windows from a
    generator seeded by --seed (nanoGPT's way: each seed sees other val tokens, so part of a seed-to-seed spread
    is eval sampling); fixed: eval_iters × batch_size windows evenly spaced over this process's val shard, the
    very same tokens for every seed and run, so paired differences between runs carry no eval sampling noise."""
    if cfg.eval_set == "seeded":
        gen = torch.Generator().manual_seed(cfg.seed + 10_000 + rank)
        return [get_batch(data, cfg, rank, world, gen, device) for _ in range(cfg.eval_iters)]
    lo, hi = len(data) * rank // world, len(data) * (rank + 1) // world - cfg.block_size - 1
    n = cfg.eval_iters * cfg.batch_size
    starts = [lo + (hi - lo) * i // n for i in range(n)]
    return [windows(data, starts[b:b + cfg.batch_size], cfg.block_size, device) for b in range(0, n, cfg.batch_size)]


@torch.no_grad()
def evaluate(model, data, cfg, rank, world, device, ddp):
    """Mean val loss over the eval_iters batches of eval_batches (the same every eval, so evals are comparable)."""
    model.eval()
    losses = [model(x, y)[1].float() for x, y in eval_batches(data, cfg, rank, world, device)]
    model.train()
    loss = torch.stack(losses).mean()
    if ddp:
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return loss.item()


def restore(ckpt, ckpt_path, model, optimizer, train_gen, osci, world, rank):
    """Load everything that decides what happens next from a checkpoint -> (step, best val loss, skipped steps,
    the train-loss window in progress), or exit with one line if it does not fit this run."""
    if len(ckpt["rng"]["train_gen"]) != world:
        sys.exit(f"error: {ckpt_path} was written by {len(ckpt['rng']['train_gen'])} processes; resume with "
                 f"the same number (this run has {world}) so every data shard continues where it stopped")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        sys.exit(f"error: {ckpt_path} does not fit the model this config builds (changed a model or FP4 flag "
                 f"on --resume?): {str(e).splitlines()[0]}")
    optimizer.load_state_dict(ckpt["optimizer"])
    train_gen.set_state(ckpt["rng"]["train_gen"][rank])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if osci is not None and ckpt.get("osci") is not None:
        osci.load_state_dict(ckpt["osci"])
    w = ckpt["log_window"]
    return ckpt["step"], ckpt["best_val_loss"], w["skipped"], dict(losses=w["losses"], time=w["time"], steps=w["steps"])


def save_checkpoint(path, state):
    """torch.save, atomically: a crash mid-write leaves the previous checkpoint intact."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def main(argv=None):
    # -----------------------------------------------------------------------------
    # config, device, DDP
    given = parse_args(sys.argv[1:] if argv is None else argv)
    cfg, ckpt = load_config(given)
    check(cfg, given)
    cfg = resolve_schedules(cfg)
    check_out_dir(cfg.out_dir)
    ddp, rank, world, device = setup_device(cfg)
    master, device_type = rank == 0, device.split(":")[0]
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    # activations (and the matmuls of the high-precision layers) in bf16 where that is fast; master weights fp32
    dtype, dtype_why = activation_dtype(cfg.dtype, device_type)
    torch.manual_seed(cfg.seed)

    def log(*a):
        if master:
            tqdm.write(" ".join(str(x) for x in a))

    log(f"torch {torch.__version__} | device {device} x {world} | activations {dtype} ({dtype_why}) | config:")
    log(json.dumps(asdict(cfg)))
    # -----------------------------------------------------------------------------
    # data: uint16 token memmaps (pystdlib, the default, is built on first use from Python's own library)
    data_dir = dataset_dir(cfg.dataset)
    if cfg.dataset == "pystdlib" and not os.path.exists(os.path.join(data_dir, "meta.pkl")) and master:
        prepare_pystdlib()
    if ddp:
        dist.barrier()
    meta, splits = load_dataset(data_dir, cfg.block_size, world)
    train_gen = torch.Generator().manual_seed(cfg.seed + rank)   # its state is the data position
    # -----------------------------------------------------------------------------
    # model, FP4 conversion, optimizer, and everything a checkpoint restores
    model = build_model(cfg, meta["vocab_size"], dtype)
    recipe, fp4_layers, osci, outctl = setup_fp4(cfg, model, device, rank, log) if cfg.fp4 else (None, {}, None, None)
    model.to(device)
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device_type)
    # step, best val loss, skipped steps, the train-loss average in progress between evals
    step, best_val, skipped, window = 0, float("inf"), 0, dict(losses=[], time=0.0, steps=0)
    if ckpt is not None:
        step, best_val, skipped, window = restore(ckpt, ckpt_path, model, optimizer, train_gen, osci, world, rank)
        log(f"resumed from {ckpt_path} at step {step}")
    elif osci is not None:
        osci.after_step(0)                                   # a window at step 0 opens on the initial weights
    log(f"model {cfg.model}: {model.num_params() / 1e6:.2f}M parameters, {model.config}")
    raw_model = model                                      # what gets saved: no _orig_mod. / module. prefixes
    if cfg.compile:
        model = fastpaths.compile_model(model)
    if ddp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)

    def checkpoint():
        gens = [None] * world
        if ddp:
            dist.all_gather_object(gens, train_gen.get_state())
        else:
            gens = [train_gen.get_state()]
        if master:
            save_checkpoint(ckpt_path, dict(
                model=raw_model.state_dict(), optimizer=optimizer.state_dict(), config=asdict(cfg),
                recipe=asdict(recipe) if recipe else None, step=step, best_val_loss=best_val,
                rng=dict(torch=torch.get_rng_state(), train_gen=gens), osci=osci.state_dict() if osci else None,
                log_window=dict(window, skipped=skipped), dataset_meta={k: meta[k] for k in ("tokenizer", "vocab_size")}))

    # -----------------------------------------------------------------------------
    # training loop
    last_step = cfg.stop_iter or cfg.max_iters
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    if master and ckpt is None and os.path.exists(log_path):
        os.remove(log_path)                                # a fresh run starts a fresh log
    # SIGINT (Ctrl-C) / SIGTERM (a scheduler's preemption): finish the current step, save, exit; --resume goes on
    interrupted = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: interrupted.append(signum))
    bar = tqdm(total=last_step, initial=step, disable=not master or not sys.stderr.isatty(), dynamic_ncols=True,
               leave=False)                                 # a progress bar for terminals, not for log files
    t_start, val_loss, stats = time.time(), float("nan"), {}
    resumed_at = step if ckpt is not None else -1
    for step in range(step, last_step + 1):
        # interrupted: checkpoint the state between two steps and leave (all processes agree on when)
        stop = torch.tensor(float(bool(interrupted)), device=device)
        if ddp:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item():
            checkpoint()
            log(f"interrupted at step {step}: saved {ckpt_path}; continue with: python train.py --resume "
                f"--out-dir {cfg.out_dir}")
            sys.exit(128 + (interrupted[0] if interrupted else signal.SIGTERM))
        # once in a while: evaluate, log (with the FP4 health of the step just before), checkpoint
        if (step % cfg.eval_interval == 0 or step == last_step) and (step != resumed_at or step == last_step):
            val_loss = evaluate(model, splits["val"], cfg, rank, world, device, ddp)
            best_val = min(best_val, val_loss)
            record = eval_record(step, cfg, meta, val_loss, window, tokens_per_step, time.time() - t_start, skipped,
                                 dtype)
            log(f"eval {step:5d} | val_loss {val_loss:.4f} | bits/{meta['unit']} {record['val_bits_per_unit']:.3f}")
            if fp4_layers:
                record["fp4"], line = fp4_training.fp4_report(step, fp4_layers, stats, osci, outctl)
                if cfg.fp4_probe:                          # the same batch at every eval: comparable over the run
                    probe_batch = get_batch(splits["train"], cfg, rank, world, torch.Generator().manual_seed(cfg.seed + 20_000), device)
                    record["fp4"]["probe"] = fp4_training.fp4_probe(model, fp4_layers, probe_batch, ddp)
                    line += (f" | grad vs high precision: cosine {record['fp4']['probe']['grad_cosine']:.4f} rel. error "
                             f"{record['fp4']['probe']['grad_rel_error']:.4f}")
                log(line)
            if master:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            window = dict(losses=[], time=0.0, steps=0)
            checkpoint()
        if step == last_step:
            break
        # one optimizer step: grad_accum micro-batches (DDP syncs grads on the last one only), clip, AdamW
        t0, lr = time.time(), get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if outctl is not None:
            outctl.before_step(step)
        before_eval = (step + 1) % cfg.eval_interval == 0 or step + 1 == last_step
        with fp4_training.record_stats(fp4_layers if before_eval else {}) as recorded:   # FP4 health, before each eval
            loss, grad_norm = train_step(model, optimizer, lambda: get_batch(splits["train"], cfg, rank, world,
                                                                            train_gen, device), cfg, ddp)
        stats = recorded if before_eval else stats
        finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
        else:
            what = f"non-finite {'loss' if not torch.isfinite(loss) else 'gradient'} at step {step} " \
                   f"(loss {loss.item():.4g}, grad norm {grad_norm.item():.4g})"
            if not cfg.skip_nonfinite:
                log(fp4_training.nonfinite_report(raw_model, fp4_layers))
                sys.exit(f"error: {what}. Stopped without saving: {ckpt_path} holds the last good state. Lower "
                         f"--lr, keep more layers in bf16 (--bf16-first-k/--bf16-last-k), or --skip-nonfinite")
            skipped += 1                                   # the step counts, the update is dropped
            log(f"skipping {what} ({skipped} skipped so far)")
        optimizer.zero_grad(set_to_none=True)
        if osci is not None:
            osci.after_step(step + 1)
        if outctl is not None:
            outctl.after_step(step + 1, reduce=dist.all_reduce if ddp else None)
        loss_val, dt = loss.item(), time.time() - t0
        if finite:
            window["losses"].append(loss_val)
        window["time"], window["steps"] = window["time"] + dt, window["steps"] + 1
        bar.update(1)
        if step % cfg.log_interval == 0:
            log(f"step {step:5d}/{cfg.max_iters} | loss {loss_val:.4f} | lr {lr:.2e} | {dt * 1000:7.1f} ms/step | "
                f"{tokens_per_step / dt:9,.0f} tok/s")
    bar.close()
    log(f"final val_loss {val_loss:.4f}")
    if ddp:
        dist.barrier()                  # let rank 0 finish its checkpoint write before any process tears down
        dist.destroy_process_group()
        # A torchrun worker is done here. Leave without C++ static destructors: with gloo, about 1 exit in 30
        # aborted in teardown ("terminate called without an active exception") after all work was saved.
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)
    return val_loss


def train_step(model, optimizer, next_batch, cfg, ddp):
    """grad_accum micro-batches forward and backward (DDP syncs the grads on the last one only) -> (mean loss,
    global grad norm, clipped to grad_clip if > 0; after DDP's sync, so every process agrees)."""
    loss_sum = torch.zeros((), device=next(model.parameters()).device)
    for micro in range(cfg.grad_accum):
        x, y = next_batch()
        with nullcontext() if (not ddp or micro == cfg.grad_accum - 1) else model.no_sync():
            _, loss = model(x, y)
            (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach() / cfg.grad_accum
    if ddp:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    return loss_sum, grad_norm


def eval_record(step, cfg, meta, val_loss, window, tokens_per_step, elapsed, skipped, dtype):
    """One line of log.jsonl (NaN written as null, so it stays JSON)."""
    train_loss = sum(window["losses"]) / len(window["losses"]) if window["losses"] else float("nan")
    tok_s = window["steps"] * tokens_per_step / window["time"] if window["time"] else float("nan")
    record = dict(step=step, tokens=step * tokens_per_step, train_loss=train_loss, val_loss=val_loss,
                  val_bits_per_unit=val_loss / math.log(2) / meta["units_per_token"], unit=meta["unit"],
                  lr=get_lr(step, cfg), tok_per_s=tok_s, elapsed_s=elapsed, dtype=str(dtype).removeprefix("torch."),
                  skipped_nonfinite=skipped)
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}


if __name__ == "__main__":
    main()

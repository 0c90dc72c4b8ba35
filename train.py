"""
train.py: train a GPT with simulated 4-bit (NVFP4 / MXFP4) linear layers, or in high precision as the baseline.

    python train.py --fp4 --osci-reset          # TetraJet-v2 with OsciReset on the offline default corpus, ~1 min on 2 CPU cores
    python train.py                             # the baseline: the same run without FP4
    python train.py --fp4 --fp4-recipe nvidia   # NVIDIA's recipe; 'tetrajet[rht=none,aligned=false]' overrides fields
    torchrun --standalone --nproc_per_node=8 train.py --fp4 --model 150m --dataset <name>

Every TrainConfig field is a --flag (python train.py --help); the resolved config is printed and saved in every
checkpoint. Writes <out_dir>/log.jsonl (one JSON object per eval) and <out_dir>/ckpt.pt; --resume continues
exactly (the same losses as an uninterrupted run); Ctrl-C saves first.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import fastpaths
import fp4
import health
from data.prepare import dataset_dir, load_dataset, prepare_pystdlib
from model import GPT, GPTConfig, PRESETS

# -----------------------------------------------------------------------------
# config: one dataclass, one --flag per field, its help text beside it


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
    compile: bool = flag(False, "torch.compile the model (the FP4 layers keep their bits; see docs/usage.md)")
    out_dir: str = flag("out", "log.jsonl and ckpt.pt go here")
    resume: bool = flag(False, "continue from <out_dir>/ckpt.pt with its config")


PER_INVOCATION = ("resume", "stop_iter")    # flags a resumed run does not inherit from its checkpoint
EVAL_SEED_OFFSET = 10_000      # --eval-set seeded: its own stream, apart from the training data's (seed + rank)
HEALTH_SEED_OFFSET = 20_000    # the batch FP4 health and the probe read at every eval (the same batch every time)
LAYER_SEED_STRIDE, RANK_SEED_STRIDE = 1000, 100_000   # FP4 layer noise: seed·1000 + rank·100000 + layer index


def parse_args(argv):
    """-> the flags given (only those), typed. Unknown, abbreviated or malformed flags: one line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS, allow_abbrev=False)
    p.error = lambda message: sys.exit(f"error: {message} (see python train.py --help)")
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


def load_config(given):
    """The flags given (and, with --resume, the checkpoint's config under them) -> (cfg, checkpoint or None)."""
    cfg, ckpt = replace(TrainConfig(), **given), None
    if cfg.resume:
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        if not os.path.exists(path):
            sys.exit(f"error: --resume but no checkpoint at {path}; run without --resume to start fresh")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            cfg = replace(TrainConfig(**{k: v for k, v in ckpt["config"].items() if k not in PER_INVOCATION}), **given)
        except Exception as e:
            sys.exit(f"error: checkpoint {path} is unreadable ({type(e).__name__}: {e}); delete it or choose another --out-dir")
    return cfg, ckpt


def check(cfg, given):
    """Contradictory or impossible settings -> exit with one line naming the flag and the fix; else the recipe."""
    n_layer = cfg.n_layer or PRESETS[cfg.model]["n_layer"]
    fp4_only = [k for k in given if k.startswith(("fp4_", "keep_", "osci_", "out_control")) and k != "fp4_path"]
    for bad, msg in (
            (not cfg.fp4 and fp4_only, f"--{fp4_only[0].replace('_', '-') if fp4_only else ''} needs --fp4 (without it the model is the baseline)"),
            (cfg.fp4 and not cfg.out_control and any(k.startswith("out_control_") for k in given),
             "--out-control-frac/-step/-window/-choice have no effect without --out-control: add it or drop them"),
            (not 0 <= cfg.out_control_frac <= 0.5, "--out-control-frac must be between 0 and 0.5"),
            (not (0 <= cfg.keep_first_k and 0 <= cfg.keep_last_k and cfg.keep_first_k + cfg.keep_last_k <= n_layer),
             f"--keep-first-k + --keep-last-k must be between 0 and the model's {n_layer} blocks"),
            *((getattr(cfg, k) < 1, f"--{k.replace('_', '-')} must be >= 1") for k in (
                "batch_size", "block_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval")),
            (not 0 <= cfg.stop_iter <= cfg.max_iters, "--stop-iter must be between 0 and --max-iters"),
            (not (math.isfinite(cfg.lr) and cfg.lr > 0), "--lr must be a positive number"),
            (not (math.isfinite(cfg.min_lr) and 0 <= cfg.min_lr <= cfg.lr), "--min-lr must be between 0 and --lr"),
            (not 0 <= cfg.warmup_iters <= cfg.max_iters, "--warmup-iters must be between 0 and --max-iters")):
        if bad:
            sys.exit(f"error: {msg}")
    try:
        return fp4.parse_recipe(cfg.fp4_recipe) if cfg.fp4 else None
    except ValueError as e:
        sys.exit(f"error: {e} (--fp4-recipe)")


def resolve_schedules(cfg):
    """-> cfg with the OsciReset and OutControl schedules in steps, as they will run: if fewer than two OsciReset
    periods fit after its start, the period shrinks to half the remaining steps and the window to at most a
    quarter of it (--max-iters 200: start 120, period 40, window 10); the OutControl window ends before the last step."""
    start_of = lambda v: int(v * cfg.max_iters) if v < 1 else int(v)       # a fraction of max_iters, or a step
    start, period, window = start_of(cfg.osci_start), cfg.osci_period, cfg.osci_window
    if cfg.max_iters - start < 2 * period:
        period = max(2, (cfg.max_iters - start) // 2)
        window = max(1, min(window, period // 4))
    oc_start = start_of(cfg.out_control_step)
    return replace(cfg, osci_start=start, osci_period=period, osci_window=window, out_control_step=oc_start,
                   out_control_window=max(1, min(cfg.out_control_window, cfg.max_iters - oc_start - 1)))


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

# -----------------------------------------------------------------------------
# the model as a run trains it (sample.py builds it with the same function)


def build_model(cfg, vocab_size, dtype, device, rank=0, log=print):
    """The GPT of cfg's preset and overrides (vocab padded to a multiple of 64, nanoGPT), its block Linears converted
    to FP4 if cfg.fp4 (before compile and DDP, so both see the final modules), and the FP4 kernel chosen
    (fastpaths.use, said in one line) -> (model on device, {name: FP4Linear})."""
    size = {k: getattr(cfg, k) or v for k, v in PRESETS[cfg.model].items()}
    model = GPT(GPTConfig(vocab_size=(vocab_size + 63) // 64 * 64, block_size=cfg.block_size, **size), dtype)
    if cfg.fp4:
        recipe = fp4.parse_recipe(cfg.fp4_recipe)
        try:
            log(fastpaths.use(cfg.fp4_path, device, recipe))
        except ValueError as e:                          # a path asked for by name that cannot run here
            sys.exit(f"error: {e}")
        fp4.convert_to_fp4(model, recipe, keep_first_k=cfg.keep_first_k, keep_last_k=cfg.keep_last_k,
                           seed=cfg.seed * LAYER_SEED_STRIDE + rank * RANK_SEED_STRIDE)   # independent noise per process
    return model.to(device), {n: m for n, m in model.named_modules() if isinstance(m, fp4.FP4Linear)}

# -----------------------------------------------------------------------------
# data: random windows of this process's contiguous shard (nanoGPT's random offsets: the generator is the position)


def windows(data, starts, block_size, device):
    """-> x, y (len(starts), block_size) int64: the windows of `data` at `starts`, y shifted by one."""
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in starts])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in starts])
    return x.to(device), y.to(device)


def get_batch(data, cfg, rank, world, gen, device):
    lo, hi = len(data) * rank // world, len(data) * (rank + 1) // world - cfg.block_size - 1
    return windows(data, torch.randint(lo, hi, (cfg.batch_size,), generator=gen).tolist(), cfg.block_size, device)


def eval_batches(data, cfg, rank, world, device):
    """The val batches of every eval. seeded: random windows from seed + 10000 (each seed sees other tokens); fixed:
    eval_iters x batch_size windows evenly spaced over the shard, the same for every seed (paired differences between
    runs then carry no eval-sampling noise)."""
    if cfg.eval_set == "seeded":
        gen = torch.Generator().manual_seed(cfg.seed + EVAL_SEED_OFFSET + rank)
        return [get_batch(data, cfg, rank, world, gen, device) for _ in range(cfg.eval_iters)]
    lo, hi = len(data) * rank // world, len(data) * (rank + 1) // world - cfg.block_size - 1
    n = cfg.eval_iters * cfg.batch_size
    starts = [lo + (hi - lo) * i // n for i in range(n)]
    return [windows(data, starts[b:b + cfg.batch_size], cfg.block_size, device) for b in range(0, n, cfg.batch_size)]


def get_lr(step, cfg):
    """Linear warmup, then cosine to min_lr, or WSD: flat, then linear decay over the last 20%."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if cfg.lr_schedule == "wsd":
        decay_start = int(0.8 * cfg.max_iters)
        return cfg.lr - max(0.0, (step - decay_start) / max(1, cfg.max_iters - decay_start)) * (cfg.lr - cfg.min_lr)
    frac = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))) * (cfg.lr - cfg.min_lr)


def main(argv=None):
    # -----------------------------------------------------------------------------
    # config, device, DDP
    given = parse_args(sys.argv[1:] if argv is None else argv)
    cfg, ckpt = load_config(given)
    recipe = check(cfg, given)
    cfg = resolve_schedules(cfg)
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)                   # fail now, not after an hour of training
        open(os.path.join(cfg.out_dir, ".write_test"), "w").close()
        os.remove(os.path.join(cfg.out_dir, ".write_test"))
    except OSError as e:
        sys.exit(f"error: cannot write to --out-dir {cfg.out_dir} ({e.strerror or e}); choose a writable folder")
    ddp = int(os.environ.get("RANK", -1)) != -1                   # launched by torchrun?
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = cfg.device if cfg.device != "auto" else \
        "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available() or device == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"error: --device {device}, but this torch sees no {device} device; use --device cpu or auto")
    if ddp:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if device == "cuda" else device
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    master, device_type = rank == 0, device.split(":")[0]
    log = lambda *a: tqdm.write(" ".join(map(str, a))) if master else None
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    dtype, dtype_why = activation_dtype(cfg.dtype, device_type)  # activations; master weights stay fp32
    torch.manual_seed(cfg.seed)
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
    # model, FP4, optimizer, and what a checkpoint restores
    if recipe:
        log(f"FP4 recipe: {recipe}")
    model, fp4_layers = build_model(cfg, meta["vocab_size"], dtype, device, rank, log)
    osci = outctl = None
    if cfg.fp4:                                 # oscillation windows are measured always, reset with --osci-reset
        osci = fp4.OsciReset(fp4_layers, cfg.osci_period, cfg.osci_window, cfg.osci_threshold, cfg.osci_start, cfg.osci_reset)
        log(f"oscillation windows: {cfg.osci_window} steps every {cfg.osci_period} from step {cfg.osci_start}, "
            f"threshold {cfg.osci_threshold}, {'resetting' if cfg.osci_reset else 'measuring only'}")
    if cfg.out_control:
        outctl = fp4.OutControl(fp4_layers, cfg.out_control_frac, cfg.out_control_step, cfg.out_control_window,
                                cfg.out_control_choice, cfg.seed)
        log(f"out-control: calibrating steps {cfg.out_control_step}-{cfg.out_control_step + cfg.out_control_window - 1}, "
            f"then {cfg.out_control_frac:.0%} of input channels (rounded up to 32; by {cfg.out_control_choice}) in MXFP8")
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device_type)
    step, best_val, skipped, window = 0, float("inf"), 0, dict(losses=[], time=0.0, steps=0)
    if ckpt is not None:
        if len(ckpt["rng"]["train_gen"]) != world:
            sys.exit(f"error: {ckpt_path} was written by {len(ckpt['rng']['train_gen'])} processes; resume with as many")
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            sys.exit(f"error: {ckpt_path} does not fit the model this config builds: {str(e).splitlines()[0]}")
        optimizer.load_state_dict(ckpt["optimizer"])
        train_gen.set_state(ckpt["rng"]["train_gen"][rank])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if osci is not None and ckpt["osci"] is not None:
            osci.load_state_dict(ckpt["osci"])
        step, best_val, skipped, window = ckpt["step"], ckpt["best_val_loss"], ckpt["skipped"], ckpt["log_window"]
        log(f"resumed from {ckpt_path} at step {step}")
    elif osci is not None:
        osci.after_step(0)                                   # a window at step 0 opens on the initial weights
    log(f"model {cfg.model}: {model.num_params() / 1e6:.2f}M parameters, vocabulary {meta['vocab_size']} "
        f"({meta['tokenizer']}), {model.config}")
    raw_model = model                                        # what gets saved: no _orig_mod. / module. prefixes
    if cfg.compile:
        model = fastpaths.compile_model(model)
    if ddp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)

    def checkpoint():
        gens = [None] * world
        dist.all_gather_object(gens, train_gen.get_state()) if ddp else gens.__setitem__(0, train_gen.get_state())
        if master:
            state = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), config=asdict(cfg),
                         recipe=str(recipe) if recipe else None, step=step, best_val_loss=best_val, skipped=skipped,
                         log_window=window, rng=dict(torch=torch.get_rng_state(), train_gen=gens),
                         osci=osci.state_dict() if osci else None, dataset_meta={k: meta[k] for k in ("tokenizer", "vocab_size")})
            torch.save(state, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)       # atomic: a crash mid-write keeps the last checkpoint

    # -----------------------------------------------------------------------------
    # training loop
    last_step = cfg.stop_iter or cfg.max_iters
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    if master and ckpt is None and os.path.exists(log_path):
        os.remove(log_path)                                  # a fresh run starts a fresh log
    interrupted = []                                         # Ctrl-C / SIGTERM: finish the step, save, exit
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: interrupted.append(signum))
    bar = tqdm(total=last_step, initial=step, disable=not master or not sys.stderr.isatty(), leave=False)
    t_start, val_loss, resumed_at = time.time(), float("nan"), step if ckpt is not None else -1
    for step in range(step, last_step + 1):
        stop = torch.tensor(float(bool(interrupted)), device=device)   # all processes agree on when
        if ddp:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item():
            checkpoint()
            log(f"interrupted at step {step}: saved {ckpt_path}; continue with: python train.py --resume --out-dir {cfg.out_dir}")
            sys.exit(128 + (interrupted[0] if interrupted else signal.SIGTERM))
        # once in a while: evaluate, FP4 health on a fixed batch, log, checkpoint
        if (step % cfg.eval_interval == 0 or step == last_step) and (step != resumed_at or step == last_step):
            model.eval()
            with torch.no_grad():
                losses = torch.stack([model(x, y)[1].float() for x, y in eval_batches(splits["val"], cfg, rank, world, device)])
            model.train()
            val_loss = losses.mean()
            if ddp:
                dist.all_reduce(val_loss, op=dist.ReduceOp.AVG)
            val_loss, best_val = val_loss.item(), min(best_val, val_loss.item())
            train_loss = sum(window["losses"]) / len(window["losses"]) if window["losses"] else None
            record = dict(step=step, tokens=step * tokens_per_step, train_loss=train_loss, val_loss=val_loss,
                          val_bits_per_unit=val_loss / math.log(2) / meta["units_per_token"], unit=meta["unit"],
                          lr=get_lr(step, cfg), tok_per_s=window["steps"] * tokens_per_step / window["time"] if window["time"] else None,
                          elapsed_s=time.time() - t_start, dtype=str(dtype).removeprefix("torch."), skipped_nonfinite=skipped)
            log(f"eval {step:5d} | val_loss {val_loss:.4f} | bits/{meta['unit']} {record['val_bits_per_unit']:.3f}")
            if fp4_layers:
                batch = get_batch(splits["train"], cfg, rank, world, torch.Generator().manual_seed(cfg.seed + HEALTH_SEED_OFFSET), device)
                with model.no_sync() if ddp else nullcontext():
                    layers_health, probe = health.measure(raw_model, fp4_layers, batch, cfg.fp4_probe)
                record["fp4"], line = health.report(step, layers_health, osci, outctl)
                if probe:
                    record["fp4"]["probe"] = probe
                    line += f" | grad vs high precision: cosine {probe['grad_cosine']:.4f} rel. error {probe['grad_rel_error']:.4f}"
                log(line)
            if master:
                with open(log_path, "a") as f:
                    f.write(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}) + "\n")
            window = dict(losses=[], time=0.0, steps=0)
            checkpoint()
        if step == last_step:
            break
        # one optimizer step: grad_accum micro-batches (DDP syncs on the last), clip, AdamW
        t0, lr = time.time(), get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if outctl is not None:
            outctl.before_step(step)
        loss = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            x, y = get_batch(splits["train"], cfg, rank, world, train_gen, device)
            with nullcontext() if (not ddp or micro == cfg.grad_accum - 1) else model.no_sync():
                _, micro_loss = model(x, y)
                (micro_loss / cfg.grad_accum).backward()
            loss += micro_loss.detach() / cfg.grad_accum
        if ddp:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
        else:
            what = f"non-finite {'loss' if not torch.isfinite(loss) else 'gradient'} at step {step} (loss {loss.item():.4g}, grad norm {grad_norm.item():.4g})"
            if not cfg.skip_nonfinite:
                for n, m in fp4_layers.items():              # where a NaN came from: each FP4 weight's scales
                    sat, under = health.block_health(m.weight.detach(), m.recipe, m.recipe.weight_tile, fp4.four_over_six_of(m.recipe, "weights"))
                    log(f"  {n}: weight blocks saturated {sat:.2%}, underflowed {under:.2%}")
                fix = "keep more layers in high precision (--keep-first-k/--keep-last-k), " if cfg.fp4 else ""
                sys.exit(f"error: {what}. Stopped without saving: {ckpt_path} holds the last good state. Lower --lr, {fix}or --skip-nonfinite")
            skipped += 1                                     # the step counts, the update is dropped
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
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)                     # skip C++ static destructors: gloo aborted ~1 exit in 30 in teardown
    return val_loss


if __name__ == "__main__":
    main()

"""
train.py: train a GPT with simulated 4-bit (NVFP4 / MXFP4) linear layers, or in high precision as the baseline.

    python train.py --fp4 --osci-reset          # TetraJet-v2 with OsciReset on the offline default corpus, ~1 min on 2 CPU cores
    python train.py                             # the baseline: the same run without FP4
    python train.py --fp4 --fp4-recipe nvidia   # NVIDIA's recipe; 'tetrajet[rht=none,aligned=false]' overrides fields
    torchrun --standalone --nproc_per_node=8 train.py --fp4 --model 150m --dataset <name>

Every config.TrainConfig field is a --flag (python train.py --help); the resolved config is printed and saved in
every checkpoint. Writes <out_dir>/log.jsonl (one JSON object per eval) and <out_dir>/ckpt.pt; --resume continues
exactly (the same losses as an uninterrupted run) and refuses a flag that would change the run; Ctrl-C saves first.
"""

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import config
import fastpaths
import fp4
import health
from data.prepare import dataset_dir, load_dataset, prepare_pystdlib
from model import GPT, GPTConfig, PRESETS

# -----------------------------------------------------------------------------
# seeds: every stream follows from --seed (config.py holds the flags and their checks)

EVAL_SEED_OFFSET = 10_000      # --eval-set seeded: its own stream, apart from the training data's (seed + rank)
HEALTH_SEED_OFFSET = 20_000    # the batch FP4 health and the probe read at every eval (the same batch every time)
LAYER_SEED_STRIDE, RANK_SEED_STRIDE = 1000, 100_000   # FP4 layer noise: seed·1000 + rank·100000 + layer index

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
    given = config.parse_args(sys.argv[1:] if argv is None else argv, __doc__)
    cfg, ckpt, changes = config.load_config(given)                # resolved: what will run, saved as such
    recipe = config.check(cfg, given)
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)                   # fail now, not after an hour of training
        open(os.path.join(cfg.out_dir, ".write_test"), "w").close()
        os.remove(os.path.join(cfg.out_dir, ".write_test"))
    except OSError as e:
        sys.exit(f"error: cannot write to --out-dir {cfg.out_dir} ({e.strerror or e}); choose a writable folder")
    ddp = int(os.environ.get("RANK", -1)) != -1                   # launched by torchrun?
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = cfg.device
    if ddp:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if device == "cuda" else device
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    master, device_type = rank == 0, device.split(":")[0]
    log = lambda *a: tqdm.write(" ".join(map(str, a))) if master else None
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    dtype = getattr(torch, cfg.dtype)                            # activations; master weights stay fp32
    why = "the checkpoint's" if ckpt and "dtype" not in given else config.activation_dtype(given.get("dtype", "auto"), device_type)[1]
    torch.manual_seed(cfg.seed)
    log(f"torch {torch.__version__} | device {device} x {world} | activations {cfg.dtype} ({why}) | config:")
    log(json.dumps(asdict(cfg)))
    for line in changes:
        log(f"resumed with {line}" + (": the LR schedule now spans the new length" if line.startswith("--max-iters") else ""))
    if cfg.compile:
        log("--compile: the FP4 layers keep their bits; the compiled high-precision parts round differently from eager, "
            "so losses differ slightly from an eager run's (docs/usage.md)")
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
        if (step % cfg.eval_interval == 0 or step == last_step) and step != resumed_at:   # (saved after its eval)
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

"""
bench.py: how fast is simulated FP4 here? Three tables, every implementation path present on this machine:

  1. quantizers on a 4096x4096 fp32 tensor: ms, elements/s and GB/s (bytes read + written), against a plain
     copy (the floor of any one-pass quantizer) and torchao's nvfp4_quantize when torchao is installed;
  2. one FP4 linear layer, forward + backward, against the bf16 nn.Linear at a few (tokens, in, out) shapes;
  3. a full training step of train.py's default model (same model, batch and flags), fp4 / bf16; with
     --train-flags '--fp4 --out-control', each FP4 path with and without OutControl's MXFP8 channels.

    python tools/bench.py                   # cpu, all three tables
    python tools/bench.py --device cuda     # adds the triton path and the copy bandwidth it is measured against
    python tools/bench.py --only quant      # one table: quant, linear or step
    python tools/bench.py --only step --path cpu --repeat 40   # one path, enough rounds for a ratio's s.e.

Timings are medians of --repeat runs after warm-up (the compiled path compiles on its first call). On a shared
machine numbers move by 10-20% between runs: compare within one run, which is why every table has its baseline;
table 3's models take turns, one step each, and its ratios are paired per round (geometric mean ± s.e.).
"""

import argparse
import dataclasses
import sys
import os
import time

if __package__ in (None, ""):                   # run as a script (python tools/X.py): the repo root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch

import config
import fastpaths
import fp4
import train

QUANT_SHAPE = (4096, 4096)
LINEAR_SHAPES = ((2048, 128, 384), (2048, 512, 512), (4096, 1024, 1024))    # (tokens, in, out)
BYTE_VOCAB = 256                                                              # the default corpus is byte-level


def timeit(fn, device, repeat, warmup=2):
    """Median wall time of fn() in ms, after `warmup` calls; synchronizes CUDA around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


ONLY_PATH = None                                                              # --path: one path instead of all


def paths_here(device, recipe):
    """The FP4 paths that can run on this device for this recipe (reference and compiled everywhere torch
    runs; cpu and triton where their probe passes, as fastpaths.use requires), or --path's alone."""
    recipe = fp4.parse_recipe(recipe)
    return [p for p in fastpaths.PATHS if ONLY_PATH in (None, p) and
            (p in ("reference", "compiled") or fastpaths.probe(p, device, recipe) is None)]


def on(path, fn):
    """fn with fp4.KERNEL set to `path`'s kernel while it runs (each table switches paths between calls)."""
    def run():
        fp4.KERNEL = fastpaths.kernel(path)
        return fn()
    return run


def bench_quant(device, repeat):
    x = torch.randn(QUANT_SHAPE, device=device)
    n = x.numel()
    rows = [("copy (x.clone())", timeit(x.clone, device, repeat), n * 8)]
    try:
        from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale
        rows.append(("torchao nvfp4_quantize (per-tensor)", timeit(
            lambda: nvfp4_quantize(x, 16, per_tensor_amax_to_scale(x.abs().amax())), device, repeat),
            n * (4 + 0.5 + 1 / 16)))                               # fp32 in; packed codes + E4M3 scales out
    except ImportError:
        print("(torchao not installed: no torchao row)")
    gen = torch.Generator(device).manual_seed(0)
    variants = (("nvidia", "per-tensor 1x16 RTN", dict()), ("nvidia", "per-tensor 16x16 RTN", dict(tile=(16, 16))),
                ("nvidia", "per-tensor SR", dict(rounding="stochastic")), ("tetrajet", "double-block RTN", dict()),
                ("tetrajet", "double-block SR", dict(rounding="stochastic")), ("mxfp4", "mxfp4 RTN", dict()))
    for path in paths_here(device, "nvidia"):
        for recipe, name, kw in variants:
            if path in paths_here(device, recipe):
                rows.append((f"fake_quant {name} [{path}]", timeit(
                    on(path, lambda: fp4.fake_quant(x, recipe, generator=gen, **kw)), device, repeat), n * 8))
    copy_ms = rows[0][1]
    print(f"\n1. quantizers, {QUANT_SHAPE[0]}x{QUANT_SHAPE[1]} fp32 on {device} (GB/s = bytes read + written)")
    print(f"{'':52s} {'ms':>8s} {'Gelem/s':>8s} {'GB/s':>7s} {'x copy':>7s}")
    for name, ms, nbytes in rows:
        print(f"{name:52s} {ms:8.1f} {n / ms / 1e6:8.2f} {nbytes / ms / 1e6:7.1f} {ms / copy_ms:7.1f}")
    return rows


def bench_linear(device, repeat, recipe):
    print(f"\n2. one linear layer, forward + backward, recipe {recipe} on {device}: ms (ratio to bf16 nn.Linear)")
    print(f"{'tokens x in x out':20s} {'bf16':>8s} " + " ".join(f"{p:>18s}" for p in paths_here(device, recipe)))
    for tokens, k_in, k_out in LINEAR_SHAPES:
        x = torch.randn(tokens, k_in, device=device, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(tokens, k_out, device=device, dtype=torch.bfloat16)
        ref = torch.nn.Linear(k_in, k_out, bias=False, device=device)

        def step(layer):
            y = layer(x) if isinstance(layer, fp4.FP4Linear) else torch.nn.functional.linear(x, layer.weight.bfloat16())
            y.backward(dy)
        base = timeit(lambda: step(ref), device, repeat)
        cells = []
        for path in paths_here(device, recipe):
            layer = fp4.FP4Linear.from_linear(ref, recipe)
            t = timeit(on(path, lambda: step(layer)), device, repeat)
            cells.append(f"{t:9.1f} ({t / base:5.1f}x)")
        print(f"{tokens:>6d} x {k_in:>4d} x {k_out:>4d}  {base:8.1f} " + " ".join(f"{c:>18s}" for c in cells))


def train_config(argv):
    """--train-flags -> the TrainConfig of table 3; a bad flag exits with train.py's own line."""
    given = config.parse_args(argv)
    cfg = config.TrainConfig(**given)
    config.check(cfg, given)
    return cfg


def bench_step(device, repeat, recipe, cfg):
    """fwd + bwd + AdamW of train.py's model at its defaults (plus any --train-flags), bf16 vs every FP4 path.
    The models take turns, one step each, `repeat` rounds after two warm-up rounds: each reports its median, and
    each ratio is the geometric mean of the rounds' ratios (so not the medians' ratio), where a shared machine's
    drifts, which move every model in a round alike, cancel."""
    dtype, why = config.activation_dtype(cfg.dtype, device.type)           # train.py's default (--dtype auto)
    base = "bf16" if dtype == torch.bfloat16 else "fp32"
    idx = torch.randint(0, BYTE_VOCAB, (cfg.batch_size, cfg.block_size + 1), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    x, y = idx[:, :-1], idx[:, 1:]
    steps, without_oc = {}, {}
    variants = [(base, None, False)]
    for p in paths_here(device, recipe):           # with --out-control in --train-flags: each path with and without
        variants += [(f"fp4 {recipe} [{p}]", p, False)] + [(f"fp4 {recipe} +OutControl [{p}]", p, True)] * cfg.out_control
    for label, path, out_control in variants:
        torch.manual_seed(cfg.seed)         # (built without --fp4: this table converts the model itself)
        model = train.build_model(dataclasses.replace(cfg, fp4=False), BYTE_VOCAB, dtype, device)[0]
        if path is not None:
            fp4.convert_to_fp4(model, recipe)
        if out_control:     # the outlier channels a calibration would fix (the time does not depend on which)
            without_oc[label] = f"fp4 {recipe} [{path}]"
            for m in model.modules():
                if isinstance(m, fp4.FP4Linear):
                    norms = torch.rand(m.in_features, generator=torch.Generator().manual_seed(0)).to(device)
                    m.columns = fp4.select_outlier_channels(norms, cfg.out_control_frac)
        opt = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device.type)

        def step(model=model, opt=opt, path=path):
            fp4.KERNEL = fastpaths.kernel(path or "reference")
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[label] = step
    times = {label: [] for label in steps}
    for _ in range(repeat + 2):
        for label, step in steps.items():
            times[label].append(timeit(step, device, 1, warmup=0))
    times = {label: torch.tensor(t[2:], dtype=torch.float64) for label, t in times.items()}
    results = {label: t.sort().values[len(t) // 2].item() for label, t in times.items()}   # (timeit's median)

    def ratio(a, b):
        """a's step / b's, paired round by round: the geometric mean ± its s.e. (a shared machine's drifts, which
        move every model in a round alike, cancel; the medians' ratio keeps them)."""
        logs = (times[a] / times[b]).log()
        se = logs.std().item() / len(logs) ** 0.5 if len(logs) > 1 else float("nan")
        r = logs.mean().exp().item()
        return f"{r:5.2f}x ± {r * se:.2f}"
    print(f"\n3. training step, model {cfg.model}, batch {cfg.batch_size} x {cfg.block_size} tokens, on {device}, "
          f"activations {dtype} ({why}); a ratio is paired per round (geometric mean ± s.e. over {repeat} rounds)")
    for label, ms in results.items():
        print(f"{label:44s} {ms:8.1f} ms   {ratio(label, base)} {base}   "
              f"{cfg.batch_size * cfg.block_size / ms * 1e3:9,.0f} tok/s"
              + (f"   {ratio(label, without_oc[label])} without OutControl" if label in without_oc else ""))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(prog="tools/bench.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (see python tools/bench.py --help)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda where this torch sees one, else cpu)")
    p.add_argument("--recipe", default="tetrajet", help="a recipe preset or spec, e.g. 'tetrajet[rht=none]'")
    p.add_argument("--only", choices=["quant", "linear", "step"], help="one table (default: all three)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per cell, their median reported; table 3: rounds "
                   "(default: 5)")
    p.add_argument("--path", choices=fastpaths.PATHS, help="time this FP4 path alone (default: every path here)")
    p.add_argument("--train-flags", default="", help="extra train.py flags for table 3, e.g. '--model 70m'")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    try:
        fp4.parse_recipe(args.recipe)
    except ValueError as e:
        sys.exit(f"error: {e} (--recipe)")
    cfg = train_config(args.train_flags.split())                         # checked before any table runs
    global ONLY_PATH
    ONLY_PATH = args.path
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device} is no device torch knows; use cpu, cuda or cuda:N")
    if device.type not in available:
        p.error(f"--device {args.device}: bench.py runs on cpu, cuda or mps")
    if not available[device.type]:
        sys.exit(f"error: --device {args.device}, but this torch sees no {device.type} device; use --device cpu")
    if args.path and not paths_here(device, args.recipe):
        sys.exit(f"error: --path {args.path} cannot run here: {fastpaths.probe(args.path, device, fp4.parse_recipe(args.recipe))}")
    print(f"torch {torch.__version__} | {device} | {torch.get_num_threads()} threads"
          + (f" | {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    if args.only in (None, "quant"):
        bench_quant(device, args.repeat)
    if args.only in (None, "linear"):
        bench_linear(device, args.repeat, args.recipe)
    if args.only in (None, "step"):
        bench_step(device, args.repeat, args.recipe, cfg)


if __name__ == "__main__":
    main()

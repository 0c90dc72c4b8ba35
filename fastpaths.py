"""
fastpaths.py: the one place that chooses how fp4.fake_quant runs, and says so once at start-up.

fp4.py is the definition. A faster implementation replaces exactly one thing, the kernel hook fp4.KERNEL:

    KERNEL(x2, fmt, outer, tile, rounding, seed, rht_signs, four_over_six, dtype, columns=None) -> x_dq (Mp, Kp)

on the padded operand fp4.fake_quant has already built and the seed it has already drawn, so every path rounds
the same numbers with the same noise (columns: fp4.by_columns). Four paths, the reference's bits (tests/test_paths.py):

    reference  fp4.py's own quantize + dequantize, eager: the readable definition and the judge of the rest
    compiled   the same function through torch.compile: inductor fuses it into a few loops, ~5-10x faster on a CPU
    cpu        cpu_kernels/: C with OpenMP, built with the system's gcc on first use, ~2x faster than compiled
    triton     kernels.py: NVFP4 (and OutControl's MXFP8) kernels in Triton for CUDA GPUs (no MXFP4 kernel)

use("auto", device, recipe) tries triton on CUDA, then cpu on a CPU, then compiled, each only after a probe shows
it runs here and gives the reference's bits; its line names the path and every faster one it passed over, and
why. A path asked for by name that cannot run is an error, never a silent substitution.
"""

import functools

import torch

import fp4

PATHS = ("reference", "compiled", "cpu", "triton")


@functools.cache
def kernel(path):
    """The KERNEL function of `path` (None for the reference), built once; raises if it cannot be built here."""
    if path == "reference":
        return None
    if path == "cpu":
        import cpu_kernels                                   # builds the C library on first use (~1 s)
        cpu_kernels.library()
        return cpu_kernels.fake_quant
    if path == "triton":
        import kernels                                       # needs triton
        return kernels.fake_quant
    # compiled: one graph per (K, format, rounding, RHT, ...) variant, ~2-6 s each the first time (inductor caches
    # them on disk). Rows are dynamic, so every batch size shares a graph; K is static (a symbolic K vectorizes
    # 3-4x worse). A run uses ~10-20 variants: raise dynamo's limit of 8 so it never falls back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    compiled = torch.compile(fp4.reference_kernel, fullgraph=True)

    def run(x2, *args, columns=None):
        if columns is not None:                              # OutControl's split: the definition, on this kernel
            (fmt, outer, tile, *_, four_over_six, dtype) = args
            return fp4.by_columns(run, x2, fmt, outer, tile, four_over_six, dtype, columns)
        x2 = x2.contiguous()                                 # transposed operands: one copy beats strided reads
        torch._dynamo.maybe_mark_dynamic(x2, 0)
        torch._dynamo.mark_static(x2, 1)
        return compiled(x2, *args[:-1], None)                # fp32 out: the cast stays outside the graph
    return run


def probe(path, device, recipe):
    """-> None if `path` runs this recipe here and gives the reference's bits on a small tensor (RTN; SR with an
    RHT-16 and a bf16 output; OutControl's split; the recipe's own 4/6, MS-EDEN or RHT-128), else why not, in one phrase."""
    if path == "cpu" and device.type != "cpu":
        return f"its kernels run on the CPU (this run uses {device.type})"
    if path == "triton" and device.type != "cuda":
        return f"its kernels need a CUDA device (this run uses {device.type})"
    if path == "triton" and recipe.fmt != "nvfp4":
        return f"kernels.py has no {recipe.fmt} kernel"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 256, generator=g).to(device)
    checks = [dict(), dict(rounding="stochastic", rht_signs=fp4.random_signs(g).to(device), dtype=torch.bfloat16),
              dict(columns=fp4.select_outlier_channels(torch.rand(256, generator=g), 0.1))]     # OutControl's split
    if recipe.four_over_six != "none":
        checks.append(dict(tile=recipe.weight_tile, four_over_six=recipe.four_over_six_error))
    if recipe.rht_size != fp4.NVFP4_BLOCK:
        checks.append(dict(rounding=recipe.grad_rounding, rht_signs=fp4.random_signs(g, n=recipe.rht_size).to(device)))
    saved = fp4.KERNEL
    try:
        for kw in checks:
            results = []
            for fp4.KERNEL in (kernel(path), None):
                results.append(fp4.fake_quant(x, recipe, generator=torch.Generator(device).manual_seed(1), **kw))
            if not torch.equal(*results):
                return "its result differs from the reference"
    except Exception as e:                                   # no C compiler, no triton, unsupported device, ...
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        fp4.KERNEL = saved
    return None


def use(requested, device, recipe):
    """Set fp4.KERNEL for this process -> the start-up line that names the path and why. requested: auto or one
    of PATHS. ValueError if a path asked for by name cannot run here."""
    device = torch.device(device)
    if requested not in ("auto",) + PATHS:
        raise ValueError(f"unknown FP4 path {requested!r}; choose auto or one of {', '.join(PATHS)}")
    if requested == "reference":
        fp4.KERNEL = None
        return f"FP4 path: reference (eager fp4.py; recipe {recipe}, {device})"
    candidates = [requested] if requested != "auto" else ["triton"] * (device.type == "cuda") + ["cpu", "compiled"]
    skipped = []
    for path in candidates:
        why_not = probe(path, device, recipe)
        if why_not is None:
            fp4.KERNEL = kernel(path)
            what = {"cpu": "cpu_kernels/, C", "compiled": "torch.compile of fp4.py", "triton": "kernels.py"}[path]
            return f"FP4 path: {path} ({what}; recipe {recipe}, {device}{''.join(f'; not {p}: {w}' for p, w in skipped)})"
        if requested == path:
            raise ValueError(f"FP4 path {path} is not available: {why_not}; use --fp4-path "
                             f"{'compiled' if path in ('cpu', 'triton') else 'reference'}")
        skipped.append((path, why_not))
    fp4.KERNEL = None
    passed = "; ".join(f"not {p}: {w}" for p, w in skipped)
    return "!" * 100 + f"\n!!! FP4 path: reference (eager, ~10x slower; {passed})\n" + "!" * 100


def compile_model(model):
    """torch.compile(model) with each FP4Linear an eager island between the compiled graphs (dynamo cannot trace
    its generator draws; its quantizers are already the chosen kernel). The FP4 layers keep their bits; the
    compiled high-precision parts (attention, norms, LM head) may round differently from eager (docs/usage.md)."""
    for m in model.modules():
        if isinstance(m, fp4.FP4Linear):
            m.forward = torch.compiler.disable(m.forward)
    return torch.compile(model)

"""
fastpaths.py: the implementations of fp4.py's quantizers, and the one place that chooses which one runs.

fp4.py is the definition. An FP4 layer calls its quantizers through an implementation object it holds
(FP4Linear.impl), with three members: fake_quant and quantize_nvfp4 (the signatures of fp4's functions) and
tensor_core_gemm(device) (None, or a GEMM straight from the FP4 codes). Four implementations, all giving the
same bits (tests/test_paths.py ties each to the reference):

    reference  fp4.REFERENCE: fp4.py's functions run eagerly; the readable definition and the judge of the rest
    compiled   the same functions through torch.compile: inductor fuses each quantizer into a few loops (C++ and
               OpenMP on a CPU), ~5-10x faster than eager there
    cpu        cpu_kernels/: hand-written C with OpenMP, built with the system's gcc on first use, ~1.5-2x faster
               than compiled; what makes a simulated FP4 step cost ~1.5x a high-precision one on a laptop CPU
    triton     kernels.py: NVFP4 quantizers in Triton for CUDA GPUs, and on FP4 tensor cores (Blackwell) a GEMM
               that multiplies the codes themselves

select(requested, device, recipe) decides once, at start-up: "auto" takes triton on CUDA, cpu on a CPU, else
compiled, else the reference, each only after a probe shows it runs here and gives the reference's bits on a
small tensor; its line names the path and every faster one it passed over with the reason. A path asked for by
name that cannot run is an error, never a silent substitution. OutControl's MXFP8 channels (10% of the
columns, rounded up to whole 32-channel blocks) always run the reference.

Imports: this module imports fp4; kernels.py (triton) and cpu_kernels/ are imported only when chosen. fp4.py
imports none of them.
"""

import functools

import torch

import fp4

PATHS = ("reference", "compiled", "cpu", "triton")

# -----------------------------------------------------------------------------
# compiled: fp4.py's own quantizer bodies through torch.compile


@functools.cache
def _compile(fn):
    """fn(x2, ...) through torch.compile: one graph per (K, format, outer, tile, rounding, RHT, device) variant,
    ~2-6 s to compile on a laptop CPU the first time (inductor caches it on disk for later runs). The row count
    is dynamic, so every batch size and every layer of one width share a graph; K is static, because with a
    symbolic K the block indexing vectorizes 3-4x worse (measured 8.3 vs 2.2 ms on 512x2048 with RHT)."""
    # A run uses ~10-20 variants, a test session more: raise dynamo's limit of 8 graphs per function so it
    # never falls back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    compiled = torch.compile(fn, fullgraph=True)

    def run(x2, *args):
        if not x2.is_contiguous():   # a transposed operand (wgrad's dYᵀ, Xᵀ): one copy beats strided reads
            x2 = _transpose_graph()(x2.t()) if x2.t().is_contiguous() else x2.contiguous()
        torch._dynamo.maybe_mark_dynamic(x2, 0)
        torch._dynamo.mark_static(x2, 1)
        return compiled(x2, *args)
    return run


@functools.cache
def _transpose_graph():
    """x (R, C) contiguous -> xᵀ (C, R) contiguous through inductor's tiled transpose: 4-5x faster than eager's
    x.t().contiguous() on a CPU (0.12 vs 0.62 ms per 1M bf16 elements), which copies element by element."""
    # dynamic=False, one small graph per shape: with dynamic=True (or once automatic dynamic shapes kicked in),
    # quantizer graphs compiled afterwards came out with a symbolic K despite mark_static, 5-8x slower
    # (10 vs 1.3 ms per 1M elements; seen with TORCH_LOGS=dynamic as a symbol for x2.size()[1])
    return torch.compile(lambda x: x.t().contiguous(), fullgraph=True, dynamic=False)


def _quantize_nvfp4_2d(x2, outer, tile, rounding, seed, H=None, four_over_six=None):
    """fp4.quantize_nvfp4's body on a padded fp32 (Mp, Kp), in the form inductor's CPU backend vectorizes:
    packed codes code(2j) + 16·code(2j+1) formed in fp32 and returned as int16, scales as raw uint8 bytes
    (fp32 -> uint8 conversions and e4m3 outputs each measured 2-4x slower on 4096x4096). Same values."""
    if H is not None:
        x2 = fp4._rotate(x2, H)
    magnitude, negative, block_scale, _, outer_scale = fp4._round_nvfp4(x2, outer, tile, rounding, seed, four_over_six)
    k = fp4._code_values(magnitude, negative).reshape(x2.shape[0], -1, 2)                # (Mp, Kp/2, 2)
    return (k[..., 0] + k[..., 1] * 16.0).to(torch.int16), block_scale.view(torch.uint8), outer_scale


class FastPath:
    """What every fast implementation shares: fp4.py's padding and seed draw before its kernel, the crop after
    (fp4.pad_operand / crop_result, fp4.pad_codes_operand / codes_result),
    so a kernel sees exactly the padded (Mp, Kp) operand and the int64 (2,) seed the reference rounds with.
    Each subclass supplies _fake_quant_2d (-> (Mp, Kp) in `dtype` or fp32; fake_quant casts) and _quantize_nvfp4_2d (-> packed codes,
    E4M3 scale bytes, outer scale); both take four_over_six (None, "mae", "mse"; §10), rounding "eden" (MS-EDEN,
    §11) and 16 or 128 RHT signs, already checked here; what a kernel module lacks (its SUPPORTS) is refused by
    name with a ValueError (_refuse_missing: today both kernel modules have every feature, so it guards a
    kernel module that lags the reference)."""
    name = None

    def fake_quant(self, x, recipe, rounding="nearest", tile=(1, 16), generator=None, *, rht_signs=None,
                   dtype=torch.float32, four_over_six=None):
        recipe, tile = fp4.get_recipe(recipe), tuple(tile)
        fp4._check_four_over_six(four_over_six, rounding, rht_signs, recipe.fmt)
        x2, seed = fp4.pad_operand(x, recipe, rounding, tile, generator, rht_signs)
        out = self._fake_quant_2d(x2, recipe, tile, rounding, seed, rht_signs, dtype, four_over_six)
        return fp4.crop_result(out.to(dtype), x, rht_signs)

    def quantize_nvfp4(self, x, *, outer="tensor", tile=(1, 16), rounding="nearest", generator=None, rht_signs=None,
                       four_over_six=None):
        tile = tuple(tile)
        x2, seed = fp4.pad_codes_operand(x, outer, tile, rounding, generator, rht_signs, four_over_six)
        out = self._quantize_nvfp4_2d(x2, outer, tile, rounding, seed, rht_signs, four_over_six)
        return fp4.codes_result(*out, x, outer)

    def tensor_core_gemm(self, device):
        return None

    def _refuse_missing(self, four_over_six, where, rounding=None, rht_signs=None):
        """ValueError naming what the kernels lack of what this call asks: Four Over Six, MS-EDEN or RHT-128
        (each kernel module lists what it has in its SUPPORTS)."""
        asked = (("four_over_six", "Four Over Six", four_over_six is not None), ("eden", "MS-EDEN", rounding == fp4.EDEN),
                 ("rht128", "RHT-128", rht_signs is not None and len(rht_signs) != fp4.NVFP4_BLOCK))
        lacks = [what for key, what, wanted in asked if wanted and key not in self.kernels.SUPPORTS]
        if lacks:
            raise ValueError(f"path '{self.name}' has no {' / '.join(lacks)} kernel yet ({where}); "
                             f"use --fp4-path compiled or reference")


class Compiled(FastPath):
    """fp4.py's quantizer bodies (fp4._fake_quant_2d, and _quantize_nvfp4_2d above) through torch.compile."""
    name = "compiled"

    def _fake_quant_2d(self, x2, recipe, tile, rounding, seed, rht_signs, dtype, four_over_six=None):
        # (the cast to dtype stays outside the compiled graph: with a bf16 output inductor's CPU code for SR
        # recomputes each block's scale per element, 6x slower than the fp32 kernel plus eager's .to(); docs/LOG.md)
        return _compile(fp4._fake_quant_2d)(x2, recipe.fmt, recipe.outer, tile, rounding, seed,
                                            fp4.rht_operator(rht_signs, x2.device), four_over_six)

    def _quantize_nvfp4_2d(self, x2, outer, tile, rounding, seed, rht_signs, four_over_six=None):
        return _compile(_quantize_nvfp4_2d)(x2, outer, tile, rounding, seed, fp4.rht_operator(rht_signs, x2.device),
                                            four_over_six)

# -----------------------------------------------------------------------------
# cpu: cpu_kernels/ (C, OpenMP)


class CPU(FastPath):
    """cpu_kernels/'s C quantizers: NVFP4 (per-tensor and double-block, 1x16 and 16x16 tiles) and MXFP4 fake
    quantization with Four Over Six, NVFP4 codes; RTN, SR and MS-EDEN, with RHT-16 or RHT-128; they write bf16
    themselves (the same rounding as .to())."""
    name = "cpu"

    def __init__(self):
        import cpu_kernels                               # builds the C library on first use (~1 s)
        self.kernels = cpu_kernels

    def _fake_quant_2d(self, x2, recipe, tile, rounding, seed, rht_signs, dtype, four_over_six=None):
        self._refuse_missing(four_over_six, "cpu_kernels/", rounding, rht_signs)
        return self.kernels.fake_quant(x2, recipe.fmt, recipe.outer, tile, seed, fp4.rht_operator(rht_signs, x2.device),
                                       dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32,
                                       eden=rounding == fp4.EDEN, four_over_six=four_over_six)

    def _quantize_nvfp4_2d(self, x2, outer, tile, rounding, seed, rht_signs, four_over_six=None):
        self._refuse_missing(four_over_six, "cpu_kernels/", rounding, rht_signs)
        return self.kernels.quantize_nvfp4(x2, outer, tile, seed, fp4.rht_operator(rht_signs, x2.device),
                                           eden=rounding == fp4.EDEN, four_over_six=four_over_six)

# -----------------------------------------------------------------------------
# triton: kernels.py (CUDA)


class Triton(FastPath):
    """kernels.py's NVFP4 kernels (the MXFP4 recipe has none), and its GEMM from the codes on FP4 tensor cores."""
    name = "triton"

    def __init__(self):
        import kernels                                   # needs triton
        self.kernels = kernels

    def _fake_quant_2d(self, x2, recipe, tile, rounding, seed, rht_signs, dtype, four_over_six=None):
        self._refuse_missing(four_over_six, "kernels.py", rounding, rht_signs)
        if recipe.fmt != "nvfp4":
            raise ValueError(f"path 'triton' has NVFP4 kernels only; recipe {recipe.name!r} is {recipe.fmt}")
        return self.kernels.fake_quant_nvfp4(x2, outer=recipe.outer, tile=tile, seed=seed, signs=rht_signs,
                                             eden=rounding == fp4.EDEN, four_over_six=four_over_six)

    def _quantize_nvfp4_2d(self, x2, outer, tile, rounding, seed, rht_signs, four_over_six=None):
        self._refuse_missing(four_over_six, "kernels.py", rounding, rht_signs)
        return self.kernels.quantize_nvfp4(x2, outer=outer, tile=tile, seed=seed, signs=rht_signs,
                                           eden=rounding == fp4.EDEN, four_over_six=four_over_six)

    def tensor_core_gemm(self, device):
        """kernels.fp4_gemm on a GPU with FP4 tensor cores (Blackwell), else None (dequantize + matmul)."""
        return self.kernels.fp4_gemm if self.kernels.fp4_gemm_supported(torch.device(device)) else None

# -----------------------------------------------------------------------------
# the one place that decides


@functools.cache
def get(name):
    """The implementation called `name` (one of PATHS), built once. Raises if it cannot be built here (no
    triton, no C compiler): select() turns that into its reason."""
    if name not in PATHS:
        raise ValueError(f"unknown FP4 path {name!r}; choose auto or one of {PATHS}")
    return {"reference": lambda: fp4.REFERENCE, "compiled": Compiled, "cpu": CPU, "triton": Triton}[name]()


def select(requested, device, recipe):
    """-> (implementation, a line saying which and why, for the caller to print once at start-up).
    requested: "auto" or one of PATHS. auto: triton on CUDA for NVFP4 recipes, cpu on a CPU, else compiled,
    each if it builds and matches the reference on a small tensor (probe), else the reference with a loud
    banner. Every path auto passes over is named in the line, with why. A path asked for by name that
    cannot run is an error."""
    recipe, device = fp4.get_recipe(recipe), torch.device(device)
    if requested not in ("auto",) + PATHS:
        raise ValueError(f"unknown FP4 path {requested!r}; choose auto or one of {PATHS}")
    if requested == "reference":
        return fp4.REFERENCE, f"FP4 path: reference (eager fp4.py; recipe {recipe.name}, {device})"
    candidates = [requested] if requested != "auto" else \
        (["triton"] if device.type == "cuda" else []) + ["cpu", "compiled"]
    skipped = []                                         # (path, why not) for the paths auto passed over
    for path in candidates:
        why_not = probe(path, device, recipe)
        if why_not is None:
            impl = get(path)
            what = {"cpu": "cpu_kernels/, C", "compiled": "torch.compile of fp4.py's quantizers",
                    "triton": "kernels.py"}[path]
            if path == "triton":
                what += ("; GEMMs on FP4 tensor cores (kernels.fp4_gemm)" if impl.tensor_core_gemm(device)
                         else "; GEMMs dequantize + matmul: no FP4 tensor cores on this GPU")
            passed = "".join(f"; not {p}: {why}" for p, why in skipped)
            return impl, f"FP4 path: {path} ({what}; recipe {recipe.name}, {device}{passed})"
        if requested == path:
            raise ValueError(f"FP4 path {path} is not available: {why_not}; use --fp4-path "
                             f"{'compiled' if path in ('cpu', 'triton') else 'reference'}")
        skipped.append((path, why_not))
    passed = "; ".join(f"not {p}: {why}" for p, why in skipped)
    return fp4.REFERENCE, ("!" * 100 + f"\n!!! FP4 path: reference (eager, ~10x slower; {passed})\n" + "!" * 100)


def probe(path, device, recipe):
    """-> None if `path` runs this recipe on this device and gives the reference's bits on a small tensor
    (RTN, and SR with RHT and a bf16 output, and for a recipe with Four Over Six a 4/6 quantization with its
    error and W's tile, and for one with MS-EDEN or RHT-128 that rounding after a 128-point RHT), else why not
    (one phrase)."""
    if path == "cpu" and device.type != "cpu":
        return f"its kernels run on the CPU (this run uses {device.type})"
    if path == "triton" and device.type != "cuda":
        return f"its kernels need a CUDA device (this run uses {device.type})"
    if path == "triton" and recipe.fmt != "nvfp4":
        return f"kernels.py has no {recipe.fmt} kernel"
    g = torch.Generator().manual_seed(0)
    x, signs = torch.randn(32, 256, generator=g).to(device), fp4.random_signs(g).to(device)
    try:
        impl = get(path)
        checks = [dict(), dict(rounding="stochastic", rht_signs=signs, dtype=torch.bfloat16)]
        if recipe.four_over_six != "none":
            checks.append(dict(tile=recipe.weight_tile, four_over_six=recipe.four_over_six_error))
        if fp4.EDEN in (recipe.grad_rounding, recipe.other_rounding) or recipe.rht_size != fp4.NVFP4_BLOCK:
            eden = fp4.EDEN in (recipe.grad_rounding, recipe.other_rounding)
            checks.append(dict(rounding=fp4.EDEN if eden else "stochastic",
                               rht_signs=fp4.random_signs(g, n=recipe.rht_size).to(device)))
        for kw in checks:
            same = [i.fake_quant(x, recipe, generator=torch.Generator(device).manual_seed(1), **kw)
                    for i in (impl, fp4.REFERENCE)]
            if not torch.equal(*same):
                return "its result differs from the reference"
    except Exception as e:                               # no C compiler, no triton, unsupported device, ...
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def compile_model(model):
    """torch.compile(model) with each FP4Linear as an eager island between the compiled graphs: dynamo cannot
    trace its generator draws or the dequantized tensors it saves for the backward, and its quantizers are
    already its implementation's (compiled on their own on the compiled path): the same bits either way."""
    for m in model.modules():
        if isinstance(m, fp4.FP4Linear):
            m.forward = torch.compiler.disable(m.forward)
    return torch.compile(model)

"""Every fast path (fastpaths.py: compiled, cpu, triton) as fp4.KERNEL gives the reference's bits (fp4.KERNEL = None):
fake quantization, codes and scales (the C and Triton quantizers), and a whole FP4 layer's forward and backward,
for every NVFP4 variant (Four Over Six, MS-EDEN, RHT-128) and MXFP4, RTN and SR (the same counter-based noise from
the same seed), with RHT, fp32 and bf16, contiguous and transposed inputs, NaN, Inf and all-zero blocks. Then
fastpaths.use/probe/kernel (what auto picks and says, what it refuses) and compile_model. Triton runs in its
interpreter on a CPU (slow: fewer cases) and on the GPU when there is one; a path that cannot be built here (no
triton, no C compiler) is skipped. Run: python -m pytest tests/test_paths.py -q"""
import pytest
import torch

import fastpaths
import fp4
from conftest import DEVICE, awkward, equal_with_nan, layer_outputs_and_grads, same_quantized, with_kernel

# the interpreter runs the kernels in numpy, which warns on the Inf/NaN arithmetic the NaN tests exercise
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
INTERPRETED = not torch.cuda.is_available()          # triton through TRITON_INTERPRET=1 (conftest.py)
SIGNS = fp4.random_signs(torch.Generator().manual_seed(5))
SIGNS128 = fp4.random_signs(torch.Generator().manual_seed(6), n=128)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["compiled", "cpu", "triton"])
def path(request):
    """A fast path's name, or a skip saying why it cannot be built here."""
    try:
        fastpaths.kernel(request.param)
    except Exception as e:
        pytest.skip(f"{request.param} is not available here: {type(e).__name__}: {str(e).splitlines()[0]}")
    return request.param


def device_of(path):
    return DEVICE if path == "triton" else "cpu"


def both(path, fn):
    """-> (fn() with fp4.KERNEL = the path's kernel, fn() with the reference)."""
    return with_kernel(fastpaths.kernel(path), fn), with_kernel(None, fn)


def skip_unsupported(path, recipe):
    if path == "triton" and fp4.parse_recipe(recipe).fmt != "nvfp4":
        pytest.skip("kernels.py has NVFP4 kernels only")


def kernel_codes(path, x, outer, tile=(1, 16), rounding="nearest", signs=None, four_over_six=None, seed=3):
    """The path's own NVFP4 quantizer on x padded as fp4.quantize_nvfp4 pads it, the seed drawn as fp4 draws it,
    cropped to x's rows -> (codes, block_scale, outer_scale); the reference's fp4.quantize_nvfp4 of x."""
    if path == "compiled":
        pytest.skip("compiled: fastpaths compiles fake_quant's reference_kernel only (no codes)")
    dev = x.device
    x2 = fp4.pad_2d(x, tile[0], fp4.k_multiple("nvfp4", outer, rounding, signs))
    s = None if rounding == "nearest" else fp4.draw_seed(torch.Generator(dev).manual_seed(seed), dev)
    if path == "cpu":
        import cpu_kernels
        got = cpu_kernels.quantize_nvfp4(x2, outer, tile, rounding, s, signs, four_over_six)
    else:
        import kernels
        got = kernels.quantize_nvfp4(x2, outer, tile, s, signs, rounding == "eden", four_over_six)
    rows = x.shape[0]
    got = (got[0][:rows], got[1][:rows], got[2] if outer == "tensor" else got[2][:rows])
    ref = fp4.quantize_nvfp4(x, outer=outer, tile=tile, rounding=rounding, rht_signs=signs, four_over_six=four_over_six,
                             generator=torch.Generator(dev).manual_seed(seed))
    return got, ref


# torch.compile costs a few seconds per graph when its cache is cold (CI): the compiled path, whose code is fp4.py's
# own, runs a representative subset (each format, tile and rounding once); the C and Triton paths run everything
COMPILED_FAKE_QUANT = {("tetrajet", (1, 16), "nearest"), ("tetrajet", (16, 16), "stochastic"),
                       ("nvidia", (16, 16), "nearest"), ("nvidia", (1, 16), "stochastic"),
                       ("mxfp4", (1, 16), "nearest"), ("mxfp4", (1, 16), "stochastic")}


def compiled_subset(path, case, subset):
    if path == "compiled" and case not in subset:
        pytest.skip("compiled: a representative subset (each graph is a cold compile)")


def variants(path):
    """(rht_signs, input dtype, output dtype) combinations: all eight, or two where each costs a compile (torch.compile:
    one graph per input dtype and RHT) or minutes (the Triton interpreter)."""
    full = [(s, i, o) for s in (None, SIGNS) for i in (torch.float32, torch.bfloat16) for o in (torch.float32, torch.bfloat16)]
    return full[::7] if path == "compiled" or (path == "triton" and INTERPRETED) else full


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("recipe,tile", [(r, t) for r in ("nvidia", "tetrajet") for t in ((1, 16), (16, 16))]
                         + [("mxfp4", (1, 16))])
def test_fake_quant_equals_the_reference_bit_for_bit(path, recipe, tile, rounding):
    skip_unsupported(path, recipe)
    compiled_subset(path, (recipe, tile, rounding), COMPILED_FAKE_QUANT)
    x = awkward(cols=200).to(device_of(path))    # K = 200: padded to 208 (per-tensor), 224 (MXFP4), 256 (1x128)
    x[11, 7] = float("nan")                      # its block (or the whole tensor) is NaN, the rest the same bits
    for shape_x in (x, x[:17]):                  # a second row count: the compiled graph is shared across them
        for signs, in_dtype, dtype in variants(path):
            got, ref = both(path, lambda: fp4.fake_quant(
                shape_x.to(in_dtype), recipe, rounding, tile, torch.Generator(shape_x.device).manual_seed(3),
                rht_signs=None if signs is None else signs.to(shape_x.device), dtype=dtype))
            assert got.dtype == dtype and equal_with_nan(got, ref), (signs is not None, in_dtype, dtype)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("outer,tile", [(o, t) for o in ("tensor", 128) for t in ((1, 16), (16, 16))])
def test_codes_and_scales_equal_the_reference_bit_for_bit(path, outer, tile, rounding):
    x = awkward(cols=200).to(device_of(path))
    x[11, 7], x[30, 150] = float("nan"), float("inf")      # a NaN scale's byte included
    for signs, in_dtype, _ in variants(path)[::2]:
        got, ref = kernel_codes(path, x.to(in_dtype), outer, tile, rounding, None if signs is None else signs.to(x.device))
        assert same_quantized(got, ref), (signs is not None, in_dtype)


@pytest.mark.parametrize("recipe", ["nvidia", "tetrajet", "mxfp4"])
def test_transposed_operands_and_zero_tensors_equal_the_reference(path, recipe):
    # wgrad quantizes dYᵀ and Xᵀ: strided views (the C kernel reads them in place with 8x8 in-register transposes,
    # 16 rows per block), with the RHT, a NaN and an Inf block. The compiled path copies a strided operand before
    # its graph, the same for every recipe: one recipe, with K = 200 so that it reuses the graphs compiled above.
    skip_unsupported(path, recipe)
    if path == "compiled" and recipe != "nvidia":
        pytest.skip("compiled: one recipe (its strided operands are copied before the graph, whatever the recipe)")
    dev = device_of(path)
    x = awkward(rows=200 if path == "compiled" else 384, cols=64).to(dev)
    x[5, 3], x[150, 60] = float("nan"), float("inf")       # a NaN block, and an Inf block: its scale is NaN
    for signs, in_dtype, dtype in variants(path)[-1:] if path == "compiled" else variants(path):
        xt = x.to(in_dtype).t()                                                       # (64, 384), strides (1, 64)
        for rounding in ("stochastic",) if path == "compiled" else ("nearest", "stochastic"):
            got, ref = both(path, lambda: fp4.fake_quant(xt, recipe, rounding, generator=torch.Generator(dev).manual_seed(4),
                                                         dtype=dtype, rht_signs=None if signs is None else signs.to(dev)))
            assert equal_with_nan(got, ref), (signs is not None, in_dtype, rounding, dtype)
    zeros = torch.zeros(32, 200 if path == "compiled" else 128, device=dev)   # per-tensor A = 0 takes S_enc = 1;
    # zero blocks get the tiny scales
    got = with_kernel(fastpaths.kernel(path), lambda: fp4.fake_quant(zeros, recipe, "stochastic", generator=torch.Generator(dev)))
    assert not got.view(torch.int32).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("recipe", ["tetrajet", "nvidia", "mxfp4", "quartet2"])
def test_fp4_layer_outputs_and_grads_equal_the_reference(path, recipe, dtype):
    # a whole layer: RTN, SR, RHT on transposed operands, the same random draws in the same order; in bf16 and in
    # fp32 (what --dtype auto picks on a CPU without native bf16)
    skip_unsupported(path, recipe)
    compiled_subset(path, recipe, {"tetrajet"})                # each layer case is ~6 cold compiles
    if recipe == "quartet2" and dtype == torch.bfloat16:
        pytest.skip("quartet2: fp32 (its quantizers are the same in bf16: the cases below)")
    got, ref = (layer_outputs_and_grads(k, recipe, device_of(path), dtype) for k in (fastpaths.kernel(path), None))
    assert got[0].dtype == dtype and all(equal_with_nan(g, r) for g, r in zip(got, ref))     # y, dx, dW


@pytest.mark.parametrize("recipe", ["tetrajet", "nvidia", "nvidia-4over6", "quartet2", "mxfp4"])
def test_the_start_up_probe_passes(path, recipe):
    if path == "triton" and DEVICE != "cuda":
        pytest.skip("fastpaths takes triton on CUDA only")
    skip_unsupported(path, recipe)
    if path == "compiled" and recipe != "tetrajet":
        pytest.skip("compiled: one recipe (each probe is several cold compiles)")
    assert fastpaths.probe(path, torch.device(device_of(path)), fp4.parse_recipe(recipe)) is None

# -----------------------------------------------------------------------------
# Four Over Six (§10), MS-EDEN and RHT-128 (§11): the 2026 recipes' quantizers on every path


@pytest.mark.parametrize("error", ["mae", "mse"])
@pytest.mark.parametrize("outer,tile", [(o, t) for o in ("tensor", 128) for t in ((1, 16), (16, 16))])
def test_four_over_six_equals_the_reference_bit_for_bit(path, error, outer, tile):
    # (a 4/6 graph is ~25 s to compile cold: the compiled path runs one case, fp4.py's own code)
    compiled_subset(path, (error, outer, tile), {("mse", "tensor", (1, 16))})
    recipe = fp4.Recipe("nvidia" if outer == "tensor" else "tetrajet", outer=outer)
    x = awkward(cols=200).to(device_of(path))
    x[11, 7] = float("nan")
    pairs = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16))
    for in_dtype, dtype in pairs[:1] if path == "triton" and INTERPRETED else pairs:   # (bf16 in: the codes below)
        got, ref = both(path, lambda: fp4.fake_quant(x.to(in_dtype), recipe, tile=tile, dtype=dtype, four_over_six=error))
        assert equal_with_nan(got, ref), (in_dtype, dtype)
    # codes too, and a transposed bf16 operand whose K (384) is a whole number of 128-blocks (the reference's
    # codes once failed on it: the chosen candidates' layout followed the transposed input)
    xt = awkward(rows=384, cols=64).to(device_of(path)).bfloat16().t()
    for operand in (x, xt):
        got, ref = kernel_codes(path, operand, outer, tile, four_over_six=error)
        assert same_quantized(got, ref), tuple(operand.shape)


def test_eden_on_double_block_equals_the_reference_bit_for_bit(path):
    # (§13) values on every path; codes, E4M3 bytes and the corrected outer scale on the C and Triton paths;
    # contiguous and transposed operands, fp32 and bf16, a group dominated by one value
    dev = device_of(path)
    x = awkward(cols=200).to(dev)
    x[9, 130] = 400.0
    xt = awkward(rows=384, cols=64).to(dev).t()
    run = lambda t: (lambda: fp4.fake_quant(t, "tetrajet", "eden", rht_signs=SIGNS128.to(dev), generator=torch.Generator(dev)))
    for operand in (x,) if path == "compiled" else (x, xt.bfloat16()) if path == "triton" and INTERPRETED else (x, xt, x.bfloat16()):
        got, ref = both(path, run(operand))
        assert equal_with_nan(got, ref)
    if path != "compiled":
        got, ref = kernel_codes(path, x, 128, rounding="eden", signs=SIGNS128)
        assert same_quantized(got, ref)


def test_mxfp8_channels_equal_the_reference_bit_for_bit(path):
    # OutControl's MXFP8 (fp4.fake_quant_mxfp8, §8) on every path: NaN, Inf, -0.0, an all-zero block, a block of
    # subnormals (X = 2^-127) and one of 1e30, K = 200 padded to 224; contiguous and transposed (wgrad's dYᵀ),
    # fp32 and bf16 in and out
    dev = device_of(path)
    x = awkward(cols=200)
    x[2, 3], x[4, 40], x[6, 7] = float("nan"), float("inf"), -0.0
    x[10, 64:96], x[11, :32] = 1e-42, 1e30 * torch.randn(32, generator=torch.Generator().manual_seed(1))
    x, xt = x.to(dev), awkward(rows=384, cols=64).to(dev).t()
    fast = path == "compiled" or (path == "triton" and INTERPRETED)
    for operand in (x, xt) if fast else (x, xt, x.bfloat16(), xt.bfloat16()):
        for dtype in (torch.float32,) if fast else (torch.float32, torch.bfloat16):
            got, ref = both(path, lambda: fp4.fake_quant_mxfp8(operand, dtype))
            assert equal_with_nan(got, ref), (tuple(operand.shape), operand.dtype, dtype)


@pytest.mark.parametrize("recipe", ["tetrajet", "nvidia", "nvidia-4over6", "mxfp4"])
def test_outcontrol_split_operands_equal_the_reference_bit_for_bit(path, recipe):
    # fake_quant with columns (fp4.by_columns; the C path's one-pass twin): the recipe's FP4 on the inliers in
    # descending-norm order (padded to its block), MXFP8 on the outliers; the activations' 1x16 tiles and the
    # weights' (16x16 for nvidia: 40 rows padded to 48), Four Over Six, fp32 and bf16 in and out. On the C path also:
    # 6 small outliers (one zero-padded MXFP8 block), 256 outliers (several steps) beside 256 inliers (no padding),
    # an Inf among the inliers (per-tensor amax Inf), all-zero inliers
    if path != "cpu" and recipe in ("nvidia-4over6", "mxfp4"):
        pytest.skip("by_columns on this path's own kernel: two recipes suffice (the C path has its own twin)")
    r, dev, g = fp4.parse_recipe(recipe), device_of(path), torch.Generator().manual_seed(3)
    x = awkward(cols=200)
    columns = fp4.select_outlier_channels(x.norm(dim=0), 0.1)                       # 168 inliers, 32 outliers
    nonfinite, inf_in, zero_in = x.clone(), x.clone(), x.clone()
    nonfinite[2, columns[1][5]], nonfinite[4, columns[0][3]] = float("nan"), float("inf")
    inf_in[1, columns[1][0]], zero_in[:, columns[1]] = float("inf"), 0.0
    tail = awkward(cols=128)
    tail[:, 122:] *= 1e-5
    wide = torch.randn(40, 512, generator=g) * torch.logspace(3, -3, 512)
    cases = [(x, columns), (nonfinite, columns), (tail, (torch.arange(122, 128), torch.arange(122))),
             (wide, fp4.select_outlier_channels(wide.norm(dim=0), 0.5)), (inf_in, columns), (zero_in, columns)]
    fast = path == "compiled" or (path == "triton" and INTERPRETED)
    for x, columns in cases[:2] if fast else cases:
        for operand in (x,) if fast else (x, x.bfloat16()):
            for tile, dtype in ((1, 16), torch.float32), (r.weight_tile, torch.float32 if fast else torch.bfloat16):
                got, ref = both(path, lambda: fp4.fake_quant(operand.to(dev), r, tile=tile, dtype=dtype, columns=columns,
                                                             four_over_six=fp4.four_over_six_of(r, "weights")))
                assert equal_with_nan(got, ref), (tuple(x.shape), len(columns[0]), tuple(tile), operand.dtype, dtype)


@pytest.mark.parametrize("rounding,n_signs", [("eden", 128), ("eden", None), ("stochastic", 128), ("nearest", 128)])
def test_ms_eden_and_rht128_equal_the_reference_bit_for_bit(path, rounding, n_signs):
    # MS-EDEN (the per-128 correction, the stochastically rounded E4M3 scale) and the RHT-128 butterfly, on
    # contiguous and transposed (wgrad) operands, K = 200 padded to 256, a NaN row block and an Inf
    compiled_subset(path, (rounding, n_signs), {("eden", 128)})
    dev = device_of(path)
    signs = None if n_signs is None else SIGNS128.to(dev)
    x = awkward(cols=200).to(dev)
    x[11, 7] = float("nan")
    xt = awkward(rows=384, cols=64).to(dev).t()                                        # (64, 384), strided
    # (the compiled path copies strided operands before its graph: the transposed test above covers that)
    for operand in (x, x[:17]) if path == "compiled" else (x, xt, x[:17]):
        for in_dtype, dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)):
            got, ref = both(path, lambda: fp4.fake_quant(operand.to(in_dtype), "nvidia", rounding, rht_signs=signs,
                                                         generator=torch.Generator(dev).manual_seed(3), dtype=dtype))
            assert equal_with_nan(got, ref), (tuple(operand.shape), in_dtype, dtype)
    got, ref = kernel_codes(path, x, "tensor", rounding=rounding, signs=signs)
    assert same_quantized(got, ref)
    if rounding != "eden":                          # RHT-128 with a per-128 outer scale (TetraJet-style)
        got, ref = kernel_codes(path, x, 128, rounding=rounding, signs=signs)
        assert same_quantized(got, ref)

# -----------------------------------------------------------------------------
# fastpaths.use / probe / kernel: what auto picks and says, what it refuses


def test_auto_picks_a_fast_path_on_cpu_names_it_and_refuses_what_cannot_run():
    line = fastpaths.use("auto", "cpu", fp4.RECIPES["tetrajet"])       # cpu_kernels/, or compiled saying why not
    assert (fp4.KERNEL is fastpaths.kernel("cpu") and "FP4 path: cpu" in line) or \
           (fp4.KERNEL is fastpaths.kernel("compiled") and "not cpu:" in line)
    assert "recipe tetrajet" in line
    line = fastpaths.use("auto", "cpu", fp4.RECIPES["nvidia-4over6"])  # its probe checks a 16x16 "mae" 4/6 too
    assert "FP4 path: cpu" in line or "not cpu:" in line
    fastpaths.use("compiled", "cpu", fp4.RECIPES["tetrajet"])          # (its MXFP4 bits: the fake_quant test)
    assert fp4.KERNEL is fastpaths.kernel("compiled") and fastpaths.kernel("reference") is None
    assert fastpaths.use("reference", "cpu", fp4.RECIPES["nvidia"]).startswith("FP4 path: reference") and fp4.KERNEL is None
    with pytest.raises(ValueError, match="FP4 path triton is not available: its kernels need a CUDA device .*use --fp4-path compiled"):
        fastpaths.use("triton", "cpu", fp4.RECIPES["tetrajet"])
    with pytest.raises(ValueError, match="unknown FP4 path 'fastest'"):
        fastpaths.use("fastest", "cpu", fp4.RECIPES["tetrajet"])
    assert fastpaths.probe("cpu", torch.device("cuda"), fp4.RECIPES["tetrajet"]).startswith("its kernels run on the CPU")
    assert fastpaths.probe("triton", torch.device("cuda"), fp4.RECIPES["mxfp4"]) == "kernels.py has no mxfp4 kernel"


def test_a_failed_c_build_is_one_clear_error_and_auto_says_why_it_passed_over_cpu(monkeypatch, tmp_path):
    cpu_kernels = pytest.importorskip("cpu_kernels")
    monkeypatch.setattr(cpu_kernels, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(cpu_kernels, "CFLAGS", cpu_kernels.CFLAGS + ("-fno-such-flag",))
    cpu_kernels.library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="could not build fp4_cpu.c: .*no-such-flag"):
            cpu_kernels.library()
        line = fastpaths.use("auto", "cpu", fp4.RECIPES["tetrajet"])
        assert fp4.KERNEL is fastpaths.kernel("compiled") and "not cpu: RuntimeError" in line
        with pytest.raises(ValueError, match="FP4 path cpu is not available"):
            fastpaths.use("cpu", "cpu", fp4.RECIPES["tetrajet"])
    finally:
        cpu_kernels.library.cache_clear()               # the next caller loads the real build again


def test_cpu_kernels_write_bf16_like_torch_and_take_only_2d_cpu_tensors(path):
    if path != "cpu":
        pytest.skip("cpu_kernels only")
    import cpu_kernels
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 1e3
    x[0, 0] = float("nan")                              # ties to even and NaN exactly as torch's .to(torch.bfloat16)
    args = ("nvfp4", "tensor", (1, 16), "nearest", None, None, None)
    out32 = cpu_kernels.fake_quant(x, *args, dtype=torch.float32)
    out16 = cpu_kernels.fake_quant(x, *args, dtype=torch.bfloat16)
    assert out16.dtype == torch.bfloat16 and equal_with_nan(out16, out32.to(torch.bfloat16))
    assert equal_with_nan(out32, fp4.reference_kernel(x, *args))
    assert cpu_kernels.fake_quant(x, *args, dtype=torch.float16).dtype == torch.float32   # fake_quant casts the rest
    got, ref = both(path, lambda: fp4.fake_quant(x, "nvidia", dtype=torch.float16))
    assert got.dtype == torch.float16 and equal_with_nan(got, ref)
    with pytest.raises(AssertionError, match="a 2-D CPU tensor"):
        cpu_kernels.fake_quant(x.view(4, 16, 128), *args)


def test_triton_takes_only_padded_nvfp4_operands():
    kernels = pytest.importorskip("kernels", reason="triton is not installed")
    with pytest.raises(AssertionError, match="NVFP4 and MXFP8 kernels only"):
        kernels.fake_quant(torch.randn(4, 64, device=DEVICE), "mxfp4", "tensor", (1, 16), "nearest", None)
    with pytest.raises(AssertionError, match="not padded"):
        kernels.fake_quant(torch.randn(4, 40, device=DEVICE), "mxfp8", "tensor", (1, 32), "nearest", None)
    with pytest.raises(AssertionError, match="not padded"):
        kernels.fake_quant_nvfp4(torch.randn(16, 200, device=DEVICE), outer=128)


def test_fp4_layers_inside_a_compiled_model_give_the_same_bits():
    # train.py --compile: fastpaths.compile_model keeps each FP4Linear an eager island between the compiled graphs
    # (dynamo used to crash on it); with ReLU between the layers (exact everywhere) compiled must equal eager
    fp4.KERNEL = fastpaths.kernel("compiled")

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(fp4.FP4Linear(64, 48, seed=3), torch.nn.ReLU(), fp4.FP4Linear(48, 32, seed=4))
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    results = []
    for model in (build(), fastpaths.compile_model(build())):
        xg = x.clone().requires_grad_()
        y = model(xg)
        y.square().sum().backward()
        results.append((y.detach(), xg.grad, getattr(model, "_orig_mod", model)[0].weight.grad))
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled)


@needs_gpu
@pytest.mark.parametrize("fmt,outer,tile", [("nvfp4", 128, (1, 16)), ("nvfp4", "tensor", (16, 16)),
                                            ("nvfp4", "tensor", (1, 16)), ("mxfp4", None, (1, 16))])
def test_the_reference_gives_the_same_bits_on_cpu_and_gpu(fmt, outer, tile):
    """fp4.py is the judge on every device, so none of its ops may round differently on a GPU (CUDA divides by a
    Python number as a multiplication by its reciprocal: fp4._div divides by a device tensor instead)."""
    x, seed = awkward(rows=512, cols=1024), fp4.draw_seed(torch.Generator().manual_seed(4))
    for rounding in ("nearest", "stochastic") + (("eden",) if (fmt, outer, tile) == ("nvfp4", "tensor", (1, 16)) else ()):
        cpu, gpu = (fp4.reference_kernel(x.to(d), fmt, outer, tile, rounding, seed.to(d)) for d in ("cpu", "cuda"))
        assert equal_with_nan(gpu.cpu(), cpu), rounding
    cpu, gpu = fp4.quantize_mxfp8(x), fp4.quantize_mxfp8(x.cuda())            # OutControl's MXFP8 channels
    assert all(torch.equal(g.cpu().view(torch.uint8), c.view(torch.uint8)) for g, c in zip(gpu, cpu))

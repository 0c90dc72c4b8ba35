"""Every fast implementation (fastpaths.py: compiled, cpu, triton) equals the reference bit for bit: fake
quantization, codes and scales, and a whole FP4 layer's forward and backward, for every NVFP4 variant and
MXFP4, RTN and SR (the same counter-based noise from the same seed), with RHT, fp32 and bf16, contiguous and
transposed inputs, NaN, Inf and all-zero blocks. Triton runs in its interpreter on a CPU (slow: fewer cases)
and on the GPU when there is one; a path that cannot be built here (no triton, no C compiler) is skipped.
Run: python -m pytest tests/test_paths.py -q"""
import pytest
import torch

import fastpaths
import fp4
from conftest import DEVICE, awkward, equal_with_nan, layer_outputs_and_grads, same_quantized

# the interpreter runs the kernels in numpy, which warns on the Inf/NaN arithmetic the NaN tests exercise
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
INTERPRETED = not torch.cuda.is_available()          # triton through TRITON_INTERPRET=1 (conftest.py)
SIGNS = fp4.random_signs(torch.Generator().manual_seed(5))


@pytest.fixture(params=["compiled", "cpu", "triton"])
def impl(request):
    """A fast implementation, or a skip saying why it cannot run here."""
    try:
        impl = fastpaths.get(request.param)
        if request.param == "cpu":
            impl.kernels.library()                   # builds the C library (or says why not)
    except Exception as e:
        pytest.skip(f"{request.param} is not available here: {type(e).__name__}: {e}")
    return impl


def device_of(impl):
    return DEVICE if impl.name == "triton" else "cpu"


def skip_unsupported(impl, recipe):
    if impl.name == "triton" and fp4.get_recipe(recipe).fmt != "nvfp4":
        pytest.skip("kernels.py has NVFP4 kernels only")


# torch.compile costs a few seconds per graph when its cache is cold (CI): the compiled path, whose code is fp4.py's
# own, runs a representative subset (each format, tile and rounding once); the C and Triton paths run everything
COMPILED_FAKE_QUANT = {("tetrajet", (1, 16), "nearest"), ("tetrajet", (16, 16), "stochastic"),
                       ("nvidia", (16, 16), "nearest"), ("nvidia", (1, 16), "stochastic"),
                       ("mxfp4", (1, 16), "nearest"), ("mxfp4", (1, 16), "stochastic")}
COMPILED_CODES = {("tensor", (16, 16), "nearest"), (128, (1, 16), "stochastic")}


def compiled_subset(impl, case, subset):
    if impl.name == "compiled" and case not in subset:
        pytest.skip("compiled: a representative subset (each graph is a cold compile)")


def variants(impl):
    """(rht_signs, input dtype, output dtype) combinations: all eight, or two where each costs a compile (torch.compile:
    one graph per input dtype and RHT) or minutes (the Triton interpreter)."""
    full = [(s, i, o) for s in (None, SIGNS) for i in (torch.float32, torch.bfloat16) for o in (torch.float32, torch.bfloat16)]
    return full[::7] if impl.name == "compiled" or (impl.name == "triton" and INTERPRETED) else full


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("recipe,tile", [(r, t) for r in ("nvidia", "tetrajet") for t in ((1, 16), (16, 16))]
                         + [("mxfp4", (1, 16))])
def test_fake_quant_equals_the_reference_bit_for_bit(impl, recipe, tile, rounding):
    skip_unsupported(impl, recipe)
    compiled_subset(impl, (recipe, tile, rounding), COMPILED_FAKE_QUANT)
    x = awkward(cols=200).to(device_of(impl))    # K = 200: padded to 208 (per-tensor), 224 (MXFP4), 256 (1x128)
    x[11, 7] = float("nan")                      # its block (or the whole tensor) is NaN, the rest the same bits
    for shape_x in (x, x[:17]):                  # a second row count: the compiled graph is shared across them
        for signs, in_dtype, dtype in variants(impl):
            got, ref = [i.fake_quant(shape_x.to(in_dtype), recipe, rounding, tile,
                                     torch.Generator(shape_x.device).manual_seed(3),
                                     rht_signs=None if signs is None else signs.to(shape_x.device), dtype=dtype)
                        for i in (impl, fp4.REFERENCE)]
            assert got.dtype == dtype and equal_with_nan(got, ref), (signs is not None, in_dtype, dtype)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("outer,tile", [(o, t) for o in ("tensor", 128) for t in ((1, 16), (16, 16))])
def test_codes_and_scales_equal_the_reference_bit_for_bit(impl, outer, tile, rounding):
    compiled_subset(impl, (outer, tile, rounding), COMPILED_CODES)
    x = awkward(cols=200).to(device_of(impl))
    x[11, 7], x[30, 150] = float("nan"), float("inf")      # a NaN scale's byte included
    for signs, in_dtype, _ in variants(impl)[::2]:
        got, ref = [i.quantize_nvfp4(x.to(in_dtype), outer=outer, tile=tile, rounding=rounding,
                                     generator=torch.Generator(x.device).manual_seed(3),
                                     rht_signs=None if signs is None else signs.to(x.device))
                    for i in (impl, fp4.REFERENCE)]
        assert same_quantized(got, ref), (signs is not None, in_dtype)


@pytest.mark.parametrize("recipe", ["nvidia", "tetrajet", "mxfp4"])
def test_transposed_operands_and_zero_tensors_equal_the_reference(impl, recipe):
    # wgrad quantizes dYᵀ and Xᵀ: strided views (the C kernel reads them in place with 8x8 in-register transposes,
    # 16 rows per block; the compiled path copies them first), with the RHT, a NaN and an Inf block
    skip_unsupported(impl, recipe)
    dev = device_of(impl)
    x = awkward(rows=384, cols=64).to(dev)
    x[5, 3], x[200, 60] = float("nan"), float("inf")       # a NaN block, and an Inf block: its scale is NaN
    for signs, in_dtype, dtype in variants(impl)[-1:] if impl.name == "compiled" else variants(impl):
        xt = x.to(in_dtype).t()                                                       # (64, 384), strides (1, 64)
        for rounding in ("stochastic",) if impl.name == "compiled" else ("nearest", "stochastic"):
            got, ref = [i.fake_quant(xt, recipe, rounding, generator=torch.Generator(dev).manual_seed(4), dtype=dtype,
                                     rht_signs=None if signs is None else signs.to(dev)) for i in (impl, fp4.REFERENCE)]
            assert equal_with_nan(got, ref), (signs is not None, in_dtype, rounding, dtype)
    zeros = torch.zeros(32, 128, device=dev)        # per-tensor A = 0 takes S_enc = 1; zero blocks get the tiny scales
    assert not impl.fake_quant(zeros, recipe, "stochastic", generator=torch.Generator(dev)).view(torch.int32).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("recipe", ["tetrajet", "nvidia", "mxfp4"])
def test_fp4_layer_outputs_and_grads_equal_the_reference(impl, recipe, dtype, monkeypatch):
    # a whole layer: RTN, SR, RHT on transposed operands, the same random draws in the same order; in bf16 and in
    # fp32 (what --dtype auto picks on a CPU without native bf16). The simulated GEMMs: test_gemm.py tests the
    # FP4 tensor-core branch.
    skip_unsupported(impl, recipe)
    compiled_subset(impl, recipe, {"tetrajet"})                # each layer case is ~6 cold compiles
    if impl.name == "triton":
        monkeypatch.setattr(impl.kernels, "fp4_gemm_supported", lambda device: False)
    got, ref = (layer_outputs_and_grads(i, recipe, device_of(impl), dtype) for i in (impl, fp4.REFERENCE))
    assert got[0].dtype == dtype and all(equal_with_nan(g, r) for g, r in zip(got, ref))     # y, dx, dW


@pytest.mark.parametrize("recipe", ["tetrajet", "nvidia"])
def test_the_start_up_probe_passes(impl, recipe):
    if impl.name == "triton" and DEVICE != "cuda":
        pytest.skip("select() takes triton on CUDA only")
    assert fastpaths.probe(impl.name, torch.device(device_of(impl)), fp4.get_recipe(recipe)) is None


# Four Over Six (§10), MS-EDEN and RHT-128 (§11): the 2026 recipes' quantizers on every path
SIGNS128 = fp4.random_signs(torch.Generator().manual_seed(6), n=128)
COMPILED_NEW = {("mse", "tensor", (1, 16))}         # a 4/6 graph is ~25 s to compile cold: one case (fp4.py's code)


@pytest.mark.parametrize("error", ["mae", "mse"])
@pytest.mark.parametrize("outer,tile", [(o, t) for o in ("tensor", 128) for t in ((1, 16), (16, 16))])
def test_four_over_six_equals_the_reference_bit_for_bit(impl, error, outer, tile):
    compiled_subset(impl, (error, outer, tile), COMPILED_NEW)
    recipe = fp4.Recipe("nvidia" if outer == "tensor" else "tetrajet", outer=outer)
    x = awkward(cols=200).to(device_of(impl))
    x[11, 7] = float("nan")
    both = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16))
    for in_dtype, dtype in both[:1] if impl.name == "triton" and INTERPRETED else both:   # (bf16 in: the codes below)
        got, ref = [i.fake_quant(x.to(in_dtype), recipe, tile=tile, dtype=dtype, four_over_six=error)
                    for i in (impl, fp4.REFERENCE)]
        assert equal_with_nan(got, ref), (in_dtype, dtype)
    # codes too, and a transposed bf16 operand whose K (384) is a whole number of 128-blocks (the reference's
    # codes once failed on it: the chosen candidates' layout followed the transposed input)
    xt = awkward(rows=384, cols=64).to(device_of(impl)).bfloat16().t()
    for operand in (x, xt):
        got, ref = [i.quantize_nvfp4(operand, outer=outer, tile=tile, four_over_six=error) for i in (impl, fp4.REFERENCE)]
        assert same_quantized(got, ref), tuple(operand.shape)


@pytest.mark.parametrize("rounding,n_signs", [("eden", 128), ("eden", None), ("stochastic", 128), ("nearest", 128)])
def test_ms_eden_and_rht128_equal_the_reference_bit_for_bit(impl, rounding, n_signs):
    # MS-EDEN (the per-128 correction, the stochastically rounded E4M3 scale) and the RHT-128 butterfly, on
    # contiguous and transposed (wgrad) operands, K = 200 padded to 256, a NaN row block and an Inf
    compiled_subset(impl, (rounding, n_signs), {("eden", 128)})
    dev = device_of(impl)
    signs = None if n_signs is None else SIGNS128.to(dev)
    x = awkward(cols=200).to(dev)
    x[11, 7] = float("nan")
    xt = awkward(rows=384, cols=64).to(dev).t()                                        # (64, 384), strided
    for operand in (x, xt, x[:17]):
        for in_dtype, dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)):
            got, ref = [i.fake_quant(operand.to(in_dtype), "nvidia", rounding, generator=torch.Generator(dev).manual_seed(3),
                                     rht_signs=signs, dtype=dtype) for i in (impl, fp4.REFERENCE)]
            assert equal_with_nan(got, ref), (tuple(operand.shape), in_dtype, dtype)
    got, ref = [i.quantize_nvfp4(x, rounding=rounding, generator=torch.Generator(dev).manual_seed(3), rht_signs=signs)
                for i in (impl, fp4.REFERENCE)]
    assert same_quantized(got, ref)


def test_quartet2_layer_outputs_and_grads_equal_the_reference(impl, monkeypatch):
    if impl.name == "triton":
        monkeypatch.setattr(impl.kernels, "fp4_gemm_supported", lambda device: False)
    got, ref = (layer_outputs_and_grads(i, "quartet2", device_of(impl), torch.float32) for i in (impl, fp4.REFERENCE))
    assert all(equal_with_nan(g, r) for g, r in zip(got, ref))

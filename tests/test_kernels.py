"""The fast paths equal the reference bit for bit: fp4.py through torch.compile, and kernels.py's Triton
kernels (on CPU through TRITON_INTERPRET=1, on a GPU when there is one). SR is compared exactly too: every
path draws the same counter-based noise from the same seed. Run: python -m pytest tests/test_kernels.py -q"""

import os

import pytest
import torch

import fp4

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # must precede kernels.py's @triton.jit (triton reads it there)
try:
    import kernels
except ImportError:                                  # no triton (e.g. macOS): only the compiled-path tests run
    kernels = None
needs_triton = pytest.mark.skipif(kernels is None, reason="triton is not installed")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # the Triton tests run where the kernels compile
# the interpreter runs the kernels in numpy, which warns on the Inf/NaN arithmetic the NaN tests exercise
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def awkward(rows=40, cols=200, seed=0):
    """Gaussian rows at very different scales, plus an all-zero block, a block whose E4M3 scale underflows to
    a subnormal (1e-7 beside 1e2), bf16-representable values (E4M3 ties) and a K that is no block multiple."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 2, rows)[:, None]
    x[3, 16:32] = 0.0
    x[5, :] = 100.0 * torch.randn(cols, generator=g)
    x[5, 48:64] = 1e-7 * torch.randn(16, generator=g)
    x[7:9] = (torch.randn(2, cols, generator=g) * 3).bfloat16().float()
    return x


def same_quantized(a, b):
    """Two NVFP4 tuples are equal: codes, scale bytes, outer scales (bits, NaN where the other has NaN)."""
    return (torch.equal(a.codes, b.codes) and torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))
            and equal_with_nan(a.outer_scale, b.outer_scale))


def equal_with_nan(a, b):
    """Same NaN positions, and every other element the same bits (so -0.0 and +0.0 differ)."""
    bits = lambda t: t.float().nan_to_num(0.0).view(torch.int32)      # noqa: E731
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(bits(a), bits(b))


NVFP4_CASES = [(outer, tile, rounding) for outer in ("tensor", 128) for tile in ((1, 16), (16, 16))
               for rounding in ("nearest", "stochastic")]
FAKE_QUANT_CASES = [("tetrajet", "nearest", (1, 16)), ("tetrajet", "stochastic", (1, 16)),
                    ("nvidia", "nearest", (16, 16)), ("nvidia", "stochastic", (1, 16)),
                    ("mxfp4", "nearest", (1, 16)), ("mxfp4", "stochastic", (1, 16))]

# -----------------------------------------------------------------------------
# compiled (torch.compile of fp4.py) == reference


@pytest.mark.parametrize("recipe,rounding,tile", FAKE_QUANT_CASES)
def test_compiled_fake_quant_equals_reference_bit_for_bit(recipe, rounding, tile):
    x = awkward()
    x[11, 7] = float("nan")                                           # its block (or tensor) becomes NaN
    for shape_x in (x, x[:17, :150]):                                 # a second shape reuses the dynamic graph
        ref = fp4.fake_quant(shape_x, recipe, rounding, tile, torch.Generator().manual_seed(1))
        got = fp4.fake_quant(shape_x, recipe, rounding, tile, torch.Generator().manual_seed(1), path="compiled")
        assert equal_with_nan(got, ref)


@pytest.mark.parametrize("outer,tile,rounding", [("tensor", (16, 16), "nearest"), (128, (1, 16), "stochastic")])
def test_compiled_quantize_nvfp4_equals_reference_bit_for_bit(outer, tile, rounding):
    x = awkward()
    ref = fp4.quantize_nvfp4(x, outer=outer, tile=tile, rounding=rounding, generator=torch.Generator().manual_seed(2))
    got = fp4.quantize_nvfp4(x, outer=outer, tile=tile, rounding=rounding, generator=torch.Generator().manual_seed(2),
                             path="compiled")
    assert same_quantized(got, ref)


@pytest.mark.parametrize("recipe", ["tetrajet", "nvidia"])
def test_compiled_fake_quant_with_rht_bf16_output_and_transposed_input_equals_reference(recipe):
    x = awkward(rows=48, cols=300).bfloat16().t()                     # (300, 48) strided view, K = 48
    signs = fp4.random_signs(torch.Generator().manual_seed(8))
    kw = dict(rounding="stochastic", rht_signs=signs, dtype=torch.bfloat16)
    ref = fp4.fake_quant(x, recipe, generator=torch.Generator().manual_seed(9), **kw)
    got = fp4.fake_quant(x, recipe, generator=torch.Generator().manual_seed(9), path="compiled", **kw)
    assert got.dtype == torch.bfloat16 and got.shape == (300, 48) and equal_with_nan(got, ref)


def layer_outputs_and_grads(path, recipe, device="cpu", dtype=torch.bfloat16):
    """One FP4 layer, forward and backward on fixed inputs in `dtype` (3-D, K = 96 not a multiple of 128) ->
    (y, dx, dW): RTN, SR, RHT on transposed operands and the layer's random draws in order, which every path
    must reproduce."""
    g = torch.Generator().manual_seed(3)
    x, dy = torch.randn(4, 12, 96, generator=g).to(dtype), torch.randn(4, 12, 40, generator=g).to(dtype)
    layer = fp4.FP4Linear(96, 40, recipe=recipe, seed=7, path=path).to(device)
    layer.weight.data.copy_(torch.randn(40, 96, generator=g) / 10)
    xi = x.to(device).requires_grad_()
    y = layer(xi)
    y.backward(dy.to(device))
    return y, xi.grad, layer.weight.grad


def test_fp4_linear_gives_identical_outputs_and_grads_on_the_compiled_path():
    for got, ref in zip(*(layer_outputs_and_grads(path, "tetrajet") for path in ("compiled", "reference"))):
        assert equal_with_nan(got, ref)


@pytest.mark.parametrize("recipe", ["tetrajet", "nvidia", "mxfp4"])
def test_fp4_linear_in_float32_gives_identical_bits_on_the_fast_cpu_paths(recipe):
    # --dtype auto picks fp32 on CPUs without native bf16: the fast paths must agree there too
    ref = layer_outputs_and_grads("reference", recipe, dtype=torch.float32)
    for path in ("cpu", "compiled"):
        for got, want in zip(layer_outputs_and_grads(path, recipe, dtype=torch.float32), ref):
            assert got.dtype == torch.float32 and equal_with_nan(got, want), (path, recipe)

# -----------------------------------------------------------------------------
# the one place that decides


def test_select_path_picks_a_fast_path_on_cpu_and_refuses_what_cannot_run():
    path, line = fp4.select_path("auto", "cpu", "tetrajet")     # cpu_kernels.c, or compiled saying why not
    assert (path == "cpu" and "FP4 path: cpu" in line) or (path == "compiled" and "not cpu:" in line)
    assert fp4.select_path("compiled", "cpu", "mxfp4")[0] == "compiled"
    assert fp4.select_path("reference", "cpu", "nvidia")[0] == "reference"
    with pytest.raises(ValueError, match="CUDA"):
        fp4.select_path("triton", "cpu", "tetrajet")
    with pytest.raises(ValueError, match="unknown FP4 path"):
        fp4.select_path("fastest", "cpu", "tetrajet")

# -----------------------------------------------------------------------------
# kernels.py (Triton) == reference


@needs_triton
@pytest.mark.parametrize("outer,tile,rounding", NVFP4_CASES)
def test_triton_quantize_and_fake_quant_equal_reference_bit_for_bit(outer, tile, rounding):
    x = awkward(cols=200 if outer == "tensor" else 256).to(DEVICE)   # per-tensor: Kp = 208, a partial tile
    gen = lambda: torch.Generator(DEVICE).manual_seed(3)             # noqa: E731
    ref = fp4.quantize_nvfp4(x, outer=outer, tile=tile, rounding=rounding, generator=gen())
    got = fp4.quantize_nvfp4(x, outer=outer, tile=tile, rounding=rounding, generator=gen(), path="triton")
    assert same_quantized(got, ref)
    recipe = fp4.Recipe("r", outer=outer)
    ref = fp4.fake_quant(x, recipe, rounding, tile, gen())
    assert equal_with_nan(fp4.fake_quant(x, recipe, rounding, tile, gen(), path="triton"), ref)


@needs_triton
def test_triton_keeps_nan_in_its_block_like_the_reference():
    x = awkward(cols=256).to(DEVICE)
    x[2, 20] = float("nan")
    for outer in ("tensor", 128):
        recipe = fp4.Recipe("r", outer=outer)
        assert equal_with_nan(fp4.fake_quant(x, recipe, path="triton"), fp4.fake_quant(x, recipe))
        # and a NaN element's code is 0, as in the reference (not 0x7 from a NaN-dropping min)
        assert same_quantized(*(fp4.quantize_nvfp4(x, outer=outer, path=p) for p in ("triton", "reference")))


@needs_triton
@pytest.mark.parametrize("outer", ["tensor", 128])
def test_triton_fused_rht_equals_rht_then_quantize(outer):
    x = awkward(cols=256).to(DEVICE)                 # the same 16 multiply-adds in the same order: same bits
    signs = fp4.random_signs(torch.Generator().manual_seed(5)).to(DEVICE)
    seed = fp4.draw_seed(torch.Generator(DEVICE).manual_seed(6), DEVICE)
    ref = fp4._fake_quant_2d(fp4.rht16(x, signs), "nvfp4", outer, (1, 16), "stochastic", seed)
    assert equal_with_nan(kernels.fake_quant_nvfp4(x, outer, seed=seed, signs=signs), ref)


@needs_triton
@pytest.mark.parametrize("outer", ["tensor", 128])
def test_triton_takes_bf16_input_like_the_reference(outer):
    x = awkward(cols=256).bfloat16().to(DEVICE)
    gen = lambda: torch.Generator(DEVICE).manual_seed(7)             # noqa: E731
    ref = fp4.quantize_nvfp4(x, outer=outer, rounding="stochastic", generator=gen())
    assert same_quantized(fp4.quantize_nvfp4(x, outer=outer, rounding="stochastic", generator=gen(), path="triton"), ref)


@needs_triton
@pytest.mark.parametrize("recipe", ["tetrajet", "nvidia"])
def test_triton_passes_the_start_up_probe_select_path_runs_on_cuda(recipe):
    assert fp4._probe("triton", torch.device(DEVICE), fp4.get_recipe(recipe)) is None


@needs_triton
@pytest.mark.parametrize("recipe", ["tetrajet", "nvidia"])
def test_fp4_linear_gives_identical_outputs_and_grads_on_the_triton_path(recipe, monkeypatch):
    """A whole FP4 layer, forward and backward (RTN, SR, RHT on transposed operands, the same random draws in the
    same order): the simulated GEMMs, so no FP4 tensor cores even on a GPU that has them (test_gemm.py tests those)."""
    monkeypatch.setattr(kernels, "fp4_gemm_supported", lambda device: False)
    for got, ref in zip(*(layer_outputs_and_grads(path, recipe, DEVICE) for path in ("triton", "reference"))):
        assert equal_with_nan(got, ref)


@needs_triton
def test_triton_wrapper_rejects_unpadded_input_and_mx_recipes():
    with pytest.raises(ValueError, match="NVFP4 kernels only"):
        fp4.fake_quant(torch.randn(4, 64, device=DEVICE), "mxfp4", path="triton")
    with pytest.raises(ValueError, match="not padded"):
        kernels.fake_quant_nvfp4(torch.randn(16, 200, device=DEVICE), outer=128)


@needs_triton
@needs_gpu
@pytest.mark.parametrize("outer,tile,rounding", NVFP4_CASES)
def test_triton_on_gpu_equals_reference_on_gpu(outer, tile, rounding):
    x = awkward(rows=512, cols=1024).cuda()
    gen = lambda: torch.Generator("cuda").manual_seed(3)             # noqa: E731
    ref = fp4.quantize_nvfp4(x, outer=outer, tile=tile, rounding=rounding, generator=gen())
    got = fp4.quantize_nvfp4(x, outer=outer, tile=tile, rounding=rounding, generator=gen(), path="triton")
    assert same_quantized(got, ref)


@needs_gpu
@pytest.mark.parametrize("fmt,outer,tile", [("nvfp4", 128, (1, 16)), ("nvfp4", "tensor", (16, 16)),
                                            ("nvfp4", "tensor", (1, 16)), ("mxfp4", None, (1, 16))])
def test_reference_gives_the_same_bits_on_cpu_and_gpu(fmt, outer, tile):
    """fp4.py is the judge on every device, so none of its ops may round differently on a GPU (CUDA divides by a
    Python number as a multiplication by its reciprocal: fp4._div divides by a device tensor instead)."""
    x, seed = awkward(rows=512, cols=1024), fp4.draw_seed(torch.Generator().manual_seed(4))
    for rounding in fp4.ROUNDINGS:
        cpu, gpu = (fp4._fake_quant_2d(x.to(d), fmt, outer, tile, rounding, seed.to(d)) for d in ("cpu", "cuda"))
        assert equal_with_nan(gpu.cpu(), cpu), rounding
    cpu, gpu = fp4.quantize_mxfp8(x), fp4.quantize_mxfp8(x.cuda())            # OutControl's MXFP8 channels
    assert all(torch.equal(g.cpu().view(torch.uint8), c.view(torch.uint8)) for g, c in zip(gpu, cpu))

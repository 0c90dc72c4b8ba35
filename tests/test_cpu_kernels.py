"""The `cpu` path (cpu_kernels.c through cpu_kernels.py) equals the reference bit for bit, fake quantization and
codes: every NVFP4 variant (per-tensor and double-block, 1x16 and 16x16 tiles, RTN and SR, with and without
RHT) and MXFP4, fp32 and bf16 in and out, contiguous and transposed inputs, NaN and Inf blocks, and a whole
FP4 layer's forward and backward. SR is compared exactly: the C hash draws the same counter-based noise as
fp4.uniform_noise. Skipped where no C compiler with OpenMP can build the library.
Run: python -m pytest tests/test_cpu_kernels.py -q"""

import pytest
import torch

import cpu_kernels
import fp4
from test_kernels import NVFP4_CASES, awkward, equal_with_nan, layer_outputs_and_grads

try:
    cpu_kernels.library()
    BUILD_ERROR = None
except RuntimeError as e:
    BUILD_ERROR = str(e)
pytestmark = pytest.mark.skipif(BUILD_ERROR is not None, reason=f"cpu_kernels.c does not build here: {BUILD_ERROR}")

CASES = [(recipe, tile) for recipe in ("nvidia", "tetrajet") for tile in ((1, 16), (16, 16))] + [("mxfp4", (1, 16))]


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("recipe,tile", CASES)
def test_cpu_fake_quant_equals_reference_bit_for_bit(recipe, tile, rounding):
    x = awkward(cols=200)                   # K = 200: padded to 208 (per-tensor), 224 (MXFP4), 256 (double-block)
    x[11, 7] = float("nan")                 # a NaN block: NaN out there, same bits elsewhere
    signs = fp4.random_signs(torch.Generator().manual_seed(5))
    for rht_signs in (None, signs):
        for in_dtype in (torch.float32, torch.bfloat16):
            for dtype in (torch.float32, torch.bfloat16):
                got, ref = [fp4.fake_quant(x.to(in_dtype), recipe, rounding, tile,
                                           torch.Generator().manual_seed(3), path, rht_signs=rht_signs, dtype=dtype)
                            for path in ("cpu", "reference")]
                assert got.dtype == dtype and equal_with_nan(got, ref), (rht_signs is not None, in_dtype, dtype)


@pytest.mark.parametrize("outer,tile,rounding", NVFP4_CASES)
def test_cpu_quantize_nvfp4_equals_reference_bit_for_bit(outer, tile, rounding):
    # codes, E4M3 scale bytes (a NaN scale's byte included) and outer scales
    x = awkward(cols=200)
    x[11, 7], x[30, 150] = float("nan"), float("inf")
    signs = fp4.random_signs(torch.Generator().manual_seed(5))
    for rht_signs in (None, signs):
        for in_dtype in (torch.float32, torch.bfloat16):
            got, ref = [fp4.quantize_nvfp4(x.to(in_dtype), outer=outer, tile=tile, rounding=rounding, path=path,
                                           generator=torch.Generator().manual_seed(3), rht_signs=rht_signs)
                        for path in ("cpu", "reference")]
            assert torch.equal(got.codes, ref.codes)
            assert torch.equal(got.block_scale.view(torch.uint8), ref.block_scale.view(torch.uint8))
            assert equal_with_nan(got.outer_scale, ref.outer_scale)


@pytest.mark.parametrize("recipe", ["nvidia", "tetrajet", "mxfp4"])
def test_cpu_fake_quant_reads_transposed_operands_in_place(recipe):
    # wgrad quantizes dYᵀ and Xᵀ: transposed views, read column-wise by the kernel (16 rows per block)
    x = awkward(rows=256, cols=64).to(torch.bfloat16)
    xt = x.t()                                                        # (64, 256), strides (1, 64)
    for rounding in ("nearest", "stochastic"):
        got, ref = [fp4.fake_quant(xt, recipe, rounding, generator=torch.Generator().manual_seed(4),
                                   path=path, rht_signs=torch.tensor(fp4.NVIDIA_RHT_SIGNS, dtype=torch.float32),
                                   dtype=torch.bfloat16) for path in ("cpu", "reference")]
        assert equal_with_nan(got, ref)


@pytest.mark.parametrize("recipe", ["nvidia", "tetrajet", "mxfp4"])
def test_cpu_inf_blocks_match_the_reference(recipe):
    # an Inf makes its block's amax (per-tensor: every block's) Inf: NaN scales, as in the reference
    x = awkward(cols=256)
    x[2, 5], x[9, 130] = float("inf"), float("-inf")
    got, ref = [fp4.fake_quant(x, recipe, path=path) for path in ("cpu", "reference")]
    assert equal_with_nan(got, ref)


def test_cpu_all_zero_tensor_quantizes_to_zeros():
    # per-tensor A = 0 takes S_enc = 1 (fp4.tensor_scales); double-block's zero blocks get s_i = 2^-9, MXFP4's 2^-127
    for recipe in fp4.RECIPES.values():
        got = fp4.fake_quant(torch.zeros(32, 128), recipe, "stochastic", path="cpu")
        assert torch.equal(got.view(torch.int32), torch.zeros(32, 128, dtype=torch.int32))


def test_cpu_bf16_output_rounds_like_torch():
    # the kernel writes bf16 itself: ties to even and NaN exactly as torch's .to(torch.bfloat16)
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 1e3
    x[0, 0] = float("nan")
    out32 = cpu_kernels.fake_quant(x, "nvfp4", "tensor", (1, 16), None, dtype=torch.float32)
    out16 = cpu_kernels.fake_quant(x, "nvfp4", "tensor", (1, 16), None, dtype=torch.bfloat16)
    assert equal_with_nan(out16, out32.to(torch.bfloat16))


@pytest.mark.parametrize("recipe", ["tetrajet", "nvidia", "mxfp4"])
def test_fp4_layer_on_the_cpu_path_has_the_reference_output_and_grads(recipe):
    for got, ref in zip(*(layer_outputs_and_grads(path, recipe) for path in ("cpu", "reference"))):
        assert equal_with_nan(got, ref)


def test_cpu_path_refuses_what_it_does_not_do():
    x = torch.randn(16, 64)
    with pytest.raises(ValueError, match="no mxfp4 kernel with outer='tensor', tile=.16, 16."):
        cpu_kernels.fake_quant(torch.randn(16, 64), "mxfp4", "tensor", (16, 16), None)
    with pytest.raises(ValueError, match="writes fp32 or bf16"):
        cpu_kernels.fake_quant(x, "nvfp4", "tensor", (1, 16), None, dtype=torch.float16)


def test_a_failed_build_is_one_clear_error_and_auto_says_why_it_passed_over_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(cpu_kernels, "CFLAGS", cpu_kernels.CFLAGS + ("-fno-such-flag",))
    cpu_kernels.library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="could not build cpu_kernels.c: .*no-such-flag"):
            cpu_kernels.library()
        path, line = fp4.select_path("auto", "cpu", "tetrajet")
        assert path == "compiled" and "not cpu: RuntimeError" in line
        with pytest.raises(ValueError, match="FP4 path cpu is not available"):
            fp4.select_path("cpu", "cpu", "tetrajet")
    finally:
        cpu_kernels.library.cache_clear()               # the next caller loads the real build again


@pytest.mark.parametrize("recipe", ["nvidia", "tetrajet", "mxfp4"])
def test_cpu_wide_transposed_operands_with_rht_match_the_reference(recipe):
    # the AVX2 paths: 8x8 transposed loads (fp32 and bf16, 16-row blocks), RHT four 16-chunks at a time, rows of
    # 128 columns through the intrinsics row loop (fp32 and bf16 out, RTN and SR, a NaN and an Inf block)
    x = awkward(rows=384, cols=64)
    x[5, 3], x[200, 60] = float("nan"), float("inf")
    signs = fp4.random_signs(torch.Generator().manual_seed(7))
    for in_dtype in (torch.float32, torch.bfloat16):
        xt = x.to(in_dtype).t()                                       # (64, 384), strides (1, 64)
        for rounding in ("nearest", "stochastic"):
            for dtype in (torch.float32, torch.bfloat16):
                got, ref = [fp4.fake_quant(xt, recipe, rounding, generator=torch.Generator().manual_seed(4),
                                           path=path, rht_signs=signs, dtype=dtype) for path in ("cpu", "reference")]
                assert equal_with_nan(got, ref), (in_dtype, rounding, dtype)

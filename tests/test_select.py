"""fastpaths.select, the one place that chooses the implementation: what auto picks and says, what it refuses,
and each fast path's own refusals and edge cases; the reference's bits on CPU and GPU; a compiled model.
Run: python -m pytest tests/test_select.py -q"""
import pytest
import torch

import fastpaths
import fp4
from conftest import DEVICE, awkward, equal_with_nan

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_picks_a_fast_path_on_cpu_names_it_and_refuses_what_cannot_run():
    impl, line = fastpaths.select("auto", "cpu", "tetrajet")     # cpu_kernels/, or compiled saying why not
    assert (impl.name == "cpu" and "FP4 path: cpu" in line) or (impl.name == "compiled" and "not cpu:" in line)
    assert fastpaths.select("compiled", "cpu", "mxfp4")[0].name == "compiled"
    assert fastpaths.select("reference", "cpu", "nvidia")[0] is fp4.REFERENCE
    with pytest.raises(ValueError, match="CUDA"):
        fastpaths.select("triton", "cpu", "tetrajet")
    with pytest.raises(ValueError, match="unknown FP4 path"):
        fastpaths.select("fastest", "cpu", "tetrajet")


def test_a_failed_c_build_is_one_clear_error_and_auto_says_why_it_passed_over_cpu(monkeypatch, tmp_path):
    cpu_kernels = pytest.importorskip("cpu_kernels")
    monkeypatch.setattr(cpu_kernels, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(cpu_kernels, "CFLAGS", cpu_kernels.CFLAGS + ("-fno-such-flag",))
    cpu_kernels.library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="could not build fp4_cpu.c: .*no-such-flag"):
            cpu_kernels.library()
        impl, line = fastpaths.select("auto", "cpu", "tetrajet")
        assert impl.name == "compiled" and "not cpu: RuntimeError" in line
        with pytest.raises(ValueError, match="FP4 path cpu is not available"):
            fastpaths.select("cpu", "cpu", "tetrajet")
    finally:
        cpu_kernels.library.cache_clear()               # the next caller loads the real build again


def test_cpu_kernels_write_bf16_like_torch_and_refuse_what_they_do_not_do():
    cpu_kernels = pytest.importorskip("cpu_kernels")
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 1e3
    x[0, 0] = float("nan")                              # ties to even and NaN exactly as torch's .to(torch.bfloat16)
    out32 = cpu_kernels.fake_quant(x, "nvfp4", "tensor", (1, 16), None, dtype=torch.float32)
    out16 = cpu_kernels.fake_quant(x, "nvfp4", "tensor", (1, 16), None, dtype=torch.bfloat16)
    assert equal_with_nan(out16, out32.to(torch.bfloat16))
    with pytest.raises(ValueError, match="no mxfp4 kernel with outer='tensor', tile=.16, 16."):
        cpu_kernels.fake_quant(x[:16, :64], "mxfp4", "tensor", (16, 16), None)
    with pytest.raises(ValueError, match="writes fp32 or bf16"):
        cpu_kernels.fake_quant(x[:16, :64], "nvfp4", "tensor", (1, 16), None, dtype=torch.float16)


def test_triton_refuses_unpadded_input_and_mx_recipes():
    kernels = pytest.importorskip("kernels", reason="triton is not installed")
    with pytest.raises(ValueError, match="NVFP4 kernels only"):
        fastpaths.get("triton").fake_quant(torch.randn(4, 64, device=DEVICE), "mxfp4")
    with pytest.raises(ValueError, match="not padded"):
        kernels.fake_quant_nvfp4(torch.randn(16, 200, device=DEVICE), outer=128)


def test_fp4_layers_inside_a_compiled_model_give_the_same_bits():
    # train.py --compile: fastpaths.compile_model keeps each FP4Linear an eager island between the compiled graphs
    # (dynamo used to crash on it); with ReLU between the layers (exact everywhere) compiled must equal eager
    def build():
        torch.manual_seed(0)
        impl = fastpaths.get("compiled")
        return torch.nn.Sequential(fp4.FP4Linear(64, 48, seed=3, impl=impl), torch.nn.ReLU(),
                                   fp4.FP4Linear(48, 32, seed=4, impl=impl))
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
    for rounding in fp4.ROUNDINGS:
        cpu, gpu = (fp4._fake_quant_2d(x.to(d), fmt, outer, tile, rounding, seed.to(d)) for d in ("cpu", "cuda"))
        assert equal_with_nan(gpu.cpu(), cpu), rounding
    cpu, gpu = fp4.quantize_mxfp8(x), fp4.quantize_mxfp8(x.cuda())            # OutControl's MXFP8 channels
    assert all(torch.equal(g.cpu().view(torch.uint8), c.view(torch.uint8)) for g, c in zip(gpu, cpu))

"""kernels.fp4_gemm (tl.dot_scaled from the codes) equals the matmul of the dequantized operands. On CPU it runs
in TRITON_INTERPRET=1 with MXFP4 operands only: the interpreter decodes every dot_scaled scale as E8M0, so an
NVFP4 (E4M3-scaled) product is wrong there by construction; the NVFP4 tests need a Blackwell GPU and skip
elsewhere. The per-128 outer scale, the part that is the same for both formats, is tested on MXFP4 codes.
Run: python -m pytest tests/test_gemm.py -q"""

import pytest
import torch

import fastpaths
import fp4
from conftest import DEVICE

kernels = pytest.importorskip("kernels", reason="triton is not installed")   # interpreted on a CPU (conftest.py)
needs_blackwell = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.fp4_gemm_supported("cuda")),
                                     reason="needs a GPU with FP4 tensor cores (compute capability >= 10)")


def operands(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, m)[:, None]    # rows at very different scales
    return a.to(DEVICE), torch.randn(n, k, generator=g).to(DEVICE)


def test_fp4_gemm_of_mxfp4_codes_equals_the_dequantized_matmul():
    a, b = operands(40, 24, 200)              # K = 200 pads to 224: the last K step is half padding
    qa, qb = fp4.quantize_mxfp4(a), fp4.quantize_mxfp4(b)
    ref = fp4.dequantize(qa, 224) @ fp4.dequantize(qb, 224).t()
    torch.testing.assert_close(kernels.fp4_gemm(qa, qb), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_fp4_gemm_applies_per_128_outer_scales_chunk_by_chunk():
    a, b = operands(40, 24, 384)
    qa, qb = fp4.quantize_mxfp4(a), fp4.quantize_mxfp4(b)
    g = torch.Generator().manual_seed(1)
    oa, ob = (torch.rand(r, 3, generator=g).add(0.5).to(DEVICE) for r in (40, 24))   # (rows, K/128)
    got = kernels._fp4_gemm(qa.codes, qa.scale.view(torch.uint8), oa, qb.codes, qb.scale.view(torch.uint8), ob)
    ref = ((fp4.dequantize(qa, 384) * oa.repeat_interleave(128, 1))
           @ (fp4.dequantize(qb, 384) * ob.repeat_interleave(128, 1)).t())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_fp4_gemm_rejects_operands_that_do_not_match():
    a, b = operands(16, 16, 256)
    with pytest.raises(ValueError, match="share K"):
        kernels.fp4_gemm(fp4.quantize_mxfp4(a), fp4.quantize_mxfp4(b[:, :128]))
    with pytest.raises(ValueError, match="both have per-tensor or both per-128"):
        kernels.fp4_gemm(fp4.quantize_nvfp4(a), fp4.quantize_nvfp4(b, outer=128))
    with pytest.raises(ValueError, match="two NVFP4 or two MXFP4"):
        kernels.fp4_gemm(fp4.quantize_nvfp4(a), fp4.quantize_mxfp4(b))


@needs_blackwell
@pytest.mark.parametrize("outer,tile", [("tensor", (16, 16)), (128, (1, 16))])
def test_fp4_gemm_of_nvfp4_codes_equals_the_dequantized_matmul_on_blackwell(outer, tile):
    a, b = operands(300, 200, 1000)
    qa, qb = fp4.quantize_nvfp4(a, outer=outer), fp4.quantize_nvfp4(b, outer=outer, tile=tile)
    ref = fp4.dequantize(qa, 1000) @ fp4.dequantize(qb, 1000).t()
    torch.testing.assert_close(kernels.fp4_gemm(qa, qb), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@needs_blackwell
def test_fp4_linear_on_fp4_tensor_cores_matches_the_simulated_gemm():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 192, bias=False).cuda()
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    y_tc = fp4.FP4Linear.from_linear(lin, "tetrajet", impl=fastpaths.get("triton"))(x)
    y_sim = fp4.FP4Linear.from_linear(lin, "tetrajet", impl=fastpaths.get("compiled"))(x)
    assert fp4.sqnr(y_sim, y_tc) > 40            # bf16 rounding of X̂, Ŵ and summation order only


@pytest.mark.parametrize("path", ["reference", "compiled", "triton"])
def test_quantize_nvfp4_with_rht_signs_equals_rht_then_quantize(path):
    x = operands(40, 8, 200)[0]
    signs = fp4.random_signs(torch.Generator().manual_seed(3)).to(DEVICE)
    rotated = fp4.rht16(torch.nn.functional.pad(x, (0, 8)), signs)               # K 200 -> 208, then rotated
    for outer in ("tensor", 128):
        got = fastpaths.get(path).quantize_nvfp4(x, outer=outer, rounding="stochastic", rht_signs=signs,
                                                 generator=torch.Generator(DEVICE).manual_seed(1))
        ref = fp4.quantize_nvfp4(rotated, outer=outer, rounding="stochastic", generator=torch.Generator(DEVICE).manual_seed(1))
        assert all(torch.equal(g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g,
                               r.view(torch.uint8) if r.dtype == torch.float8_e4m3fn else r) for g, r in zip(got, ref))


@pytest.mark.parametrize("recipe", ["tetrajet", "nvidia"])
def test_fp4_linear_through_the_tensor_core_branch_matches_the_simulation(recipe, monkeypatch):
    """The plumbing around fp4_gemm, on CPU: quantize to codes (RHT fused, the same random draws in the same
    order), multiply, crop. With the GEMM itself replaced by dequantize-and-multiply (what the interpreter
    cannot do for NVFP4), the triton path agrees with and without the tensor-core branch up to fp32 summation
    order (the branch multiplies the zero-padded K); a wrong draw or sign would differ by a quantization step."""
    lin = torch.nn.Linear(200, 72, bias=False).to(DEVICE)
    x, dy = operands(48, 72, 200)[0], operands(48, 8, 72, seed=1)[0]
    full = lambda q: fp4.dequantize(q, 2 * q.codes.shape[-1])                   # noqa: E731 (padded width)
    monkeypatch.setattr(kernels, "fp4_gemm", lambda a, b: full(a) @ full(b).t())
    results = []
    for tensor_cores in (False, True):
        monkeypatch.setattr(kernels, "fp4_gemm_supported", lambda device, on=tensor_cores: on)
        layer, xg = fp4.FP4Linear.from_linear(lin, recipe, impl=fastpaths.get("triton")), x.clone().requires_grad_()
        lin.weight.grad = None
        y = layer(xg)
        y.backward(dy)
        results.append((y.detach(), xg.grad, lin.weight.grad))
    for simulated, tensor_cores in zip(*results):
        torch.testing.assert_close(tensor_cores, simulated, rtol=1e-6, atol=1e-6 * simulated.abs().max().item())

"""kernels.py, the Triton NVFP4 kernels, checked on any machine: (1) they compile to machine code for the GPUs they
are written for (Triton's compiler and the ptxas it ships need no GPU); (2) kernels.fp4_gemm, the GEMM straight from
the FP4 codes, equals the matmul of the dequantized operands. Their bits against fp4.py: test_paths.py.

(1) test_paths.py runs the kernels through the interpreter, which executes their Python and skips compilation, so it
cannot see what only the compiler rejects. (It missed one: the kernels read a plain global, RNE_MAGIC, which the
interpreter allowed and which made every GPU launch fail to compile.) Checked here, for H100 (sm_90) and B200 (sm_100):
  - the quantizer, in the variants training launches (Four Over Six, MS-EDEN, EDEN-128 and RHT-128 included), compiles; its PTX
    has no fused multiply-add and no approximate division (div.full), so it rounds as fp4.py does, one operation at
    a time;
  - the FP4 GEMM compiles, and on sm_100 it runs on the block-scaled FP4 tensor cores: tcgen05.mma kind::mxf4nvf4
    with a scale per 16 (NVFP4) and kind::mxf4 with a scale per 32 (MXFP4).
The compiles run in one child process without TRITON_INTERPRET (conftest.py sets it for this process, and it
turns every @triton.jit function into the interpreter's).
(2) On a CPU fp4_gemm runs in TRITON_INTERPRET=1 with MXFP4 operands only: the interpreter decodes every dot_scaled
scale as E8M0, so an NVFP4 (E4M3-scaled) product is wrong there by construction; the NVFP4 tests need a Blackwell GPU
and skip elsewhere. The per-128 outer scale, the part that is the same for both formats, is tested on MXFP4 codes.
(fp4.py no longer calls fp4_gemm: the FP4 linear simulates its GEMMs; fp4_gemm stays for FP4 hardware.)
Run: python -m pytest tests/test_kernels.py -q"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import fp4
from conftest import DEVICE

pytest.importorskip("triton")
REPO = pathlib.Path(__file__).resolve().parent.parent
ARCHS = (90, 100)   # compute capability: H100/H200, B200

# (name, FAKE, DOUBLE_BLOCK, TILE16, SR, RHT (0, 16 or 128), EDEN, FOUR_OVER_SIX (0, 1 mae, 2 mse), input dtype):
# the launches fp4.py makes for the NVFP4 recipes (forward RTN, backward SR + RHT, 16x16 weights; Four Over Six
# forward operands; Quartet II's MS-EDEN and RHT-128 backward; EDEN on double-block), with both input dtypes
QUANTIZER = [
    ("fake double-block SR RHT", True, True, False, True, 16, False, 0, "fp32"),
    ("fake double-block RTN", True, True, False, False, 0, False, 0, "bf16"),
    ("fake per-tensor 16x16 RTN", True, False, True, False, 0, False, 0, "bf16"),
    ("fake per-tensor SR RHT", True, False, False, True, 16, False, 0, "bf16"),
    ("codes double-block SR RHT", False, True, False, True, 16, False, 0, "fp32"),
    ("codes double-block 16x16 SR", False, True, True, True, 0, False, 0, "bf16"),
    ("codes per-tensor 16x16 RTN", False, False, True, False, 0, False, 0, "fp32"),
    ("codes per-tensor RTN RHT", False, False, False, False, 16, False, 0, "fp32"),
    ("fake per-tensor 4/6 mae", True, False, False, False, 0, False, 1, "bf16"),
    ("fake per-tensor 16x16 4/6 mse", True, False, True, False, 0, False, 2, "fp32"),
    ("codes double-block 4/6 mse", False, True, False, False, 0, False, 2, "fp32"),
    ("codes double-block 16x16 4/6 mae", False, True, True, False, 0, False, 1, "bf16"),
    ("fake per-tensor MS-EDEN RHT-128", True, False, False, False, 128, True, 0, "bf16"),
    ("codes per-tensor MS-EDEN RHT-128", False, False, False, False, 128, True, 0, "fp32"),
    ("codes per-tensor MS-EDEN", False, False, False, False, 0, True, 0, "bf16"),
    ("fake per-tensor SR RHT-128", True, False, False, True, 128, False, 0, "fp32"),
    ("codes double-block RTN RHT-128", False, True, False, False, 128, False, 0, "bf16"),
    ("fake double-block EDEN RHT-128", True, True, False, False, 128, True, 0, "bf16"),
    ("codes double-block EDEN RHT-128", False, True, False, False, 128, True, 0, "fp32"),
]
# (name, scale pointer type, GROUP, OUTER): NVFP4 with a per-tensor and a per-128 outer scale, and MXFP4
GEMM = [("nvfp4 per-tensor", "*fp8e4nv", 16, 1), ("nvfp4 per-128", "*fp8e4nv", 16, 2), ("mxfp4", "*u8", 32, 0)]

CHILD = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels

def compile_one(fn, signature, constexprs, arch, fusion):
    signature = dict(signature, **{k: "constexpr" for k in constexprs})
    try:
        k = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                           options={"enable_fp_fusion": fusion})
    except Exception as e:
        while e.__cause__ is not None:   # a CompilationError wraps the one that says what is wrong
            e = e.__cause__
        return {"error": f"{type(e).__name__}: {e}"[-3000:]}
    ptx = k.asm["ptx"]
    return {"fma": len(re.findall(r"\bfma\.\w+\.f32", ptx)),
            "div_full": len(re.findall(r"\bdiv\.(?:full|approx)", ptx)),
            "ftz": len(re.findall(r"\.ftz\.f32", ptx)),
            "mma": sorted(set(re.findall(r"tcgen05\.mma[\w:.]*", ptx)))}

quantizer, gemm, archs = json.loads(sys.argv[1])
out = {}
for arch in archs:
    for name, fake, double, tile16, sr, rht, eden, four_over_six, xdtype in quantizer:
        sig = {"x_ptr": "*" + xdtype, "out_ptr": "*fp32", "codes_ptr": "*u8", "scale_ptr": "*u8", "outer_ptr": "*fp32",
               "amax_ptr": "*fp32", "h_ptr": "*fp32", "seed_ptr": "*i64", "M": "i32", "Kp": "i32"}
        const = dict(FAKE=fake, DOUBLE_BLOCK=double, TILE16=tile16, SR=sr, RHT=rht, EDEN=eden,
                     FOUR_OVER_SIX=four_over_six, BM=kernels.TILE_ROWS, BK=kernels.TILE_COLS)
        out[f"{arch} {name}"] = compile_one(kernels._nvfp4_kernel, sig, const, arch, kernels.EXACT["enable_fp_fusion"])
    for xdtype in ("fp32", "bf16"):       # OutControl's MXFP8 channels
        sig = {"x_ptr": "*" + xdtype, "out_ptr": "*fp32", "M": "i32", "Kp": "i32"}
        out[f"{arch} mxfp8 {xdtype}"] = compile_one(kernels._mxfp8_kernel, sig, dict(BM=kernels.TILE_ROWS, BK=32), arch,
                                                    kernels.EXACT["enable_fp_fusion"])
    for name, stype, group, outer in gemm:
        sig = {"a_ptr": "*u8", "sa_ptr": stype, "oa_ptr": "*fp32", "b_ptr": "*u8", "sb_ptr": stype, "ob_ptr": "*fp32",
               "c_ptr": "*fp32", "M": "i32", "N": "i32", "Kp": "i32"}
        const = dict(GROUP=group, OUTER=outer, BM=kernels.GEMM_BM, BN=kernels.GEMM_BN, BK=kernels.GEMM_BK)
        out[f"{arch} gemm {name}"] = compile_one(kernels._fp4_gemm_kernel, sig, const, arch, True)
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    """{"<arch> <variant>": {"error": ...} or {"fma": n, "div_full": n, "mma": [...]}}, from one child process per
    architecture, run side by side (each compile is single-threaded)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    probe = subprocess.run([sys.executable, "-c", "from triton.backends.nvidia.compiler import CUDABackend; "
                            "from triton.backends.compiler import GPUTarget; from triton.compiler import ASTSource"],
                           env=env, capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"this triton has no CUDA backend or a different compile API: {probe.stderr.strip()[-200:]}")
    children = [subprocess.Popen([sys.executable, "-c", CHILD, json.dumps([QUANTIZER, GEMM, [arch]])], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for arch in ARCHS]
    results = {}
    for child in children:
        out, err = child.communicate(timeout=600)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert child.returncode == 0 and lines, f"the compile process failed:\n{err[-3000:]}"
        results.update(json.loads(lines[0][len("RESULT "):]))
    return results


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", [q[0] for q in QUANTIZER])
def test_quantizer_compiles_without_fma_or_approximate_division(compiled, arch, variant):
    result = compiled[f"{arch} {variant}"]
    assert "error" not in result, result.get("error")
    assert result["fma"] == 0, f"{result['fma']} fused multiply-adds: fp4.py rounds a*b and +c separately"
    assert result["div_full"] == 0, "an approximate division: use tl.math.div_rn, or multiply by an exact 2^-k"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("xdtype", ["fp32", "bf16"])
def test_mxfp8_kernel_compiles_without_fma_approximate_division_or_flushed_subnormals(compiled, arch, xdtype):
    # OutControl's channels: a block of tiny values has X = 2^-127, a subnormal a flush-to-zero would lose
    result = compiled[f"{arch} mxfp8 {xdtype}"]
    assert "error" not in result, result.get("error")
    assert result["fma"] == 0 and result["div_full"] == 0 and result["ftz"] == 0, result


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant,stype,group,outer", GEMM)
def test_fp4_gemm_compiles_and_uses_fp4_tensor_cores_on_blackwell(compiled, arch, variant, stype, group, outer):
    result = compiled[f"{arch} gemm {variant}"]
    assert "error" not in result, result.get("error")
    if arch >= 100:
        kind = "kind::mxf4nvf4.block_scale.block16" if group == 16 else "kind::mxf4.block_scale.block32"
        assert any(kind in m for m in result["mma"]), f"expected tcgen05.mma {kind}, the PTX has {result['mma']}"

# -----------------------------------------------------------------------------
# (2) kernels.fp4_gemm from the codes


def kernels_module():
    return pytest.importorskip("kernels", reason="triton is not installed")   # interpreted on a CPU (conftest.py)


def needs_blackwell():
    if not (torch.cuda.is_available() and kernels_module().fp4_gemm_supported("cuda")):
        pytest.skip("needs a GPU with FP4 tensor cores (compute capability >= 10)")


def operands(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, m)[:, None]    # rows at very different scales
    return a.to(DEVICE), torch.randn(n, k, generator=g).to(DEVICE)


def test_fp4_gemm_of_mxfp4_codes_equals_the_dequantized_matmul():
    a, b = operands(40, 24, 200)              # K = 200 pads to 224: the last K step is half padding
    qa, qb = fp4.quantize_mxfp4(a), fp4.quantize_mxfp4(b)
    ref = fp4.dequantize(qa) @ fp4.dequantize(qb).t()                          # (the padded width, 224)
    got = kernels_module().fp4_gemm(qa, qb)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_fp4_gemm_applies_per_128_outer_scales_chunk_by_chunk():
    a, b = operands(40, 24, 384)
    qa, qb = fp4.quantize_mxfp4(a), fp4.quantize_mxfp4(b)
    g = torch.Generator().manual_seed(1)
    oa, ob = (torch.rand(r, 3, generator=g).add(0.5).to(DEVICE) for r in (40, 24))   # (rows, K/128)
    got = kernels_module()._fp4_gemm(qa.codes, qa.scale.view(torch.uint8), oa, qb.codes, qb.scale.view(torch.uint8), ob)
    ref = ((fp4.dequantize(qa) * oa.repeat_interleave(128, 1)) @ (fp4.dequantize(qb) * ob.repeat_interleave(128, 1)).t())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_fp4_gemm_rejects_operands_that_do_not_match():
    kernels = kernels_module()
    a, b = operands(16, 16, 256)
    with pytest.raises(ValueError, match="share K"):
        kernels.fp4_gemm(fp4.quantize_mxfp4(a), fp4.quantize_mxfp4(b[:, :128]))
    with pytest.raises(ValueError, match="both have per-tensor or both per-128"):
        kernels.fp4_gemm(fp4.quantize_nvfp4(a), fp4.quantize_nvfp4(b, outer=128))
    with pytest.raises(ValueError, match="two NVFP4 or two MXFP4"):
        kernels.fp4_gemm(fp4.quantize_nvfp4(a), fp4.quantize_mxfp4(b))


@pytest.mark.parametrize("outer,tile", [("tensor", (16, 16)), (128, (1, 16))])
def test_fp4_gemm_of_nvfp4_codes_equals_the_dequantized_matmul_on_blackwell(outer, tile):
    needs_blackwell()
    a, b = operands(300, 200, 1000)
    qa, qb = fp4.quantize_nvfp4(a, outer=outer), fp4.quantize_nvfp4(b, outer=outer, tile=tile)
    ref = fp4.dequantize(qa) @ fp4.dequantize(qb).t()
    got = kernels_module().fp4_gemm(qa, qb)[:, :ref.shape[1]]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())

"""Property-based tests of the quantizers over shapes, dtypes and special values (hypothesis; skipped when it
is not installed). Run: python -m pytest tests/test_properties.py -q"""
import pytest
import torch

import fp4

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis not installed")
from hypothesis import given, settings, strategies as st  # noqa: E402

SPECIALS = [0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, 1e-40, 6.0, -448.0, 1.0, float("inf"), float("-inf"),
            float("nan")]
QUANTIZERS = {  # name -> (quantize, dequantize, decode scale per element)
    "nvfp4_tensor": (lambda x: fp4.quantize_nvfp4(x), fp4.dequantize_nvfp4),
    "nvfp4_128": (lambda x: fp4.quantize_nvfp4(x, outer=128), fp4.dequantize_nvfp4),
    "nvfp4_16x16": (lambda x: fp4.quantize_nvfp4(x, tile=(16, 16)), fp4.dequantize_nvfp4),
    "nvfp4_sr": (lambda x: fp4.quantize_nvfp4(x, rounding="stochastic", generator=torch.Generator().manual_seed(0)),
                 fp4.dequantize_nvfp4),
    "mxfp4": (fp4.quantize_mxfp4, fp4.dequantize_mxfp4),
    "mxfp8": (fp4.quantize_mxfp8, fp4.dequantize_mxfp8),
}


@st.composite
def tensors(draw):
    """2-D tensors of any small shape and float dtype, Gaussian times a random scale, with special values."""
    m, k = draw(st.integers(1, 40)), draw(st.integers(1, 300))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31))))
    x = x * 10.0 ** draw(st.integers(-30, 30))
    for _ in range(draw(st.integers(0, 4))):
        x[draw(st.integers(0, m - 1)), draw(st.integers(0, k - 1))] = draw(st.sampled_from(SPECIALS))
    if draw(st.booleans()):
        x[:, : min(k, 16)] = 0.0                                  # an all-zero block
    if draw(st.booleans()):
        x[:, -min(k, 32):] = draw(st.sampled_from([-3.0, 0.7, 1e-20, 448.0]))   # an all-equal block
    return x.to(draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])))


def element_scale(q, shape):
    """Decode scale of every element, (M, Kp): NVFP4 block_scale x outer, or the MX scale."""
    if isinstance(q, fp4.NVFP4):
        s = q.block_scale.float()
        s = s * q.outer_scale if q.outer_scale.dim() == 0 else s * q.outer_scale.repeat_interleave(8, -1)
        return s.repeat_interleave(16, -1)
    return q.scale.float().repeat_interleave(32, -1)


@pytest.mark.parametrize("name", list(QUANTIZERS))
@settings(max_examples=60, deadline=None, derandomize=True, database=None)   # deterministic in CI
@given(x=tensors())
def test_quantizers_never_crash_keep_nan_and_stay_within_the_format_error_bound(name, x):
    quantize, dequantize = QUANTIZERS[name]
    q = quantize(x)
    x32 = x.float()
    x_dq = dequantize(q)[:, : x.shape[1]]
    assert x_dq.shape == x.shape
    assert x_dq[x32.isnan() | x32.isinf()].isnan().all()         # NaN/Inf never turn into finite numbers
    s = element_scale(q, x.shape)[:, : x.shape[1]]
    ok = torch.isfinite(s) & torch.isfinite(x32)                 # elements whose block is all finite
    if name == "mxfp8":                                          # E4M3: half an ulp, 2^-4 relative, or X 2^-10
        bound = x32.abs() * 2.0 ** -4 + s * 2.0 ** -10
    else:                                                        # E2M1: half the top step (s), plus what the
        bound = s * (2.0 if name == "nvfp4_sr" else 1.0) + (x32.abs() - 6 * s).clamp(min=0)   # clamp at 6 lost
    err = (x32 - x_dq).abs()
    assert (err[ok] <= bound[ok] * (1 + 1e-6) + 1e-45).all()
    assert (x_dq[(x32 == 0) & torch.isfinite(s)] == 0).all()        # (a NaN scale poisons its whole block)


def test_empty_tensors_are_a_clear_error():
    for quantize, _ in QUANTIZERS.values():
        with pytest.raises(ValueError, match="empty"):
            quantize(torch.zeros(0, 16))

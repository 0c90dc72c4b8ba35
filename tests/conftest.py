"""Shared fixtures and helpers for the suite: `python -m pytest tests -q` (CPU only; GPU tests skip).

Import the helpers with `from conftest import awkward, equal_with_nan, ...`; the fixtures (`dataset`) pytest
passes by name. TRITON_INTERPRET is set here, once, before anything imports kernels.py: Triton reads it when a
@triton.jit function is defined, so on a machine without a GPU the Triton kernels run in its interpreter.
Every test starts with fp4.KERNEL as it found it and gets it back afterwards (a test that switches paths, or
runs train.py, which sets it through fastpaths.use, leaves nothing behind)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fp4  # noqa: E402
from data.prepare import prepare_text  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"    # where the Triton kernels run
# a 2-block, 64-wide model that trains in a fraction of a second a step
TINY = ["--n-layer", "2", "--n-embd", "64", "--n-head", "2", "--mlp-hidden", "128", "--block-size", "32",
        "--batch-size", "4", "--eval-iters", "2", "--warmup-iters", "2", "--lr", "1e-2", "--min-lr", "1e-3"]


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global RNG state: a test that draws from torch's global generator (an
    nn.Linear's init, a distribution's sample) is as deterministic as one that passes its own Generator."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def kernel_restored():
    """fp4.KERNEL (the one kernel hook, set by fastpaths.use) is the reference in every test unless the test sets
    it, and is put back afterwards whatever the test did."""
    saved = fp4.KERNEL
    fp4.KERNEL = None
    yield
    fp4.KERNEL = saved


@pytest.fixture(scope="module")
def one_thread():
    """Layers and models this small run fastest on one thread (and ~10x slower on two when the CPUs are busy):
    a module that trains them says `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A small byte-level dataset (~60 KB of varied, repetitive text) in a temp folder -> its path."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    text = "".join(f"{words[i % 12]} {words[(i * 7) % 12]} = {i % 97};\n" for i in range(4000))
    return str(prepare_text("toy", text, "byte", "generated", root=tmp_path_factory.mktemp("data")))


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


def equal_with_nan(a, b):
    """Same NaN positions, and every other element the same bits (so -0.0 and +0.0 differ)."""
    bits = lambda t: t.float().nan_to_num(0.0).view(torch.int32)      # noqa: E731
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(bits(a), bits(b))


def sqnr(x, x_dq):
    """Signal-to-quantization-noise ratio in dB, 10·log10(‖x‖² / ‖x - x_dq‖²), in fp64."""
    x, x_dq = x.double(), x_dq.double()
    return (10 * torch.log10(x.square().sum() / (x - x_dq).square().sum())).item()


def same_quantized(a, b):
    """Two NVFP4 tuples (or (codes, block_scale, outer_scale) triples) are equal: codes, E4M3 scale bytes and outer
    scales bit for bit, NaNs by position. (A NaN scale's sign bit is not part of the format and not the same
    everywhere: x86 writes 0xFF for a NaN made from Inf/Inf, 0x7F for one carried from a NaN input, and
    inductor's vector code differs from eager's.)"""
    a, b = fp4.NVFP4(*a), fp4.NVFP4(*b)
    sa, sb = a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8)
    nan_a, nan_b = (sa & 0x7F) == 0x7F, (sb & 0x7F) == 0x7F                 # E4M3 NaN: S.1111.111
    return (torch.equal(a.codes, b.codes) and torch.equal(nan_a, nan_b) and torch.equal(sa[~nan_a], sb[~nan_b])
            and equal_with_nan(a.outer_scale, b.outer_scale))


def with_kernel(kernel, fn):
    """fn() with fp4.KERNEL = kernel (None: the reference), the hook restored afterwards."""
    saved, fp4.KERNEL = fp4.KERNEL, kernel
    try:
        return fn()
    finally:
        fp4.KERNEL = saved


def layer_outputs_and_grads(kernel, recipe, device="cpu", dtype=torch.bfloat16):
    """One FP4 layer, forward and backward on fixed inputs in `dtype` (3-D, K = 96 not a multiple of 128) with
    fp4.KERNEL = kernel -> (y, dx, dW): RTN, SR, RHT on transposed operands and the layer's random draws in order,
    which every kernel must reproduce."""
    g = torch.Generator().manual_seed(3)
    x, dy = torch.randn(4, 12, 96, generator=g).to(dtype), torch.randn(4, 12, 40, generator=g).to(dtype)
    layer = fp4.FP4Linear(96, 40, recipe=recipe, seed=7).to(device)
    layer.weight.data.copy_(torch.randn(40, 96, generator=g) / 10)
    xi = x.to(device).requires_grad_()

    def run():
        y = layer(xi)
        y.backward(dy.to(device))
        return y
    y = with_kernel(kernel, run)
    return y, xi.grad, layer.weight.grad

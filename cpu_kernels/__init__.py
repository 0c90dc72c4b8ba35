"""
cpu_kernels/: the C quantizers (fp4_cpu.c) for CPUs, the `cpu` implementation in fastpaths.py. This module builds
fp4_cpu.c with the system C compiler on first use and calls it through ctypes: NVFP4, MXFP4 and (OutControl's)
MXFP8 fake quantization (fake_quant: fp4.KERNEL, bit for bit fp4.reference_kernel; with OutControl's columns in one
pass, fp4.by_columns' twin) and NVFP4 quantization to codes (bit for bit fp4.quantize_nvfp4), with RHT-16 or
RHT-128 (given fp4.rht's signs), Four Over Six and MS-EDEN, ~1.5-2x faster than fp4.py through torch.compile on a
laptop CPU (dev/speed.md). tests/test_paths.py ties it to the reference.

    lib = cpu_kernels.library()        # compiles once per machine (~1 s), cached under ~/.cache/nanofp4
    out = cpu_kernels.fake_quant(x2, "nvfp4", 128, (1, 16), "nearest", None, None, None, torch.bfloat16)
    python tools/bench.py --only quant # its speed beside the other paths

Needs gcc (or a cc that takes gcc's flags) with OpenMP; library() raises RuntimeError with the compiler's
message otherwise, and fastpaths.use then picks the compiled path and says why. The library links the
OpenMP runtime torch already loaded (same soname), so its threads are torch's threads, not a second pool.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("fp4_cpu.c")
# -march=native: the library is built on the machine that runs it. -ffp-contract=off: no fused multiply-add,
# whose single rounding would change bits. -fno-math-errno/-fno-trapping-math: let gcc vectorize rintf/floorf
# (no value changes). Never -ffast-math (it would reorder and flush subnormals).
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
          "-shared", "-fPIC", "-lm")
CACHE_DIR = Path.home() / ".cache" / "nanofp4"


def _compiler():
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler found (gcc or cc on PATH)")
    return cc


@functools.cache
def library():
    """-> the loaded ctypes library, compiled if this source, compiler and machine have no cached build yet.
    The build writes to a temporary file and renames it into place, so concurrent runs (torchrun) never load
    a half-written library. RuntimeError, saying why, if it cannot be built or loaded."""
    try:
        return _build_and_load()
    except OSError as e:                                 # unwritable cache, a library the loader refuses, ...
        raise RuntimeError(f"cannot build or load {SOURCE.name}: {e}") from e


def _build_and_load():
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(CFLAGS), version, platform.machine(),
                                    platform.node()]).encode()).hexdigest()[:16]
    path = CACHE_DIR / f"cpu_kernels-{key}.so"
    if not path.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=CACHE_DIR)
        os.close(fd)
        build = subprocess.run([cc, *CFLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if build.returncode != 0:
            os.unlink(tmp)
            last = (build.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise RuntimeError(f"{cc} could not build {SOURCE.name}: {last}")
        os.replace(tmp, path)
    lib = ctypes.CDLL(str(path))
    p, i, i64, u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint32
    lib.fake_quant.argtypes = [p, i, i64, i64, p, i, i64, i64, i, i, i, u32, u32, p, i, i, i]
    lib.fake_quant.restype = None
    lib.quantize_nvfp4.argtypes = [p, i, i64, i64, p, p, p, i64, i64, i, i, i, u32, u32, p, i, i, i]
    lib.quantize_nvfp4.restype = None
    lib.fake_quant_columns.argtypes = [p, i, i64, p, i, i64, i64, p, i64, i, i, i]
    lib.fake_quant_columns.restype = None
    return lib


FORMATS = {("nvfp4", "tensor"): 0, ("nvfp4", 128): 1, ("mxfp4", "tensor"): 2, ("mxfp8", "tensor"): 3}   # fp4_cpu.c's fmt
FOUR_OVER_SIX = {None: 0, "mae": 1, "mse": 2}                                     # fp4_cpu.c's fos


def _operand(x2):
    """x2 as every entry reads it: a 2-D CPU tensor, fp32 or bf16 (fp16/fp64 widened, rounded, as the reference does)."""
    assert x2.dim() == 2 and x2.device.type == "cpu", f"cpu_kernels: a 2-D CPU tensor, got {tuple(x2.shape)} on {x2.device}"
    return x2 if x2.dtype in (torch.float32, torch.bfloat16) else x2.float()


def _call(entry, x2, outputs, outer_fmt, tile, rounding, seed, rht_signs, four_over_six):
    """Shared by fake_quant and quantize_nvfp4: x2 (Mp, Kp), already padded by fp4 (any strides)."""
    assert rounding != "eden" or tile[0] == 1, "cpu_kernels: eden takes 1x16 tiles"
    x2 = _operand(x2)
    signs = None if rht_signs is None else rht_signs.float().contiguous()
    s0, s1 = (0, 0) if seed is None else (int(seed[0]), int(seed[1]))
    entry(x2.data_ptr(), int(x2.dtype == torch.bfloat16), x2.stride(0), x2.stride(1), *outputs, *x2.shape, tile[0],
          FORMATS[outer_fmt], int(rounding == "stochastic"), s0, s1, None if signs is None else signs.data_ptr(),
          0 if signs is None else len(signs), int(rounding == "eden"), FOUR_OVER_SIX[four_over_six])


def fake_quant(x2, fmt, outer, tile, rounding, seed, rht_signs=None, four_over_six=None, dtype=torch.float32,
               columns=None):
    """fp4.KERNEL: x2 (Mp, Kp) padded as fp4.fake_quant pads it -> (Mp, Kp) contiguous in dtype if fp32 or bf16 (the C
    writes bf16 itself, rounding as .to() does), else fp32 = fp4.reference_kernel(...), bit for bit."""
    out = torch.empty(x2.shape, dtype=dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32)
    if columns is not None:
        return _fake_quant_columns(x2, out, fmt, outer, tile, four_over_six, columns)
    _call(library().fake_quant, x2, (out.data_ptr(), int(out.dtype == torch.bfloat16)), (fmt, outer), tile, rounding,
          seed, rht_signs, four_over_six)
    return out


def _fake_quant_columns(x2, out, fmt, outer, tile, four_over_six, columns):
    """OutControl's operand (x2 padded in rows only) into out: fp4.by_columns in one C pass (fake_quant_columns)."""
    x2 = _operand(x2)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()                             # (C reads rows by row_stride)
    outliers, inliers = columns
    order = torch.cat((inliers, outliers)).to(torch.int64).contiguous()
    (M, K), rows = x2.shape, tile[0]
    assert len(order) == K and 0 <= int(order.min()) and int(order.max()) < K, "cpu_kernels: columns must split x's K"
    assert rows in (1, 16) and M % rows == 0, f"cpu_kernels: {M} rows in tiles of {rows} (fp4.pad_2d pads them)"
    library().fake_quant_columns(x2.data_ptr(), int(x2.dtype == torch.bfloat16), x2.stride(0), out.data_ptr(),
                                 int(out.dtype == torch.bfloat16), *x2.shape, order.data_ptr(), len(inliers), tile[0],
                                 FORMATS[(fmt, outer)], FOUR_OVER_SIX[four_over_six])
    return out


def quantize_nvfp4(x2, outer, tile, rounding, seed, rht_signs=None, four_over_six=None):
    """x2 (Mp, Kp) as fake_quant -> fp4.NVFP4 of the padded view = fp4._quantize_nvfp4_2d's, bit for bit."""
    Mp, Kp = x2.shape
    codes, block_scale = torch.empty(Mp, Kp // 2, dtype=torch.uint8), torch.empty(Mp, Kp // 16, dtype=torch.uint8)
    outer_scale = torch.empty(() if outer == "tensor" else (Mp, Kp // 128), dtype=torch.float32)
    _call(library().quantize_nvfp4, x2, (codes.data_ptr(), block_scale.data_ptr(), outer_scale.data_ptr()),
          ("nvfp4", outer), tile, rounding, seed, rht_signs, four_over_six)
    return codes, block_scale.view(torch.float8_e4m3fn), outer_scale

"""
cpu_kernels/: the C quantizers (fp4_cpu.c) for CPUs, the `cpu` implementation in fastpaths.py. This module builds
fp4_cpu.c with the system C compiler on first use and calls it through ctypes: NVFP4 and MXFP4 fake quantization
(bit for bit fp4.fake_quant) and NVFP4 quantization to codes (bit for bit fp4.quantize_nvfp4), with RHT-16 or
RHT-128, Four Over Six and MS-EDEN (SUPPORTS; RHT-128 also with the double-block outer scale), ~1.5-2x faster
than fp4.py through torch.compile on a laptop CPU (docs/LOG.md). tests/test_paths.py ties it to the reference.

    lib = cpu_kernels.library()        # compiles once per machine (~1 s), cached under ~/.cache/nanofp4
    out = cpu_kernels.fake_quant(x2, "nvfp4", outer=128, tile=(1, 16), seed=None, H=None, dtype=torch.bfloat16)
    python tools/bench.py --only quant # its speed beside the other paths

Needs gcc (or a cc that takes gcc's flags) with OpenMP; library() raises RuntimeError with the compiler's
message otherwise, and fastpaths.select then picks the compiled path and says why. The library links the
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
    return lib


# What these kernels have of fp4.py's 2026 additions (fastpaths refuses the rest by name): any of
# "four_over_six" (§10), "eden" (MS-EDEN, §11), "rht128" (H = the 128 signs of fp4.rht128)
SUPPORTS = frozenset({"four_over_six", "eden", "rht128"})

FORMATS = {("nvfp4", "tensor"): 0, ("nvfp4", 128): 1, ("mxfp4", "tensor"): 2}   # fp4_cpu.c's fmt
FOUR_OVER_SIX = {None: 0, "mae": 1, "mse": 2}                                     # fp4_cpu.c's fos


def _check(x2, fmt, outer, tile, dtype, seed, H, eden, four_over_six):
    """-> (x2 as fp32 or bf16, the RHT's size 0/16/128), after the checks both kernels need; one clear error
    otherwise."""
    if (fmt, outer) not in FORMATS or (fmt == "mxfp4" and tuple(tile) != (1, 16)):
        raise ValueError(f"fp4_cpu.c has no {fmt} kernel with outer={outer!r}, tile={tile}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the cpu path writes fp32 or bf16, got {dtype}; use --fp4-path compiled for others")
    if x2.device.type != "cpu":
        raise ValueError(f"the cpu path runs on the CPU; got a tensor on {x2.device}")
    hsize = 0 if H is None else 16 if tuple(H.shape) == (16, 16) else 128 if tuple(H.shape) == (128,) else None
    if hsize is None:
        raise ValueError(f"H must be fp4.hadamard16(signs) (16, 16) or RHT-128's signs (128,), got {tuple(H.shape)}")
    if four_over_six not in FOUR_OVER_SIX:
        raise ValueError(f"four_over_six must be None, 'mae' or 'mse', got {four_over_six!r}")
    if four_over_six is not None and (fmt != "nvfp4" or eden or seed is not None or H is not None):
        raise ValueError("Four Over Six is for NVFP4 with round to nearest and no RHT only (fp4._check_four_over_six)")
    if eden and (fmt, outer, tuple(tile)) != ("nvfp4", "tensor", (1, 16)):
        raise ValueError(f"MS-EDEN is defined for NVFP4 with outer='tensor' and 1x16 blocks, got {fmt}, "
                         f"outer={outer!r}, tile={tuple(tile)}")
    if eden and seed is None:
        raise ValueError("MS-EDEN needs the seed of its scales' noise (fp4.draw_seed)")
    if hsize == 128 and fmt != "nvfp4":
        raise ValueError("RHT-128 is for NVFP4 (fp4.Recipe)")
    block = 32 if fmt == "mxfp4" else 128 if (outer == 128 or eden or hsize == 128) else 16
    if x2.shape[0] % tile[0] or x2.shape[1] % block:
        raise ValueError(f"shape {tuple(x2.shape)} is not padded to whole {tile[0]}-row tiles and {block}-blocks")
    return (x2 if x2.dtype in (torch.float32, torch.bfloat16) else x2.float()), hsize   # fp16/fp64: as the reference


def fake_quant(x2, fmt, outer, tile, seed, H=None, dtype=torch.float32, eden=False, four_over_six=None):
    """x2 (Mp, Kp) fp32 or bf16 on the CPU, padded as fp4.fake_quant pads it (rows to tile[0], K to 16, 32 or
    128), any strides -> (Mp, Kp) contiguous in `dtype` (fp32 or bf16) = fp4._fake_quant_2d(x2, fmt, outer, tile,
    rounding, seed, H).to(dtype), bit for bit. fmt "nvfp4" (outer "tensor" or 128) or "mxfp4" (outer "tensor",
    tile (1, 16)). seed: None (round to nearest) or fp4.draw_seed's int64 (2,) (stochastic rounding with
    fp4.uniform_noise). H: None, fp4.hadamard16(signs) (RHT-16 first) or the 128 signs (RHT-128 first, fp4.rht128).
    eden: MS-EDEN (fp4._round_eden; seed then seeds the block scales' noise, the elements round to nearest).
    four_over_six: None, "mae" or "mse" (fp4._round_four_over_six; RTN, no RHT)."""
    x2, hsize = _check(x2, fmt, outer, tile, dtype, seed, H, eden, four_over_six)
    H = None if H is None else H.float().contiguous()
    s0, s1 = (0, 0) if seed is None else (int(seed[0]), int(seed[1]))
    out = torch.empty(x2.shape, dtype=dtype)
    library().fake_quant(x2.data_ptr(), int(x2.dtype == torch.bfloat16), x2.stride(0), x2.stride(1), out.data_ptr(),
                         int(dtype == torch.bfloat16), *x2.shape, tile[0], FORMATS[fmt, outer],
                         int(seed is not None and not eden), s0, s1, None if H is None else H.data_ptr(), hsize,
                         int(bool(eden)), FOUR_OVER_SIX[four_over_six])
    return out


def quantize_nvfp4(x2, outer, tile, seed, H=None, eden=False, four_over_six=None):
    """x2 (Mp, Kp) as fake_quant -> (codes uint8 (Mp, Kp/2) packed, block_scale float8_e4m3fn (Mp, Kp/16),
    outer_scale: S_dec fp32 () or s_o fp32 (Mp, Kp/128)) = fp4.quantize_nvfp4's, bit for bit, before it crops
    the padded rows."""
    x2, hsize = _check(x2, "nvfp4", outer, tile, torch.float32, seed, H, eden, four_over_six)
    H = None if H is None else H.float().contiguous()
    s0, s1 = (0, 0) if seed is None else (int(seed[0]), int(seed[1]))
    Mp, Kp = x2.shape
    codes = torch.empty(Mp, Kp // 2, dtype=torch.uint8)
    block_scale = torch.empty(Mp, Kp // 16, dtype=torch.uint8)
    outer_scale = torch.empty(() if outer == "tensor" else (Mp, Kp // 128), dtype=torch.float32)
    library().quantize_nvfp4(x2.data_ptr(), int(x2.dtype == torch.bfloat16), x2.stride(0), x2.stride(1),
                             codes.data_ptr(), block_scale.data_ptr(), outer_scale.data_ptr(), Mp, Kp, tile[0],
                             FORMATS["nvfp4", outer], int(seed is not None and not eden), s0, s1,
                             None if H is None else H.data_ptr(), hsize, int(bool(eden)), FOUR_OVER_SIX[four_over_six])
    return codes, block_scale.view(torch.float8_e4m3fn), outer_scale

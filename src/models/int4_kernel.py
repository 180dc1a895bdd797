"""INT4_KERNEL=auto: our own int4 matrix kernel, built from C on first use.

``src/models/kernels/int4_bf16.c`` multiplies bf16 rows by the int4 weights of
``Int4Linear`` (the same packed buffers PyTorch's kernel reads) on the CPU's AVX-512 BF16
dot-product instructions. Its numbers are PyTorch's kernel's up to the order of fp32
additions; in the model's decoding step it is as fast for one row and 1.3x faster for 8
rows, 1.6x for 16 and for prompts, where PyTorch's kernel is limited by arithmetic. The C file
explains how.

It needs an x86-64 CPU with AVX-512 BF16 (AMD Zen 4 and later, Intel Cooper Lake and
Sapphire Rapids and later) and, once, a C compiler (``gcc``, or ``$CC``): the library is
compiled (under a second) into MODEL_CACHE_DIR/kernels/, named by a digest of the source
and flags, and later starts load it (``python -m src.models.int4_kernel`` builds it ahead,
as the Dockerfile does). Where the CPU lacks the instructions, or the library is not built
and cannot be, ``load_int4_kernel`` says why in the log and returns None, and the layers
keep PyTorch's kernel: never an error.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

from src.models.cpu_info import cpu_flags

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "int4_bf16.c"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp",
         "-shared", "-fPIC")  # fmt: skip
CPU_FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")  # as /proc/cpuinfo names them

Int4Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def unavailable_reason() -> str | None:
    """Why the kernel cannot run on this machine, or None if it can."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"it is for x86-64 Linux, not {platform.system()} {platform.machine()}"
    flags = cpu_flags()
    if flags is None:
        return "cannot read /proc/cpuinfo"
    missing = [feature for feature in CPU_FEATURES if feature not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    # The kernel reads PyTorch's AVX-512 packing of the weights; PyTorch packs for the
    # instruction set it dispatches to, which ATEN_CPU_CAPABILITY can lower.
    from src.models.quantize import int4_packing

    packing = int4_packing()
    if packing != "avx512":
        return f"PyTorch packs int4 weights for {packing.upper()} here; the kernel reads AVX512's"
    return None


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")


def library_path(cache_dir: Path) -> Path:
    """Where the library for this source and these flags lives (built or not)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()
    return Path(cache_dir) / "kernels" / f"int4_bf16-{digest[:16]}.so"


def build(cache_dir: Path) -> Path:
    """The compiled library, built now if this source and these flags have none yet (a
    machine that has it, a container image say, needs no compiler). Raises RuntimeError
    without a compiler, OSError or subprocess.CalledProcessError if the build fails."""
    library = library_path(cache_dir)
    if library.is_file():
        return library
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (gcc, or $CC) to build it with")
    library.parent.mkdir(parents=True, exist_ok=True)
    temporary = library.with_suffix(f".tmp{os.getpid()}")  # renamed into place: atomic
    try:
        subprocess.run([cc, *FLAGS, "-o", str(temporary), str(SOURCE)],
                       check=True, capture_output=True, text=True, timeout=120)  # fmt: skip
        os.replace(temporary, library)
    finally:
        temporary.unlink(missing_ok=True)
    return library


@functools.cache
def load_int4_kernel(cache_dir: Path) -> Int4Kernel | None:
    """Our kernel as a function ``(x, packed, scales_and_offsets, out_features) -> y``, or
    None (logged) where it cannot run. Built at most once per process and cache folder."""
    reason = unavailable_reason()
    if reason is None:
        try:
            function = ctypes.CDLL(str(build(Path(cache_dir)))).int4_bf16_matmul
        except subprocess.CalledProcessError as exc:
            reason = f"the build failed: {exc.stderr.strip()[-500:]}"
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            reason = f"the build failed: {exc}"
    if reason is not None:
        logger.info("INT4_KERNEL: using PyTorch's int4 kernel (ours cannot run: %s)", reason)
        return None
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    function.restype = ctypes.c_int

    def int4_matmul(
        x: torch.Tensor, packed: torch.Tensor, scales_and_offsets: torch.Tensor, n: int
    ) -> torch.Tensor:
        """x (M, K) bf16 times the (n, K) int4 weights: (M, n) bf16."""
        x = x.contiguous()
        out = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
        rows, threads = x.shape[0], torch.get_num_threads()
        status = function(x.data_ptr(), packed.data_ptr(), scales_and_offsets.data_ptr(),
                          out.data_ptr(), rows, n, x.shape[1], threads)  # fmt: skip
        if status != 0:
            raise MemoryError("int4 kernel: out of memory")
        return out

    return int4_matmul


def can_run(out_features: int, in_features: int) -> bool:
    """Shapes the C kernel takes: whole 64-column blocks (PyTorch's AVX-512 packing of a
    partial block differs) and whole groups of 32 inputs."""
    return out_features % 64 == 0 and in_features % 32 == 0


if __name__ == "__main__":
    # python -m src.models.int4_kernel: build the library into MODEL_CACHE_DIR now (the
    # Dockerfile does, so that the image needs no compiler); any CPU can build it.
    from src.config import load_settings

    print(build(Path(load_settings().model_cache_dir)))

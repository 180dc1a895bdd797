"""INT4_KERNEL=auto: our own int4 matrix kernels, built from C on first use.

Two kernels multiply bf16 rows by the int4 weights of ``Int4Linear`` (the same packed buffers
PyTorch's kernel reads, whose layout depends on the CPU: PyTorch packs them for the
instruction set it dispatches to), each with the scale and offset of a group taken out of
the inner sum:

- ``kernels/int4_bf16.c`` for CPUs with AVX-512 BF16 (AMD Zen 4 and later, Intel Cooper Lake
  and Sapphire Rapids and later), on its bf16 dot-product instructions: as fast as PyTorch's
  kernel for one row, 1.3x for 8 rows and 1.6x for 16 and for prompts;
- ``kernels/int4_avx2.c`` for the other x86-64 CPUs with AVX2 and FMA, on 16-bit integer
  multiply-adds (activations written as int16 numbers times a power of two per group of
  32, exact for all but the ones far below the group's largest): 1.7-2.4x PyTorch's AVX2
  kernel for one row, 1.25-1.95x for more.

Their numbers are PyTorch's kernel's up to the order of fp32 additions and, for the AVX2
one, that rounding of small activations, which moves results less than bf16's rounding of
them does; the C files explain how. Building one takes a C compiler once
(src/models/native.py; ``python -m src.models.native`` builds every C kernel of ours ahead,
as the Dockerfile does). Where the CPU lacks the instructions, or the library is not built
and cannot be, ``load_int4_kernel`` says why in the log and returns None, and the layers
keep PyTorch's kernel: never an error.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from src.models.cpu_info import x86_kernel_unavailable
from src.models.native import KERNELS_DIR, Bf16Matmul, CSource, load_function

logger = logging.getLogger(__name__)

# (x, packed, scales_and_offsets, out_features) -> y
Int4Kernel = Bf16Matmul


@dataclass(frozen=True)
class KernelSource(CSource):
    """One int4 kernel: the packing of PyTorch's it reads, and what running it takes."""

    packing: str = ""  # as int4_packing() names it
    instructions: str = ""  # what it multiplies with, for the log
    cpu_features: tuple[str, ...] = ()  # as /proc/cpuinfo names them
    block_columns: int = 64  # PyTorch packs output columns in blocks of this many


AVX512_BF16 = KernelSource(
    packing="avx512",
    instructions="AVX-512 BF16",
    source=KERNELS_DIR / "int4_bf16.c",
    flags=("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"),
    cpu_features=("avx512f", "avx512bw", "avx512vl", "avx512_bf16"),
    block_columns=64,
)
AVX2_FMA = KernelSource(
    packing="avx2",
    instructions="AVX2 integer",
    source=KERNELS_DIR / "int4_avx2.c",
    flags=("-mavx2", "-mfma"),
    cpu_features=("avx2", "fma"),
    block_columns=32,
)
KERNEL_SOURCES = {kernel.packing: kernel for kernel in (AVX512_BF16, AVX2_FMA)}


def kernel_source() -> KernelSource | None:
    """The kernel that reads the packing PyTorch writes on this machine, if we have one."""
    from src.models.quantize import int4_packing

    return KERNEL_SOURCES.get(int4_packing())


def unavailable_reason() -> str | None:
    """Why no kernel of ours can run on this machine, or None if one can."""
    # PyTorch packs for the instruction set it dispatches to, which ATEN_CPU_CAPABILITY can
    # lower; each kernel reads one packing.
    kernel = kernel_source()
    if kernel is None:
        from src.models.quantize import int4_packing

        ours = " and ".join(packing.upper() for packing in KERNEL_SOURCES)
        return x86_kernel_unavailable(()) or (
            f"PyTorch packs int4 weights for {int4_packing().upper()} here; ours read {ours}'s"
        )
    return x86_kernel_unavailable(kernel.cpu_features)


@functools.cache
def load_int4_kernel(cache_dir: Path) -> Int4Kernel | None:
    """Our kernel as a function ``(x, packed, scales_and_offsets, out_features) -> y``, or
    None (logged) where it cannot run. Built at most once per process and cache folder."""
    reason = unavailable_reason()
    if reason is None:
        function, reason = load_function(Path(cache_dir), kernel_source(), "int4_bf16_matmul")
    if reason:
        logger.info("INT4_KERNEL: using PyTorch's int4 kernel (ours cannot run: %s)", reason)
        return None
    # (x, packed, scales_and_offsets, n): x (..., K) bf16 times the (n, K) int4 weights
    return Bf16Matmul(function, "int4 kernel")


def can_run(out_features: int, in_features: int) -> bool:
    """Shapes our kernel takes: whole blocks of output columns (PyTorch packs a partial
    block differently) and whole groups of 32 inputs."""
    kernel = kernel_source()
    return kernel is not None and out_features % kernel.block_columns == 0 and in_features % 32 == 0

"""INT8_KERNEL=auto: our own int8 matrix kernel (src/models/kernels/int8_avx2.c), built from C
on first use.

It multiplies bf16 rows by the int8 weights of ``Int8Linear``: every layer of QUANTIZE=int8
and the output layer of both quantised modes (for SmolLM2, 576 x 49,152: the largest single
product of a decoding step). It reads the same (N, K) int8 matrix and per-column scales as
PyTorch's ``aten._weight_int8pack_mm``, and replaces that kernel where PyTorch runs its AVX2
version: activations written as 16-bit integers times a power of two per group of 32 and
multiplied on AVX2's 16-bit integer multiply-adds, with the next weights prefetched. Its
numbers are PyTorch's up to the order of fp32 additions and the rounding of activations far
below their group's largest (below bf16's rounding of the result); the C file explains how.

Where PyTorch runs its AVX-512 kernel, ours is not used (not measured against it there), nor
where the CPU lacks AVX2 and FMA or no compiler and no built library exist:
``load_int8_kernel`` says why in the log and returns None, and the layers keep PyTorch's
kernel, never an error.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from src.models.cpu_info import x86_kernel_unavailable
from src.models.native import KERNELS_DIR, Bf16Matmul, CSource, load_function

logger = logging.getLogger(__name__)

INT8_AVX2_SOURCE = CSource(KERNELS_DIR / "int8_avx2.c", flags=("-mavx2", "-mfma"))
CPU_FEATURES = ("avx2", "fma")
COLUMNS_PER_TASK = 8  # the C file's COLUMNS
GROUP = 32  # activations per power of two

# (x, weight_int8, scales, out_features) -> y
Int8Kernel = Bf16Matmul


def unavailable_reason() -> str | None:
    """Why our kernel cannot run on this machine, or None if it can."""
    reason = x86_kernel_unavailable(CPU_FEATURES)
    capability = torch.backends.cpu.get_cpu_capability()
    if reason is None and capability != "AVX2":
        reason = f"PyTorch runs its {capability} int8 kernel here; ours replaces its AVX2 one"
    return reason


@functools.cache
def load_int8_kernel(cache_dir: Path) -> Int8Kernel | None:
    """Our kernel as a function ``(x, weight_int8, scales, n) -> y``, or None (logged) where it
    cannot run. Built at most once per process and cache folder."""
    reason = unavailable_reason()
    if reason is None:
        function, reason = load_function(Path(cache_dir), INT8_AVX2_SOURCE, "int8_bf16_matmul")
    if reason:
        logger.info("INT8_KERNEL: using PyTorch's int8 kernel (ours cannot run: %s)", reason)
        return None
    # (x, weight_int8, scales, n): x (..., K) bf16 times the (n, K) int8 weights, each row scaled
    return Bf16Matmul(function, "int8 kernel")


def can_run(out_features: int, in_features: int) -> bool:
    """Shapes our kernel takes: whole tasks of output columns, whole groups of inputs."""
    return out_features % COLUMNS_PER_TASK == 0 and in_features % GROUP == 0

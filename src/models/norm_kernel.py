"""NORM_KERNEL=auto: the RMSNorm of bf16 rows in one C call (src/models/kernels/rms_norm.c).

Decoding one token of a small model is mostly small operations, and PyTorch spends more time
dispatching an RMSNorm's half-dozen of them than computing it. The C function does the same
steps in the same precision in one call (the C file says how); on a 2-core AMD EPYC it took
the default engine from about 24 to 28 tokens/s (the README's Performance section). Used
where the model decodes (no gradients), in bf16, with Llama's weighting; everywhere else,
and where it cannot be built, PyTorch computes the norm as before.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from src.models.native import KERNELS_DIR, CSource, load_function

logger = logging.getLogger(__name__)

RMS_NORM_SOURCE = CSource(KERNELS_DIR / "rms_norm.c")

NormKernel = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


@functools.cache
def load_norm_kernel(cache_dir: Path) -> NormKernel | None:
    """The C RMSNorm as ``(x, weight, eps) -> normalised x``, or None (logged) where it
    cannot be built. Built at most once per process and cache folder."""
    function, reason = load_function(Path(cache_dir), RMS_NORM_SOURCE, "rms_norm_bf16")
    if function is None:
        logger.info("NORM_KERNEL: PyTorch computes RMSNorm (ours cannot run: %s)", reason)
        return None
    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float,
                                                                         ctypes.c_int]  # fmt: skip
    function.restype = None

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """weight * bf16(x / sqrt(mean(x^2) + eps)) over the last dimension of bf16 ``x``."""
        x = x.contiguous()
        out = torch.empty_like(x)
        width = x.shape[-1]
        function(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // width, width,
                 eps, torch.get_num_threads())  # fmt: skip
        return out

    return rms_norm


def use_norm_kernel(model: nn.Module, setting: str, cache_dir: Path) -> bool:
    """NORM_KERNEL: "auto" gives every RMSNorm of ``model`` with bf16 weights and Llama's
    weighting the C kernel, "pytorch" leaves them all to PyTorch. True if ours is in use."""
    from src.models.transformer import RMSNorm

    norms = [module for module in model.modules() if isinstance(module, RMSNorm)]
    applies = {id(n) for n in norms if n.style == "llama" and n.weight.dtype == torch.bfloat16}
    kernel = load_norm_kernel(Path(cache_dir)) if setting == "auto" and applies else None
    for norm in norms:
        norm.kernel = kernel if id(norm) in applies else None
    return kernel is not None

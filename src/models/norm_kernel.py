"""NORM_KERNEL=auto: the RMSNorm of bf16 rows in one C call (src/models/kernels/rms_norm.c),
and, where the product after it is one of our C kernels, in that product's call.

Decoding one token of a small model is mostly small operations, and PyTorch spends more time
dispatching an RMSNorm's half-dozen of them than computing it. The C function does the same
steps in the same precision in one call (rms_norm.h says how); on a 2-core AMD EPYC it took
the default engine from about 24 to 28 tokens/s (the README's Performance section). Used
where the model decodes (no gradients), in bf16, with Llama's weighting; everywhere else,
and where it cannot be built, PyTorch computes the norm as before.

A call into C still costs more than a norm's arithmetic, so each block's two norms go into
the call of the product that follows them (qkv after the first, gate-up after the second,
with the residual addition before it): ``norm_then_matmul.c``, the same numbers bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from src.models.native import KERNELS_DIR, CSource, load_typed_function
from src.models.quantize import QuantizedLinear

logger = logging.getLogger(__name__)

RMS_NORM_SOURCE = CSource(KERNELS_DIR / "rms_norm.c")
NORM_THEN_MATMUL_SOURCE = CSource(KERNELS_DIR / "norm_then_matmul.c")

NormKernel = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
# (norm, layer, x, delta) -> (layer(norm(x + delta)), x + delta): see load_norm_then_matmul.
NormThenMatmul = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@functools.cache
def load_norm_kernel(cache_dir: Path) -> NormKernel | None:
    """The C RMSNorm as ``(x, weight, eps) -> normalised x``, or None (logged) where it
    cannot be built. Built at most once per process and cache folder."""
    signature = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
    function = load_typed_function(cache_dir, RMS_NORM_SOURCE, "rms_norm_bf16", signature, None,
                                   logger, "NORM_KERNEL: PyTorch computes RMSNorm")  # fmt: skip
    if function is None:
        return None

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """weight * bf16(x / sqrt(mean(x^2) + eps)) over the last dimension of bf16 ``x``."""
        x = x.contiguous()
        out = torch.empty_like(x)
        width = x.shape[-1]
        function(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // width, width,
                 eps, torch.get_num_threads())  # fmt: skip
        return out

    return rms_norm


@functools.cache
def load_norm_then_matmul(cache_dir: Path) -> NormThenMatmul | None:
    """The C function as ``norm_then_matmul`` below, or None (logged) where it cannot be
    built. Built at most once per process and cache folder."""
    signature = [ctypes.c_void_p] * 5 + [ctypes.c_float] + [ctypes.c_void_p] * 3 + [
        ctypes.c_int64] * 3 + [ctypes.c_int]  # fmt: skip
    function = load_typed_function(cache_dir, NORM_THEN_MATMUL_SOURCE, "norm_then_matmul",
                                   signature, ctypes.c_int, logger,
                                   "NORM_KERNEL: norms in calls of their own")  # fmt: skip
    if function is None:
        return None

    def norm_then_matmul(
        norm: nn.Module, layer: nn.Module, x: torch.Tensor, delta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer(norm(x + delta))`` and ``x + delta`` (``x`` itself without ``delta``) in
        one C call, for ``x`` the norm's kernel takes and a ``fusable`` layer."""
        kernel, weights, scales = layer.kernel_operands()
        x = x.contiguous()
        if delta is None:
            total, delta_pointer, total_pointer = x, None, None
        else:
            delta, total = delta.contiguous(), torch.empty_like(x)
            delta_pointer, total_pointer = delta.data_ptr(), total.data_ptr()
        out = torch.empty(*x.shape[:-1], layer.out_features, dtype=torch.bfloat16)
        width = x.shape[-1]
        status = function(kernel.address, x.data_ptr(), delta_pointer, total_pointer,
                          norm.weight.data_ptr(), norm.eps, weights.data_ptr(), scales.data_ptr(),
                          out.data_ptr(), x.numel() // width, layer.out_features, width,
                          torch.get_num_threads())  # fmt: skip
        if status != 0:
            raise MemoryError(f"{kernel.label} after a norm: out of memory")
        return out, total

    return norm_then_matmul


def fusable(layer: nn.Module) -> bool:
    """Whether ``layer`` multiplies through one of our C kernels alone (no bias), so that the
    norm before it can run in the same call: a LoRA-wrapped or PyTorch-kernel layer cannot."""
    return isinstance(layer, QuantizedLinear) and layer.kernel_operands() is not None


def use_norm_kernel(model: nn.Module, setting: str, cache_dir: Path) -> bool:
    """NORM_KERNEL: "auto" gives every RMSNorm of ``model`` with bf16 weights and Llama's
    weighting the C kernel, and every block the C call of a norm and the product after it
    (which it uses where ``fusable``); "pytorch" leaves them all to PyTorch. True if ours is
    in use."""
    from src.models.transformer import Block, RMSNorm

    norms = [module for module in model.modules() if isinstance(module, RMSNorm)]
    applies = {id(n) for n in norms if n.style == "llama" and n.weight.dtype == torch.bfloat16}
    kernel = load_norm_kernel(Path(cache_dir)) if setting == "auto" and applies else None
    for norm in norms:
        norm.kernel = kernel if id(norm) in applies else None
    then_matmul = load_norm_then_matmul(Path(cache_dir)) if kernel is not None else None
    for block in model.modules():
        if isinstance(block, Block):
            block.norm_then_matmul = then_matmul
    return kernel is not None

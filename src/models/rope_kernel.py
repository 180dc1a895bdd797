"""ROPE_KERNEL=auto: a decoding step's rotary embedding and KV-cache write in one C call
(src/models/kernels/rope_cache.c).

Between the qkv projection and attention, each layer slices q, k and v apart, rotates q and k
and copies k and v into the cache: about fifteen small operations, whose dispatch costs more
than their arithmetic when one token is decoded. The C function does the same steps with
the same rounding, bit for bit. Used where a step adds positions to a cache that already
holds some (decoding, not the prompt), in bf16, with the rotation over whole heads and
without per-head norms, and with no gradients; everywhere else, and where it cannot be
built, PyTorch's operations run as before.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src.models.native import KERNELS_DIR, CSource, load_typed_function

logger = logging.getLogger(__name__)

ROPE_CACHE_SOURCE = CSource(KERNELS_DIR / "rope_cache.c")

# (qkv, cos, signed sin, cache layer, n_head, n_kv_head) -> (q, keys, values): see
# load_rope_kernel.
RopeKernel = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@functools.cache
def load_rope_kernel(cache_dir: Path) -> RopeKernel | None:
    """The C function as ``rotate_into_cache`` below, or None (logged) where it cannot be
    built. Built at most once per process and cache folder."""
    function = load_typed_function(cache_dir, ROPE_CACHE_SOURCE, "rotate_into_cache",
                                   [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7, None, logger,
                                   "ROPE_KERNEL: PyTorch rotates q and k")  # fmt: skip
    if function is None:
        return None

    def rotate_into_cache(
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        layer: Any,
        n_head: int,
        n_kv_head: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From qkv (B, T, (n_head + 2 n_kv_head) hs) bf16: the rotated queries (B, n_head,
        T, hs), and the cache layer's keys and values (B, n_kv_head, S, hs) once this step's
        rotated keys and its values are appended to them."""
        B, T, width = qkv.shape
        head_dim = width // (n_head + 2 * n_kv_head)
        qkv, cos, sin_signed = qkv.contiguous(), cos.contiguous(), sin_signed.contiguous()
        keys, values, start = layer.reserve(T)
        q = torch.empty(B, n_head, T, head_dim, dtype=torch.bfloat16)
        function(qkv.data_ptr(), cos.data_ptr(), sin_signed.data_ptr(), q.data_ptr(),
                 keys.data_ptr(), values.data_ptr(), B, T, n_head, n_kv_head, head_dim, start,
                 keys.shape[2])  # fmt: skip
        return (q, *layer.advance(T))

    return rotate_into_cache


def use_rope_kernel(model: nn.Module, setting: str, cache_dir: Path) -> bool:
    """ROPE_KERNEL: "auto" gives the attention of every layer whose rotation covers whole
    heads, without per-head norms, the C function (which Attention then uses for bf16 steps
    that extend a cache); "pytorch" leaves them all to PyTorch. True if ours is in use."""
    from src.models.transformer import Attention

    layers = [module for module in model.modules() if isinstance(module, Attention)]
    applies = {id(layer) for layer in layers
               if layer.rotary_dim == layer.head_dim and not layer.qk_norm}  # fmt: skip
    kernel = load_rope_kernel(Path(cache_dir)) if setting == "auto" and applies else None
    for layer in layers:
        layer.rope_kernel = kernel if id(layer) in applies else None
    return kernel is not None

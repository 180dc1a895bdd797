"""KV caches as the engine sees them: per layer, keys and values of shape
(B, kv_heads, length, head_dim), whether the model is ours (``KVCache``) or transformers'
(``DynamicCache``). Both have ``layers[i].keys/.values``; only making a new one differs."""

from __future__ import annotations

from typing import Any

import torch

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (1, kv_heads, length, head_dim)


def row_layers(cache: Any, row: int, columns: torch.Tensor) -> list[LayerKV]:
    """Copies of one row's keys and values at ``columns`` (its real, non-padding positions)
    from a batched cache."""
    return [
        (layer.keys[row : row + 1, :, columns], layer.values[row : row + 1, :, columns])
        for layer in cache.layers
    ]


def cache_from_layers(model: Any, layers: list[LayerKV]) -> Any:
    """A new KV cache for ``model`` that starts with ``layers`` (copied, never aliased)."""
    from src.models.transformer import KVCache, Transformer

    if isinstance(model, Transformer):
        return KVCache.from_layers(layers)
    from transformers import DynamicCache

    # DynamicCache's first update concatenates onto an empty tensor: a copy.
    return DynamicCache(ddp_cache_data=layers, config=model.config)

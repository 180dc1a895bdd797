"""What the engine and the chat layer need to know about a loaded model: which ids end a
reply, how many positions it was trained for, whether it attends to a sliding window, and how
much memory its keys and values take per token."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from src.errors import ModelLoadingError


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends a reply: the tokenizer's EOS and the generation config's (which for
    chat models is often the end-of-turn token, e.g. <|im_end|>)."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def max_positions(config: Any) -> int:
    """The longest sequence the model was trained for (names differ between families)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelLoadingError(
        f"cannot tell the context length of {type(config).__name__}: "
        "it has no max_position_embeddings or n_positions"
    )


def uses_sliding_window(model: Any) -> bool:
    """Whether some layer attends only to a window of recent positions (Mistral, Gemma 2/3):
    such layers drop old keys on their own schedule, so their caches are neither batched
    together, shared between requests, nor reused."""
    config = model.config
    if getattr(config, "sliding_window", None):
        return True
    return "sliding_attention" in (getattr(config, "layer_types", None) or [])


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of keys and values one token of context holds in the KV cache (all layers)."""
    config = model.config
    layers = _first_int(config, "num_hidden_layers", "n_layer")
    heads = _first_int(config, "num_attention_heads", "n_head")
    kv_heads = _first_int(config, "num_key_value_heads", "n_kv_head") or heads
    width = _first_int(config, "hidden_size", "n_embd")
    head_dim = _first_int(config, "head_dim") or width // heads
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    element = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    return 2 * layers * kv_heads * head_dim * element  # keys and values


def _first_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# Keys and values of the longest conversations may take at most this share of the memory
# when every row of a full batch holds one.
KV_MEMORY_SHARE = 0.25
# A chat keeps at least this much conversation (or the model's whole limit, if smaller):
# rows rarely all fill their windows at once, and a window any smaller forgets too soon.
MIN_CONTEXT_WINDOW = 4096


def context_window(model: Any, rows: int, memory_bytes: int | None = None) -> int:
    """The most tokens (prompt and reply) one conversation may hold: the model's own limit,
    lowered if ``rows`` conversations that long would not fit in a quarter of the memory
    (``memory_bytes``: this machine's or container's, unless given), but never below
    ``MIN_CONTEXT_WINDOW``."""
    limit = max_positions(model.config)
    memory = available_memory() if memory_bytes is None else memory_bytes
    affordable = int(memory * KV_MEMORY_SHARE) // (kv_bytes_per_token(model) * max(rows, 1))
    return min(limit, max(affordable, MIN_CONTEXT_WINDOW))


def available_memory() -> int:
    """Bytes of RAM this process may use: the machine's, or its container's limit (cgroup
    v2 ``memory.max``, or v1's ``memory.limit_in_bytes``) if that is lower."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in (
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ):
        try:
            value = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            memory = min(memory, int(value))
    return memory

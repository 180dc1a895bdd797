"""Prefix caching: reuse the keys and values of tokens the model has already read.

Each chat prompt is mostly the previous turn's prompt plus the reply and one new message, and
every conversation starts with the same system prompt. Running those tokens through the model
again costs time in proportion to their number (about 1.6 ms a token for the bundled model on
2 cores), yet their keys and values cannot have changed: attention is causal, so position i
depends only on tokens 0..i. So when a reply ends, the engine keeps the keys and values of
everything it read, and a later prompt that starts with the same tokens only runs its new
tokens through the model. (llama.cpp keeps a conversation's cache in its slot the same way,
and vLLM's automatic prefix caching shares common prefixes between requests.)

This cache is deliberately simple: whole sequences in least-recently-used order under a
memory budget (PREFIX_CACHE_MB), matched by their longest common prefix with the prompt. The
engines of one server (the base model's and each LoRA adapter's) share one cache and its
budget: each entry belongs to the engine (``owner``) whose model computed it, since the same
tokens give other keys and values under another adapter.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from src.models.caches import LayerKV

MIN_REUSED_TOKENS = 8  # below this, a match saves less than looking it up and merging costs


@dataclass(eq=False)  # entries are told apart by identity (their tensors don't compare)
class _Entry:
    ids: torch.Tensor  # (length,) the token ids whose keys and values are kept
    layers: list[LayerKV]
    nbytes: int
    owner: object  # the engine whose model computed them


class PrefixCache:
    """Keys and values of earlier sequences, looked up by the longest common prefix.

    Thread-safe. The tensors handed out by ``longest_prefix`` are the cache's own: callers
    copy them (every cache in this project copies on its first append) and never write to them.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: list[_Entry] = []  # least recently used first
        self._lock = threading.Lock()
        self.lookups = 0
        self.hits = 0
        self.tokens_reused = 0  # prompt tokens that did not go through the model again

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def longest_prefix(self, ids: list[int], owner: object = None) -> tuple[int, list[LayerKV]]:
        """How many leading tokens of ``ids`` have keys and values cached by ``owner``, and
        those (each (1, kv_heads, n, head_dim)); (0, []) when fewer than ``MIN_REUSED_TOKENS``
        match. At most ``len(ids) - 1``: the last token must go through the model to give the
        logits."""
        query = torch.tensor(ids, dtype=torch.long)
        with self._lock:
            self.lookups += 1
            best, best_length = None, 0
            for entry in self._entries:
                length = min(len(entry.ids), len(ids) - 1)
                if entry.owner is not owner or length <= best_length:
                    continue
                differs = (entry.ids[:length] != query[:length]).nonzero()
                common = int(differs[0]) if len(differs) else length
                if common > best_length:
                    best, best_length = entry, common
            if best is None or best_length < MIN_REUSED_TOKENS:
                return 0, []
            self._entries.remove(best)
            self._entries.append(best)  # most recently used
            self.hits += 1
            self.tokens_reused += best_length
            return best_length, [
                (k[:, :, :best_length], v[:, :, :best_length]) for k, v in best.layers
            ]

    def store(self, ids: torch.Tensor, layers: list[LayerKV], owner: object = None) -> None:
        """Keep ``layers`` (owned by the cache from now on) as ``owner``'s keys and values of
        ``ids``. That owner's entries that are a prefix of ``ids`` go (the new one covers
        them); then the least recently used of all, until the cache fits its budget."""
        if len(ids) < MIN_REUSED_TOKENS:
            return
        nbytes = sum(k.nbytes + v.nbytes for k, v in layers)
        if nbytes > self.budget_bytes:
            return
        entry = _Entry(ids.clone(), layers, nbytes, owner)
        with self._lock:
            self._entries = [
                e for e in self._entries if e.owner is not owner or not _is_prefix(e.ids, entry.ids)
            ]
            self._entries.append(entry)
            total = sum(e.nbytes for e in self._entries)
            while total > self.budget_bytes:
                total -= self._entries.pop(0).nbytes

    def forget(self, owner: object) -> None:
        """Drop ``owner``'s entries (its engine closed: nobody can use them again)."""
        with self._lock:
            self._entries = [e for e in self._entries if e.owner is not owner]


def _is_prefix(shorter: torch.Tensor, longer: torch.Tensor) -> bool:
    return len(shorter) <= len(longer) and bool(torch.equal(shorter, longer[: len(shorter)]))

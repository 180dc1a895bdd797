"""An LRU cache of replies to deterministic (greedy) requests.

The key is the exact prompt (token ids, or the messages sent to a remote server) plus every
parameter that can change a greedy reply, so a hit returns exactly what generation would have
produced. Sampled requests are never cached: users asking twice expect two different samples.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from src.params import GenerationParams


@dataclass(frozen=True)
class CachedReply:
    text: str
    completion_tokens: int
    finish_reason: str
    prompt_tokens: int = 0
    stop_sequence: str | None = None  # the one that ended the reply, if one did


def cache_key(model_id: str, prompt: Sequence[Hashable], params: GenerationParams) -> tuple:
    """``prompt`` identifies the prompt exactly: its token ids, or with a remote backend its
    (role, content) messages."""
    # The seed only matters when sampling, and sampled replies are never cached.
    # As JSON text: some values (logit_bias, a response format's schema) are dicts, which are
    # not hashable; ASCII escapes keep a lone surrogate (refused later, by the tokenizer) legal.
    relevant = json.dumps(params.model_dump(exclude={"seed"}), sort_keys=True, ensure_ascii=True)
    return (model_id, tuple(prompt), relevant)


class ResponseCache:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, CachedReply] = OrderedDict()
        self._lock = threading.Lock()  # the API serves requests from several threads
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> CachedReply | None:
        with self._lock:
            reply = self._entries.get(key)
            if reply is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return reply

    def put(self, key: tuple, reply: CachedReply) -> None:
        if self.max_entries == 0:
            return
        with self._lock:
            self._entries[key] = reply
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

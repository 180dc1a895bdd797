"""Memory for keys and values, shared by the engines of one server.

A decoding batch keeps the keys and values of every token of every row, left-padded to its
longest row: rows x longest x ``kv_bytes_per_token``. Sixteen rows of long conversations on
the bundled model hold several hundred MB, and a server with LoRA adapters has one engine
(and one batch) per adapter. ``KVBudget`` bounds the sum (KV_CACHE_MB): before admitting a
request, an engine checks that its batch, with that row added and every row grown to its
longest possible reply, still fits beside what the other engines hold; if not, the request
waits for rows to finish. An engine with nothing running always admits one request, so a
single conversation longer than the budget is still served. The estimate counts each row's
prompt and longest reply; a prompt whose start comes from the prefix cache may be padded a
little further, so the budget is close, not exact.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any


class KVBudget:
    """Thread-safe; each engine holds one amount, updated as its batch changes."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._held: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def fits(self, owner: Any, amount: int) -> bool:
        """Whether ``owner`` may hold ``amount`` beside what the others hold."""
        with self._lock:
            return self._fits(owner, amount)

    def reserve(self, owner: Any, amount: int) -> bool:
        """Hold ``amount`` for ``owner`` if it fits, in one step (two engines admitting at
        once cannot both take the last room); False, and nothing changed, if not."""
        with self._lock:
            if not self._fits(owner, amount):
                return False
            self._held[owner] = max(amount, self._held.get(owner, 0))
            return True

    def _fits(self, owner: Any, amount: int) -> bool:
        others = sum(held for key, held in self._held.items() if key is not owner)
        return others + amount <= self.limit_bytes

    def hold(self, owner: Any, amount: int) -> None:
        with self._lock:
            if amount:
                self._held[owner] = amount
            else:
                self._held.pop(owner, None)

    def used(self) -> int:
        with self._lock:
            return sum(self._held.values())

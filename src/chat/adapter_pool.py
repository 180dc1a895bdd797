"""The base model's ChatService plus one per LoRA adapter, loaded on first use.

Each adapter gets its own service (and its own copy of the base weights, about 0.6 GB for the
bundled model): requests for different adapters can then be batched and cached separately,
without swapping adapters under a running batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from src.chat.service import ChatService
from src.errors import InvalidRequestError
from src.models.adapters import list_adapters, resolve_adapter

AdapterLoader = Callable[[Path], ChatService]


class AdapterPool:
    def __init__(self, base: ChatService, adapters_dir: Path, load: AdapterLoader) -> None:
        self.base = base
        self.adapters_dir = Path(adapters_dir)
        self._load = load
        self._services: dict[str, ChatService] = {}
        self._lock = threading.Lock()

    @property
    def remote(self) -> bool:
        """BACKEND=remote: there is no local model to put an adapter on."""
        return isinstance(self.base, ChatService) and self.base.backend.kind == "remote"

    def names(self) -> list[str]:
        if self.remote:
            return []  # adapters run on a local model; the UI then shows no picker
        return list_adapters(self.adapters_dir)

    def services(self) -> list[ChatService]:
        """The base service and every adapter's loaded so far."""
        with self._lock:
            return [self.base, *self._services.values()]

    def close(self) -> None:
        """Close the base service and every adapter's (their engine threads stop)."""
        for service in self.services():
            service.close()

    def get(self, adapter: str | None) -> ChatService:
        """The service for ``adapter`` (None or "" is the base model)."""
        if not adapter:
            return self.base
        if self.remote:
            raise InvalidRequestError(
                f"adapter: {adapter!r} cannot be used: LoRA adapters run on a local model, "
                "and this server sends generation to a remote one (BACKEND=remote)",
                "adapter",
            )
        path = resolve_adapter(self.adapters_dir, adapter)  # rejects unknown names and paths
        with self._lock:
            if adapter not in self._services:
                self._services[adapter] = self._load(path)
            return self._services[adapter]

"""The base model's ChatService plus one per LoRA adapter, loaded on first use.

Each adapter gets its own service (its own engine and caches): requests for different
adapters can then be batched and cached separately, without swapping adapters under a running
batch. On the scratch engine an adapter's model shares every base weight and adds only its
LoRA matrices (src/models/lora_view.py); on transformers' engine it is a copy of the model
with the adapter merged in. An adapter written again since it was loaded (trained anew into
the same folder) is loaded again on its next use. At most ``max_loaded`` adapters are kept
(MAX_LOADED_ADAPTERS): loading one more closes the least recently used that has no reply
running (its memory goes back), and when every loaded adapter is busy the request is refused
with ``ServerBusyError`` (503) rather than going over the limit.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from src.chat.service import ChatService
from src.engine.memory import release_free_memory
from src.errors import InvalidRequestError, ServerBusyError
from src.models.adapters import list_adapters, resolve_adapter
from src.models.lora_wrapper import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_SAFETENSORS

AdapterLoader = Callable[[Path], ChatService]

# A service handed out this recently counts as in use even before its reply is created (the
# request may wait for a worker thread to build its prompt).
HANDED_OUT_SECONDS = 10.0


ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_SAFETENSORS, ADAPTER_PICKLE)


def adapter_version(folder: Path) -> tuple:
    """What changes when an adapter is written again: the sizes and times of the files that
    make the adapter. A training run's other files in the same folder (metrics.jsonl growing
    every step, its plots and reports) are not the adapter and do not make it load again."""
    files = [folder / name for name in ADAPTER_FILES]
    return tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in files
        if p.is_file() and not p.is_symlink()
    )


class AdapterPool:
    def __init__(
        self,
        base: ChatService,
        adapters_dir: Path,
        load: AdapterLoader,
        max_loaded: int = 2,
    ) -> None:
        self.base = base
        self.adapters_dir = Path(adapters_dir)
        self.max_loaded = max_loaded
        self._load = load
        # Least recently used first; each with the time it was last handed out.
        self._services: OrderedDict[str, ChatService] = OrderedDict()
        self._handed_out: dict[str, float] = {}
        self._versions: dict[str, tuple] = {}  # each loaded adapter's files, as loaded
        self._lock = threading.Lock()
        self.loads = 0
        self.evictions = 0

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
            version = adapter_version(path)
            loaded = self._services.get(adapter)
            stale = loaded is not None and self._versions.get(adapter) != version
            if stale and not loaded.running_replies():
                # Trained again since it was loaded (make dpo into the same folder): the new
                # weights are served once no reply is running on the old ones.
                self._services.pop(adapter).close()
                loaded = None
            if loaded is None:
                self._make_room()
                self._services[adapter] = self._load(path)
                self._versions[adapter] = version
                self.loads += 1
            self._services.move_to_end(adapter)
            self._handed_out[adapter] = time.monotonic()
            return self._services[adapter]

    def _make_room(self) -> None:
        """Close least recently used idle adapters until one more fits."""
        while len(self._services) >= self.max_loaded:
            now = time.monotonic()
            idle = [
                name
                for name, service in self._services.items()
                if not service.running_replies()
                and now - self._handed_out.get(name, 0.0) > HANDED_OUT_SECONDS
            ]
            if not idle:
                raise ServerBusyError(
                    f"adapter: the {len(self._services)} adapters loaded (MAX_LOADED_ADAPTERS is "
                    f"{self.max_loaded}) are all in use; try again shortly",
                    "adapter",
                )
            self._handed_out.pop(idle[0], None)
            self._services.pop(idle[0]).close()  # no reference left: its weights are freed
            self.evictions += 1
            release_free_memory()  # ... and given back to the system

    def loaded(self) -> list[str]:
        """Names of the adapters loaded now, least recently used first."""
        with self._lock:
            return list(self._services)

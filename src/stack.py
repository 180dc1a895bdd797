"""The composition root: the one place that builds the chat stack from the settings.

Every entry point calls ``build_chat_stack``: the CLI (``src/mvp_chatbot.py``), the API
(``src/web/api.py``), the standalone web UI (``src/web_app.py``) and the Spaces ``app.py``.
What it assembles, bottom up:

    model (src/models)  ->  engine (src/engine: the one decode loop)  ->  LocalBackend
    -> ChatService (src/chat)  ->  AdapterPool (the base service plus one per LoRA adapter)

With BACKEND=remote no model is loaded: the service's backend is a ``RemoteBackend``.
``ChatStack.close()`` stops every engine thread and remote client and closes the store.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from src.chat.adapter_pool import AdapterPool
from src.chat.local import LocalBackend
from src.chat.remote import RemoteBackend
from src.chat.service import ChatService
from src.chat.store import SessionStore
from src.config import Settings
from src.engine.batching import BatchingEngine
from src.engine.kv_budget import KVBudget
from src.engine.memory import release_free_memory
from src.engine.prefix_cache import PrefixCache
from src.errors import ConfigError
from src.models.inference import InferenceModel
from src.models.model_info import (
    context_window,
    eos_token_ids,
    uses_sliding_window,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ChatStack:
    service: ChatService  # the base model's
    adapters: AdapterPool  # the base service plus one per LoRA adapter, loaded on first use
    store: SessionStore | None  # the sessions database, shared by all the services

    def close(self) -> None:
        """Stop every service's engine thread (or remote client), then close the store."""
        self.adapters.close()
        if self.store is not None:
            self.store.close()


def build_chat_stack(
    settings: Settings,
    model_name: str | None = None,
    adapter_path: Path | None = None,
    engine_name: str | None = None,
    sessions: bool = False,
    background: bool = True,
) -> ChatStack:
    """Load the configured model and build the stack around it.

    ``model_name``, ``adapter_path`` and ``engine_name`` override MODEL_NAME, ADAPTER_PATH and
    ENGINE (the CLI's flags). ``sessions=True`` (the API and the web UI) keeps conversations
    in SQLite at DATA_DIR/sessions.sqlite3. ``background=False`` (the CLI: one consumer)
    runs the decode loop in the caller's thread instead of a scheduler thread (see
    ``BatchingEngine``).
    Raises ``ConfigError`` or ``ModelLoadingError``.
    """
    store = SessionStore(settings.sessions_db) if sessions else None
    # The base model's engine and each adapter's share one budget for keys and values.
    shared = SharedCaches.from_settings(settings)

    def service_for(adapter: Path | None, shared_base: InferenceModel | None = None) -> ChatService:
        build = partial(
            build_service,
            settings,
            model_name,
            adapter,
            engine_name,
            store,
            shared=shared,
            shared_base=shared_base,
        )
        if not background:
            return build(background=False)
        # Loading runs PyTorch's parallel kernels: in a thread that then ends, so that no
        # OpenMP thread team stays alive beside the engine's (see BatchingEngine). What it
        # read and converted on the way is then given back to the system.
        service = in_passing_thread(partial(build, background=True))
        release_free_memory()
        return service

    try:
        service = service_for(adapter_path)
    except BaseException:
        if store is not None:
            store.close()
        raise

    # Adapters picked by name go on the base model's weights where its engine allows.
    shared_base = service.backend.loaded if isinstance(service.backend, LocalBackend) else None

    def adapter_service(adapter: Path) -> ChatService:
        loaded = service_for(adapter, shared_base=shared_base)
        loaded.result_observers = service.result_observers  # one list: metrics see every reply
        return loaded

    adapters = AdapterPool(
        service, settings.adapters_dir, adapter_service, settings.max_loaded_adapters
    )
    return ChatStack(service, adapters, store)


def in_passing_thread(work: Callable[[], T]) -> T:
    """``work()`` run in a new thread that ends with it; its result, or its exception."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="model-loading")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def build_service(
    settings: Settings,
    model_name: str | None = None,
    adapter_path: Path | None = None,
    engine_name: str | None = None,
    store: SessionStore | None = None,
    background: bool = True,
    shared: SharedCaches | None = None,
    shared_base: InferenceModel | None = None,
) -> ChatService:
    """One ChatService: the configured model (or remote server) with the settings' defaults;
    its engine draws on ``shared`` caches (servers: one for all their engines), and an
    adapter goes on ``shared_base``'s weights where it can (see ``load_for_inference``)."""
    if settings.backend == "remote":
        if adapter_path is not None or engine_name not in (None, "auto"):
            raise ConfigError(
                "LoRA adapters and --engine need a local model, but BACKEND=remote loads "
                "none; drop them or use BACKEND=local",
                field="BACKEND",
            )
        backend = RemoteBackend.from_settings(settings, model=model_name)
        name = backend.model
    else:
        backend, name = build_local_backend(
            settings, model_name, adapter_path, engine_name, background, shared, shared_base
        )
    return ChatService(
        backend,
        model_name=name,
        default_params=settings.generation_defaults(),
        cache_size=settings.response_cache_size,
        default_system_prompt=settings.system_prompt,
        store=store,
        max_message_chars=settings.max_message_chars,
        max_reply_tokens=settings.max_length,
        adapter_name=adapter_path.name if adapter_path is not None else None,
    )


def build_local_backend(
    settings: Settings,
    model_name: str | None = None,
    adapter_path: Path | None = None,
    engine_name: str | None = None,
    background: bool = True,
    shared: SharedCaches | None = None,
    shared_base: InferenceModel | None = None,
) -> tuple[LocalBackend, str]:
    """The model (see ``src.models.inference`` for ENGINE, PRECISION and QUANTIZE), the
    engine that decodes for it, and the text-to-ids backend around the engine."""
    from src.models.inference import load_for_inference
    from src.training.calibration import calibration_examples

    loaded = load_for_inference(
        settings, model_name, adapter_path, engine_name, shared_base, calibration_examples
    )
    backend = local_backend(loaded.model, loaded.tokenizer, settings, background, shared)
    backend.loaded = loaded
    logger.info(
        "Model: %s (%s); context window %d tokens (a full one holds %.0f MB of keys and values)",
        loaded.name,
        loaded.description,
        backend.context_window,
        backend.kv_cache_bytes / 2**20,
    )
    return backend, loaded.name


def local_backend(
    model: Any,
    tokenizer: Any,
    settings: Settings,
    background: bool = False,
    shared: SharedCaches | None = None,
) -> LocalBackend:
    """The engine for an already loaded ``model`` and the backend around it (scripts that
    load a model themselves, such as compare_adapter.py, start here: one consumer, so by
    default the loop runs in the caller's thread, with a prefix cache of its own and no
    budget for keys and values beyond the model's context window)."""
    if uses_sliding_window(model):
        logger.warning(
            "Notice: this model uses sliding-window attention; requests are decoded one at a time."
        )
    shared = shared or SharedCaches(prefix_cache=new_prefix_cache(settings))
    engine = BatchingEngine(
        model,
        eos_token_ids(model, tokenizer),
        settings.max_batch_size,
        prefix_cache=shared.prefix_cache,
        background=background,
        max_waiting=settings.max_queued_requests if background else None,
        memory_release_seconds=settings.memory_release_seconds,
        kv_budget=shared.kv_budget,
        max_prefill_tokens=settings.max_prefill_tokens,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        prompt_lookup_tokens=settings.prompt_lookup_tokens,
    )
    window = context_window(model, engine.max_batch_size)
    return LocalBackend(engine, tokenizer, window)


@dataclass
class SharedCaches:
    """What every engine of one stack (the base model's and each adapter's) draws from, so
    that loading adapters does not multiply the memory settings allow."""

    kv_budget: KVBudget | None = None  # KV_CACHE_MB: keys and values of all running batches
    prefix_cache: PrefixCache | None = None  # PREFIX_CACHE_MB: kept for later prompts

    @classmethod
    def from_settings(cls, settings: Settings) -> SharedCaches:
        return cls(KVBudget(settings.kv_cache_mb * 2**20), new_prefix_cache(settings))


def new_prefix_cache(settings: Settings) -> PrefixCache | None:
    return PrefixCache(settings.prefix_cache_mb * 2**20) if settings.prefix_cache_mb else None

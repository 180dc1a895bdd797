"""The decode loop: every reply of the CLI, the API, the web UI and the scripts comes from here.

Token ids in, token ids out: the engine knows nothing of tokenizers or chat. A single scheduler
thread owns the model, and concurrent requests share one forward pass per decoding step
(continuous batching). Requests that arrive together are first prefilled together (their
left-padded prompts through the model in one pass, giving their KV caches and first tokens),
then join the running batch. At every step the batch's last tokens go through the model
together, (B, 1), and the logits pipeline (``src/engine/logits.py``) picks each row's next
token with the row's own parameters. Finished or cancelled rows leave the batch at once, and
waiting requests join between two steps, so nobody waits for a whole batch to finish. A single
stream is the same loop with one row.

Rows have different lengths, so the shared KV cache is left-padded: the attention mask hides
the padding, and each row gets explicit position ids (its own token count), which is what
RoPE and learned positions need.

With a ``PrefixCache``, a prompt that starts like an earlier sequence (the previous turn of the
conversation, the shared system prompt) only runs its new tokens through the model.

A long prompt that arrives while other replies are being decoded is prefilled a chunk at a
time (``prefill_chunk_tokens``), one chunk between two decoding steps, so the running replies
pause for a chunk at a time instead of for the whole prompt; the last chunk joins the batch
like any prompt whose beginning was cached.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from src.engine.kv_budget import KVBudget
from src.engine.logits import (
    GeneratedToken,
    LogitsPipeline,
    TokenConstraint,
    sampling_generator,
    token_logprobs,
)
from src.engine.memory import MemoryReleaser, return_large_blocks_at_once
from src.engine.prefix_cache import PrefixCache
from src.engine.prompt_lookup import draft_tokens, prepare_prompt_lookup
from src.errors import EngineClosedError, ServerBusyError
from src.models.caches import LayerKV, cache_from_layers, row_layers
from src.models.model_info import kv_bytes_per_token, uses_sliding_window
from src.models.single_steps import single_steps
from src.params import GenerationParams

logger = logging.getLogger(__name__)

# Engines not closed yet: closed at exit, because a scheduler thread still waiting when the
# interpreter shuts down makes the process abort ("terminate called without an active
# exception").
_LIVE_ENGINES: weakref.WeakSet[BatchingEngine] = weakref.WeakSet()


def _close_live_engines() -> None:
    for engine in list(_LIVE_ENGINES):
        engine.close(timeout=2.0)


atexit.register(_close_live_engines)

_DONE = object()  # end-of-stream marker on a request's queue
_CLOSE = object()  # on the waiting queue: the scheduler thread ends


@dataclass
class _Request:
    prompt_ids: list[int]
    params: GenerationParams
    should_stop: Callable[[], bool]
    tokens: queue.Queue = field(default_factory=queue.Queue)
    constraint: TokenConstraint | None = None  # a grammar the reply must follow
    abandoned: bool = False  # the consumer went away (closed the generator)
    generator: torch.Generator | None = None
    # Prompt + generated ids (for the repetition penalty and the prefix cache), in a buffer
    # with room for every token the request may generate: adding one writes one element
    # instead of copying the whole history (torch.cat) for every token of every row.
    history: torch.Tensor = field(init=False, repr=False)
    generated: int = 0
    # Keys and values of the prompt's first tokens, computed so far by chunked prefill:
    # (how many tokens, per layer (1, kv_heads, n, head_dim)).
    partial: tuple[int, list[LayerKV]] | None = None

    def __post_init__(self) -> None:
        room = len(self.prompt_ids) + self.params.max_new_tokens
        self.history = torch.empty(room, dtype=torch.long)
        self.history[: len(self.prompt_ids)] = torch.tensor(self.prompt_ids, dtype=torch.long)

    @property
    def seen(self) -> torch.Tensor:
        return self.history[: len(self.prompt_ids) + self.generated]

    @property
    def reply(self) -> torch.Tensor:
        return self.history[len(self.prompt_ids) : len(self.prompt_ids) + self.generated]

    def add(self, token_id: int) -> None:
        self.history[len(self.prompt_ids) + self.generated] = token_id
        self.generated += 1

    def ends_with(self, token_id: int, eos: frozenset[int]) -> bool:
        """Whether ``token_id``, about to be added, is the request's last token."""
        return token_id in eos or self.generated + 1 >= self.params.max_new_tokens


@dataclass
class _Batch:
    requests: list[_Request]
    cache: Any  # a transformers DynamicCache: per layer keys/values (B, kv_heads, L, head_dim)
    attention_mask: torch.Tensor  # (B, L): 1 for real tokens, 0 for left padding
    positions: torch.Tensor  # (B,): the position id of each row's next token
    last_tokens: torch.Tensor  # (B,)


class BatchingEngine:
    """Generates token ids for many requests at once; safe to call from many threads.

    ``eos_token_ids`` end a reply (the token is yielded, then the reply ends). ``close()``
    stops the loop; requests still running then fail with ``EngineClosedError``.

    Who runs the loop: with ``background=True`` (servers: the API, the web UI) a scheduler
    thread of its own; with ``background=False`` (one consumer: the CLI, scripts, the
    benchmark) the callers' own threads, each taking one round of the loop for everyone
    whenever it waits for a token. The loop is the same. The second way keeps the decoding in
    the thread that already did the model's other work: PyTorch gives each thread that runs
    its parallel kernels an OpenMP thread team, and on this 2-core machine a second team
    alive (the main thread's, after it loaded a model) slows a decoding thread's by 40-50%
    (README Performance).
    """

    def __init__(
        self,
        model: Any,
        eos_token_ids: frozenset[int],
        max_batch_size: int = 16,
        prefix_cache: PrefixCache | None = None,
        pipeline: LogitsPipeline | None = None,
        background: bool = True,
        max_waiting: int | None = None,
        memory_release_seconds: float = 5.0,
        kv_budget: KVBudget | None = None,
        max_prefill_tokens: int | None = None,
        prompt_lookup_tokens: int = 0,
        prefill_chunk_tokens: int = 0,
    ) -> None:
        """``memory_release_seconds``: while requests are being decoded, memory freed by the
        engine goes back to the system at most this often (0: only when the batch empties,
        which it always does as well). See ``src/engine/memory.py``. ``kv_budget``: the keys
        and values this engine's batch may hold, shared with the server's other engines
        (``src/engine/kv_budget.py``); a request that does not fit waits.
        ``max_prefill_tokens``: prompts prefilled together in one pass hold at most this many
        tokens, padding included (one prompt alone may be longer): a pass's attention scores
        take memory in proportion to rows x length squared, so a burst of long prompts is
        prefilled a few rows at a time instead of all at once. ``prompt_lookup_tokens``: a
        single stream checks up to this many drafted tokens per step (0: none), see
        ``src/engine/prompt_lookup.py``. ``prefill_chunk_tokens``: while other rows decode, a
        prompt longer than this is prefilled this many tokens per round (0: in one pass)."""
        self.model = model
        self.eos_token_ids = frozenset(eos_token_ids)
        # Our left-padded shared cache assumes every layer attends to all earlier positions.
        # Sliding-window layers (Mistral, Gemma 2/3) keep their own bookkeeping, so such a
        # model decodes one request at a time, and its caches are neither shared nor reused.
        sliding = uses_sliding_window(model)
        self.max_batch_size = 1 if sliding else max_batch_size
        self.prefix_cache = None if sliding else prefix_cache
        # This engine's entries in a prefix cache it may share with others (no reference to
        # the engine itself, so the cache never keeps a dropped engine alive).
        self._cache_owner = object()
        self.pipeline = pipeline or LogitsPipeline()
        self.max_waiting = max_waiting  # requests queued for a row; None: no limit
        self.stats = EngineStats()
        return_large_blocks_at_once()  # for the whole process; the same every time
        self.memory = MemoryReleaser(memory_release_seconds)
        self.kv_budget = kv_budget
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._prefilling: _Request | None = None  # a long prompt, a chunk per round
        # Sliding-window caches cannot take back positions, so such a model never drafts.
        self.prompt_lookup_tokens = 0 if sliding else prompt_lookup_tokens
        if self.prompt_lookup_tokens:
            prepare_prompt_lookup()  # its import now, not in the middle of a reply
        self._eos_tensor = torch.tensor(sorted(self.eos_token_ids), dtype=torch.long)
        self._kv_per_token = kv_bytes_per_token(model) if kv_budget is not None else 0
        self._deferred: deque[_Request] = deque()  # taken from the queue, waiting for room
        self.batch_sizes: Counter[int] = Counter()  # decoding steps by their number of rows
        self._waiting: queue.Queue[Any] = queue.Queue()
        self._requests: dict[int, _Request] = {}  # admitted, not finished: failed on a crash
        self._closed = False
        self._closing = threading.Lock()  # no request slips in behind the closing marker
        self._group = threading.RLock()  # held while a group of requests is being queued
        self._thread: threading.Thread | None = None
        self._batch: _Batch | None = None  # the running batch, when callers run the loop
        self._driving = threading.Lock()  # one caller at a time runs a round
        if background:
            self._thread = threading.Thread(target=self._run, name="decode-engine", daemon=True)
            self._thread.start()
            _LIVE_ENGINES.add(self)

    def generate_token_ids(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[int]:
        """Yield new token ids until EOS (yielded too), max_new_tokens, or ``should_stop()``
        (checked before every token). Closing the iterator early frees the request's row."""
        generation = self.generate(prompt_ids, params, should_stop)
        try:
            for token in generation:
                yield token.token_id
        finally:
            generation.close()

    def generate(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        should_stop: Callable[[], bool] = lambda: False,
        constraint: TokenConstraint | None = None,
    ) -> Generation:
        """Queue a request now and return its tokens as they come: ``generate_token_ids``
        with each token's log-probabilities when ``params.logprobs`` asks (and first, with
        ``params.prompt_logprobs``, the prompt's own tokens, marked ``in_prompt``). With a
        ``constraint``, only tokens it allows are chosen. Close it to give up the request."""
        request = _Request(list(prompt_ids), params, should_stop, constraint=constraint)
        with self._closing:
            if self._closed:
                raise EngineClosedError("the engine is closed: the server is shutting down")
            self._waiting.put(request)
        return Generation(self, request)

    @contextmanager
    def together(self, requests: int = 1) -> Iterator[None]:
        """The ``requests`` queued inside this block are admitted in one go (prefilled
        together): the n choices of one request then share their batch, so with a seed they
        come out the same each time. Raises ``ServerBusyError`` when the queue of requests
        waiting for a row has no room for them (``max_waiting``): a full queue answers at once
        instead of piling up work that clients would give up on."""
        with self._group:
            waiting = self.waiting_requests()
            if self.max_waiting is not None and waiting + requests > self.max_waiting:
                raise ServerBusyError(
                    f"the server is busy: {waiting} requests are waiting for the model "
                    f"(MAX_QUEUED_REQUESTS is {self.max_waiting}); try again shortly"
                )
            yield

    def waiting_requests(self) -> int:
        """Requests queued or deferred, not yet admitted to a batch."""
        return self._waiting.qsize() + len(self._deferred)

    def _next_item(self, request: _Request, timeout: float | None = None) -> object:
        """The request's next token (or end marker, or error). Without a scheduler thread,
        run rounds of the loop (for every request) until one is there."""
        if self._thread is not None:
            return request.tokens.get(timeout=timeout)
        while True:
            try:
                return request.tokens.get_nowait()
            except queue.Empty:
                pass
            with self._driving:
                if request.tokens.empty():
                    if self._closed:
                        return EngineClosedError("the engine was closed before this reply ended")
                    self._batch = self._round(self._batch, wait=False)

    def _wait_for_end(self, request: _Request) -> None:
        """Until the loop has let go of an abandoned request (at its next step), so that when
        a caller's close() returns, the row is free and its keys and values are kept in the
        prefix cache."""
        while True:
            try:
                item = self._next_item(request, timeout=60.0)
            except queue.Empty:
                return
            if item is _DONE or isinstance(item, BaseException):
                return

    def close(self, timeout: float = 10.0) -> None:
        """Stop the scheduler thread after its current step. Requests still waiting or running
        fail with ``EngineClosedError``; new ones are refused. Safe to call twice."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._waiting.put(_CLOSE)
        _LIVE_ENGINES.discard(self)
        if self.prefix_cache is not None:
            self.prefix_cache.forget(self._cache_owner)
        if self._thread is None:
            with self._driving:
                self._fail_all(EngineClosedError("the engine was closed before this reply ended"))
        elif threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- the scheduler thread -------------------------------------------------------------

    def _run(self) -> None:
        batch: _Batch | None = None
        while not self._closed:
            batch = self._round(batch, wait=True)
        self._fail_all(EngineClosedError("the engine was closed before this reply ended"))

    def _round(self, batch: _Batch | None, wait: bool) -> _Batch | None:
        """One round of the loop: admit waiting requests (``wait``: block until one comes if
        there is nothing to do), then one decoding step for the batch."""
        try:
            batch = self._admit(batch, wait)
            if batch is not None:
                batch = self._step(batch)
        except Exception as exc:  # never let one bad step kill the server's engine
            logger.exception("generation step failed")
            # Fail every admitted request, including any merged during this round, so no
            # consumer waits forever on its queue.
            for request in list(self._requests.values()):
                self._finish(request, exc)
            batch, self._prefilling = None, None
        # Give back what this round's tensors left free in malloc: when the batch has just
        # emptied (the server goes idle), and every few seconds while it runs.
        self.memory.after_round(busy=batch is not None)
        if self.kv_budget is not None:
            holding = [*(batch.requests if batch else []), *filter(None, [self._prefilling])]
            self.kv_budget.hold(self, self._kv_bytes(holding))
        return batch

    def _kv_bytes(self, requests: list[_Request]) -> int:
        """The keys and values a batch of ``requests`` holds once every row has its longest
        reply (rows are left-padded to the longest)."""
        if not requests:
            return 0
        longest = max(len(r.prompt_ids) + r.params.max_new_tokens for r in requests)
        return len(requests) * longest * self._kv_per_token

    def _may_join(
        self, running: list[_Request], arrivals: list[_Request], request: _Request
    ) -> bool:
        """Whether ``request`` may be prefilled with ``arrivals`` and join ``running``: the
        prefill pass within ``max_prefill_tokens`` and the batch within the KV budget. One
        request alone always may, so nothing waits for ever."""
        if not running and not arrivals:
            return True
        if self.max_prefill_tokens is not None and arrivals:
            longest = max(len(r.prompt_ids) for r in (*arrivals, request))
            if (len(arrivals) + 1) * longest > self.max_prefill_tokens:
                return False
        if self.kv_budget is None:
            return True
        return self.kv_budget.reserve(self, self._kv_bytes([*running, *arrivals, request]))

    def _fail_all(self, error: Exception) -> None:
        """Fail the admitted requests and those still waiting (the engine is closed)."""
        for request in list(self._requests.values()):
            self._finish(request, error)
        self._prefilling = None
        while self._deferred:
            self._deferred.popleft().tokens.put(error)
        if self.kv_budget is not None:
            self.kv_budget.hold(self, 0)
        while True:  # requests that never got in
            try:
                request = self._waiting.get_nowait()
            except queue.Empty:
                break
            if request is not _CLOSE:
                request.tokens.put(error)

    def _finish(self, request: _Request, outcome: object = _DONE) -> None:
        """Send the last item (end marker or exception) and forget the request."""
        request.tokens.put(outcome)
        self._requests.pop(id(request), None)

    def _admit(self, batch: _Batch | None, wait: bool = True) -> _Batch | None:
        """Prefill the waiting requests together and merge them into the batch (with
        ``wait``, block if idle). Clients that arrive together (a burst, a page of users)
        share one prefill pass instead of queueing behind each other's prompts."""
        room = self.max_batch_size - (len(batch.requests) if batch is not None else 0)
        running = batch.requests if batch is not None else []
        arrivals: list[_Request] = []
        if self._prefilling is not None:  # first in line: its next chunk, or its last one now
            request, self._prefilling = self._prefilling, None
            if request.abandoned or request.should_stop():
                self._finish(request)
            elif batch is not None and self._prefill_chunk(request):
                self._prefilling = request
                return batch
            else:
                arrivals.append(request)
        while len(arrivals) < room:
            if self._deferred:  # first in line: it was waiting for room
                request = self._deferred.popleft()
            else:
                try:
                    request = self._waiting.get(block=wait and batch is None and not arrivals)
                except queue.Empty:
                    break
                if not arrivals:  # a group being queued (``together``) is complete first
                    with self._group:
                        pass
            if request is _CLOSE:
                break
            if request.abandoned or request.should_stop():  # its client left while it waited
                self._finish(request)
                continue
            if arrivals and self._chunks(request, batch):
                self._deferred.appendleft(request)  # next round, a chunk at a time
                break
            if not self._may_join(running, arrivals, request):
                self._deferred.appendleft(request)  # waits, first in line, for rows to end
                break
            self._requests[id(request)] = request
            if self._start(request):
                if self._chunks(request, batch) and self._prefill_chunk(request):
                    self._prefilling = request  # (arrivals is empty: see above)
                    break
                arrivals.append(request)
        if not arrivals:
            return batch
        joined = self._prefill_together(arrivals)
        if joined is None:
            return batch
        return joined if batch is None else _merge(batch, joined)

    def _chunks(self, request: _Request, batch: _Batch | None) -> bool:
        """Whether ``request``'s prompt is prefilled a chunk per round: it is long, and other
        rows are decoding (alone, one pass is faster). Scored prompts need every position's
        logits from one pass."""
        return (
            bool(self.prefill_chunk_tokens)
            and batch is not None
            and not request.params.prompt_logprobs
            and len(request.prompt_ids) > self.prefill_chunk_tokens
        )

    @torch.inference_mode()
    def _prefill_chunk(self, request: _Request) -> bool:
        """Run the next ``prefill_chunk_tokens`` of ``request``'s prompt (after what is cached
        or already done) through the model, keeping their keys and values in
        ``request.partial``. False, doing nothing but the lookup, when at most a chunk is left:
        ``_prefill`` runs that part and gives the first token."""
        done, layers = self._cached_prefix(request)
        if len(request.prompt_ids) - done <= self.prefill_chunk_tokens:
            request.partial = (done, layers) if done else None
            return False
        end = done + self.prefill_chunk_tokens
        output = self.model(
            input_ids=request.seen[done:end].unsqueeze(0),
            attention_mask=torch.ones(1, end, dtype=torch.long),
            position_ids=torch.arange(done, end).unsqueeze(0),
            cache=cache_from_layers(self.model, layers) if done else None,
            use_cache=True,
            logits_to_keep=1,
        )
        # The pass's own cache, one row with nothing padded: its tensors as they are (the next
        # pass copies them into a cache of its own anyway).
        request.partial = (end, [(layer.keys, layer.values) for layer in output.cache.layers])
        self.stats.prefill_chunks += 1
        return True

    def _start(self, request: _Request) -> bool:
        """Set up a request's sampling state; False if it was cancelled while waiting."""
        request.generator = sampling_generator(request.params)
        if request.should_stop() or request.abandoned:
            self._finish(request)
            return False
        return True

    def _prefill_together(self, requests: list[_Request]) -> _Batch | None:
        scored = [request for request in requests if request.params.prompt_logprobs]
        if scored and len(requests) > 1:  # they need every position's logits: each alone
            batch = self._prefill_together([r for r in requests if not r.params.prompt_logprobs])
            for request in scored:
                single = self._prefill_together([request])
                if single is not None:
                    batch = single if batch is None else _merge(batch, single)
            return batch
        if not requests:
            return None
        try:
            return self._prefill(requests)
        except Exception as exc:
            if len(requests) == 1:  # this request's own problem: only it fails
                self._finish(requests[0], exc)
                return None
        # One bad prompt (say, too long for the model) must not fail the others that
        # arrived with it: prefill each alone, so only that one gets the error.
        batch = None
        for request in requests:
            try:
                single = self._prefill([request])
            except Exception as exc:
                self._finish(request, exc)
                continue
            if single is not None:
                batch = single if batch is None else _merge(batch, single)
        return batch

    @torch.inference_mode()
    def _prefill(self, requests: list[_Request]) -> _Batch | None:
        """All the prompts through the model in one pass. A row is its cached prefix (keys
        and values only, see ``PrefixCache``) then its new tokens; each part is left-padded to
        the longest, so a row can have padding between the two, which the mask hides."""
        scoring = requests[0].params.prompt_logprobs  # then it is alone (_prefill_together)
        found = [(0, []) if scoring else self._cached_prefix(request) for request in requests]
        past = max(reused for reused, _ in found)
        length = max(
            len(request.prompt_ids) - reused
            for request, (reused, _) in zip(requests, found, strict=True)
        )
        input_ids = torch.zeros(len(requests), length, dtype=torch.long)
        attention_mask = torch.zeros(len(requests), past + length, dtype=torch.long)
        for row, (request, (reused, _)) in enumerate(zip(requests, found, strict=True)):
            new = len(request.prompt_ids) - reused
            input_ids[row, length - new :] = request.seen[reused:]
            attention_mask[row, past - reused : past] = 1
            attention_mask[row, past + length - new :] = 1
        if len(requests) == 1 and past == 0:
            # Nothing cached, nothing to hide: no mask lets the model take its causal fast path.
            output = self.model(
                input_ids=input_ids, use_cache=True, logits_to_keep=0 if scoring else 1
            )
            if scoring:
                self._send_prompt_logprobs(requests[0], output.logits[0])
        else:
            output = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                # Padding does not count: each row's first real token is at position 0.
                position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past:],
                cache=cache_from_layers(self.model, _stack(found, past)) if past else None,
                use_cache=True,
                logits_to_keep=1,
            )
        self.stats.prefill_passes += 1
        self.stats.rows_prefilled += len(requests)
        batch = _Batch(
            requests=list(requests),
            cache=output.cache,
            attention_mask=attention_mask,
            positions=attention_mask.sum(dim=1),
            last_tokens=torch.zeros(len(requests), dtype=torch.long),
        )
        keep = self._emit(batch, output.logits[:, -1])
        return _select(batch, keep)

    def _send_prompt_logprobs(self, request: _Request, logits: torch.Tensor) -> None:
        """The prompt's tokens, each scored by the logits of the position before it (the
        first has nothing before it)."""
        prompt = request.prompt_ids
        request.tokens.put(GeneratedToken(prompt[0], in_prompt=True))
        if len(prompt) > 1:
            top = [request.params.top_logprobs] * (len(prompt) - 1)
            for token in token_logprobs(logits[:-1], prompt[1:], top, in_prompt=True):
                request.tokens.put(token)

    def _cached_prefix(self, request: _Request) -> tuple[int, list[LayerKV]]:
        """The keys and values ``request``'s prompt starts with: those chunked prefill has
        computed (taken: used once), or else the prefix cache's longest match."""
        if request.partial is not None:
            found, request.partial = request.partial, None
            return found
        if self.prefix_cache is None:
            return 0, []
        return self.prefix_cache.longest_prefix(request.prompt_ids, owner=self._cache_owner)

    def _remember(self, batch: _Batch, row: int, request: _Request) -> None:
        """Keep a leaving row's keys and values (prompt and reply so far) for later prompts."""
        if self.prefix_cache is None:
            return
        columns = batch.attention_mask[row].nonzero().squeeze(1)  # its real positions
        if len(columns) == len(request.seen):  # the cache holds exactly those tokens
            layers = row_layers(batch.cache, row, columns)
            self.prefix_cache.store(request.seen, layers, owner=self._cache_owner)

    @torch.inference_mode()
    def _step(self, batch: _Batch) -> _Batch | None:
        draft = self._draft(batch)
        if len(draft):
            return self._lookup_step(batch, draft)
        attention_mask = torch.cat(
            [batch.attention_mask, torch.ones(len(batch.requests), 1, dtype=torch.long)], dim=1
        )
        # A row can have padding inside its cache (between a cached prefix and its new tokens,
        # see _prefill) even when it is alone in the batch: look at the mask, not the count.
        padded = not bool(batch.attention_mask.all())
        output = self.model(
            input_ids=batch.last_tokens.unsqueeze(1),  # (B, 1)
            # (B, L + 1); without padding, no mask lets the model skip building one
            attention_mask=attention_mask if padded else None,
            position_ids=batch.positions.unsqueeze(1),  # (B, 1)
            cache=batch.cache,
            use_cache=True,
        )
        self.stats.steps += 1
        self.stats.rows_decoded += len(batch.requests)
        self.batch_sizes[len(batch.requests)] += 1
        batch.cache = output.cache
        batch.attention_mask = attention_mask
        batch.positions = batch.positions + 1
        keep = self._emit(batch, output.logits[:, -1])
        return _select(batch, keep)

    def _draft(self, batch: _Batch) -> torch.Tensor:
        """Tokens to check in this step: only a single stream drafts (rows of a batch would
        accept different numbers of tokens), never past the reply's last possible token."""
        if not self.prompt_lookup_tokens or len(batch.requests) != 1:
            return batch.last_tokens[:0]
        request = batch.requests[0]
        room = request.params.max_new_tokens - request.generated - 1
        # request.seen ends with the token this step feeds the model (batch.last_tokens).
        return draft_tokens(request.seen, min(self.prompt_lookup_tokens, room), self._eos_tensor)

    def _lookup_step(self, batch: _Batch, draft: torch.Tensor) -> _Batch | None:
        """One pass over the last token and the draft, then the row's tokens chosen one
        position at a time exactly as ``_step`` would (same pipeline, same random draws,
        grammar advanced token by token) for as long as each choice equals the draft's next
        token; the keys and values past the last accepted token are dropped."""
        inputs = torch.cat([batch.last_tokens, draft]).unsqueeze(0)  # (1, 1 + drafted)
        count = inputs.shape[1]
        past = batch.attention_mask.shape[1]
        attention_mask = torch.cat(
            [batch.attention_mask, torch.ones(1, count, dtype=torch.long)], dim=1
        )
        padded = not bool(batch.attention_mask.all())
        with single_steps():
            output = self.model(
                input_ids=inputs,
                attention_mask=attention_mask if padded else None,
                position_ids=batch.positions.unsqueeze(1) + torch.arange(count),
                cache=batch.cache,
                use_cache=True,
            )
        self.stats.steps += 1
        self.stats.rows_decoded += 1
        self.batch_sizes[1] += 1
        self.stats.drafted += len(draft)
        batch.cache = output.cache
        for position in range(count):
            # The cache is the row's up to this position (what _remember keeps of a row
            # that ends here), and the next token's position follows it.
            batch.attention_mask = attention_mask[:, : past + position + 1]
            batch.positions = batch.positions + 1
            keep = self._emit(batch, output.logits[:, position])
            if not keep:
                return None
            if position == len(draft) or int(batch.last_tokens[0]) != int(draft[position]):
                break
            self.stats.accepted += 1
        batch.cache.crop(-(count - position - 1))
        return _select(batch, keep)

    def _emit(self, batch: _Batch, logits: torch.Tensor) -> list[int]:
        """Choose each row's next token, send it, and return the rows that go on."""
        live = []
        for row, request in enumerate(batch.requests):
            # max_new_tokens=0: the prompt was only to be scored (prefill did that)
            if request.abandoned or request.should_stop() or not request.params.max_new_tokens:
                self._remember(batch, row, request)
                self._finish(request)
            else:
                live.append(row)
        if len(live) < len(batch.requests):
            logits = logits[live]
        chosen = self._choose(logits, [batch.requests[row] for row in live])
        tokens = self._with_logprobs(logits, [batch.requests[row] for row in live], chosen)
        keep, next_tokens, sent, finished = [], [], [], []
        for row, token_id, token in zip(live, chosen, tokens, strict=True):
            request = batch.requests[row]
            if not isinstance(token_id, Exception) and request.constraint is not None:
                token_id = _advance(request.constraint, token_id)
            if isinstance(token_id, Exception):  # e.g. a sampling error: fail this row only
                self._finish(request, token_id)
                continue
            sent.append((request, token))
            if request.ends_with(token_id, self.eos_token_ids):
                self._remember(batch, row, request)  # the cache holds all but this last token
                finished.append(request)
            else:
                keep.append(row)
                next_tokens.append(token_id)
            request.add(token_id)
        # The tokens go out together after the bookkeeping: each one wakes its reply's thread,
        # which would otherwise take the interpreter lock in the middle of this loop.
        for request, token in sent:
            request.tokens.put(token)
        for request in finished:
            self._finish(request)
        if keep:  # indexed by row, as _select expects; finished rows' entries are unused
            batch.last_tokens = torch.zeros(len(batch.requests), dtype=torch.long)
            batch.last_tokens[keep] = torch.tensor(next_tokens)
        return keep

    def _with_logprobs(
        self, logits: torch.Tensor, requests: list[_Request], chosen: list[int | Exception]
    ) -> list[GeneratedToken | None]:
        """The chosen tokens as sent: with their log-probabilities for the rows that asked."""
        tokens: list[GeneratedToken | None] = [
            None if isinstance(token_id, Exception) else GeneratedToken(token_id)
            for token_id in chosen
        ]
        asking = [
            row
            for row, request in enumerate(requests)
            if request.params.logprobs and tokens[row] is not None
        ]
        if asking:
            scored = token_logprobs(
                logits[asking],
                [chosen[row] for row in asking],
                [requests[row].params.top_logprobs for row in asking],
            )
            for row, token in zip(asking, scored, strict=True):
                tokens[row] = token
        return tokens

    def _choose(self, logits: torch.Tensor, requests: list[_Request]) -> list[int | Exception]:
        """The rows' next tokens from the pipeline, all rows in one go. Should that fail (a
        bad value in one request), each row is tried alone, so only the bad one fails."""
        if not requests:
            return []
        try:
            return self.pipeline.next_tokens(logits, requests)
        except Exception:
            alone: list[int | Exception] = []
            for row, request in enumerate(requests):
                try:
                    alone.extend(self.pipeline.next_tokens(logits[row : row + 1], [request]))
                except Exception as exc:
                    alone.append(exc)
            return alone


def _advance(constraint: TokenConstraint, token_id: int) -> int | Exception:
    """Move the row's grammar past its chosen token; an error fails only that row."""
    try:
        constraint.advance(token_id)
    except Exception as exc:
        return exc
    return token_id


class Generation:
    """One request's tokens, as the engine produces them (see ``BatchingEngine.generate``)."""

    def __init__(self, engine: BatchingEngine, request: _Request) -> None:
        self._engine = engine
        self._request = request
        self._ended = False

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> GeneratedToken:
        if self._ended:
            raise StopIteration
        item = self._engine._next_item(self._request)
        if item is _DONE or isinstance(item, BaseException):
            self._ended = True
            if item is _DONE:
                raise StopIteration
            raise item
        return item

    def close(self) -> None:
        """Give up the request (if it has not ended): its row is freed at the next step, and
        by the time this returns (e.g. a stop sequence matched, the client went away)."""
        if not self._ended:
            self._ended = True
            self._request.abandoned = True
            self._engine._wait_for_end(self._request)

    def abandon(self) -> None:
        """Give up the request without waiting (for a caller that never read from it, such
        as the event loop when a client left before its reply started): the engine drops it
        at its next step, or when it would have been admitted."""
        self._ended = True
        self._request.abandoned = True


@dataclass
class EngineStats:
    """Forward passes and the rows they carried (``/health`` shows them: rows per step is
    how well requests are batched)."""

    steps: int = 0  # decoding steps
    rows_decoded: int = 0  # sum of batch sizes over those steps
    prefill_passes: int = 0
    rows_prefilled: int = 0
    prefill_chunks: int = 0  # passes over a chunk of a long prompt while others decoded
    drafted: int = 0  # prompt-lookup tokens checked
    accepted: int = 0  # ... and kept: each saved a decoding step


def _stack(found: list[tuple[int, list[LayerKV]]], length: int) -> list[LayerKV]:
    """Per layer, the rows' cached keys and values left-padded to ``length`` and stacked
    (rows with nothing cached are all padding)."""
    template = next(layers for reused, layers in found if reused)
    stacked = []
    for index, (template_keys, template_values) in enumerate(template):
        keys, values = [], []
        for reused, layers in found:
            row_keys, row_values = (
                layers[index] if reused else (template_keys[:, :, :0], template_values[:, :, :0])
            )
            keys.append(_left_pad(row_keys, length, 2))
            values.append(_left_pad(row_values, length, 2))
        stacked.append((torch.cat(keys), torch.cat(values)))
    return stacked


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _merge(batch: _Batch, other: _Batch) -> _Batch:
    """Stack two batches into one, left-padding the shorter cache to the longer."""
    length = max(batch.attention_mask.shape[1], other.attention_mask.shape[1])
    for layer, other_layer in zip(batch.cache.layers, other.cache.layers, strict=True):
        layer.keys = torch.cat(
            [_left_pad(layer.keys, length, 2), _left_pad(other_layer.keys, length, 2)]
        )
        layer.values = torch.cat(
            [_left_pad(layer.values, length, 2), _left_pad(other_layer.values, length, 2)]
        )
    return _Batch(
        requests=batch.requests + other.requests,
        cache=batch.cache,
        attention_mask=torch.cat(
            [_left_pad(batch.attention_mask, length, 1), _left_pad(other.attention_mask, length, 1)]
        ),
        positions=torch.cat([batch.positions, other.positions]),
        last_tokens=torch.cat([batch.last_tokens, other.last_tokens]),
    )


def _select(batch: _Batch, rows: list[int]) -> _Batch | None:
    """Keep only ``rows``, and drop leading cache columns that are padding for every row."""
    if not rows:
        return None
    if len(rows) < len(batch.requests):
        index = torch.tensor(rows)
        batch.cache.batch_select_indices(index)
        batch.requests = [batch.requests[row] for row in rows]
        batch.attention_mask = batch.attention_mask[index]
        batch.positions = batch.positions[index]
        batch.last_tokens = batch.last_tokens[index]
    first_real = int(batch.attention_mask.any(dim=0).nonzero()[0])
    if first_real > 0:
        for layer in batch.cache.layers:
            layer.keys = layer.keys[:, :, first_real:]
            layer.values = layer.values[:, :, first_real:]
        batch.attention_mask = batch.attention_mask[:, first_real:]
    return batch

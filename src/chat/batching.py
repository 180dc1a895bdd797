"""Continuous batching: concurrent requests share one forward pass per decoding step.

A single scheduler thread owns the model. Each request is first prefilled alone (its prompt
through the model, giving its KV cache and first token), then joins the running batch. At
every step the batch's last tokens go through the model together, (B, 1), and each row picks
its next token with its own parameters. Finished or cancelled rows leave the batch at once,
and waiting requests join between two steps, so nobody waits for a whole batch to finish.

Rows have different lengths, so the shared KV cache is left-padded: the attention mask hides
the padding, and each row gets explicit position ids (its own token count), which is what
RoPE and learned positions need. With one request this is the same loop as ``HFEngine``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from src.chat.engine import eos_token_ids, max_positions
from src.chat.params import GenerationParams
from src.chat.sampling import choose_next_token, sampling_generator

logger = logging.getLogger(__name__)

_DONE = object()  # end-of-stream marker on a request's queue


@dataclass
class _Request:
    prompt_ids: list[int]
    params: GenerationParams
    should_stop: Callable[[], bool]
    tokens: queue.Queue = field(default_factory=queue.Queue)
    abandoned: bool = False  # the consumer went away (closed the generator)
    generator: torch.Generator | None = None
    previous_ids: torch.Tensor | None = None  # prompt + generated, for the repetition penalty
    generated: int = 0

    def finished_by(self, token_id: int, eos: frozenset[int]) -> bool:
        return token_id in eos or self.generated >= self.params.max_new_tokens


@dataclass
class _Batch:
    requests: list[_Request]
    cache: Any  # a transformers DynamicCache: per layer keys/values (B, kv_heads, L, head_dim)
    attention_mask: torch.Tensor  # (B, L): 1 for real tokens, 0 for left padding
    positions: torch.Tensor  # (B,): the position id of each row's next token
    last_tokens: torch.Tensor  # (B,)


class BatchingEngine:
    """Same interface as ``HFEngine``; safe to call from many threads at once."""

    def __init__(self, model: Any, tokenizer: Any, max_batch_size: int = 16) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.max_positions = max_positions(model.config)
        self.max_batch_size = max_batch_size
        self._waiting: queue.Queue[_Request] = queue.Queue()
        self._requests: dict[int, _Request] = {}  # admitted, not finished: failed on a crash
        self._thread = threading.Thread(target=self._run, name="batching-engine", daemon=True)
        self._thread.start()
        self.steps = 0  # forward passes in the decode phase (for tests and the benchmark)
        self.rows_decoded = 0  # sum of batch sizes over those steps

    def generate_token_ids(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[int]:
        request = _Request(list(prompt_ids), params, should_stop)
        self._waiting.put(request)
        try:
            while True:
                item = request.tokens.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.abandoned = True  # e.g. a stop sequence matched: free the row

    # ---- the scheduler thread -------------------------------------------------------------

    def _run(self) -> None:
        batch: _Batch | None = None
        while True:
            try:
                batch = self._admit(batch)
                if batch is not None:
                    batch = self._step(batch)
            except Exception as exc:  # never let one bad step kill the server's engine
                logger.exception("generation step failed")
                # Fail every admitted request, including any merged during this round, so no
                # consumer waits forever on its queue.
                for request in list(self._requests.values()):
                    self._finish(request, exc)
                batch = None

    def _finish(self, request: _Request, outcome: object = _DONE) -> None:
        """Send the last item (end marker or exception) and forget the request."""
        request.tokens.put(outcome)
        self._requests.pop(id(request), None)

    def _admit(self, batch: _Batch | None) -> _Batch | None:
        """Prefill waiting requests and merge them into the batch (block if idle)."""
        while batch is None or len(batch.requests) < self.max_batch_size:
            try:
                request = self._waiting.get(block=batch is None)
            except queue.Empty:
                break
            self._requests[id(request)] = request
            try:
                single = self._prefill(request)
            except Exception as exc:  # this request's own problem: only it fails
                self._finish(request, exc)
                continue
            if single is not None:
                batch = single if batch is None else _merge(batch, single)
        return batch

    @torch.inference_mode()
    def _prefill(self, request: _Request) -> _Batch | None:
        request.generator = sampling_generator(request.params)
        request.previous_ids = torch.tensor(request.prompt_ids, dtype=torch.long)
        if request.should_stop() or request.abandoned:
            self._finish(request)
            return None
        output = self.model(
            input_ids=request.previous_ids.unsqueeze(0), use_cache=True, logits_to_keep=1
        )
        batch = _Batch(
            requests=[request],
            cache=output.cache,
            attention_mask=torch.ones(1, len(request.prompt_ids), dtype=torch.long),
            positions=torch.tensor([len(request.prompt_ids)]),
            last_tokens=torch.zeros(1, dtype=torch.long),
        )
        keep = self._emit(batch, output.logits[:, -1])
        return _select(batch, keep)

    @torch.inference_mode()
    def _step(self, batch: _Batch) -> _Batch | None:
        attention_mask = torch.cat(
            [batch.attention_mask, torch.ones(len(batch.requests), 1, dtype=torch.long)], dim=1
        )
        output = self.model(
            input_ids=batch.last_tokens.unsqueeze(1),  # (B, 1)
            attention_mask=attention_mask,  # (B, L + 1)
            position_ids=batch.positions.unsqueeze(1),  # (B, 1)
            cache=batch.cache,
            use_cache=True,
        )
        self.steps += 1
        self.rows_decoded += len(batch.requests)
        batch.cache = output.cache
        batch.attention_mask = attention_mask
        batch.positions = batch.positions + 1
        keep = self._emit(batch, output.logits[:, -1])
        return _select(batch, keep)

    def _emit(self, batch: _Batch, logits: torch.Tensor) -> list[int]:
        """Choose each row's next token, send it, and return the rows that go on."""
        keep = []
        for row, request in enumerate(batch.requests):
            if request.abandoned or request.should_stop():
                self._finish(request)
                continue
            try:
                token_id = choose_next_token(
                    logits[row], request.previous_ids, request.params, request.generator
                )
            except Exception as exc:  # e.g. a sampling error: fail this row, not the batch
                self._finish(request, exc)
                continue
            request.generated += 1
            request.tokens.put(token_id)
            if request.finished_by(token_id, self.eos_token_ids):
                self._finish(request)
                continue
            request.previous_ids = torch.cat([request.previous_ids, torch.tensor([token_id])])
            batch.last_tokens[row] = token_id
            keep.append(row)
        return keep


def supports_batching(model: Any) -> bool:
    """Our left-padded shared cache assumes every layer attends to all earlier positions;
    sliding-window layers keep their own bookkeeping, so such models are not batched."""
    config = model.config
    if getattr(config, "sliding_window", None):
        return False
    return "sliding_attention" not in (getattr(config, "layer_types", None) or [])


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

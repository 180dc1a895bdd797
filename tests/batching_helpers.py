"""Run the same prompts one at a time and as concurrent requests of one batching engine."""

from __future__ import annotations

import threading
import time

import torch

from src.chat.service import ChatService
from src.engine.batching import BatchingEngine
from src.params import GenerationParams


def prompts_for(service: ChatService, questions: list[str], params: GenerationParams) -> list:
    return [
        service.start_reply(service.new_conversation(), q, params).prompt.input_ids
        for q in questions
    ]


def alone_and_together(
    service: ChatService, prompts: list[list[int]], params: GenerationParams
) -> tuple[list[list[int]], list[list[int]], BatchingEngine]:
    """Token ids of each prompt generated alone by the service's engine, and by a fresh
    ``BatchingEngine`` with every request arriving at once."""
    engine = service.backend.engine
    alone = [list(engine.generate_token_ids(p, params)) for p in prompts]
    together = BatchingEngine(engine.model, engine.eos_token_ids)
    return alone, arrive_together(together, prompts, params), together


def arrive_together(
    engine: BatchingEngine,
    prompts: list[list[int]],
    params: GenerationParams | list[GenerationParams],
) -> list[list[int] | Exception]:
    """Each prompt's token ids (or its exception) with every request queued before the
    scheduler admits any but the first, so they share one prefill pass, then decode together.
    ``params``: for all requests, or one per prompt."""
    each = params if isinstance(params, list) else [params] * len(prompts)
    results: list = [None] * len(prompts)
    gate, holding = threading.Event(), threading.Event()

    def hold_the_scheduler() -> bool:
        holding.set()
        return not gate.wait(timeout=60)

    def run(index: int) -> None:
        # The first request holds the scheduler (it checks should_stop before its prefill)
        # until all the others are queued: a deterministic "arrive together".
        should_stop = hold_the_scheduler if index == 0 else (lambda: False)
        try:
            results[index] = list(
                engine.generate_token_ids(prompts[index], each[index], should_stop)
            )
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    threads[0].start()
    wait_until(holding.is_set)
    for thread in threads[1:]:
        thread.start()
    wait_until(lambda: engine._waiting.qsize() == len(prompts) - 1)
    gate.set()
    for thread in threads:
        thread.join()
    return results


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


def assert_same_up_to_a_near_tie(
    model, prompt_ids: list[int], expected: list[int], got: list[int], margin: float = 1.0
) -> None:
    """``got`` (a reply decoded another way: batched, or from cached keys and values) equals
    ``expected`` (the reference reply), or leaves it only where the reference model's own
    logits nearly tie the two choices.

    In bf16 two ways of computing the same step (other shapes, other summation orders, int8
    rounding of a batch's output layer) move logits by tenths; greedy decoding then flips
    wherever two tokens are that close, and after that the replies differ legitimately. A
    real bug (a wrong cache, a wrong mask, rows mixed up) moves logits by far more."""
    differ = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), None)
    if differ is None:
        assert len(got) == len(expected) or not got or not expected
        return
    ids = torch.tensor([prompt_ids + expected[:differ]])
    with torch.inference_mode():
        logits = model(ids, logits_to_keep=1).logits[0, -1].float()
    gap = float(logits[expected[differ]] - logits[got[differ]])
    assert gap < margin, (
        f"token {differ}: {got[differ]} instead of {expected[differ]}, {gap:.2f} below it"
    )

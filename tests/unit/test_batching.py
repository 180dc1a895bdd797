"""The batching engine's failure handling: nobody waits forever, one bad row fails alone."""

import threading
import time

import pytest

import src.engine.batching as batching
from src.chat.prompts import encode_conversation
from src.engine.batching import BatchingEngine
from src.engine.kv_budget import KVBudget
from src.engine.logits import LogitsPipeline, repetition_penalty
from src.engine.prefix_cache import PrefixCache
from src.errors import EngineClosedError
from src.models.model_info import kv_bytes_per_token
from src.params import GenerationParams
from tests.batching_helpers import alone_and_together, arrive_together, wait_until

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

GREEDY = GenerationParams(do_sample=False, repetition_penalty=1.0, max_new_tokens=20)


@pytest.fixture()
def engine(tiny_llama_service):
    return BatchingEngine(
        tiny_llama_service.backend.engine.model, tiny_llama_service.backend.engine.eos_token_ids
    )


def prompt(service, text):
    return encode_conversation(
        service.backend.tokenizer,
        service.backend.prompt_format,
        None,
        [{"role": "user", "content": text}],
    )


def test_a_crash_while_merging_fails_every_request_instead_of_hanging(
    engine, tiny_llama_service, monkeypatch
):
    def broken_merge(*_):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(batching, "_merge", broken_merge)
    first = engine.generate_token_ids(
        prompt(tiny_llama_service, "one"), GREEDY.updated(max_new_tokens=200)
    )
    next(first)  # the first request is decoding in the batch
    second = engine.generate_token_ids(prompt(tiny_llama_service, "two"), GREEDY)
    with pytest.raises(RuntimeError, match="simulated"):
        list(second)
    with pytest.raises(RuntimeError, match="simulated"):
        list(first)
    monkeypatch.undo()
    assert list(engine.generate_token_ids(prompt(tiny_llama_service, "three"), GREEDY))


def test_a_sampling_error_in_one_row_fails_only_that_request(
    engine, tiny_llama_service, monkeypatch
):
    def poisoned(scores, rows):  # a score processor that fails on one request's rows
        if any(row.params.seed == 13 and len(row.seen) > 40 for row in rows):
            raise RuntimeError("invalid probabilities (simulated)")

    healthy_prompt = prompt(tiny_llama_service, "healthy")
    expected = list(tiny_llama_service.backend.engine.generate_token_ids(healthy_prompt, GREEDY))
    engine = BatchingEngine(
        engine.model,
        engine.eos_token_ids,
        pipeline=LogitsPipeline(score_processors=[repetition_penalty, poisoned]),
    )
    results = {}

    def run(name, ids, params):
        try:
            results[name] = list(engine.generate_token_ids(ids, params))
        except RuntimeError as exc:
            results[name] = exc

    threads = [
        threading.Thread(target=run, args=("healthy", healthy_prompt, GREEDY)),
        threading.Thread(
            target=run,
            args=(
                "poisoned",
                prompt(tiny_llama_service, "bad"),
                GREEDY.updated(do_sample=True, temperature=1.0, seed=13, max_new_tokens=60),
            ),
        ),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert isinstance(results["poisoned"], RuntimeError)
    assert results["healthy"] == expected


def test_sliding_window_models_are_decoded_one_at_a_time_without_a_prefix_cache():
    from transformers import LlamaConfig, MistralConfig

    class Model:
        def __init__(self, config):
            self.config = config

    full = BatchingEngine(Model(LlamaConfig()), frozenset(), 8, PrefixCache(2**20))
    sliding = BatchingEngine(
        Model(MistralConfig(sliding_window=4096)), frozenset(), 8, PrefixCache(2**20)
    )
    try:
        assert (full.max_batch_size, full.prefix_cache is not None) == (8, True)
        assert (sliding.max_batch_size, sliding.prefix_cache) == (1, None)
    finally:
        full.close()
        sliding.close()


@pytest.mark.parametrize("service_fixture", ["tiny_llama_service", "tiny_gpt2_service"])
def test_requests_arriving_together_share_one_prefill_and_decode_as_alone(service_fixture, request):
    """Left-padded joint prefill: rotary (Llama) and learned (GPT-2) positions both count
    from each row's first real token, so every reply is the one it gets alone."""
    service = request.getfixturevalue(service_fixture)
    texts = ["hi", "a much longer question about the weather today", "and a third one"]
    prompts = [prompt(service, text) for text in texts]
    alone, together, engine = alone_and_together(service, prompts, GREEDY)
    assert together == alone
    assert (engine.stats.prefill_passes, engine.stats.rows_prefilled) == (1, 3)


def test_a_prompt_that_fails_in_a_joint_prefill_fails_alone(tiny_gpt2_service):
    service = tiny_gpt2_service  # learned positions: at most 128
    engine = BatchingEngine(service.backend.engine.model, service.backend.engine.eos_token_ids)
    good = prompt(service, "hello there")
    too_long = prompt(service, "word " * 200)
    results = arrive_together(engine, [good, too_long, good], GREEDY)
    expected = list(service.backend.engine.generate_token_ids(good, GREEDY))
    assert results[0] == results[2] == expected
    assert isinstance(results[1], Exception)


def test_close_fails_running_and_waiting_requests_and_refuses_new_ones(tiny_llama_service):
    source = tiny_llama_service.backend.engine
    engine = BatchingEngine(source.model, source.eos_token_ids, max_batch_size=1)
    ids = prompt(tiny_llama_service, "one")
    running = engine.generate_token_ids(ids, GREEDY.updated(max_new_tokens=200))
    next(running)  # decoding: the batch of one is full
    waiting = engine.generate_token_ids(ids, GREEDY)
    waiting_result = {}
    thread = threading.Thread(
        target=lambda: waiting_result.update(error=_error_of(lambda: list(waiting)))
    )
    thread.start()
    wait_until(lambda: engine._waiting.qsize() == 1)
    engine.close()
    thread.join(30)
    assert isinstance(waiting_result["error"], EngineClosedError)
    with pytest.raises(EngineClosedError):
        list(running)
    with pytest.raises(EngineClosedError, match="closed"):
        next(engine.generate_token_ids(ids, GREEDY))
    engine.close()  # twice is fine


def _error_of(call):
    try:
        call()
    except Exception as exc:
        return exc
    return None


def test_the_callers_threads_can_run_the_loop_themselves(tiny_llama_service):
    """``background=False`` (the CLI, scripts, the benchmark): no scheduler thread; whoever
    waits for a token runs a round of the same loop for everyone. Same tokens, also with
    several callers at once, and an early close still keeps the conversation's keys."""
    source = tiny_llama_service.backend.engine
    prompts = [prompt(tiny_llama_service, text) for text in ("one", "two words", "three")]
    expected = [list(source.generate_token_ids(ids, GREEDY)) for ids in prompts]
    engine = BatchingEngine(
        source.model, source.eos_token_ids, prefix_cache=PrefixCache(2**24), background=False
    )
    assert engine._thread is None
    assert [list(engine.generate_token_ids(ids, GREEDY)) for ids in prompts] == expected
    results: dict[int, list[int]] = {}
    threads = [
        threading.Thread(
            target=lambda i=i: results.update(
                {i: list(engine.generate_token_ids(prompts[i], GREEDY))}
            )
        )
        for i in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [results[i] for i in range(3)] == expected
    reply = engine.generate_token_ids(prompts[0] + expected[0], GREEDY)
    next(reply)
    reply.close()  # frees the row at once: nobody else runs the loop
    assert engine.prefix_cache.hits >= 1
    engine.close()
    with pytest.raises(EngineClosedError):
        next(engine.generate_token_ids(prompts[0], GREEDY))


def test_the_kv_budget_holds_requests_back_until_rows_end_and_changes_no_reply(
    tiny_llama_service,
):
    """KV_CACHE_MB: with room for two rows of these requests (grown to their longest reply),
    four arriving together run two at a time, in order; each reply is the one it gets alone,
    and the budget is free again at the end."""
    service = tiny_llama_service
    prompts = [prompt(service, text) for text in ("one", "two", "three", "four")]
    model = service.backend.engine.model
    longest = max(len(p) for p in prompts) + GREEDY.max_new_tokens
    budget = KVBudget(2 * longest * kv_bytes_per_token(model))
    other_engine = Owner()
    budget.hold(other_engine, 0)  # another engine holding nothing takes no room
    engine = BatchingEngine(model, service.backend.engine.eos_token_ids, kv_budget=budget)
    rows_seen: list[int] = []
    step = engine._step

    def counting_step(batch):
        rows_seen.append(len(batch.requests))
        return step(batch)

    engine._step = counting_step
    alone = [list(service.backend.engine.generate_token_ids(p, GREEDY)) for p in prompts]
    together = arrive_together(engine, prompts, GREEDY)
    assert together == alone
    assert max(rows_seen) == 2 and engine.stats.prefill_passes >= 2
    wait_until(lambda: budget.used() == 0)
    # Another engine holding the whole budget: one request still runs (never a deadlock).
    budget.hold(other_engine, budget.limit_bytes)
    assert list(engine.generate_token_ids(prompts[0], GREEDY)) == alone[0]
    engine.close()


class Owner:
    """Stands for an engine (the budget keeps weak references to its holders)."""


def test_kv_budget_bookkeeping():
    budget, first, second = KVBudget(100), Owner(), Owner()
    assert budget.fits(first, 100) and not budget.fits(first, 101)
    budget.hold(first, 60)
    assert budget.fits(first, 100)  # its own amount is replaced, not added
    assert budget.fits(second, 40) and not budget.fits(second, 41)
    budget.hold(first, 0)
    assert budget.used() == 0 and budget.fits(second, 100)


def test_a_burst_of_prompts_is_prefilled_within_max_prefill_tokens(tiny_llama_service):
    service = tiny_llama_service
    texts = ["hi", "a much longer question about the weather today", "and a third one"]
    prompts = [prompt(service, text) for text in texts]
    alone = [list(service.backend.engine.generate_token_ids(p, GREEDY)) for p in prompts]
    longest = max(len(p) for p in prompts)
    engine = BatchingEngine(
        service.backend.engine.model,
        service.backend.engine.eos_token_ids,
        max_prefill_tokens=2 * longest,  # two of these prompts per pass, padded to the longest
    )
    assert arrive_together(engine, prompts, GREEDY) == alone
    assert (engine.stats.prefill_passes, engine.stats.rows_prefilled) == (2, 3)
    engine.close()


def test_a_request_given_up_while_it_waits_for_room_is_dropped_at_once(tiny_llama_service):
    """A client that leaves while its request waits for KV room frees it at the next step,
    not once a long reply beside it has ended."""
    model = tiny_llama_service.backend.engine.model
    budget, other = KVBudget(10_000), Owner()
    budget.hold(other, 10_000)  # another engine holds everything: only one row at a time
    engine = BatchingEngine(model, frozenset(), kv_budget=budget)  # no EOS: runs to the end
    running = engine.generate([1, 2, 3, 4], GREEDY.updated(max_new_tokens=600))
    next(running)
    waiting = engine.generate([5, 6, 7], GREEDY.updated(max_new_tokens=5))
    wait_until(lambda: len(engine._deferred) == 1)
    started = time.monotonic()
    waiting.close()
    assert time.monotonic() - started < 5 and not engine._deferred
    assert running._request.generated < 600  # the long reply was still running
    running.close()
    engine.close()


def long_prompt(service, words: int) -> list[int]:
    return prompt(service, " ".join(f"word{i}" for i in range(words)))


def test_a_long_prompt_is_prefilled_a_chunk_between_steps_and_changes_no_reply(
    tiny_llama_service,
):
    """PREFILL_CHUNK_TOKENS: a long prompt arriving while another reply decodes goes through
    the model a chunk per round, a decoding step of the running reply between two chunks;
    both replies are the ones they get alone."""
    service = tiny_llama_service
    model = service.backend.engine.model
    running_prompt, long = prompt(service, "hello"), long_prompt(service, 30)
    chunk = 8
    params = [GREEDY.updated(max_new_tokens=150), GREEDY.updated(max_new_tokens=30)]
    alone_engine = BatchingEngine(model, frozenset())
    alone = [
        list(alone_engine.generate_token_ids(p, each))
        for p, each in zip((running_prompt, long), params, strict=True)
    ]
    alone_engine.close()
    engine = BatchingEngine(model, frozenset(), prefill_chunk_tokens=chunk)
    events: list[str] = []
    step, prefill_chunk = engine._step, engine._prefill_chunk

    def logged_step(batch):
        events.append(f"step{len(batch.requests)}")
        return step(batch)

    def logged_chunk(request):
        more = prefill_chunk(request)
        events.append("chunk" if more else "last")
        return more

    engine._step, engine._prefill_chunk = logged_step, logged_chunk
    running = engine.generate_token_ids(running_prompt, params[0])
    first = [next(running)]  # the batch is decoding
    newcomer = engine.generate_token_ids(long, params[1])
    assert list(newcomer) == alone[1]
    assert first + list(running) == alone[0]
    chunks = (len(long) - 1) // chunk  # while more than one chunk is left
    assert engine.stats.prefill_chunks == chunks
    chunked = [e for e in events if e in ("chunk", "last")]
    assert chunked == ["chunk"] * chunks + ["last"]
    # Between two chunks (and after the last), the running reply took a step alone.
    between = events[events.index("chunk") : events.index("last")]
    assert between == ["chunk", "step1"] * chunks
    engine.close()


def test_chunked_prefill_starts_after_a_cached_prefix_and_skips_lone_prompts(tiny_llama_service):
    service = tiny_llama_service
    model = service.backend.engine.model
    long = long_prompt(service, 30)
    params = GREEDY.updated(max_new_tokens=40)
    plain = BatchingEngine(model, frozenset())
    expected = list(plain.generate_token_ids(long + [5, 6, 7], params))
    plain.close()
    cache = PrefixCache(2**30)
    engine = BatchingEngine(model, frozenset(), prefix_cache=cache, prefill_chunk_tokens=8)
    list(engine.generate_token_ids(long, params.updated(max_new_tokens=1)))  # alone: one pass
    assert engine.stats.prefill_chunks == 0
    running = engine.generate_token_ids(prompt(service, "hello"), params)
    next(running)
    # The same long prompt and 3 tokens more: everything but those comes from the cache.
    assert list(engine.generate_token_ids(long + [5, 6, 7], params)) == expected
    assert engine.stats.prefill_chunks == 0 and cache.tokens_reused >= len(long)
    running.close()
    engine.close()


def test_a_request_given_up_during_chunked_prefill_is_dropped_and_frees_its_room(
    tiny_llama_service,
):
    model = tiny_llama_service.backend.engine.model
    budget = KVBudget(2**30)
    engine = BatchingEngine(model, frozenset(), kv_budget=budget, prefill_chunk_tokens=4)
    running = engine.generate([1, 2, 3, 4], GREEDY.updated(max_new_tokens=2000))
    next(running)
    newcomer = engine.generate(list(range(5, 400)), GREEDY)
    wait_until(lambda: engine.stats.prefill_chunks >= 2)
    newcomer.close()
    assert engine._prefilling is None and engine.stats.prefill_chunks < 99
    running_bytes = engine._kv_bytes([running._request])
    wait_until(lambda: budget.used() == running_bytes)
    running.close()
    engine.close()

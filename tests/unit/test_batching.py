"""The batching engine's failure handling: nobody waits forever, one bad row fails alone."""

import threading

import pytest

import src.chat.batching as batching
from src.chat.batching import BatchingEngine, supports_batching
from src.chat.prompts import encode_conversation
from src.params import GenerationParams
from tests.batching_helpers import alone_and_together, arrive_together

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

GREEDY = GenerationParams(do_sample=False, repetition_penalty=1.0, max_new_tokens=20)


@pytest.fixture()
def engine(tiny_llama_service):
    return BatchingEngine(tiny_llama_service.engine.model, tiny_llama_service.tokenizer)


def prompt(service, text):
    return encode_conversation(
        service.tokenizer, service.prompt_format, None, [{"role": "user", "content": text}]
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
    original = batching.choose_next_token

    def poisoned(logits, previous, params, generator):
        if params.seed == 13 and len(previous) > 40:
            raise RuntimeError("invalid probabilities (simulated)")
        return original(logits, previous, params, generator)

    healthy_prompt = prompt(tiny_llama_service, "healthy")
    expected = list(tiny_llama_service.engine.generate_token_ids(healthy_prompt, GREEDY))
    monkeypatch.setattr(batching, "choose_next_token", poisoned)
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


def test_sliding_window_models_are_not_batched():
    from transformers import LlamaConfig, MistralConfig

    class Model:
        def __init__(self, config):
            self.config = config

    assert supports_batching(Model(LlamaConfig()))
    assert not supports_batching(Model(MistralConfig(sliding_window=4096)))


@pytest.mark.parametrize("service_fixture", ["tiny_llama_service", "tiny_gpt2_service"])
def test_requests_arriving_together_share_one_prefill_and_decode_as_alone(service_fixture, request):
    """Left-padded joint prefill: rotary (Llama) and learned (GPT-2) positions both count
    from each row's first real token, so every reply is the one it gets alone."""
    service = request.getfixturevalue(service_fixture)
    texts = ["hi", "a much longer question about the weather today", "and a third one"]
    prompts = [prompt(service, text) for text in texts]
    alone, together, engine = alone_and_together(service, prompts, GREEDY)
    assert together == alone
    assert (engine.prefill_passes, engine.rows_prefilled) == (1, 3)


def test_a_prompt_that_fails_in_a_joint_prefill_fails_alone(tiny_gpt2_service):
    service = tiny_gpt2_service  # learned positions: at most 128
    engine = BatchingEngine(service.engine.model, service.tokenizer)
    good = prompt(service, "hello there")
    too_long = prompt(service, "word " * 200)
    results = arrive_together(engine, [good, too_long, good], GREEDY)
    expected = list(service.engine.generate_token_ids(good, GREEDY))
    assert results[0] == results[2] == expected
    assert isinstance(results[1], Exception)

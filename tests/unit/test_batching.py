"""The batching engine's failure handling: nobody waits forever, one bad row fails alone."""

import threading

import pytest

import src.chat.batching as batching
from src.chat.batching import BatchingEngine, supports_batching
from src.chat.params import GenerationParams
from src.chat.prompts import encode_conversation

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
                GREEDY.updated(seed=13, max_new_tokens=60),
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

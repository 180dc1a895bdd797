"""Prefix caching: a prompt that starts like an earlier sequence reuses its keys and values,
and the replies are exactly those computed from scratch, one request at a time and batched,
on all three model kinds (transformers' Llama and GPT-2, our Transformer)."""

import pytest
import torch

from src.chat.prompts import encode_conversation
from src.engine.batching import BatchingEngine
from src.engine.prefix_cache import MIN_REUSED_TOKENS, PrefixCache
from src.models.transformer import Transformer
from src.params import GenerationParams
from tests.batching_helpers import arrive_together

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

GREEDY = GenerationParams(do_sample=False, repetition_penalty=1.0, max_new_tokens=12)
BUDGET = 64 * 2**20


def layers_for(ids: list[int], layers: int = 2) -> list:
    """Fake keys/values whose numbers encode the token ids (to check what is handed out)."""
    tensor = torch.tensor(ids, dtype=torch.float32).view(1, 1, -1, 1)
    return [(tensor.clone(), -tensor.clone()) for _ in range(layers)]


def test_the_longest_common_prefix_is_found_and_handed_out_sliced():
    cache = PrefixCache(BUDGET)
    first, second = list(range(20)), list(range(10)) + [99] * 10
    cache.store(torch.tensor(first), layers_for(first))
    cache.store(torch.tensor(second), layers_for(second))
    reused, layers = cache.longest_prefix(list(range(15)) + [7, 7])
    assert reused == 15
    assert layers[1][0].flatten().tolist() == list(range(15))
    assert layers[1][1].flatten().tolist() == [-float(i) for i in range(15)]
    # At most all but the last token: the model must still read one to give the logits.
    assert cache.longest_prefix(first)[0] == len(first) - 1
    assert (cache.lookups, cache.hits, cache.tokens_reused) == (2, 2, 15 + 19)


def test_short_matches_and_short_sequences_are_not_worth_keeping():
    cache = PrefixCache(BUDGET)
    cache.store(torch.arange(MIN_REUSED_TOKENS - 1), layers_for(list(range(MIN_REUSED_TOKENS - 1))))
    assert len(cache) == 0
    cache.store(torch.arange(30), layers_for(list(range(30))))
    assert cache.longest_prefix(list(range(MIN_REUSED_TOKENS - 1)) + [500, 501]) == (0, [])
    assert cache.longest_prefix([500] * 40) == (0, [])


def test_a_longer_sequence_replaces_its_prefixes_and_the_budget_evicts_least_recently_used():
    ids = list(range(100))
    one_entry = sum(k.nbytes + v.nbytes for k, v in layers_for(ids))
    cache = PrefixCache(budget_bytes=2 * one_entry)
    cache.store(torch.tensor(ids[:50]), layers_for(ids[:50]))
    cache.store(torch.tensor(ids), layers_for(ids))  # the turn after: covers the first
    assert len(cache) == 1
    other = [200 + i for i in range(100)]
    cache.store(torch.tensor(other), layers_for(other))
    cache.longest_prefix(ids + [1])  # ids is now the most recently used
    third = [400 + i for i in range(100)]
    cache.store(torch.tensor(third), layers_for(third))
    assert cache.nbytes <= cache.budget_bytes
    assert cache.longest_prefix(other + [1])[0] == 0  # evicted
    assert cache.longest_prefix(ids + [1])[0] == 100
    # An entry larger than the whole budget is not kept at all.
    PrefixCache(budget_bytes=10).store(torch.tensor(ids), layers_for(ids))


def test_engines_sharing_the_cache_share_its_budget_but_never_each_others_entries(
    tiny_llama_path,
):
    """The base model's engine and an adapter's compute other keys for the same tokens."""
    ids = list(range(100))
    one_entry = sum(k.nbytes + v.nbytes for k, v in layers_for(ids))
    cache = PrefixCache(budget_bytes=2 * one_entry)
    base, adapter = object(), object()
    cache.store(torch.tensor(ids), layers_for(ids), owner=base)
    assert cache.longest_prefix(ids + [1], owner=adapter) == (0, [])
    cache.store(torch.tensor(ids[:50]), layers_for(ids[:50]), owner=adapter)  # not merged
    assert cache.longest_prefix(ids + [1], owner=adapter)[0] == 50
    assert len(cache) == 2 and cache.longest_prefix(ids + [1], owner=base)[0] == 100
    other = [200 + i for i in range(100)]
    cache.store(torch.tensor(other), layers_for(other), owner=adapter)  # one budget for all
    assert cache.nbytes <= cache.budget_bytes and len(cache) == 2
    cache.forget(adapter)
    assert len(cache) == 1 and cache.longest_prefix(ids + [1], owner=base)[0] == 100
    # An engine that closes takes its entries with it.
    from src.models.transformer import Transformer

    cache = PrefixCache(BUDGET)
    cache.store(torch.tensor(ids), layers_for(ids), owner=base)
    model = Transformer.from_folder(tiny_llama_path)
    engine = BatchingEngine(model, frozenset({2}), prefix_cache=cache, background=False)
    prompt = list(range(5, 30))
    list(engine.generate_token_ids(prompt, GREEDY))
    assert len(cache) == 2
    engine.close()
    assert len(cache) == 1


def conversation_prompts(service) -> tuple[list[int], list[int]]:
    """A first turn, and the second turn of the same conversation (which starts with it)."""
    first = [{"role": "user", "content": "Tell me about the weather in spring."}]
    encode = lambda messages: encode_conversation(  # noqa: E731
        service.backend.tokenizer, service.backend.prompt_format, "Be brief.", messages
    )
    second = first + [
        {"role": "assistant", "content": "It is mild."},
        {"role": "user", "content": "And in autumn?"},
    ]
    return encode(first), encode(second)


def models(service):
    """The service's transformers model and our Transformer built from its weights."""
    return {
        "hf": service.backend.engine.model,
        "scratch": Transformer.from_hf(service.backend.engine.model),
    }


@pytest.mark.parametrize("service_fixture", ["tiny_llama_service", "tiny_gpt2_service"])
@pytest.mark.parametrize("kind", ["hf", "scratch"])
def test_one_request_at_a_time_reuses_the_previous_turn_with_identical_replies(
    service_fixture, kind, request
):
    service = request.getfixturevalue(service_fixture)
    model = models(service)[kind]
    first, second = conversation_prompts(service)
    plain = BatchingEngine(model, service.backend.engine.eos_token_ids)
    cached = BatchingEngine(
        model, service.backend.engine.eos_token_ids, prefix_cache=PrefixCache(BUDGET)
    )
    assert list(cached.generate_token_ids(first, GREEDY)) == list(
        plain.generate_token_ids(first, GREEDY)
    )
    reply = cached.generate_token_ids(second, GREEDY)
    expected = list(plain.generate_token_ids(second, GREEDY))
    assert [next(reply) for _ in range(3)] == expected[:3]
    reply.close()  # a stop sequence or a cancelled stream: what was read is still kept
    assert cached.prefix_cache.tokens_reused >= len(first) - 1
    again = list(cached.generate_token_ids(second, GREEDY))
    assert again == expected
    # The cancelled reply kept its whole prompt: all of it but the last token is reused.
    assert cached.prefix_cache.tokens_reused >= (len(first) - 1) + (len(second) - 1)


@pytest.mark.parametrize("service_fixture", ["tiny_llama_service", "tiny_gpt2_service"])
@pytest.mark.parametrize("kind", ["hf", "scratch"])
def test_batched_prefill_mixes_cached_and_uncached_rows_with_identical_replies(
    service_fixture, kind, request
):
    """Rows with a long cached prefix, a short one and none share one prefill pass: their
    caches are padded in the middle, and positions still count real tokens only."""
    service = request.getfixturevalue(service_fixture)
    model = models(service)[kind]
    first, second = conversation_prompts(service)
    unrelated = encode_conversation(
        service.backend.tokenizer,
        service.backend.prompt_format,
        None,
        [{"role": "user", "content": "Hi!"}],
    )
    # The last row reuses all of `first` but one token: its cache has padding between its
    # cached part and its one new token. It also decodes longest, so it ends up alone in the
    # batch with that gap still in its cache (which only the mask can hide).
    params = [GREEDY, GREEDY, GREEDY.updated(max_new_tokens=3 * GREEDY.max_new_tokens)]
    prompts = [second, unrelated, first]
    plain = BatchingEngine(model, service.backend.engine.eos_token_ids)
    expected = [list(plain.generate_token_ids(p, q)) for p, q in zip(prompts, params, strict=True)]

    engine = BatchingEngine(
        model, service.backend.engine.eos_token_ids, prefix_cache=PrefixCache(BUDGET)
    )
    assert list(engine.generate_token_ids(first, GREEDY)) == expected[2][: len(expected[0])]
    results = arrive_together(engine, prompts, params)
    assert results == expected
    assert engine.stats.prefill_passes == 2
    assert engine.prefix_cache.hits == 2  # second and first again; "Hi!" shares too little


def test_a_forward_pass_that_fails_halfway_leaves_nothing_in_the_cache(tiny_llama_service):
    """The first layer has already appended its keys when the second fails: such a cache is
    inconsistent, so it must not be kept (the error itself reaches the caller)."""
    service = tiny_llama_service
    model = service.backend.engine.model
    first, second = conversation_prompts(service)
    engine = BatchingEngine(
        model, service.backend.engine.eos_token_ids, prefix_cache=PrefixCache(BUDGET)
    )
    list(engine.generate_token_ids(first, GREEDY))
    assert len(engine.prefix_cache) == 1
    layer = model.model.layers[1]
    calls = {"n": 0}
    original = layer.forward

    def fails_on_the_third_call(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return original(*args, **kwargs)

    layer.forward = fails_on_the_third_call
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            list(engine.generate_token_ids(second, GREEDY))
    finally:
        del layer.forward
    assert len(engine.prefix_cache) == 1  # only the first turn's entry
    plain = BatchingEngine(model, service.backend.engine.eos_token_ids)
    expected = list(plain.generate_token_ids(second, GREEDY))
    assert list(engine.generate_token_ids(second, GREEDY)) == expected

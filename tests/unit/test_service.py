"""ChatService and the generation loop on tiny random-weight models with real tokenizers."""

import gc
import threading

import pytest
import torch

from src.chat.prompts import encode_conversation
from src.errors import (
    ContextOverflowError,
    EngineClosedError,
    InvalidRequestError,
    ServerShuttingDownError,
)
from src.models.loader import load_from_folder
from src.models.model_info import context_window, kv_bytes_per_token
from src.params import GenerationParams
from tests.conftest import GREEDY, make_service

pytestmark = [pytest.mark.unit, pytest.mark.timeout(180)]

SERVICES = ["tiny_gpt2_service", "tiny_llama_service"]


@pytest.fixture(params=SERVICES)
def service(request):
    return request.getfixturevalue(request.param)


def hf_greedy(service, prompt_ids, max_new_tokens, repetition_penalty=1.0):
    model = service.backend.engine.model
    output = model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        repetition_penalty=repetition_penalty,
        eos_token_id=list(service.backend.engine.eos_token_ids),
        pad_token_id=service.backend.tokenizer.eos_token_id,
    )
    return output[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_tokens_equal_transformers_generate(service, penalty):
    conversation = service.new_conversation()
    params = GREEDY.updated(max_new_tokens=24, repetition_penalty=penalty)
    stream = service.start_reply(conversation, "Tell me about the sea.", params)
    ours = list(service.backend.engine.generate_token_ids(stream.prompt.input_ids, params))
    assert ours == hf_greedy(service, stream.prompt.input_ids, 24, penalty)


def test_streamed_deltas_add_up_to_the_reply_and_usage_is_counted(service):
    conversation = service.new_conversation()
    stream = service.start_reply(conversation, "Hello!", GREEDY.updated(max_new_tokens=12))
    deltas = list(stream)
    result = stream.result
    assert "".join(deltas) == result.text
    assert result.completion_tokens <= 12
    assert result.finish_reason in ("stop", "length")
    assert result.prompt_tokens == len(stream.prompt.input_ids)
    assert conversation.messages[-1] == {"role": "assistant", "content": result.text}


def test_max_new_tokens_gives_finish_reason_length(tiny_gpt2_service):
    service = tiny_gpt2_service
    params = GREEDY.updated(max_new_tokens=5)
    prompt_ids = service.start_reply(service.new_conversation(), "Hi", params).prompt.input_ids
    expected = hf_greedy(service, prompt_ids, 5)
    assert service.backend.tokenizer.eos_token_id not in expected  # random weights: no EOS
    result = service.reply(service.new_conversation(), "Hi", params)
    assert result.finish_reason == "length" and result.completion_tokens == 5


def test_a_stop_sequence_ends_the_reply_and_is_not_shown(service):
    full = service.reply(service.new_conversation(), "Go on", GREEDY.updated(max_new_tokens=20))
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = service.reply(
        service.new_conversation(), "Go on", GREEDY.updated(max_new_tokens=20, stop=[stop])
    )
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"


def test_two_turns_the_second_prompt_holds_the_first(service):
    conversation = service.new_conversation()
    first = service.reply(conversation, "My name is Ada.")
    stream = service.start_reply(conversation, "What is my name?")
    expected = encode_conversation(
        service.backend.tokenizer,
        service.backend.prompt_format,
        conversation.system_prompt,
        [
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": "What is my name?"},
        ],
    )
    assert stream.prompt.input_ids == expected


def test_greedy_replies_are_cached_and_sampled_ones_are_not(service):
    first = service.reply(service.new_conversation(), "Hi")
    second = service.reply(service.new_conversation(), "Hi")
    assert not first.cached and second.cached and second.text == first.text
    sampled = GenerationParams(max_new_tokens=8, seed=1)
    service.reply(service.new_conversation(), "Hi", sampled)
    assert not service.reply(service.new_conversation(), "Hi", sampled).cached


def test_sampling_with_a_seed_is_reproducible(service):
    params = GenerationParams(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    texts = {service.reply(service.new_conversation(), "Hi", params).text for _ in range(2)}
    other = service.reply(service.new_conversation(), "Hi", params.updated(seed=8)).text
    assert len(texts) == 1 and other not in texts


def test_cancel_stops_after_the_current_token_and_keeps_the_partial_reply(service):
    conversation = service.new_conversation()
    params = GREEDY.updated(max_new_tokens=50)
    stream = service.start_reply(conversation, "Count", params)
    received = []
    for delta in stream:
        received.append(delta)
        stream.cancel()
    assert stream.result.finish_reason == "cancelled"
    assert stream.result.completion_tokens < 50
    assert conversation.messages[-1]["content"] == "".join(received)


def test_cancel_from_another_thread(service):
    stream = service.start_reply(
        service.new_conversation(), "Count", GREEDY.updated(max_new_tokens=100)
    )
    for _ in stream:
        canceller = threading.Thread(target=stream.cancel)
        canceller.start()
        canceller.join()  # the cancel lands while the stream is mid-reply
    assert stream.result.finish_reason == "cancelled"
    assert stream.result.completion_tokens < 100


def test_an_abandoned_stream_changes_nothing(service):
    conversation = service.new_conversation()
    service.reply(conversation, "First")
    before = [dict(m) for m in conversation.messages]
    iterator = iter(service.start_reply(conversation, "Second", GREEDY.updated(max_new_tokens=30)))
    next(iterator)
    iterator.close()  # e.g. a web client that went away
    assert conversation.messages == before


def test_empty_message_is_rejected(service):
    for message in ("", "   \n"):
        with pytest.raises(InvalidRequestError, match="message: must not be empty"):
            service.start_reply(service.new_conversation(), message)


def test_max_new_tokens_that_fills_the_window_is_rejected(tiny_gpt2_path):
    service = make_service(tiny_gpt2_path, context_window=64)
    with pytest.raises(InvalidRequestError, match=r"max_new_tokens=64 leaves no room.*64-token"):
        service.start_reply(service.new_conversation(), "Hi", GREEDY.updated(max_new_tokens=64))


def test_the_context_window_is_the_model_limit_bounded_by_memory_but_at_least_4096(
    tiny_gpt2_path,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16384,
    )
    model = LlamaForCausalLM(config)
    per_token = kv_bytes_per_token(model)
    assert per_token == 2 * 2 * 2 * 8 * 4  # keys and values, 2 layers, 2 heads of 8, fp32
    assert context_window(model, rows=16, memory_bytes=2**40) == 16384  # the model's limit
    # 16 rows of 6,000 tokens fill exactly a quarter of this much memory:
    assert context_window(model, rows=16, memory_bytes=4 * 16 * 6000 * per_token) == 6000
    assert context_window(model, rows=16, memory_bytes=4 * 16 * 100 * per_token) == 4096
    gpt2, _ = load_from_folder(tiny_gpt2_path)
    assert context_window(gpt2, rows=16, memory_bytes=0) == 128  # its own limit is lower


def test_the_bundled_model_keeps_its_whole_8k_window_by_default(bundled_service):
    """The brief's MAX_LENGTH=512 once capped the window: three exchanges and the chat forgot
    its beginning. The window is now the model's own 8,192 positions (at least 4,096 on a
    machine with little memory)."""
    backend = bundled_service.backend
    model = backend.engine.model
    assert backend.context_window == context_window(model, rows=backend.engine.max_batch_size)
    assert 4096 <= backend.context_window <= 8192
    assert backend.kv_cache_bytes == 8192 * kv_bytes_per_token(backend.engine.model)
    conversation = bundled_service.new_conversation()
    for number in range(12):
        conversation.add_exchange(f"Tell me about topic {number}. " * 20, "Sure. " * 60)
    stream = bundled_service.start_reply(conversation, "And the first topic?")
    stream.abandon()
    assert stream.prompt.dropped_messages == 0
    assert len(stream.prompt.input_ids) > 2048


def test_old_turns_are_dropped_and_reported_when_the_window_is_full(tiny_gpt2_path):
    service = make_service(tiny_gpt2_path, context_window=60, default_params=GREEDY)
    conversation = service.new_conversation()
    for number in range(4):
        conversation.add_exchange(f"question number {number} " * 3, f"answer {number} " * 3)
    result = service.reply(conversation, "last one", GREEDY.updated(max_new_tokens=8))
    assert result.dropped_messages >= 2 and result.dropped_messages % 2 == 0
    assert result.prompt_tokens <= 60 - 8
    assert len(conversation.messages) == 10  # dropping is for the prompt only: history stays


def test_a_message_too_long_for_the_window_is_a_clear_error(tiny_gpt2_path):
    service = make_service(tiny_gpt2_path, context_window=64, default_params=GREEDY)
    conversation = service.new_conversation()
    with pytest.raises(ContextOverflowError, match="Shorten the message"):
        service.start_reply(conversation, "word " * 200)
    assert conversation.messages == []


def test_system_prompt_is_used_with_a_chat_template(tiny_llama_service):
    conversation = tiny_llama_service.new_conversation("You are a pirate.")
    stream = tiny_llama_service.start_reply(conversation, "Hi")
    assert "You are a pirate." in tiny_llama_service.backend.tokenizer.decode(
        stream.prompt.input_ids
    )
    assert tiny_llama_service.supports_system_prompt


# ---- shutdown ------------------------------------------------------------------------------


def test_an_interrupted_reply_is_not_saved_and_says_the_server_is_shutting_down(
    tiny_llama_service,
):
    conversation = tiny_llama_service.new_conversation()
    stream = tiny_llama_service.start_reply(conversation, "Hi", GREEDY.updated(max_new_tokens=60))
    deltas = iter(stream)
    next(deltas)
    assert tiny_llama_service.interrupt_all() == 1
    with pytest.raises(ServerShuttingDownError, match="not saved"):
        list(deltas)
    assert conversation.messages == [] and stream.result is None


def test_replies_that_start_after_the_shutdown_began_are_interrupted_too(tiny_gpt2_path):
    """A request already past the server's door when the grace period ended must not run to
    its end (the process would wait for it)."""
    service = make_service(tiny_gpt2_path, default_params=GREEDY.updated(max_new_tokens=60))
    service.interrupt_all()
    conversation = service.new_conversation()
    stream = service.start_reply(conversation, "Hi")
    with pytest.raises(ServerShuttingDownError):
        stream.complete()
    assert conversation.messages == []


def test_a_reply_that_completed_on_its_own_is_saved_even_if_interrupted(tiny_gpt2_path):
    service = make_service(tiny_gpt2_path, default_params=GREEDY)
    expected = service.reply(service.new_conversation(), "Hi").text  # now in the cache
    conversation = service.new_conversation()
    stream = service.start_reply(conversation, "Hi")
    stream.interrupt()  # too late: the (cached) reply is complete
    assert stream.complete().text == expected
    assert conversation.messages[-1] == {"role": "assistant", "content": expected}


def test_closing_the_service_stops_its_engine(tiny_gpt2_path):
    service = make_service(tiny_gpt2_path, default_params=GREEDY)
    engine = service.backend.engine
    service.close()
    assert not engine._thread.is_alive()
    with pytest.raises(EngineClosedError):
        service.reply(service.new_conversation(), "Hi")


def test_a_reply_counts_as_running_from_its_start_until_it_ends_or_is_dropped(
    tiny_llama_service,
):
    """What keeps an adapter's service from being closed under a queued reply, and what a
    reply whose client left before it was read gives back at once."""
    service = tiny_llama_service
    params = GREEDY.updated(max_new_tokens=5)
    started = service.start_reply(service.new_conversation(), "hi", params)
    assert service.running_replies() == 1  # queued, not yet read
    started.complete()
    assert service.running_replies() == 0
    never_read = service.start_reply(service.new_conversation(), "hi", params)
    never_read.abandon()  # returns at once: nothing waits for the engine
    assert service.running_replies() == 0
    dropped = service.start_reply(service.new_conversation(), "hello", params)
    del dropped
    gc.collect()
    assert service.running_replies() == 0

import pytest
from transformers import AutoTokenizer

from src.chat.prompts import (
    PromptFormat,
    build_prompt,
    detect_prompt_format,
    encode_conversation,
)
from src.errors import ContextOverflowError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(180)]

HISTORY = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke"},
    {"role": "assistant", "content": "Why did the chicken cross the road?"},
    {"role": "user", "content": "Why?"},
]


@pytest.fixture()
def gpt2(gpt2_tokenizer_path):
    return AutoTokenizer.from_pretrained(gpt2_tokenizer_path)


@pytest.fixture()
def smollm(bundled_model_path):
    return AutoTokenizer.from_pretrained(bundled_model_path)


def test_format_is_chosen_from_the_tokenizer_not_the_name(gpt2, smollm):
    assert detect_prompt_format(gpt2) is PromptFormat.EOS_JOINED
    assert detect_prompt_format(smollm) is PromptFormat.CHAT_TEMPLATE
    gpt2.chat_template = smollm.chat_template  # a GPT-2 with a template uses the template
    assert detect_prompt_format(gpt2) is PromptFormat.CHAT_TEMPLATE


def test_dialogpt_format_joins_turns_with_eos(gpt2):
    ids = encode_conversation(gpt2, PromptFormat.EOS_JOINED, "ignored", HISTORY[:3])
    eos = gpt2.eos_token_id
    expected = (
        gpt2.encode("Hi there")
        + [eos]
        + gpt2.encode("Hello! How can I help?")
        + [eos]
        + gpt2.encode("Tell me a joke")
        + [eos]
    )
    assert ids == expected


def test_chat_template_includes_system_prompt_all_turns_and_generation_prompt(smollm):
    ids = encode_conversation(smollm, PromptFormat.CHAT_TEMPLATE, "Be brief.", HISTORY)
    text = smollm.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    for message in HISTORY:
        assert f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("fixture", ["gpt2", "smollm"])
def test_oldest_turns_are_dropped_first_in_pairs_and_reported(request, fixture):
    tokenizer = request.getfixturevalue(fixture)
    prompt_format = detect_prompt_format(tokenizer)
    full = encode_conversation(tokenizer, prompt_format, "Be brief.", HISTORY)
    without_first_pair = encode_conversation(tokenizer, prompt_format, "Be brief.", HISTORY[2:])
    build = build_prompt(tokenizer, prompt_format, "Be brief.", HISTORY, len(full) - 1)
    assert build.dropped_messages == 2
    assert build.input_ids == without_first_pair
    if prompt_format is PromptFormat.CHAT_TEMPLATE:
        assert "Be brief." in tokenizer.decode(build.input_ids)  # the system prompt stays


def test_everything_fits_nothing_dropped(smollm):
    build = build_prompt(smollm, PromptFormat.CHAT_TEMPLATE, None, HISTORY, 10_000)
    assert build.dropped_messages == 0


def test_a_message_that_cannot_fit_raises_a_clear_error(smollm):
    with pytest.raises(
        ContextOverflowError, match=r"message: needs \d+ prompt tokens, but only 5 fit"
    ):
        build_prompt(smollm, PromptFormat.CHAT_TEMPLATE, None, HISTORY, 5)

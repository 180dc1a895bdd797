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


# ---- roles, tools and tool results (OpenAI's message shapes) ------------------------------------

CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def render(tokenizer, messages, system=None, tools=()):
    ids = encode_conversation(tokenizer, PromptFormat.CHAT_TEMPLATE, system, messages, tools=tools)
    return tokenizer.decode(ids)


def test_developer_is_system_and_consecutive_roles_pass_through(smollm):
    text = render(
        smollm,
        [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "one"},
            {"role": "user", "content": "two"},
        ],
    )
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert text.count("<|im_start|>user") == 2


def test_tool_calls_and_results_use_the_default_format_without_template_support(smollm):
    from src.chat.tools import Tool

    tool = Tool("get_weather", "Weather", {"type": "object", "properties": {"city": {}}})
    text = render(
        smollm,
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "id": "c2"}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
            {"role": "tool", "tool_call_id": "c2", "content": "Warm"},
        ],
        system="Be brief.",
        tools=(tool,),
    )
    assert text.count("<|im_start|>system") == 1 and '"name": "get_weather"' in text
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{call}\n{call}<|im_end|>" in text
    # consecutive results: one user turn, as Qwen2.5's template shows them
    results = "<tool_response>\nSunny\n</tool_response>\n<tool_response>\nWarm\n</tool_response>"
    assert f"<|im_start|>user\n{results}<|im_end|>" in text


def test_templates_that_refuse_consecutive_roles_get_them_merged(smollm):
    strict = AutoTokenizer.from_pretrained(smollm.name_or_path)
    strict.chat_template = (
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]"
        "['role'] %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
        "[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    )
    text = render(strict, [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}])
    assert text == "[user]one\n\ntwo"


def test_dropping_old_turns_keeps_a_user_message_first(smollm):
    messages = [
        {"role": "user", "content": "old " * 30},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "x " * 30},
        {"role": "user", "content": "new"},
    ]
    built = build_prompt(smollm, PromptFormat.CHAT_TEMPLATE, None, messages, 40)
    assert built.dropped_messages == 3


def test_training_labels_tool_calls_in_the_served_format(smollm):
    from src.chat.prompts import IGNORE_INDEX, encode_for_training
    from src.chat.tools import Tool

    tool = Tool("get_weather", "Weather", {"type": "object", "properties": {"city": {}}})
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    ids, labels = encode_for_training(
        smollm, PromptFormat.CHAT_TEMPLATE, None, messages, tools=(tool,)
    )
    served = encode_conversation(
        smollm,
        PromptFormat.CHAT_TEMPLATE,
        None,
        messages,
        add_generation_prompt=False,
        tools=(tool,),
    )
    assert ids == served  # the same tokens as at inference
    learned = smollm.decode([t for t in labels if t != IGNORE_INDEX])
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        in learned
    )
    assert "It is sunny." in learned and "Sunny" not in learned.replace("sunny", "")


def test_a_template_with_tool_support_presents_the_tools_itself(smollm):
    from src.chat.tools import Tool

    native = AutoTokenizer.from_pretrained(smollm.name_or_path)
    native.chat_template = (
        "{% if tools %}[tools:{% for t in tools %}{{ t.function.name }};{% endfor %}]{% endif %}"
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
        "{% for c in m.tool_calls or [] %}<call {{ c.function.name }} "
        "{{ c.function.arguments.city }}>{% endfor %}{% endfor %}"
    )
    tool = Tool("get_weather", "Weather", {"type": "object"})
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
    ]
    text = render(native, messages, tools=(tool,))
    # the template's own presentation: no default system prompt, arguments as an object
    assert (
        text == "[tools:get_weather;][user]Weather?[assistant]<call get_weather Paris>[tool]Sunny"
    )


def test_a_long_conversation_is_tokenized_about_once(smollm, monkeypatch):
    """Dropping turns costs no second tokenization of the text that stays, and a prompt that
    cannot fit is refused after tokenizing only its newest turn."""
    from src.chat import text_encoding

    encoded: list[tuple[str, bool]] = []
    original = text_encoding._encode_one

    def counting(tokenizer, rust, text, is_message):
        encoded.append((text, is_message))
        return original(tokenizer, rust, text, is_message)

    monkeypatch.setattr(text_encoding, "_encode_one", counting)
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 40}
        for i in range(99)
    ]
    built = build_prompt(smollm, PromptFormat.CHAT_TEMPLATE, None, messages, 2000)
    assert 0 < built.dropped_messages < 98 and len(built.input_ids) <= 2000
    texts = [text for text, is_message in encoded if is_message]
    assert len(texts) == len(set(texts)) <= len(messages)  # each message's text once at most
    encoded.clear()
    with pytest.raises(ContextOverflowError):
        build_prompt(smollm, PromptFormat.CHAT_TEMPLATE, None, messages, 50)
    assert [text for text, is_message in encoded if is_message] == [messages[-1]["content"]]

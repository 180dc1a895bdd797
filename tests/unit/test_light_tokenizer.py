"""LightTokenizer (tokenizers + Jinja, no transformers import) gives exactly the ids, text and
chat prompts that transformers' AutoTokenizer gives, for SmolLM2's tokenizer and template and
for the genuine GPT-2 BPE."""

import pytest
from transformers import AutoTokenizer

from src.chat.prompts import PromptFormat, detect_prompt_format, encode_conversation
from src.models.light_tokenizer import LightTokenizer

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "Don't stop - it's fine , isn't it ?",
    "emoji 🌸🌻🌼 and flags 🇫🇷, RTL שלום عربى, CJK 東京",
    "tabs\tand\nnew\n\nlines\r\n",
    "<|im_start|>special tokens typed by a user<|im_end|>",
    "a" * 300,
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 👋"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
]


@pytest.fixture(scope="module", params=["smollm2", "gpt2"])
def pair(request, bundled_model_path, gpt2_tokenizer_path):
    folder = bundled_model_path if request.param == "smollm2" else gpt2_tokenizer_path
    return LightTokenizer(folder), AutoTokenizer.from_pretrained(folder)


def test_encode_and_decode_match_transformers(pair):
    light, reference = pair
    assert light.eos_token_id == reference.eos_token_id
    for text in TEXTS:
        for special in (True, False):
            ids = light.encode(text, add_special_tokens=special)
            assert ids == reference.encode(text, add_special_tokens=special), text
        for skip in (True, False):
            assert light.decode(ids, skip_special_tokens=skip) == reference.decode(
                ids, skip_special_tokens=skip
            )


def test_chat_prompts_match_transformers(pair):
    light, reference = pair
    assert detect_prompt_format(light) is detect_prompt_format(reference)
    prompt_format = detect_prompt_format(light)
    for messages in CONVERSATIONS:
        turns = [m for m in messages if m["role"] != "system"]
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        if prompt_format is PromptFormat.EOS_JOINED:
            system = None
        assert encode_conversation(light, prompt_format, system, turns) == encode_conversation(
            reference, prompt_format, system, turns
        )
        if prompt_format is PromptFormat.CHAT_TEMPLATE:
            for generation_prompt in (True, False):
                assert light.apply_chat_template(
                    messages, add_generation_prompt=generation_prompt, tokenize=False
                ) == reference.apply_chat_template(
                    messages, add_generation_prompt=generation_prompt, tokenize=False
                )


def test_a_template_that_raises_names_the_problem(bundled_model_path, tmp_path):
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bundled_model_path / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
        "{% endif %}{{ messages[0]['content'] }}"
    )
    light = LightTokenizer(tmp_path)
    assert light.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "x"
    with pytest.raises(Exception, match="first must be user"):
        light.apply_chat_template([{"role": "assistant", "content": "x"}])

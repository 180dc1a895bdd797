"""Dataset formats, the errors for malformed records, and assistant-only labels."""

import json

import pytest
from transformers import AutoTokenizer

from src.chat.prompts import IGNORE_INDEX, PromptFormat, detect_prompt_format
from src.errors import DatasetError
from src.training.data import collate, load_examples, tokenize_examples

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

OPENAI = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
}
SHAREGPT = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
ALPACA = {"instruction": "Translate to French", "input": "cat", "output": "chat"}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_each_format_parses(tmp_path):
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", [OPENAI, SHAREGPT, ALPACA]))
    assert examples[0].system_prompt == "Be brief."
    assert examples[0].messages == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert examples[1].messages[1] == {"role": "assistant", "content": "4"}
    assert examples[2].messages[0]["content"] == "Translate to French\n\ncat"
    assert examples[2].messages[1]["content"] == "chat"
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps([OPENAI, ALPACA]))
    assert len(load_examples(str(as_json))) == 2


def test_bundled_datasets_load():
    chitchat = load_examples("chitchat")
    chatterbot = load_examples("chatterbot")
    # 3,150 of chitchat's 7,168 conversations have one speaker only: nothing to learn there.
    assert len(chitchat) == 4017 and len(chatterbot) > 500
    for example in chitchat[:50] + chatterbot[:50]:
        roles = [m["role"] for m in example.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", ":2: not valid JSON"),
        ("[1, 2]", ":2: a record must be a JSON object"),
        ('{"text": "hi"}', ":2: unknown format"),
        ('{"messages": []}', ":2: 'messages' must be a non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role: unknown role"),
        ('{"messages": [{"role": "user", "content": 5}]}', "messages[0].content: must be a string"),
        (
            '{"messages": [{"role": "assistant", "content": "x"}]}',
            "messages[0].role: expected 'user'",
        ),
        ('{"messages": [{"role": "user", "content": "x"}]}', "must end with an assistant reply"),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}]}',
            "messages[1]: a system message may only come first",
        ),
        (
            '{"conversations": [{"from": "bot", "value": "x"}]}',
            "conversations[0].from: unknown role",
        ),
        ('{"instruction": "x"}', ":2: 'output' must be a non-empty string"),
        ('{"instruction": "x", "output": "y", "input": 3}', "'input' must be a string"),
    ],
)
def test_malformed_records_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(OPENAI) + "\n" + line + "\n" + json.dumps(ALPACA) + "\n")
    with pytest.raises(DatasetError) as error:
        load_examples(str(path))
    assert str(path) in str(error.value) and message in str(error.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DatasetError, match="no such file .*chitchat, chatterbot"):
        load_examples(str(tmp_path / "nothing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="no records"):
        load_examples(str(tmp_path / "empty.jsonl"))


@pytest.fixture(params=["gpt2", "smollm2"])
def tokenizer(request, gpt2_tokenizer_path):
    if request.param == "gpt2":
        return AutoTokenizer.from_pretrained(gpt2_tokenizer_path)
    return AutoTokenizer.from_pretrained(request.getfixturevalue("bundled_model_path"))


def test_only_assistant_tokens_are_learned(tokenizer, tmp_path):
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", [SHAREGPT]))
    prompt_format = detect_prompt_format(tokenizer)
    data = tokenize_examples(examples, tokenizer, prompt_format, 512, 0.0, seed=0)
    example = data.train[0]
    learned = [t for t in example["labels"] if t != IGNORE_INDEX]
    expected = tokenizer.encode("4", add_special_tokens=False)
    if prompt_format is PromptFormat.CHAT_TEMPLATE:
        assert tokenizer.decode(learned) == "4<|im_end|>\n"
    else:  # DialoGPT: the reply and its EOS
        assert learned == expected + [tokenizer.eos_token_id]


def test_truncation_is_counted_and_empty_examples_dropped(tokenizer):
    examples = load_examples("chatterbot")[:40]
    prompt_format = detect_prompt_format(tokenizer)
    full = tokenize_examples(examples, tokenizer, prompt_format, 4096, 0.0, seed=0)
    longest = max(len(e["input_ids"]) for e in full.train)
    cut = tokenize_examples(examples, tokenizer, prompt_format, longest - 3, 0.0, seed=0)
    assert cut.truncated_examples >= 1 and cut.truncated_tokens >= 3
    assert all(len(e["input_ids"]) <= longest - 3 for e in cut.train)
    assert cut.stats["truncated_tokens"] == cut.truncated_tokens


def test_validation_split_and_collate(tokenizer):
    examples = load_examples("chatterbot")[:40]
    data = tokenize_examples(examples, tokenizer, detect_prompt_format(tokenizer), 256, 0.1, 0)
    assert len(data.validation) == 4 and len(data.train) + data.dropped_examples == 36
    batch = collate(data.train[:3], pad_id=0)
    lengths = [len(e["input_ids"]) for e in data.train[:3]]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_too_few_examples_for_a_validation_split(tmp_path, tokenizer):
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", [ALPACA]))
    with pytest.raises(DatasetError, match="too few"):
        tokenize_examples(examples, tokenizer, detect_prompt_format(tokenizer), 64, 0.5, 0)


def test_the_fast_labelling_path_equals_the_exact_one(bundled_model_path):
    import src.chat.prompts as prompts

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path)
    examples = load_examples("chitchat")[:25] + load_examples("chatterbot")[:25]
    examples.append(load_examples("chatterbot")[0])
    examples[-1].system_prompt = "Answer like a pirate 🏴‍☠️."
    fast_used = 0
    for example in examples:
        fast = prompts._encode_for_training_by_offsets(
            tokenizer, example.system_prompt, example.messages
        )
        exact_ids = prompts.encode_conversation(
            tokenizer,
            PromptFormat.CHAT_TEMPLATE,
            example.system_prompt,
            example.messages,
            add_generation_prompt=False,
        )
        if fast is None:
            continue
        fast_used += 1
        assert fast[0] == exact_ids

        # the exact path, forced: a tokenizer that does not say it is fast
        class Slow:
            def __getattr__(self, name):
                return getattr(tokenizer, name)

            is_fast = False

        assert (
            prompts.encode_for_training(
                Slow(), PromptFormat.CHAT_TEMPLATE, example.system_prompt, example.messages
            )
            == fast
        )
    assert fast_used > 40


def test_parquet_files_and_saved_datasets_are_read_through_hf_datasets(tmp_path):
    import datasets

    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("Hi", "Hello!"), ("2+2?", "4")]
    ]
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "d.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "dict"))
    for source in ("d.parquet", "saved", "dict"):
        examples = load_examples(str(tmp_path / source))
        assert [e.messages[1]["content"] for e in examples] == ["Hello!", "4"]
    bad = datasets.Dataset.from_list([{"instruction": "x", "output": ""}])
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DatasetError, match=r"bad.parquet: record 0: 'output' must be a non-empty"):
        load_examples(str(tmp_path / "bad.parquet"))

"""Training data: read conversations from files or bundled datasets, check every record, and
turn them into token ids and labels with the chat core's own prompt format.

Formats (detected per record):
- OpenAI ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``
- ShareGPT ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``
- Alpaca ``{"instruction": ..., "input": ... (optional), "output": ...}``
in ``.jsonl`` (one record a line) or ``.json`` (a list of records) files, ``.parquet`` files
or ``Dataset.save_to_disk`` folders (read with HF datasets), or the bundled datasets
``chitchat`` (chitchat-dataset) and ``chatterbot`` (chatterbot-corpus).

Every record is checked before anything is tokenized: a bad one raises ``DatasetError`` naming
the file, the line (or record number) and the field, so no run starts on half-read data.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from src.chat.prompts import IGNORE_INDEX, Message, PromptFormat, encode_for_training
from src.errors import DatasetError
from src.models.bundled import package_dir
from src.validation import short_repr

BUILTIN_DATASETS = ("chitchat", "chatterbot")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class Example:
    messages: list[Message]  # alternating user/assistant, ending with the assistant
    system_prompt: str | None
    where: str  # "file.jsonl:12": for error messages


# ---- reading -------------------------------------------------------------------------------


def load_examples(source: str) -> list[Example]:
    """All examples of ``source``: a bundled dataset name or a .jsonl/.json file."""
    if source in BUILTIN_DATASETS:
        return read_chitchat() if source == "chitchat" else read_chatterbot()
    path = Path(source)
    if path.is_dir() or path.suffix == ".parquet":
        records = read_with_datasets(path)
    elif path.is_file():
        records = read_records(path)
    else:
        raise DatasetError(
            f"{source}: no such file (and not a bundled dataset: {', '.join(BUILTIN_DATASETS)})"
        )
    if not records:
        raise DatasetError(f"{path}: no records")
    return [parse_record(record, where) for where, record in records]


def read_records(path: Path) -> list[tuple[str, Any]]:
    """(location, record) pairs of a .jsonl or .json file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read it ({exc})") from None
    if path.suffix == ".json":
        try:
            records = json.loads(decode_utf8(data, str(path)))
        except (ValueError, RecursionError) as exc:
            raise DatasetError(f"{path}: not valid JSON ({describe_json_error(exc)})") from None
        if not isinstance(records, list):
            raise DatasetError(f"{path}: a .json dataset must be a list of records")
        return [(f"{path}: record {number}", record) for number, record in enumerate(records)]
    records = []
    # JSON Lines ends lines with "\n" only (str.splitlines() would also split inside strings,
    # at characters JSON leaves unescaped such as U+2028), and each line is decoded alone so
    # that bytes that are not UTF-8 are reported with their line.
    for number, line in enumerate(data.split(b"\n"), start=1):
        text = decode_utf8(line, f"{path}:{number}")
        if not text.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(text)))
        except (ValueError, RecursionError) as exc:
            raise DatasetError(
                f"{path}:{number}: not valid JSON ({describe_json_error(exc)})"
            ) from None
    return records


def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def describe_json_error(exc: Exception) -> str:
    """json.loads raises JSONDecodeError for bad syntax, ValueError for an integer of over
    4300 digits and RecursionError for nesting too deep."""
    if isinstance(exc, json.JSONDecodeError):
        place = (
            f"line {exc.lineno} column {exc.colno}" if "\n" in exc.doc else f"column {exc.colno}"
        )
        return f"{exc.msg} at {place}"
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def read_with_datasets(path: Path) -> list[tuple[str, Any]]:
    """Parquet files and folders written by ``Dataset.save_to_disk``, read by HF datasets.
    (JSON and JSONL are read by ``read_records``, which can name the line of a bad record.)"""
    import datasets

    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded:
                    raise DatasetError(f"{path}: a DatasetDict needs a 'train' split")
                loaded = loaded["train"]
        else:
            loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except (FileNotFoundError, ValueError, OSError, datasets.exceptions.DatasetsError) as exc:
        # DatasetGenerationError says only "An error occurred while generating the dataset";
        # what went wrong (say, pyarrow's "Parquet magic bytes not found") is its cause.
        reason = exc.__cause__ if isinstance(exc, datasets.exceptions.DatasetsError) else exc
        raise DatasetError(f"{path}: cannot read it with datasets ({reason or exc})") from None
    return [(f"{path}: record {number}", row) for number, row in enumerate(loaded)]


def parse_record(record: Any, where: str) -> Example:
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: a record must be a JSON object")
    if "messages" in record:
        return _from_messages(record["messages"], where, "messages", "role", "content", None)
    if "conversations" in record:
        return _from_messages(
            record["conversations"], where, "conversations", "from", "value", SHAREGPT_ROLES
        )
    if "instruction" in record:
        return _from_alpaca(record, where)
    raise DatasetError(
        f"{where}: unknown format: expected a 'messages' (OpenAI), 'conversations' (ShareGPT) "
        "or 'instruction' (Alpaca) field"
    )


def _from_messages(turns, where, field_name, role_key, text_key, role_names) -> Example:
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}: '{field_name}' must be a non-empty list")
    system_prompt = None
    messages: list[Message] = []
    for number, turn in enumerate(turns):
        place = f"{where}: {field_name}[{number}]"
        if not isinstance(turn, dict):
            raise DatasetError(f"{place}: must be an object with '{role_key}' and '{text_key}'")
        role = turn.get(role_key)
        if role_names:
            role = role_names.get(role) if isinstance(role, str) else None
        if role not in ("system", "user", "assistant"):
            raise DatasetError(f"{place}.{role_key}: unknown role {short_repr(turn.get(role_key))}")
        text = turn.get(text_key)
        if not isinstance(text, str):
            raise DatasetError(f"{place}.{text_key}: must be a string")
        check_unicode(text, f"{place}.{text_key}")
        if role == "system":
            if number != 0:
                raise DatasetError(f"{place}: a system message may only come first")
            system_prompt = text
            continue
        expected = "user" if len(messages) % 2 == 0 else "assistant"
        if role != expected:
            raise DatasetError(
                f"{place}.{role_key}: expected {expected!r} (roles must "
                f"alternate, starting with the user), got {role!r}"
            )
        messages.append({"role": role, "content": text})
    if not messages or messages[-1]["role"] != "assistant":
        raise DatasetError(f"{where}: '{field_name}' must end with an assistant reply")
    return Example(messages, system_prompt, where)


def check_unicode(text: str, place: str) -> None:
    """JSON can hold a lone surrogate ("\\ud800"), which tokenizers cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DatasetError(
            f"{place}: invalid Unicode (a lone surrogate) at character {exc.start}"
        ) from None


def _from_alpaca(record: dict, where: str) -> Example:
    for name in ("instruction", "output"):
        if not isinstance(record.get(name), str) or not record[name].strip():
            raise DatasetError(f"{where}: '{name}' must be a non-empty string")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise DatasetError(f"{where}: 'input' must be a string")
    for name in ("instruction", "input", "output"):
        check_unicode(record.get(name) or "", f"{where}: '{name}'")
    prompt = record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
    messages = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": record["output"]},
    ]
    return Example(messages, None, where)


def read_chitchat() -> list[Example]:
    """chitchat-dataset: each conversation is a list of turns, each turn a list of short
    messages from one speaker. The first speaker is the user; a turn's messages are joined.
    Conversations with a single turn (3,150 of 7,168) have no reply to learn and are skipped,
    leaving 4,017."""
    path = package_dir("chitchat_dataset") / "dataset.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    examples = []
    for key, conversation in data.items():
        turns = [
            " ".join(part["text"].strip() for part in turn if part.get("text"))
            for turn in conversation.get("messages", [])
        ]
        turns = [turn for turn in turns if turn]
        if len(turns) % 2:
            turns = turns[:-1]  # end on the assistant's turn
        if len(turns) >= 2:
            roles = ["user", "assistant"] * (len(turns) // 2)
            messages = [{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)]
            examples.append(Example(messages, None, f"chitchat:{key}"))
    return examples


def read_chatterbot() -> list[Example]:
    """chatterbot-corpus (English): short dialogs in YAML, alternating speakers."""
    folder = package_dir("chatterbot_corpus") / "data" / "english"
    examples = []
    for path in sorted(folder.glob("*.yml")):
        corpus = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for number, dialog in enumerate(corpus.get("conversations") or []):
            turns = [str(turn).strip() for turn in dialog if str(turn).strip()]
            if len(turns) % 2:
                turns = turns[:-1]
            if len(turns) >= 2:
                roles = ["user", "assistant"] * (len(turns) // 2)
                messages = [{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)]
                examples.append(Example(messages, None, f"chatterbot:{path.stem}:{number}"))
    return examples


# ---- tokenizing ----------------------------------------------------------------------------


@dataclass
class TokenizedData:
    train: list[dict[str, list[int]]]  # {"input_ids", "labels"}
    validation: list[dict[str, list[int]]]
    truncated_examples: int = 0  # examples cut to max_length
    truncated_tokens: int = 0  # tokens removed by cutting
    dropped_examples: int = 0  # nothing left to learn after cutting
    stats: dict[str, Any] = field(default_factory=dict)


def tokenize_examples(
    examples: list[Example],
    tokenizer: Any,
    prompt_format: PromptFormat,
    max_length: int,
    validation_fraction: float,
    seed: int,
) -> TokenizedData:
    """Tokenize, cut to ``max_length`` (counting what was cut), and split train/validation."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_validation = max(1, round(len(examples) * validation_fraction)) if validation_fraction else 0
    if len(examples) - n_validation < 1:
        raise DatasetError(
            f"only {len(examples)} examples: too few to keep "
            f"{validation_fraction:.0%} for validation"
        )
    data = TokenizedData(train=[], validation=[])
    for rank, index in enumerate(tqdm(order, desc="Tokenizing", unit="example", leave=False)):
        example = examples[index]
        ids, labels = encode_for_training(
            tokenizer, prompt_format, example.system_prompt, example.messages
        )
        if len(ids) > max_length:
            data.truncated_examples += 1
            data.truncated_tokens += len(ids) - max_length
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            data.dropped_examples += 1  # the cut removed every assistant token
            continue
        split = data.validation if rank < n_validation else data.train
        split.append({"input_ids": ids, "labels": labels})
    if not data.train:
        raise DatasetError("no training examples left after tokenizing; raise max_length")
    data.stats = {
        "examples": len(examples),
        "train": len(data.train),
        "validation": len(data.validation),
        "train_tokens": sum(len(e["input_ids"]) for e in data.train),
        "truncated_examples": data.truncated_examples,
        "truncated_tokens": data.truncated_tokens,
        "dropped_examples": data.dropped_examples,
    }
    return data


def collate(batch: list[dict[str, list[int]]], pad_id: int):
    """Right-pad a batch into tensors: input_ids, attention_mask, labels (pads ignored)."""
    import torch

    length = max(len(example["input_ids"]) for example in batch)
    input_ids, attention_mask, labels = [], [], []
    for example in batch:
        padding = length - len(example["input_ids"])
        input_ids.append(example["input_ids"] + [pad_id] * padding)
        attention_mask.append([1] * len(example["input_ids"]) + [0] * padding)
        labels.append(example["labels"] + [IGNORE_INDEX] * padding)
    return {
        "input_ids": torch.tensor(input_ids),
        "attention_mask": torch.tensor(attention_mask),
        "labels": torch.tensor(labels),
    }

"""Preference pairs for DPO: read and check a JSONL file in TRL's conversational format (what
``scripts/export_preferences.py`` writes), then tokenize with the chat core's own encoder.

A line: ``{"prompt": [messages, ending with the user's], "chosen": [{"role": "assistant",
"content": ...}], "rejected": [...]}``. Every line is checked before anything is tokenized; a
bad one raises ``DatasetError`` naming the file, the line and the field.

Tokens come from ``encode_conversation``, as in chat and in LoRA fine-tuning: the prompt is the
conversation with the generation prompt, a reply is what the conversation through that reply
adds to it (its end-of-turn token included). So the pairs are trained on exactly the prompt the
server will build, and message text never becomes control tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from src.chat.prompts import Message, PromptFormat, encode_conversation
from src.errors import DatasetError
from src.training.data import check_unicode, read_records

ROLES = ("system", "user", "assistant")
MIN_REPLY_TOKENS = 8  # a pair whose prompt leaves less room for its replies is dropped


@dataclass(frozen=True)
class Pair:
    system_prompt: str | None
    messages: list[Message]  # ends with the user's turn
    chosen: str
    rejected: str
    where: str  # "file.jsonl:12"


def load_pairs(path: Path) -> list[Pair]:
    if not Path(path).is_file():
        raise DatasetError(f"{path}: no such file (export one with make export-preferences)")
    records = read_records(Path(path))
    if not records:
        raise DatasetError(f"{path}: no preference pairs")
    return [parse_pair(record, where) for where, record in records]


def parse_pair(record: Any, where: str) -> Pair:
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: a pair must be a JSON object")
    for name in ("prompt", "chosen", "rejected"):
        if name not in record:
            raise DatasetError(
                f"{where}: missing field {name!r} (a pair has prompt, chosen, rejected)"
            )
    prompt = [
        message_of(m, f"{where}: prompt[{i}]") for i, m in enumerate(_list(record, "prompt", where))
    ]
    system = None
    if prompt and prompt[0]["role"] == "system":
        system = prompt.pop(0)["content"]
    if not prompt or prompt[-1]["role"] != "user":
        last = prompt[-1]["role"] if prompt else "nothing"
        raise DatasetError(
            f"{where}: prompt: must end with the user's turn (it ends with {last}): the replies "
            "answer it"
        )
    chosen, rejected = (reply_of(record, name, where) for name in ("chosen", "rejected"))
    if chosen.strip() == rejected.strip():
        raise DatasetError(
            f"{where}: chosen: the same text as rejected, so there is nothing to prefer"
        )
    return Pair(system, prompt, chosen, rejected, where)


def _list(record: dict, name: str, where: str) -> list:
    value = record[name]
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: {name}: must be a non-empty list of messages")
    return value


def message_of(message: Any, where: str) -> Message:
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise DatasetError(f"{where}: a message is an object with a string 'content'")
    if message.get("role") not in ROLES:
        raise DatasetError(
            f"{where}: role {message.get('role')!r} is not one of {', '.join(ROLES)}"
        )
    check_unicode(message["content"], where)
    return {"role": message["role"], "content": message["content"]}


def reply_of(record: dict, name: str, where: str) -> str:
    """The one assistant message of ``chosen`` or ``rejected``."""
    messages = _list(record, name, where)
    if len(messages) != 1:
        raise DatasetError(f"{where}: {name}: must hold exactly one assistant message")
    reply = message_of(messages[0], f"{where}: {name}[0]")
    if reply["role"] != "assistant" or not reply["content"].strip():
        raise DatasetError(f"{where}: {name}[0]: must be a non-empty assistant message")
    return reply["content"]


# ---- tokenizing ----------------------------------------------------------------------------


def encode_reply(
    tokenizer: Any, prompt_format: PromptFormat, pair: Pair, reply: str
) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids): the prompt as chat builds it, and what the reply adds."""
    prompt = encode_conversation(tokenizer, prompt_format, pair.system_prompt, pair.messages, True)
    answered = [*pair.messages, {"role": "assistant", "content": reply}]
    through = encode_conversation(tokenizer, prompt_format, pair.system_prompt, answered, False)
    if through[: len(prompt)] != prompt:
        raise DatasetError(
            f"{pair.where}: the chat template does not encode the prompt the same way alone and "
            "followed by a reply, so the reply's tokens cannot be located"
        )
    return prompt, through[len(prompt) :]


@dataclass
class TokenizedPairs:
    train: list[dict[str, list[int]]]  # {"prompt_ids", "chosen_ids", "rejected_ids"}
    held_out: list[dict[str, list[int]]]
    held_out_pairs: list[Pair] = field(default_factory=list)
    truncated: int = 0  # pairs whose replies were cut to fit max_length
    dropped: int = 0  # pairs whose prompt alone does not fit


def tokenize_pairs(
    pairs: list[Pair],
    tokenizer: Any,
    prompt_format: PromptFormat,
    max_length: int,
    held_out_fraction: float,
    seed: int,
) -> TokenizedPairs:
    """Tokenize, fit each pair into ``max_length`` (replies cut at the end; a pair whose
    prompt leaves no room for them is dropped), and split off ``held_out_fraction`` of the
    pairs for evaluation."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_held_out = max(1, round(len(pairs) * held_out_fraction)) if held_out_fraction else 0
    if len(pairs) - n_held_out < 1:
        raise DatasetError(f"only {len(pairs)} pairs: too few to hold out {held_out_fraction:.0%}")
    data = TokenizedPairs(train=[], held_out=[])
    for rank, index in enumerate(tqdm(order, desc="Tokenizing pairs", leave=False)):
        pair = pairs[index]
        prompt, chosen = encode_reply(tokenizer, prompt_format, pair, pair.chosen)
        _, rejected = encode_reply(tokenizer, prompt_format, pair, pair.rejected)
        room = max_length - len(prompt)
        if room < MIN_REPLY_TOKENS:
            data.dropped += 1
            continue
        if len(chosen) > room or len(rejected) > room:
            data.truncated += 1
        example = {
            "prompt_ids": prompt,
            "chosen_ids": chosen[:room],
            "rejected_ids": rejected[:room],
        }
        if rank < n_held_out:
            data.held_out.append(example)
            data.held_out_pairs.append(pair)
        else:
            data.train.append(example)
    if not data.train:
        raise DatasetError("no training pairs left after tokenizing; raise data.max_length")
    return data

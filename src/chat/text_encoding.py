"""Message text is encoded as text, never as control tokens.

A chat template renders a conversation as one string, and tokenizing that string turns every
``<|im_end|>`` or ``<|im_start|>system`` in it into the real control token, including those a
user typed: a message could close its own turn and open a system turn (role injection). So the
rendered conversation is tokenized in pieces: the template's own text with its control tokens,
and each message's text with control tokens read as plain text (the Rust tokenizer's
``encode_special_tokens``), joined in order. Only the template places control tokens.

On ordinary text the pieces give the same ids as the whole string (tested): a message's text
starts after the template's newline or tag and ends before its end-of-turn token, where the
tokenizer's pre-tokenizer splits anyway.
"""

from __future__ import annotations

import re
import threading
import weakref
from typing import Any

from src.errors import InvalidRequestError

Segment = tuple[str, bool]  # (text, is a message's text)
# Private-use characters mark where each message's text goes in the rendered template.
MARK_OPEN, MARK_CLOSE = "\ue000", "\ue001"
_MARK = re.compile(f"{MARK_OPEN}(\\d+){MARK_CLOSE}")

# id(tokenizer) -> its text-only copy, dropped when the tokenizer is (each adapter loaded has a
# tokenizer of its own: keeping them would keep two tokenizers, ~8 MB, per adapter ever loaded).
_text_only: dict[int, Any] = {}
_lock = threading.Lock()


def marker(index: int) -> str:
    return f"{MARK_OPEN}{index}{MARK_CLOSE}"


def rust_tokenizer(tokenizer: Any) -> Any | None:
    """The ``tokenizers.Tokenizer`` inside transformers' fast tokenizers and our LightTokenizer."""
    from tokenizers import Tokenizer

    rust = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "backend", None)
    return rust if isinstance(rust, Tokenizer) else None


def _text_only_rust(rust: Any) -> Any:
    """A copy of ``rust`` that reads control tokens in text as plain text (kept per tokenizer:
    the flag is never switched on a tokenizer another thread is using)."""
    from tokenizers import Tokenizer

    with _lock:
        plain = _text_only.get(id(rust))
        if plain is None:
            plain = Tokenizer.from_str(rust.to_str())
            plain.no_padding()
            plain.no_truncation()
            plain.encode_special_tokens = True
            _text_only[id(rust)] = plain
            weakref.finalize(rust, _forget, id(rust))
        return plain


def _forget(key: int) -> None:
    with _lock:
        _text_only.pop(key, None)


def special_token_strings(tokenizer: Any) -> list[str]:
    rust = rust_tokenizer(tokenizer)
    if rust is not None:
        return [t.content for t in rust.get_added_tokens_decoder().values() if t.special]
    return list(getattr(tokenizer, "all_special_tokens", []))


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """``text`` as text: a control token's string in it is split like any other text."""
    return encode_segments(tokenizer, [(text, True)])[0]


def encode_segments(
    tokenizer: Any, segments: list[Segment], memo: dict[Segment, list[int]] | None = None
) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids of the joined segments, and each token's character span in the joined text
    (None for a tokenizer without a Rust backend, or with a ``memo``). Template text keeps its
    control tokens; message text never makes one. ``memo`` keeps each segment's ids, so that
    the same text is tokenized once however many prompts it goes into."""
    rust = rust_tokenizer(tokenizer)
    ids: list[int] = []
    if rust is None or memo is not None:
        for segment in segments:
            if segment[0]:
                known = memo.get(segment) if memo is not None else None
                if known is None:
                    known = _encode_one(tokenizer, rust, *segment)
                    if memo is not None:
                        memo[segment] = known
                ids += known
        return ids, None
    plain = _text_only_rust(rust)
    offsets: list[tuple[int, int]] = []
    start = 0
    for text, is_message in segments:
        if text:
            encoded = (plain if is_message else rust).encode(text, add_special_tokens=False)
            ids += encoded.ids
            offsets += [(start + a, start + b) for a, b in encoded.offsets]
        start += len(text)
    return ids, offsets


def _encode_one(tokenizer: Any, rust: Any | None, text: str, is_message: bool) -> list[int]:
    if rust is None:  # a slow (Python) tokenizer: transformers' own switch
        encoded = tokenizer(text, add_special_tokens=False, split_special_tokens=is_message)
        return list(encoded["input_ids"])
    return (
        (_text_only_rust(rust) if is_message else rust).encode(text, add_special_tokens=False).ids
    )


def mark_contents(chat: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The messages with each text replaced by a marker, and the texts in marker order."""
    texts: list[str] = []
    marked = []
    for message in chat:
        content = message.get("content")
        if isinstance(content, str) and content:
            marked.append({**message, "content": marker(len(texts))})
            texts.append(content)
        else:
            marked.append(message)
    return marked, texts


def split_rendered(marked: str, texts: list[str], real: str, tokenizer: Any) -> list[Segment]:
    """Segments of the rendered conversation ``real``, from its rendering with markers.

    A template that changes the text it places (one that trims it, say) cannot be split at
    the markers; then, if no message holds a control token's string, the whole text is safe
    to encode as it is, and otherwise the request is refused, naming the problem."""
    for placed in (texts, [text.strip() for text in texts]):
        if any(MARK_OPEN in text or MARK_CLOSE in text for text in placed):
            break
        segments: list[Segment] = []
        position = 0
        for match in _MARK.finditer(marked):
            segments.append((marked[position : match.start()], False))
            segments.append((placed[int(match.group(1))], True))
            position = match.end()
        segments.append((marked[position:], False))
        if "".join(text for text, _ in segments) == real:
            return segments
    specials = [s for s in special_token_strings(tokenizer) if any(s in t for t in texts)]
    if specials:
        raise InvalidRequestError(
            f"messages: a message contains the model's control token {specials[0]!r}, and this "
            "chat template changes message text in a way that keeps it from being encoded "
            "safely as plain text; remove it from the message",
            "messages",
        )
    return [(real, False)]

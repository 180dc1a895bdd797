"""Turning a stream of token ids into a stream of text that is safe to show.

Two problems, one class each:
- A token can end in the middle of a multi-byte character (an emoji is often 2-3 byte-level
  BPE tokens), and decoding token by token would print U+FFFD garbage. ``IncrementalDecoder``
  holds text back until it decodes cleanly.
- A stop sequence can arrive split over several tokens, and must not be shown.
  ``StopSequenceFilter`` holds back any tail that could still become a stop sequence.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    """Decode token ids one at a time into text deltas.

    Decoding a window (``prefix_offset:``) rather than each token alone keeps BPE merges and
    SentencePiece leading spaces right; this is the scheme vLLM and TGI use.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window used to decode
        self.read_offset = 0  # ids before this have been turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end (e.g. genuinely invalid bytes)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]


class StopSequenceFilter:
    """Pass text through until a stop sequence appears; never show the stop sequence."""

    def __init__(self, stop_sequences: tuple[str, ...] | list[str]) -> None:
        self.stop_sequences = tuple(stop_sequences)
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop sequence that ended the text

    def push(self, text: str) -> str:
        """Add text; return what is safe to show now. Sets ``stopped`` on a stop sequence."""
        if self.stopped:
            return ""
        self.pending += text
        hits = [(i, s) for s in self.stop_sequences if (i := self.pending.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits, key=lambda hit: hit[0])
            self.stopped = True
            shown, self.pending = self.pending[:at], ""
            return shown
        held = self._longest_stop_prefix_suffix()
        shown = self.pending[: len(self.pending) - held]
        self.pending = self.pending[len(shown) :]
        return shown

    def flush(self) -> str:
        """At the end of generation, text held back as a possible stop prefix is real text."""
        shown, self.pending = ("" if self.stopped else self.pending), ""
        return shown

    def _longest_stop_prefix_suffix(self) -> int:
        """Length of the longest end of ``pending`` that begins some stop sequence."""
        longest = 0
        for stop in self.stop_sequences:
            for length in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:length]):
                    longest = length
                    break
        return longest

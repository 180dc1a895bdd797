"""What a reply streams: text, the log-probabilities of the tokens behind it, and tool calls.

Every backend's generation yields ``Delta`` objects; ``ReplyStream`` gathers them into the
``ChatResult``, and each front end translates them into its protocol's chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from src.chat.tools import ToolCallDelta


@dataclass(frozen=True)
class TokenInfo:
    """One token as a client sees it: its text, its exact bytes (a token can hold part of a
    UTF-8 character, whose text then shows U+FFFD), its log-probability under the model (None
    for a prompt's first token) and the likeliest alternatives, as (text, bytes, logprob)."""

    token: str
    bytes: bytes
    logprob: float | None
    top: tuple[tuple[str, bytes, float], ...] = ()


@dataclass
class Delta:
    text: str = ""
    logprobs: list[TokenInfo] = field(default_factory=list)
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    # With params.prompt_logprobs: the prompt's own tokens, scored, on the first delta
    prompt_logprobs: list[TokenInfo] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.text or self.logprobs or self.tool_calls or self.prompt_logprobs)

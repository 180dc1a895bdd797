"""Structured outputs: a grammar holds a reply to a shape while it is generated.

A grammar (a JSON schema, or a Lark grammar for tool calls) is compiled by llguidance into a
*matcher* that knows, after every token, which tokens may come next. At each decoding step the
engine asks each constrained row's matcher for that set as a bitmask (one bit per token of the
vocabulary) and sets every other token's score to -inf (``grammar_mask`` in
``src/engine/logits.py``), so whatever is sampled keeps the reply a prefix of something the
grammar accepts: a finished JSON reply always parses and validates.

Why llguidance (README "Structured outputs"): it has no dependencies beyond its own wheel
(xgrammar's pulls triton), compiles JSON schemas, Lark grammars and lazy tool-call triggers,
names the schema keyword it cannot handle, and its mask costs microseconds per token, next to
the tens of milliseconds of a decoding step (``scripts/benchmark.py --sections structured``).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from src.errors import InvalidRequestError
from src.params import ResponseFormat

# Replies keep JSON's usual spacing (", " and ": "), and no other whitespace: a grammar that
# allowed any whitespace lets a small model pad a reply with newlines until it runs out of
# tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = {"type": "object"}


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """An llguidance grammar for JSON values valid against ``schema``."""
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise InvalidRequestError(f"response_format: {exc}", "response_format") from None


def response_format_grammar(response_format: ResponseFormat | None) -> str | None:
    """The grammar a response format asks for (None for free text)."""
    if response_format is None or not response_format.constrains:
        return None
    if response_format.type == "json_object":
        return json_schema_grammar(ANY_JSON_OBJECT)
    return json_schema_grammar(response_format.json_schema or ANY_JSON_OBJECT)


class GrammarConstraint:
    """One reply's matcher, as the engine's ``TokenConstraint``."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def fill_mask(self, bitmask: torch.Tensor) -> None:
        self.matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    def advance(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            raise ValueError(f"grammar: token {token_id} was not allowed: {self.error}")

    @property
    def error(self) -> str:
        return self.matcher.get_error()

    @property
    def finished(self) -> bool:
        """Whether the reply so far is complete for the grammar."""
        return self.matcher.is_accepting()


class GrammarCompiler:
    """Compiles grammars for one tokenizer. Reading the vocabulary into llguidance takes about
    a third of a second, so it is done once, on the first constrained request."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._compiled: Any = None
        self._lock = threading.Lock()

    @property
    def llg_tokenizer(self) -> Any:
        with self._lock:
            if self._compiled is None:
                self._compiled = self._load()
            return self._compiled

    def _load(self) -> Any:
        import copy

        import llguidance
        from tokenizers import Tokenizer

        # transformers' fast tokenizers and our LightTokenizer both wrap a Rust tokenizer.
        rust = getattr(self.tokenizer, "backend_tokenizer", None)
        rust = rust or getattr(self.tokenizer, "backend", None)
        if not isinstance(rust, Tokenizer):
            raise InvalidRequestError(
                "response_format: structured outputs and tools need a tokenizer.json (Rust) "
                f"tokenizer, and this model's is {type(self.tokenizer).__name__}",
                "response_format",
            )
        rust = copy.copy(rust)
        rust.no_padding()
        rust.no_truncation()
        return llguidance.LLTokenizer(
            rust.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_token_ids
        )

    def check(self, grammar: str, field: str) -> None:
        """Raise ``InvalidRequestError`` naming the problem if ``grammar`` cannot be compiled
        (a schema keyword llguidance does not support, an unknown type, a bad reference)."""
        import llguidance

        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self.llg_tokenizer
        )
        if failed:
            raise InvalidRequestError(f"{field}: cannot be enforced: {messages[0]}", field)

    def constraint(self, grammar: str, field: str = "response_format") -> GrammarConstraint:
        import llguidance

        self.check(grammar, field)
        matcher = llguidance.LLMatcher(self.llg_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"{field}: cannot be enforced: {matcher.get_error()}", field)
        return GrammarConstraint(matcher)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes of one token (a token may hold part of a UTF-8 character)."""
        return self.llg_tokenizer.decode_bytes([token_id])

"""A tokenizer for chat inference without importing transformers.

``import transformers`` plus ``AutoTokenizer`` costs about a second here, a third of the
cold-start budget (README "Performance"). Chat inference needs four things from a tokenizer,
and a model folder's ``tokenizer.json`` (Hugging Face ``tokenizers``, Rust) and chat template
(Jinja) are all they need:

- ``encode(text, add_special_tokens)`` and ``decode(ids, skip_special_tokens)``;
- ``apply_chat_template(messages, ...)``, rendered the way transformers renders it (the same
  sandboxed Jinja environment and options, special tokens as template variables);
- ``eos_token_id`` and ``chat_template``.

The tests check that ids and text equal ``AutoTokenizer``'s. Folders without a
``tokenizer.json`` (slow, SentencePiece-only tokenizers) use ``AutoTokenizer`` instead, and
training always does (it needs offsets and batching).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from src.errors import ModelLoadingError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class LightTokenizer:
    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        try:
            self.backend = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception
            read_json(path)  # a damaged file: ModelLoadingError naming it
            # Valid JSON that this version of tokenizers cannot read: the caller falls back
            # to transformers' AutoTokenizer.
            raise ValueError(f"tokenizers cannot read {path}: {exc}") from None
        config = read_json(folder / "tokenizer_config.json")
        self.special_tokens = {
            name: token_text(config[name]) for name in SPECIAL_TOKEN_NAMES if config.get(name)
        }
        eos = self.special_tokens.get("eos_token")
        self.eos_token = eos
        self.eos_token_id = self.backend.token_to_id(eos) if eos else None
        self.chat_template = chat_template_of(folder, config)
        # transformers 5 defaults clean_up_tokenization_spaces to False for fast tokenizers.
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_dict: bool = False,
    ) -> Any:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None:
            self._template = compile_chat_template(self.chat_template)
        text = self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )
        if not tokenize:
            return text
        # As transformers does: the template writes the special tokens itself.
        ids = self.encode(text, add_special_tokens=False)
        return {"input_ids": ids} if return_dict else ids


def read_json(path: Path) -> dict:
    """The JSON object in ``path`` ({} if there is no such file); a damaged file is a
    ``ModelLoadingError`` naming it."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelLoadingError(f"{path} cannot be read ({exc.strerror or exc}).") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelLoadingError(f"{path} is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ModelLoadingError(f"{path} should hold a JSON object, not {type(data).__name__}.")
    return data


def token_text(value: Any) -> str:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    return value["content"] if isinstance(value, dict) else str(value)


def chat_template_of(folder: Path, config: dict) -> str | None:
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    return template if isinstance(template, str) else None


def compile_chat_template(source: str) -> Any:
    """The template in the environment transformers uses: sandboxed (templates come from the
    hub and are untrusted), trim_blocks and lstrip_blocks, with its helper globals."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, indent=indent, ensure_ascii=False
    )
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(source)


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: no space before punctuation and contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                          (" 're", "'re")):  # fmt: skip
        text = text.replace(before, after)
    return text


def can_load_light(folder: Path) -> bool:
    return (Path(folder) / "tokenizer.json").is_file()

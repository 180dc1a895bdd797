"""Property-based tests of the core with arbitrary input: each function either works (and
its result has the promised properties) or raises the project's own error, with a message
that names the field, file or line; nothing else escapes.

- prompts: arbitrary unicode (emoji, RTL, NUL and control characters, lone surrogates,
  very long words) through the real GPT-2 and SmolLM2 tokenizers and chat template;
- generation parameters: any values, NaN, infinities, huge and negative numbers, wrong types;
- a whole reply through ChatService with all of the above, on tiny random-weight models;
- streaming text: arbitrary token ids and stop sequences;
- loaders: the YAML training config, JSONL/JSON/Parquet datasets and conversation files,
  broken in every way Hypothesis finds (random bytes, truncated, wrong fields and types).

FUZZ_EXAMPLES=N sets the number of examples per test (tests/fuzz/conftest.py).
"""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from src.chat.conversation import Conversation, load_conversation_file, save_conversation_file
from src.chat.prompts import PromptFormat, build_prompt, encode_conversation
from src.chat.streaming import IncrementalDecoder, StopSequenceFilter
from src.errors import (
    ContextOverflowError,
    ConversationFileError,
    DatasetError,
    InvalidRequestError,
    MiniClaudeError,
    TrainingConfigError,
)
from src.params import GenerationParams, make_params
from src.training.config import TrainingConfig, load_training_config, no_settings
from src.training.data import load_examples
from tests.conftest import GREEDY, make_service
from tests.fuzz.cases import count
from tests.fuzz.conftest import examples

EXAMPLES = examples(60)
pytestmark = [pytest.mark.unit, pytest.mark.timeout(max(300, EXAMPLES))]

PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,  # the autouse environment isolation
        HealthCheck.filter_too_much,
    ],
)

# ---- text ----------------------------------------------------------------------------------

# Pieces that have broken text handling somewhere: emoji sequences, RTL and bidi controls,
# NUL and terminal control characters, combining marks, zero-width and BOM, line separators,
# special-token look-alikes and very long words.
TRICKY = [
    "👨‍👩‍👧‍👦",
    "🇫🇷🏳️‍🌈",
    "שלום עולם",
    "مرحبا",
    "\u202eevil\u202c",
    "\x00",
    "\x07\x1b[31mred\x1b[0m",
    "\r\n",
    "e\u0301\u0308",
    "\u200b\u200d\ufeff",
    "\u2028\u2029\x85",
    "<|im_end|>",
    "<|endoftext|>",
    "a" * 3000,
    "🙂" * 500,
    "supercalifragilistic" * 100,
    "中文字符" * 50,
]
VALID_TEXT = st.lists(
    st.one_of(st.text(st.characters(codec="utf-8"), max_size=30), st.sampled_from(TRICKY)),
    max_size=4,
).map("".join)
SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
SHORT_TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
# Mostly valid text, short or not; sometimes with a lone surrogate (JSON's "\ud800" decodes
# to one).
ANY_TEXT = st.one_of(
    SHORT_TEXT,
    VALID_TEXT,
    st.tuples(VALID_TEXT, SURROGATE, VALID_TEXT).map("".join),
)


def has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(char) <= 0xDFFF for char in text)


def history_of(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    messages = []
    for user, assistant in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def assert_own_error(exc: BaseException, *kinds: type[MiniClaudeError]) -> None:
    """What escapes must be one of the project's errors, with a message."""
    assert isinstance(exc, kinds), f"{type(exc).__name__} escaped: {exc}"
    assert str(exc).strip(), "an error without a message"
    assert len(str(exc)) < 5000, f"a {len(str(exc))}-character message"


# ---- prompts -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(gpt2_tokenizer_path, bundled_model_path) -> dict:
    return {
        "gpt2": AutoTokenizer.from_pretrained(gpt2_tokenizer_path),
        "smollm2": AutoTokenizer.from_pretrained(bundled_model_path),
    }


FORMATS = {"gpt2": PromptFormat.EOS_JOINED, "smollm2": PromptFormat.CHAT_TEMPLATE}


@pytest.mark.parametrize("name", ["gpt2", "smollm2"])
def test_build_prompt_fits_the_budget_and_keeps_the_newest_message(tokenizers, name):
    tokenizer, prompt_format = tokenizers[name], FORMATS[name]

    @PROPERTY_SETTINGS
    @given(
        system=st.none() | VALID_TEXT,
        pairs=st.lists(st.tuples(VALID_TEXT, VALID_TEXT), max_size=4),
        message=VALID_TEXT,
        budget=st.integers(1, 400),
    )
    def run(system, pairs, message, budget) -> None:
        messages = history_of(pairs) + [{"role": "user", "content": message}]

        def encode(part):
            return encode_conversation(tokenizer, prompt_format, system, part)

        try:
            built = build_prompt(tokenizer, prompt_format, system, messages, budget)
        except ContextOverflowError as exc:
            count("core", f"build_prompt ({name})", "too long")
            assert str(exc).startswith("message: needs "), exc
            assert len(encode(messages[-1:])) > budget  # not even the newest message fits
            return
        count(
            "core", f"build_prompt ({name})", "dropped turns" if built.dropped_messages else "fits"
        )
        assert len(built.input_ids) <= budget
        dropped = built.dropped_messages
        assert dropped % 2 == 0 and 0 <= dropped < len(messages)
        assert built.input_ids == encode(messages[dropped:])  # the newest message is kept
        if dropped:
            assert len(encode(messages[dropped - 2 :])) > budget  # and as much as fits

    run()


# ---- generation parameters -----------------------------------------------------------------

FIELDS = list(GenerationParams.model_fields)
NUMBERS = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 2**63, -(2**63), 10**30, 10**5000, -0.0, 5e-324, 1e-300, 1e308]),
)
WEIRD = st.one_of(
    NUMBERS,
    st.booleans(),
    st.none(),
    ANY_TEXT.map(lambda text: text[:80]),
    st.sampled_from(["0.5", "nan", "inf", "-inf", "1e999", "", " 3 ", "true"]),
    st.lists(st.one_of(ANY_TEXT.map(lambda text: text[:70]), NUMBERS), max_size=10),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
IN_RANGE = {
    "max_new_tokens": st.integers(1, 12),
    "temperature": st.just(0.0) | st.floats(0.0, 5.0),
    "top_p": st.floats(0.0, 1.0, exclude_min=True),
    "top_k": st.integers(0, 10_000),
    "repetition_penalty": st.floats(0.05, 10.0),
    "do_sample": st.booleans(),
    "seed": st.none() | st.integers(0, 2**63 - 1),
    "stop": st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=8), max_size=3),
    "min_p": st.floats(0.0, 1.0),
    "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "logit_bias": st.dictionaries(st.integers(0, 100), st.floats(-100.0, 100.0), max_size=3),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20),
    "prompt_logprobs": st.booleans(),
    "response_format": st.sampled_from([None, {"type": "text"}, {"type": "json_object"}]),
}
# Each field: left out, in range (twice as likely), or anything at all.
PARAM_VALUES = st.fixed_dictionaries(
    {}, optional={name: st.one_of(IN_RANGE[name], IN_RANGE[name], WEIRD) for name in FIELDS}
)
VALID_PARAM_VALUES = st.fixed_dictionaries({}, optional=IN_RANGE)


def check_params(values: dict) -> GenerationParams | None:
    """make_params gives valid params or InvalidRequestError naming only fields it was given."""
    try:
        params = make_params(values)
    except InvalidRequestError as exc:
        assert_own_error(exc, InvalidRequestError)
        for problem in str(exc).split("; "):
            field = re.split(r"[=:.]", problem, maxsplit=1)[0]
            assert field in values, (field, str(exc))
        return None
    assert 0 <= params.max_new_tokens <= 4096
    assert params.temperature == 0.0 or 0.01 <= params.temperature <= 5.0
    assert 0.0 < params.top_p <= 1.0 and 0 <= params.top_k <= 10_000
    assert 0.05 <= params.repetition_penalty <= 10.0
    assert params.seed is None or 0 <= params.seed < 2**63
    assert len(params.stop) <= 8 and all(0 < len(stop) <= 64 for stop in params.stop)
    assert make_params(params.model_dump()) == params  # stable under a round trip
    return params


def test_generation_params_are_valid_or_name_the_field():
    @PROPERTY_SETTINGS
    @given(
        values=st.one_of(
            VALID_PARAM_VALUES,
            PARAM_VALUES,
            PARAM_VALUES.map(lambda values: {**values, "temprature": 1}),
        )
    )
    def run(values) -> None:
        params = check_params(values)
        count("core", "make_params", "refused" if params is None else "valid")

    run()


# ---- a whole reply -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services(tiny_gpt2_path, tiny_llama_path) -> dict:
    """Tiny random-weight models with the real tokenizers, a 128-token context window."""
    options = {"context_window": 128, "max_message_chars": 4000, "default_params": GREEDY}
    return {
        "gpt2": make_service(tiny_gpt2_path, **options),
        "llama": make_service(tiny_llama_path, **options),
    }


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_reply_with_any_input_completes_or_is_refused_by_name(services, name):
    service = services[name]

    @PROPERTY_SETTINGS
    @given(
        system=st.none() | SHORT_TEXT | ANY_TEXT,
        pairs=st.lists(st.tuples(SHORT_TEXT, SHORT_TEXT), max_size=3)
        | st.lists(st.tuples(ANY_TEXT, ANY_TEXT), max_size=2),
        message=SHORT_TEXT | ANY_TEXT,
        values=st.one_of(VALID_PARAM_VALUES, PARAM_VALUES),
    )
    def run(system, pairs, message, values) -> None:
        name_ = f"ChatService reply ({name})"
        params = check_params({**service.default_params.model_dump(), **values})
        if params is None:
            count("core", name_, "params refused")
            return
        conversation = Conversation(system_prompt=system, messages=history_of(pairs))
        before = list(conversation.messages)
        try:
            result = service.reply(conversation, message, params)
        except InvalidRequestError as exc:
            assert_own_error(exc, InvalidRequestError)
            field = re.split(r"[=:]", str(exc), maxsplit=1)[0]
            count("core", name_, f"refused: {field}")
            assert field in ("message", "system_prompt", "messages", "max_new_tokens"), exc
            surrogates = has_surrogate(message) or has_surrogate(system or "")
            surrogates |= any(has_surrogate(m["content"]) for m in before)
            empty = not message.strip()
            overflow = isinstance(exc, ContextOverflowError) or field == "max_new_tokens"
            assert surrogates or empty or len(message) > 4000 or overflow, exc
            assert conversation.messages == before  # a refused request changes nothing
            return
        count("core", name_, f"replied ({result.finish_reason})")
        assert message.strip() and not has_surrogate(message)
        assert result.finish_reason in ("stop", "length")
        assert 1 <= result.completion_tokens <= params.max_new_tokens
        # (U+FFFD may appear whatever the finish: a random-weight model can emit byte tokens
        # that are not valid UTF-8 and then end its turn; the decoder shows them as U+FFFD.)
        assert not any(stop in result.text for stop in params.stop)
        assert conversation.messages[-2:] == [
            {"role": "user", "content": message},
            {"role": "assistant", "content": result.text},
        ]

    run()


# ---- streaming text ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "smollm2"])
def test_incremental_decoding_of_any_token_ids(tokenizers, name):
    tokenizer = tokenizers[name]
    # Low ids are single bytes and special tokens: incomplete UTF-8 and skipped tokens.
    token_ids = st.lists(
        st.integers(0, 300) | st.integers(0, len(tokenizer) - 1), min_size=1, max_size=24
    )

    @PROPERTY_SETTINGS
    @given(ids=token_ids)
    def run(ids) -> None:
        count("core", f"IncrementalDecoder ({name})")
        decoder = IncrementalDecoder(tokenizer)
        shown = ""
        for number, token_id in enumerate(ids, start=1):
            shown += decoder.push(token_id)
            # Text once shown is never taken back by a later token.
            assert tokenizer.decode(ids[:number], skip_special_tokens=True).startswith(shown)
        shown += decoder.flush()
        assert shown == tokenizer.decode(ids, skip_special_tokens=True)

    run()


STOPS = st.lists(st.text("ab#\n🙂", min_size=1, max_size=4), max_size=3)


@PROPERTY_SETTINGS
@given(pieces=st.lists(st.text("ab#\n🙂x", max_size=6), max_size=10), stops=STOPS)
def test_stop_sequences_end_the_text_exactly_where_one_begins(pieces, stops):
    stop_filter = StopSequenceFilter(stops)
    shown = "".join(stop_filter.push(piece) for piece in pieces) + stop_filter.flush()
    full = "".join(pieces)
    count("core", "StopSequenceFilter", "stopped" if stop_filter.stopped else "not stopped")
    assert full.startswith(shown)
    assert not any(stop in shown for stop in stops)  # a stop sequence is never shown
    if any(stop in full for stop in stops):
        assert stop_filter.stopped
        assert any(full.startswith(shown + stop) for stop in stops)  # cut right before one
    else:
        assert shown == full and not stop_filter.stopped  # everything else is shown


# ---- the YAML training config --------------------------------------------------------------

DEFAULT_CONFIG = TrainingConfig().model_dump(mode="json")
CONFIG_KEYS = [
    f"{section}.{key}"
    for section, values in DEFAULT_CONFIG.items()
    if isinstance(values, dict)
    for key in values
] + ["model", "data", "lora", "training", "unknown", "training.unknown"]
YAML_VALUES = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([10**30, -1, 0, 2**64]),
    st.booleans(),
    st.none(),
    st.text(max_size=20),
    st.lists(st.integers() | st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
YAML_BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
    "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nlora: {target_modules: *e, rank: *e}\n"
)


@st.composite
def config_files(draw) -> bytes:
    """A valid config with some keys changed, broken YAML, or random bytes."""
    kind = draw(st.sampled_from(["changed", "truncated", "bytes", "special"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "special":
        return draw(
            st.sampled_from(
                [
                    b"",
                    b"- a list\n",
                    b"just text",
                    b"training: [",
                    b"\xff\xfe\x00",
                    b"training: {max_steps: 1" + b"0" * 5000 + b"}",
                    b"training: " + b"[" * 5000,
                    b"? [1, 2]\n: x\n",
                    b"training: !!python/object/apply:os.system [echo hi]",
                    b"training: {max_steps: .nan, learning_rate: .inf}",
                    b"data: {source: \x00}",
                    YAML_BOMB.encode(),
                ]
            )
        )
    config = json.loads(json.dumps(DEFAULT_CONFIG))
    for key in draw(st.lists(st.sampled_from(CONFIG_KEYS), max_size=4)):
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node[last] = draw(YAML_VALUES)
    text = yaml.safe_dump(config, allow_unicode=True)
    if kind == "truncated":
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode()


def test_training_config_loads_or_names_the_file_and_key(tmp_path):
    @PROPERTY_SETTINGS
    @given(
        content=config_files(),
        overrides=st.lists(
            st.tuples(st.sampled_from(CONFIG_KEYS), YAML_VALUES.map(str) | st.text(max_size=8)).map(
                "=".join
            )
            | st.text(max_size=12),
            max_size=2,
        ),
    )
    def run(content, overrides) -> None:
        path = tmp_path / "config.yaml"
        path.write_bytes(content)
        note(f"{content[:300]!r} {overrides!r}")
        try:
            config = load_training_config(path, overrides, settings=no_settings())
        except TrainingConfigError as exc:
            count("core", "load_training_config", "refused")
            assert_own_error(exc, TrainingConfigError)
            message = str(exc)
            # The file, an override or the key it sets is named.
            assert (
                str(path) in message
                or message.startswith("override ")
                or (any(message.startswith(o.partition("=")[0].strip()) for o in overrides))
            ), message
            return
        except Exception as exc:
            assert_own_error(exc, TrainingConfigError)
        count("core", "load_training_config", "loaded")
        assert isinstance(config, TrainingConfig)
        assert math.isfinite(config.training.learning_rate)

    run()


# ---- datasets ------------------------------------------------------------------------------

# With the separators JSON leaves unescaped but str.splitlines() splits at.
TURN_TEXT = st.lists(
    st.text(st.characters(codec="utf-8"), max_size=10)
    | st.sampled_from(["\u2028", "\u2029", "\x85", "\x1c", "\r", "\x00", "🙂"]),
    max_size=3,
).map("".join)
# Lines that broke a loader once: an unhashable role, an integer too long to convert,
# nesting too deep for the parser, NaN, a lone surrogate.
BAD_LINES = [
    b'{"conversations": [{"from": ["human"], "value": "hi"}]}',
    b'{"messages": [{"role": {"a": 1}, "content": "hi"}]}',
    b'{"instruction": "a", "output": "b", "input": 1' + b"0" * 5000 + b"}",
    b"[" * 100_000,
    b'{"instruction": NaN, "output": "b"}',
    b'{"instruction": "\\ud800", "output": "b"}',
    b"\xff\xfe",
]


@st.composite
def records(draw, broken: bool = False):
    """A valid record in one of the three formats; with ``broken``, one changed somewhere
    (which may or may not make it invalid) or any JSON value at all."""
    kind = draw(st.sampled_from(["openai", "sharegpt", "alpaca"] + ["junk"] * broken))
    pairs = draw(st.lists(st.tuples(TURN_TEXT, TURN_TEXT), min_size=1, max_size=3))
    if kind == "openai":
        record = {"messages": history_of(pairs)}
        if draw(st.booleans()):
            record["messages"].insert(0, {"role": "system", "content": draw(TURN_TEXT)})
    elif kind == "sharegpt":
        names = {"user": "human", "assistant": "gpt"}
        turns = [{"from": names[m["role"]], "value": m["content"]} for m in history_of(pairs)]
        record = {"conversations": turns}
    elif kind == "alpaca":
        words = TURN_TEXT.filter(str.strip)
        record = {"instruction": draw(words), "input": draw(TURN_TEXT), "output": draw(words)}
    else:
        return draw(YAML_VALUES)
    if broken:  # change one value anywhere in it
        node = record
        while True:
            keys = sorted(node) if isinstance(node, dict) else range(len(node))
            key = draw(st.sampled_from(keys))
            child = node[key]
            if not isinstance(child, dict | list) or not child or draw(st.booleans()):
                node[key] = draw(YAML_VALUES)
                break
            node = child
    return record


def texts_of(record: dict) -> list[str]:
    """The texts a valid record holds, in order (what its Example must hold)."""
    if "messages" in record:
        return [m["content"] for m in record["messages"]]
    if "conversations" in record:
        return [m["value"] for m in record["conversations"]]
    extra = record["input"]
    prompt = record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
    return [prompt, record["output"]]


SUFFIXES = [".jsonl", ".json"]


def dataset_text(parts: list[bytes], suffix: str) -> bytes:
    if suffix == ".jsonl":
        return b"".join(part + b"\n" for part in parts)
    return b"[" + b",\n".join(parts) + b"]"


def test_valid_datasets_load_every_record_exactly(tmp_path):
    """Any text (line separators, NUL, emoji...) in any of the formats, in .jsonl or .json."""

    @PROPERTY_SETTINGS
    @given(items=st.lists(records(), min_size=1, max_size=5), suffix=st.sampled_from(SUFFIXES))
    def run(items, suffix) -> None:
        count("core", f"load_examples valid ({suffix})")
        path = tmp_path / f"valid{suffix}"
        parts = [json.dumps(item, ensure_ascii=False).encode() for item in items]
        path.write_bytes(dataset_text(parts, suffix))
        loaded = load_examples(str(path))
        assert len(loaded) == len(items)
        for example, item in zip(loaded, items, strict=True):
            texts = [example.system_prompt] * (example.system_prompt is not None)
            assert texts + [m["content"] for m in example.messages] == texts_of(item)

    run()


def test_broken_datasets_name_the_file_and_the_line(tmp_path):
    """Valid records with one bad record or line among them, or the file cut short or
    replaced by random bytes: loads (if the change did no harm) or raises DatasetError
    naming the file, and for JSON Lines the bad line."""

    @PROPERTY_SETTINGS
    @given(
        items=st.lists(records(), max_size=4),
        bad=st.one_of(
            records(broken=True).map(lambda r: json.dumps(r, ensure_ascii=False).encode()),
            st.sampled_from(BAD_LINES),
            st.binary(max_size=40).filter(lambda b: b"\n" not in b and b.strip()),
        ),
        position=st.integers(0, 4),
        suffix=st.sampled_from(SUFFIXES),
        damage=st.sampled_from(["bad record", "truncate", "bytes"]),
        cut=st.floats(0, 1),
    )
    def run(items, bad, position, suffix, damage, cut) -> None:
        path = tmp_path / f"broken{suffix}"
        parts = [json.dumps(item, ensure_ascii=False).encode() for item in items]
        position = min(position, len(parts))
        if damage == "bad record":
            parts.insert(position, bad)
            data = dataset_text(parts, suffix)
        elif damage == "truncate":
            data = dataset_text(parts, suffix)
            data = data[: int(len(data) * cut)]
        else:
            data = bad
        path.write_bytes(data)
        note(repr(data[:500]))
        try:
            loaded = load_examples(str(path))
        except Exception as exc:
            count("core", f"load_examples broken ({suffix})", "refused")
            assert_own_error(exc, DatasetError)
            assert str(exc).startswith(str(path)), str(exc)
            if damage == "bad record" and suffix == ".jsonl":
                assert str(exc).startswith(f"{path}:{position + 1}: "), str(exc)
            return
        count("core", f"load_examples broken ({suffix})", "loaded")
        for example in loaded:  # text a tokenizer can take
            for text in [example.system_prompt or ""] + [m["content"] for m in example.messages]:
                assert not has_surrogate(text), example.where

    run()


@pytest.fixture(scope="module")
def datasets_cache(tmp_path_factory):
    """HF datasets caches what it reads: keep that out of the user's cache."""
    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-cache"))
        yield


FILE_NUMBERS = itertools.count()


def test_parquet_datasets_load_or_name_the_file(tmp_path, datasets_cache):
    import pandas as pd

    @settings(PROPERTY_SETTINGS, max_examples=max(EXAMPLES // 6, 5))  # each read is slow
    @given(
        items=st.lists(
            st.one_of(records(), records(broken=True).filter(lambda r: isinstance(r, dict))),
            min_size=1,
            max_size=4,
        ),
        damage=st.sampled_from(["none", "truncate", "bytes"]),
        cut=st.floats(0, 1),
        junk=st.binary(max_size=60),
    )
    def run(items, damage, cut, junk) -> None:
        path = tmp_path / f"data{next(FILE_NUMBERS)}.parquet"  # datasets caches by path
        try:
            pd.DataFrame(items).to_parquet(path)
        except Exception:
            assume(False)  # pyarrow cannot store these mixed types: not our loader's input
        data = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(data[: int(len(data) * cut)])
        elif damage == "bytes":
            path.write_bytes(junk)
        try:
            loaded = load_examples(str(path))
        except Exception as exc:
            count("core", "load_examples (.parquet)", "refused")
            assert_own_error(exc, DatasetError)
            assert str(exc).startswith(str(path)), str(exc)
            return
        count("core", "load_examples (.parquet)", "loaded")
        assert loaded

    run()


# ---- conversation files --------------------------------------------------------------------


@st.composite
def conversation_files(draw) -> bytes:
    pairs = draw(st.lists(st.tuples(TURN_TEXT, TURN_TEXT), max_size=3))
    data = {
        "version": 1,
        "id": draw(st.text(max_size=10)),
        "system_prompt": draw(st.none() | TURN_TEXT),
        "messages": history_of(pairs),
        "params": draw(st.dictionaries(st.sampled_from(FIELDS), YAML_VALUES, max_size=2)),
    }
    for key in draw(st.lists(st.sampled_from(sorted(data)), max_size=2)):
        data[key] = draw(YAML_VALUES)
    text = json.dumps(data, ensure_ascii=False).encode()
    damage = draw(st.sampled_from(["none", "none", "truncate", "bytes", "special"]))
    if damage == "truncate":
        return text[: draw(st.integers(0, len(text)))]
    if damage == "bytes":
        return draw(st.binary(max_size=100))
    if damage == "special":
        return draw(
            st.sampled_from(
                [b"", b"null", b"[" * 100_000, b'{"messages": [], "id": 1' + b"0" * 5000 + b"}"]
            )
        )
    return text


def test_conversation_files_load_or_name_the_file(tmp_path):
    @PROPERTY_SETTINGS
    @given(content=conversation_files())
    def run(content) -> None:
        path = tmp_path / "conversation.json"
        path.write_bytes(content)
        note(repr(content[:300]))
        try:
            conversation, params = load_conversation_file(path)
        except Exception as exc:
            count("core", "load_conversation_file", "refused")
            assert_own_error(exc, ConversationFileError)
            assert str(path) in str(exc), str(exc)
            return
        count("core", "load_conversation_file", "loaded")
        assert isinstance(params, dict)
        assert len(conversation.messages) % 2 == 0

    run()


def test_conversations_with_any_text_round_trip_or_are_refused(tmp_path):
    @PROPERTY_SETTINGS
    @given(system=st.none() | ANY_TEXT, pairs=st.lists(st.tuples(ANY_TEXT, ANY_TEXT), max_size=2))
    def run(system, pairs) -> None:
        path = tmp_path / "saved.json"
        conversation = Conversation(system_prompt=system, messages=history_of(pairs))
        try:
            save_conversation_file(path, conversation, {"temperature": 0.5})
        except Exception as exc:
            count("core", "save/load conversation", "refused")
            assert_own_error(exc, ConversationFileError)
            assert has_surrogate(system or "") or any(has_surrogate(a + b) for a, b in pairs)
            return
        count("core", "save/load conversation", "round trip")
        assert load_conversation_file(path) == (conversation, {"temperature": 0.5})

    run()

import pytest
from transformers import AutoTokenizer

from src.chat.streaming import REPLACEMENT_CHAR, IncrementalDecoder, StopSequenceFilter

pytestmark = [pytest.mark.unit, pytest.mark.timeout(180)]

TEXTS = [
    "Hello, world!",
    "Emoji 🌸🎉 and accents: héllo, naïve, Ærøskøbing",
    "中文字符和日本語のテキスト",
    "mixed  spaces\n\nnew lines\tand tabs",
    "👩‍👩‍👧‍👦 family, 🇫🇷 flag",
]


@pytest.fixture(params=["gpt2", "smollm2"])
def tokenizer(request, gpt2_tokenizer_path):
    if request.param == "gpt2":
        return AutoTokenizer.from_pretrained(gpt2_tokenizer_path)
    return AutoTokenizer.from_pretrained(request.getfixturevalue("bundled_model_path"))


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoding_reassembles_text_without_broken_characters(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(token_id) for token_id in ids] + [decoder.flush()]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert all(REPLACEMENT_CHAR not in delta for delta in deltas)


def test_an_emoji_split_over_tokens_is_held_back_until_complete(gpt2_tokenizer_path):
    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_path)
    ids = tokenizer.encode("🌸", add_special_tokens=False)
    assert len(ids) > 1  # byte-level BPE splits it: the case this class exists for
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(token_id) for token_id in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🌸"


def test_special_tokens_are_not_shown(gpt2_tokenizer_path):
    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_path)
    decoder = IncrementalDecoder(tokenizer)
    text = "".join(decoder.push(i) for i in tokenizer.encode("Hi") + [tokenizer.eos_token_id])
    assert text == "Hi"


def test_stop_sequence_split_across_pieces_is_never_shown():
    stops = StopSequenceFilter(["\nUser:"])
    shown = [stops.push(piece) for piece in ["Sure", ", here", "\nUs", "er", ": more"]]
    assert "".join(shown) == "Sure, here"
    assert stops.stopped and stops.matched == "\nUser:"
    assert stops.push("anything") == "" and stops.flush() == ""


def test_text_held_as_a_possible_stop_prefix_is_released_when_it_is_not_one():
    stops = StopSequenceFilter(["###"])
    assert stops.push("a #") == "a "
    assert stops.push("# b") == "## b"  # "## b" cannot become "###": all of it is shown
    assert not stops.stopped
    assert stops.flush() == ""


def test_stop_filter_releases_held_text_at_the_end():
    stops = StopSequenceFilter(["###"])
    assert stops.push("ends with ##") == "ends with "
    assert stops.flush() == "##"


def test_earliest_of_several_stop_sequences_wins():
    stops = StopSequenceFilter(["END", "\n\n"])
    assert stops.push("one\n\ntwo END") == "one"
    assert stops.matched == "\n\n"  # which one ended it (Anthropic's stop_sequence)

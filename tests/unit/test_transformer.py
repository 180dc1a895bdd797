"""The from-scratch transformer: exact against Hugging Face, and its properties."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from src.models.transformer import (
    KVCache,
    RotaryEmbedding,
    Transformer,
    TransformerConfig,
    apply_rotary,
    apply_rotary_rolled,
    attention_bias,
    signed_sin,
)
from tests.conftest import TINY_FAMILIES

pytestmark = [pytest.mark.unit, pytest.mark.timeout(180)]

PROMPTS = [
    "What is the capital of France?",
    "Hi",
    "A longer prompt, so that the batch needs padding on the left of the shorter ones.",
]


def padded_batch(tokenizer, texts, pad_id):
    encoded = [tokenizer.encode(text) for text in texts]
    length = max(map(len, encoded))
    ids = torch.tensor([[pad_id] * (length - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (length - len(e)) + [1] * len(e) for e in encoded])
    return ids, mask


@pytest.fixture(params=["tiny_gpt2_path", "tiny_llama_path", *sorted(TINY_FAMILIES)])
def pair(request):
    """(Hugging Face model, our model on the same weights, tokenizer), for every family."""
    if request.param in TINY_FAMILIES:
        folder = request.getfixturevalue("tiny_family_paths")[request.param]
    else:
        folder = request.getfixturevalue(request.param)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return hf, Transformer.from_hf(hf), AutoTokenizer.from_pretrained(folder)


def test_logits_equal_hugging_face_on_a_padded_batch(pair):
    hf, ours, tokenizer = pair
    ids, mask = padded_batch(tokenizer, PROMPTS, tokenizer.eos_token_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        actual = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(actual[real], expected[real], atol=1e-4)


def test_greedy_generation_equals_hugging_face_token_for_token(pair):
    hf, ours, tokenizer = pair
    stop = {tokenizer.eos_token_id}
    for text in PROMPTS:
        prompt = tokenizer.encode(text)
        expected = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=list(stop),
            pad_token_id=tokenizer.eos_token_id,
        )
        assert list(ours.generate(prompt, 32, stop_token_ids=stop)) == (
            expected[0, len(prompt) :].tolist()
        )


def test_from_a_folder_too(tiny_gpt2_path):
    model = Transformer.from_hf(tiny_gpt2_path)
    assert model.config.n_layer == 2 and model.config.positions == "learned"


def test_kv_cache_gives_the_same_logits_as_recomputing(pair):
    _, ours, tokenizer = pair
    ids = torch.tensor([tokenizer.encode(PROMPTS[2])])
    with torch.no_grad():
        full = ours(ids).logits
        cache = KVCache(ours.config.n_layer)
        first = ours(ids[:, :5], cache=cache, use_cache=True).logits
        steps = [
            ours(ids[:, t : t + 1], cache=cache, use_cache=True).logits
            for t in range(5, ids.shape[1])
        ]
    incremental = torch.cat([first, *steps], dim=1)
    # One-token steps take another attention kernel (grouped queries, no mask): same maths,
    # another summation order, so fp32 rounding differs in the fifth decimal.
    assert torch.allclose(incremental, full, atol=1e-4)


def test_a_later_token_never_changes_earlier_logits(pair):
    _, ours, tokenizer = pair
    ids = torch.tensor([tokenizer.encode(PROMPTS[2])])
    changed = ids.clone()
    changed[0, 10] = (changed[0, 10] + 1) % ours.config.vocab_size
    with torch.no_grad():
        before, after = ours(ids).logits, ours(changed).logits
    assert torch.equal(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_fused_sdpa_equals_written_out_attention(pair):
    _, ours, tokenizer = pair
    ids, mask = padded_batch(tokenizer, PROMPTS, tokenizer.eos_token_id)
    with torch.no_grad():
        fast = ours(ids, attention_mask=mask).logits
        slow = ours(ids, attention_mask=mask, sdpa=False).logits
    assert torch.allclose(fast[mask.bool()], slow[mask.bool()], atol=1e-4)


def test_attention_weights_are_causal_probabilities(pair):
    _, ours, tokenizer = pair
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        output = ours(ids, output_attentions=True, output_hidden_states=True)
    T = ids.shape[1]
    assert len(output.attentions) == ours.config.n_layer
    assert len(output.hidden_states) == ours.config.n_layer + 1
    weights = output.attentions[0]
    assert weights.shape == (1, ours.config.n_head, T, T)
    assert torch.allclose(weights.sum(-1), torch.ones(1, ours.config.n_head, T), atol=1e-5)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    assert weights[..., future].abs().max() == 0


def test_generate_streams_and_seeded_sampling_is_reproducible(tiny_llama_path):
    model = Transformer.from_hf(tiny_llama_path)
    stream = model.generate([1, 2, 3], max_new_tokens=5)
    assert isinstance(next(stream), int)  # a generator: tokens come one at a time
    sample = {"max_new_tokens": 12, "temperature": 1.0, "top_k": 50, "seed": 3}
    first = list(model.generate([1, 2, 3], **sample))
    assert first == list(model.generate([1, 2, 3], **sample))
    assert first != list(model.generate([1, 2, 3], **{**sample, "seed": 4}))
    greedy = list(model.generate([1, 2, 3], max_new_tokens=12))
    stopped = list(model.generate([1, 2, 3], max_new_tokens=12, stop_token_ids={greedy[3]}))
    assert stopped == greedy[: greedy.index(greedy[3]) + 1]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"n_embd": 30, "n_head": 4}, "n_embd=30 is not divisible by n_head=4"),
        ({"n_head": 4, "n_kv_head": 3}, "n_head=4 is not divisible by n_kv_head=3"),
        ({"n_head": 4, "n_kv_head": 0}, "n_kv_head=0"),
        ({"n_layer": 0}, "n_layer must be a positive integer, got 0"),
        ({"norm": "batchnorm"}, "norm='batchnorm'; allowed: layernorm, rmsnorm"),
        ({"positions": "rope", "head_dim": 5}, "rotary_dim=5 must be even and at most head_dim"),
        ({"positions": "rope", "rotary_dim": 10}, "rotary_dim=10 must be even and at most head_di"),
        ({"norm_eps": 0.0}, "norm_eps must be positive"),
    ],
)
def test_bad_configs_name_the_values(values, message):
    base = {"vocab_size": 100, "n_layer": 2, "n_head": 4, "n_embd": 32}
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**{**base, **values})


def test_unsupported_architectures_are_refused():
    from transformers import BertConfig

    with pytest.raises(ValueError, match="'bert': supported are gpt2, llama, mistral, qwen2"):
        TransformerConfig.from_hf(BertConfig())


def test_other_rope_scalings_are_refused_by_name():
    """Never a model that is silently different: such a model stays on transformers' engine."""
    from transformers import LlamaConfig

    yarn = {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0}
    with pytest.raises(ValueError, match="unsupported rope scaling 'yarn'"):
        TransformerConfig.from_hf(LlamaConfig(rope_parameters=yarn))


def test_sliding_windows_are_read_as_transformers_applies_them():
    from transformers import MistralConfig, Qwen2Config

    mistral = TransformerConfig.from_hf(MistralConfig(sliding_window=64, num_hidden_layers=3))
    assert (mistral.attention_window, mistral.windowed_layers) == (64, (0, 1, 2))
    assert TransformerConfig.from_hf(MistralConfig(sliding_window=None)).windowed_layers == ()
    qwen = Qwen2Config(sliding_window=64, num_hidden_layers=4, max_window_layers=2)
    assert TransformerConfig.from_hf(qwen).windowed_layers == ()  # use_sliding_window is off
    qwen = Qwen2Config(
        use_sliding_window=True, sliding_window=64, num_hidden_layers=4, max_window_layers=2
    )
    assert TransformerConfig.from_hf(qwen).windowed_layers == (2, 3)


def test_a_window_hides_keys_counted_in_real_tokens():
    # Row 0: two padding positions then 4 tokens; row 1: a token, padding inside, 3 tokens.
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 0, 0, 1, 1, 1]])
    allowed = attention_bias(attention_mask, 2, torch.float32, window=2)[:, 0] == 0
    assert allowed[0].tolist() == [[False] * 3 + [True, True, False], [False] * 4 + [True] * 2]
    assert allowed[1].tolist() == [[False] * 3 + [True, True, False], [False] * 4 + [True] * 2]
    with pytest.raises(ValueError, match="attention_window must be positive"):
        TransformerConfig(vocab_size=8, n_layer=1, n_head=1, n_embd=8, attention_window=0)


@pytest.mark.parametrize("kind", sorted(TINY_FAMILIES))
def test_every_family_loads_from_its_folder_without_transformers(tiny_family_paths, kind):
    """The fast start-up path (config.json and safetensors read directly) builds the same
    model as going through transformers: the same logits."""
    folder = tiny_family_paths[kind]
    direct, through_hf = Transformer.from_folder(folder), Transformer.from_hf(folder)
    assert direct.config == through_hf.config
    ids = torch.tensor([[5, 17, 300, 42, 7, 99]])
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, through_hf(ids).logits)


def test_sequences_longer_than_the_positions_are_refused(tiny_gpt2_path):
    model = Transformer.from_hf(tiny_gpt2_path)
    with pytest.raises(ValueError, match="longer than max_position_embeddings=128"):
        model(torch.zeros(1, 129, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rolled_rotary_equals_the_textbook_one_bit_for_bit(dtype):
    torch.manual_seed(3)
    x = (torch.randn(2, 5, 7, 64) * 4).to(dtype)  # (B, heads, T, hs)
    cos, sin = (part.to(dtype) for part in RotaryEmbedding(64, 10_000.0)(torch.arange(7)[None]))
    assert torch.equal(apply_rotary_rolled(x, cos, signed_sin(sin)), apply_rotary(x, cos, sin))

"""The rotary embedding and KV-cache write in C (src/models/kernels/rope_cache.c, ROPE_KERNEL):
bit for bit the numbers of PyTorch's operations, for one new token or several, one row or a
padded batch, across the cache's growth; used only where it applies; a machine that cannot
build it keeps PyTorch's operations, never an error."""

import logging

import pytest
import torch

from src.models import native
from src.models.rope_kernel import load_rope_kernel, use_rope_kernel
from src.models.single_steps import single_steps
from src.models.transformer import KV_BLOCK, Attention, KVCache, Transformer, TransformerConfig

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kernel_cache")
    if load_rope_kernel(folder) is None:
        pytest.skip("no C compiler here to build the kernel")
    return folder


def tiny_model(**changes) -> Transformer:
    torch.manual_seed(0)
    settings = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                    intermediate_size=128, positions="rope", norm="rmsnorm", mlp="swiglu",
                    max_position_embeddings=256, attention_bias=True)  # fmt: skip
    return Transformer(TransformerConfig(**{**settings, **changes})).eval().to(torch.bfloat16)


def decode(model: Transformer, setting: str, cache_dir, new_tokens: list[int]) -> list:
    """Logits of a padded two-row prompt, then of one-token steps, then of a three-token pass
    in single steps (as prompt lookup verifies drafts), with ROPE_KERNEL=``setting``."""
    use_rope_kernel(model, setting, cache_dir)
    prompt = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # the second row is padded on the left
    cache, logits = KVCache(model.config.n_layer), []
    with torch.no_grad():
        logits.append(model(prompt, attention_mask=mask, cache=cache).logits)
        for token in new_tokens:
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            step = torch.full((2, 1), token)
            logits.append(model(step, attention_mask=mask, cache=cache).logits)
        mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
        with single_steps():
            logits.append(model(torch.tensor([[5, 6, 7]] * 2), attention_mask=mask,
                                cache=cache).logits)  # fmt: skip
    return logits


def test_the_c_rotation_and_cache_write_give_pytorchs_numbers_bit_for_bit(kernel_cache):
    model = tiny_model()
    # Enough steps to outgrow the prompt's cache buffer (KV_BLOCK positions), so the C
    # function writes into grown buffers too.
    tokens = [(3 * i) % 64 for i in range(KV_BLOCK + 4)]
    ours = decode(model, "auto", kernel_cache, tokens)
    assert all(layer.rope_kernel is not None for layer in model.modules()
               if isinstance(layer, Attention))  # fmt: skip
    theirs = decode(model, "pytorch", kernel_cache, tokens)
    for mine, reference in zip(ours, theirs, strict=True):
        assert torch.equal(mine, reference)


def test_the_c_function_writes_the_cache_pytorch_would(kernel_cache):
    """The keys and values it leaves in the cache are the ones PyTorch's path stores."""
    model = tiny_model()
    caches = {}
    for setting in ("auto", "pytorch"):
        use_rope_kernel(model, setting, kernel_cache)
        cache = KVCache(model.config.n_layer)
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3, 4]]), cache=cache)
            model(torch.tensor([[9]]), cache=cache)
        caches[setting] = cache
    for mine, reference in zip(caches["auto"].layers, caches["pytorch"].layers, strict=True):
        assert mine.length == reference.length == 5
        assert torch.equal(mine.keys, reference.keys) and torch.equal(mine.values, reference.values)


def test_rope_kernel_setting_applies_to_whole_head_rotation_without_head_norms(kernel_cache):
    assert use_rope_kernel(tiny_model(), "auto", kernel_cache)
    assert not use_rope_kernel(tiny_model(), "pytorch", kernel_cache)
    # Partial rotary (Phi-3's, StableLM's) and per-head norms (Qwen3) keep PyTorch's path.
    assert not use_rope_kernel(tiny_model(rotary_dim=8), "auto", kernel_cache)
    assert not use_rope_kernel(tiny_model(qk_norm=True), "auto", kernel_cache)


def test_fp32_and_gradients_keep_pytorchs_path(kernel_cache):
    """The kernel is for bf16 decoding: an fp32 model, or training's forward pass (which
    needs the backward pass), goes through PyTorch's operations."""
    model = tiny_model()
    use_rope_kernel(model, "auto", kernel_cache)
    attention = model.blocks[0].attention
    cache = KVCache(model.config.n_layer)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
    qkv = torch.zeros(1, 1, 8 * 16, dtype=torch.bfloat16)
    rotary = (torch.ones(1, 1, 1, 16), torch.zeros(1, 1, 1, 16))
    with torch.no_grad():
        assert attention.rotates_into_cache(qkv, rotary, cache, written_out=False)
        assert not attention.rotates_into_cache(qkv.float(), rotary, cache, written_out=False)
        assert not attention.rotates_into_cache(qkv, rotary, cache, written_out=True)
        assert not attention.rotates_into_cache(qkv, rotary, KVCache(2), written_out=False)
    assert not attention.rotates_into_cache(qkv, rotary, cache, written_out=False)


def test_a_failed_build_keeps_pytorchs_rotation(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(native, "compiler", lambda: "/bin/false")  # exits 1, builds nothing
    load_rope_kernel.cache_clear()
    with caplog.at_level(logging.INFO, logger="src.models.rope_kernel"):
        assert not use_rope_kernel(tiny_model(), "auto", tmp_path)
    assert "the build failed" in caplog.text
    load_rope_kernel.cache_clear()

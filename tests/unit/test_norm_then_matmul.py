"""Each block's norms in the C call of the product after them (src/models/kernels/
norm_then_matmul.c, part of NORM_KERNEL): the numbers of the separate steps bit for bit (the
residual addition, the C norm, our int4 or int8 kernel), in a model's prompt pass, its
decoding steps and a padded batch; used only where both the norm and the product are ours."""

import logging

import pytest
import torch

from src.models import native
from src.models.int8_kernel import load_int8_kernel
from src.models.lora_wrapper import LoRALinear
from src.models.native import use_kernels
from src.models.norm_kernel import fusable, load_norm_kernel, load_norm_then_matmul
from src.models.quantize import Int4Linear, Int8DynamicLinear, Int8Linear
from src.models.transformer import Block, KVCache, RMSNorm
from tests.kernel_checks import tiny_quantized_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def fused(kernel_cache):
    function = load_norm_then_matmul(kernel_cache)
    if function is None or load_norm_kernel(kernel_cache) is None:
        pytest.skip("no C compiler here to build the kernels")
    return function


def model_with_our_kernels(method: str, kernel_cache) -> torch.nn.Module:
    torch.manual_seed(0)
    # Llama's layers: no biases (a layer with a bias keeps its own call).
    model = tiny_quantized_model(method, layers=2, attention_bias=False, mlp_bias=False).eval()
    with torch.no_grad():  # norms that are not all ones, so that the weighting counts
        for norm in model.modules():
            if isinstance(norm, RMSNorm):
                norm.weight.copy_(torch.randn_like(norm.weight) * 0.3 + 1)
    in_use = use_kernels(model, kernel_cache)
    if not any(method in kernel for kernel in in_use):
        pytest.skip(f"no {method} kernel of ours runs on this CPU")
    return model


@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 70])  # 64 and up: the norm splits rows between threads
def test_one_call_gives_the_separate_steps_numbers_bit_for_bit(fused, kernel_cache, method, rows):
    model = model_with_our_kernels(method, kernel_cache)
    block = model.blocks[0]
    norm, layer = block.norm2, block.mlp.gate_up
    x = (torch.randn(rows, 64) * torch.rand(rows, 1) * 8).bfloat16()
    delta = torch.randn(rows, 64).bfloat16()
    with torch.no_grad():
        total = x + delta  # PyTorch's bf16 addition
        expected = layer(norm(total))  # the C norm, then our kernel, in two calls
        ours, our_total = fused(norm, layer, x, delta)
        alone, same_x = fused(norm, layer, x)
    assert torch.equal(our_total, total) and torch.equal(ours, expected)
    assert same_x is x and torch.equal(alone, layer(norm(x)))
    assert ours.shape == (rows, layer.out_features) and ours.dtype == torch.bfloat16


def logits_of(model: torch.nn.Module) -> list[torch.Tensor]:
    """A padded two-row prompt, then three one-token steps, then one row alone."""
    prompt = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    cache, logits = KVCache(model.config.n_layer), []
    with torch.no_grad():
        logits.append(model(prompt, attention_mask=mask, cache=cache).logits)
        for token in (5, 17, 33):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            step = torch.full((2, 1), token)
            logits.append(model(step, attention_mask=mask, cache=cache).logits)
        logits.append(model(prompt[:1]).logits)
    return logits


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_a_model_gives_the_same_logits_fused_or_not(fused, kernel_cache, method, monkeypatch):
    model = model_with_our_kernels(method, kernel_cache)
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    assert all(block.norm_then_matmul is fused for block in blocks)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1])
        return fused(*args, **kwargs)

    for block in blocks:
        monkeypatch.setattr(block, "norm_then_matmul", counted)
    ours = logits_of(model)
    # Two fused calls per block and pass: qkv after norm1, gate-up after norm2.
    assert len(calls) == 5 * 2 * len(blocks)
    assert {id(layer) for layer in calls} == {
        id(layer) for block in blocks for layer in (block.attention.qkv, block.mlp.gate_up)
    }
    for block in blocks:
        monkeypatch.setattr(block, "norm_then_matmul", None)
    theirs = logits_of(model)
    for mine, reference in zip(ours, theirs, strict=True):
        assert torch.equal(mine, reference)


def test_only_where_both_the_norm_and_the_product_are_ours(fused, kernel_cache):
    model = model_with_our_kernels("int4", kernel_cache)
    block = model.blocks[0]
    x = torch.randn(1, 1, 64).bfloat16()
    with torch.no_grad():
        assert block.fuses(x) and not block.fuses(x.float())
    assert not block.fuses(x)  # gradients: training needs PyTorch's norm and its backward
    qkv = block.attention.qkv
    assert isinstance(qkv, Int4Linear) and fusable(qkv)
    # A LoRA adapter on the layer, PyTorch's int4 kernel, or PyTorch's norm: no fusion.
    adapted = LoRALinear.around(qkv, torch.zeros(4, 64), torch.zeros(qkv.out_features, 4))
    assert not fusable(adapted)
    kernel, qkv.kernel = qkv.kernel, None
    assert not fusable(qkv)
    with torch.no_grad():
        assert not block.fuses(x)
    qkv.kernel, block.norm1.kernel = kernel, None
    assert fusable(qkv)
    with torch.no_grad():
        assert not block.fuses(x)
        assert block(x, None, None, None, False)[0].shape == x.shape


def test_a_layer_whose_product_depends_on_its_rows_stays_in_its_own_call(kernel_cache):
    """The output layer (Int8DynamicLinear) may round its rows to int8 from a few on: only
    its own call decides, so it never takes part."""
    layer = Int8DynamicLinear.from_linear(torch.nn.Linear(64, 64, bias=False))
    layer.kernel = load_int8_kernel(kernel_cache)
    assert not fusable(layer)


def test_int8_layers_take_part_where_our_int8_kernel_runs(kernel_cache):
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 64, bias=False))
    layer.kernel = load_int8_kernel(kernel_cache)
    if layer.kernel is None:
        pytest.skip("our int8 kernel does not run on this CPU")
    assert fusable(layer)
    layer.scales = layer.scales.float()  # scales our kernel cannot read
    assert not fusable(layer)


def test_a_failed_build_keeps_the_norms_in_calls_of_their_own(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(native, "compiler", lambda: "/bin/false")  # exits 1, builds nothing
    load_norm_then_matmul.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="src.models.norm_kernel"):
            assert load_norm_then_matmul(tmp_path) is None
        assert "the build failed" in caplog.text
    finally:
        load_norm_then_matmul.cache_clear()

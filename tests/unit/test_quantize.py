"""Weight-only int8/int4 layers: they multiply like the weights they store, int4 stores
4-bit-grid weights (as in a Q4_1 file) exactly, and quantize_model swaps the right layers."""

import pytest
import torch
from torch import nn

from src.models.quantize import (
    INT8_ACTIVATION_MIN_ROWS,
    Int4Linear,
    Int8DynamicLinear,
    Int8Linear,
    fit_int4_groups,
    quantize_for_inference,
    quantize_model,
    resolve_quantization,
)
from src.models.transformer import Transformer, TransformerConfig


def q4_grid_linear(out_features: int, in_features: int, bias: bool = True) -> nn.Linear:
    """A layer whose weights lie on a Q4_1 grid: per 32 weights, scale * q + minimum with
    q in 0..15 using both ends (as after llama.cpp's quantisation)."""
    torch.manual_seed(0)
    groups = in_features // 32
    codes = torch.randint(0, 16, (out_features, groups, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15
    # Scales and minimums that bf16 holds exactly, so the only rounding left is the inputs'.
    scale = torch.randint(1, 8, (out_features, groups, 1)).float() / 64
    minimum = -torch.randint(0, 32, (out_features, groups, 1)).float() / 64
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.copy_((codes * scale + minimum).reshape(out_features, in_features))
    return layer


def test_int4_reproduces_weights_on_the_4_bit_grid_exactly():
    layer = q4_grid_linear(48, 96)
    x = torch.randn(3, 5, 96).bfloat16()  # bf16 inputs: what the kernel multiplies
    expected = layer(x.float())
    actual = Int4Linear.from_linear(layer)(x.float())
    assert actual.shape == (3, 5, 48) and actual.dtype == torch.float32
    # Only the bf16 rounding of products and sums remains.
    assert torch.allclose(actual, expected, rtol=2e-2, atol=2e-2)


def test_int4_groups_are_fitted_with_less_error_than_plain_rounding():
    """The searched scales and minimums are never worse than min/max rounding for any group,
    and on heavy-tailed weights (a trained layer's have outliers) clearly better overall."""
    torch.manual_seed(0)
    groups = (torch.distributions.StudentT(4.0).sample((256, 16, 32)) * 0.02).float()
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low) / 15
    plain_codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
    plain = (plain_codes * scale[..., None] + low[..., None] - groups).square().sum(-1)
    codes, scale, low = fit_int4_groups(groups)
    assert codes.min() >= 0 and codes.max() <= 15 and torch.equal(codes, codes.round())
    fitted = (codes * scale[..., None] + low[..., None] - groups).square().sum(-1)
    assert bool((fitted <= plain * (1 + 1e-6)).all())
    assert fitted.sum() < 0.9 * plain.sum()


@pytest.mark.parametrize("layer_class", [Int8Linear, Int4Linear])
def test_quantised_layers_stay_close_to_arbitrary_weights(layer_class):
    torch.manual_seed(1)
    layer = nn.Linear(64, 48)
    x = torch.randn(4, 64)
    expected = layer(x)
    actual = layer_class.from_linear(layer)(x)
    relative = (actual - expected).norm() / expected.norm()
    assert relative < (0.02 if layer_class is Int8Linear else 0.15), relative
    # The layer returns the dtype it was given.
    assert layer_class.from_linear(layer)(x.bfloat16()).dtype == torch.bfloat16


def test_quantize_model_swaps_linear_layers_and_keeps_the_output_layer_at_int8():
    config = TransformerConfig(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                               norm="rmsnorm", positions="rope", mlp="swiglu",
                               attention_bias=False, mlp_bias=False)  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(config).eval()
    ids = torch.randint(0, 96, (2, 7))
    before = model(ids).logits
    quantize_model(model, "int4")
    assert isinstance(model.blocks[0].attention.qkv, Int4Linear)
    assert isinstance(model.blocks[1].mlp.down, Int4Linear)
    assert isinstance(model.lm_head, Int8DynamicLinear)  # the most sensitive layer keeps 8 bits
    after = model(ids).logits
    assert after.shape == before.shape
    assert (after - before).norm() / before.norm() < 0.2
    # Greedy choices mostly survive even on random weights.
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.6


def test_layers_the_int4_kernel_cannot_take_are_kept():
    model = nn.Sequential(nn.Linear(40, 8), nn.Linear(8, 64))  # 40 and 8: not multiples of 32
    quantize_model(model, "int4")
    assert all(type(layer) is nn.Linear for layer in model)
    quantize_model(model, "int8")
    assert all(type(layer) is Int8Linear for layer in model)


def test_unknown_method_and_resolution_of_auto(bundled_model_path, tiny_llama_path):
    with pytest.raises(ValueError, match="QUANTIZE='int3'; allowed: none, int8, int4"):
        quantize_model(nn.Linear(32, 32), "int3")
    assert resolve_quantization("auto", bundled_model_path) == "int4"  # a Q4_1 GGUF file
    assert resolve_quantization("auto", tiny_llama_path) == "none"
    assert resolve_quantization("int8", tiny_llama_path) == "int8"
    layer = nn.Linear(32, 32)
    assert quantize_model(layer, "none") is layer


def test_a_lora_adapter_is_merged_before_quantising(tiny_llama_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    adapted = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter change something
            nn.init.normal_(parameter, std=0.5)
    ids = torch.randint(0, 1000, (1, 6))
    with torch.no_grad():
        expected = adapted(ids).logits
        merged_weight = adapted.merge_and_unload().model.layers[0].self_attn.q_proj.weight.clone()
    # merge_and_unload changed `adapted` in place; build it again for quantize_for_inference.
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    adapted = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.5)
    quantized = quantize_for_inference(adapted, "int8")
    q_proj = quantized.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Int8Linear)  # a plain quantised layer: the adapter is inside it
    dequantized = q_proj.weight_int8.float() * q_proj.scales.float()[:, None]
    assert torch.allclose(dequantized, merged_weight, atol=merged_weight.abs().max() / 100)
    with torch.no_grad():
        actual = quantized(ids).logits
    assert (actual - expected).norm() / expected.norm() < 0.05


def test_the_output_layer_quantises_each_row_on_its_own(monkeypatch):
    """Several rows (a batched decoding step) on a CPU with int8 dot products: int8
    activations with one scale per row, summed exactly in int32, so each request gets exactly
    the logits that row alone gives. One row (a single stream): the weight-only int8 product,
    exact bf16 activations."""
    monkeypatch.setattr("src.models.quantize.int8_dot_products", lambda: True)
    torch.manual_seed(0)
    layer = nn.Linear(64, 96, bias=False)
    quantised = Int8DynamicLinear.from_linear(layer)
    weight_only = Int8Linear.from_linear(layer)
    rows = torch.randn(INT8_ACTIVATION_MIN_ROWS + 4, 64, dtype=torch.bfloat16)
    rows[3] *= 50  # one row far larger than the others must not change their scales
    together = quantised(rows)
    alone = torch.cat([quantised.int8_product(row[None]) for row in rows]).bfloat16()
    assert torch.equal(together, alone)
    expected = layer(rows.float())
    relative = (together.float() - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert relative.max() < 0.03, relative
    assert not torch.equal(together, weight_only(rows))  # really the int8-activation product
    one_row = rows[:1]
    assert torch.equal(quantised(one_row), weight_only(one_row))


def test_without_int8_dot_products_the_output_layer_keeps_bf16_activations(monkeypatch):
    """Without VNNI, PyTorch's int8-by-int8 product is the slow one: every row count then
    takes the weight-only product."""
    monkeypatch.setattr("src.models.quantize.int8_dot_products", lambda: False)
    layer = nn.Linear(64, 96, bias=False)
    quantised, weight_only = Int8DynamicLinear.from_linear(layer), Int8Linear.from_linear(layer)
    rows = torch.randn(INT8_ACTIVATION_MIN_ROWS + 4, 64, dtype=torch.bfloat16)
    assert torch.equal(quantised(rows), weight_only(rows))

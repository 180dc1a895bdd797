"""Our int8 kernel (src/models/kernels/int8_avx2.c): the same products as PyTorch's int8 kernel
on the same weights and scales, for one row up to many, and as close to the exact product as
a bf16 result allows; INT8_KERNEL picks it per layer (the output layer included); and where
it cannot run, PyTorch's kernel stays, never an error."""

import logging

import pytest
import torch
from torch import nn

from src.models import cpu_info, int8_kernel, native
from src.models.int8_kernel import can_run, load_int8_kernel, unavailable_reason
from src.models.quantize import Int8DynamicLinear, Int8Linear, quantize_model, use_int8_kernel
from src.models.transformer import Transformer, TransformerConfig

pytestmark = pytest.mark.unit

needs_kernel = pytest.mark.skipif(
    unavailable_reason() is not None, reason=f"our int8 kernel cannot run: {unavailable_reason()}"
)


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
    """One cache folder for the product tests: the library is built once for all of them."""
    return tmp_path_factory.mktemp("kernel_cache")


def layer_with_known_weights(in_features: int, out_features: int, seed: int):
    """An Int8Linear and its weights exactly as the kernels read them, in fp64: the int8
    codes times the stored bf16 scale of their output column."""
    torch.manual_seed(seed)
    layer = Int8Linear.from_linear(nn.Linear(in_features, out_features, bias=False))
    return layer, layer.weight_int8.double() * layer.scales.double()[:, None]


def pytorch_product(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int8pack_mm(x, layer.weight_int8, layer.scales)


@needs_kernel
@pytest.mark.parametrize(("in_features", "out_features"), [(576, 1536), (1536, 576), (32, 8)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 17])
def test_our_kernel_multiplies_like_pytorchs(kernel_cache, in_features, out_features, rows):
    layer, _ = layer_with_known_weights(in_features, out_features, seed=rows)
    x = (torch.randn(rows, in_features) * 3).bfloat16()
    kernel = load_int8_kernel(kernel_cache)
    ours = kernel(x, layer.weight_int8, layer.scales).float()
    theirs = pytorch_product(layer, x).float()
    # Both round fp32 sums of the same products to bf16, summed in another order (ours with
    # the smallest activations rounded to 16-bit integers): at most one bf16 step apart, and
    # almost always equal.
    assert torch.allclose(ours, theirs, rtol=2**-7, atol=1e-3)
    assert (ours != theirs).float().mean() < 0.05
    # Each row on its own gives the same numbers as within the batch, wherever it sits.
    for row in range(rows):
        alone = kernel(x[row : row + 1], layer.weight_int8, layer.scales)
        assert torch.equal(alone.float(), ours[row : row + 1])


@needs_kernel
@pytest.mark.parametrize("rows", [1, 4])
def test_our_kernel_is_as_exact_as_a_bf16_result_allows(kernel_cache, rows):
    """Against the exact product (fp64) of the weights as stored, with activations whose
    magnitudes span 2^20 within each group of 32: every result is within half a bf16 step
    of the exact one, plus 2^-15 of each group's largest activation times its weights'
    magnitudes (the rounding to 16-bit integers), plus fp32 rounding."""
    layer, weight = layer_with_known_weights(576, 1536, seed=rows)
    magnitudes = 2.0 ** torch.randint(-20, 1, (rows, 576)).float()
    x = (torch.randn(rows, 576) * magnitudes).bfloat16()
    ours = load_int8_kernel(kernel_cache)(x, layer.weight_int8, layer.scales).double()
    exact = x.double() @ weight.T
    largest = x.double().abs().reshape(rows, -1, 32).amax(dim=-1)  # (rows, K / 32)
    activation_rounding = (largest * 2**-15) @ weight.abs().reshape(1536, -1, 32).sum(-1).T
    fp32_rounding = 2**-16 * (x.double().abs() @ weight.abs().T)
    bound = exact.abs() * 2**-8 + (activation_rounding + fp32_rounding) * 1.01
    assert ((ours - exact).abs() <= bound).all()


@needs_kernel
def test_our_kernel_keeps_zeros_nans_infs_and_extreme_magnitudes(kernel_cache):
    layer, weight = layer_with_known_weights(576, 64, seed=0)
    x = torch.randn(5, 576)
    x[0] = 0.0
    x[1, 100] = float("nan")
    x[4, 7] = float("inf")
    x[2] *= 1e-33  # activations near the bottom of bf16's range
    x[3] *= 1e36  # and near its top
    x = x.bfloat16()
    ours = load_int8_kernel(kernel_cache)(x, layer.weight_int8, layer.scales)
    theirs = pytorch_product(layer, x)
    assert torch.equal(ours[0], torch.zeros(64, dtype=torch.bfloat16))
    assert ours[1].isnan().all()  # a NaN spoils its own row, as in PyTorch's kernel
    assert torch.equal(ours[4].isinf(), theirs[4].isinf()) and ours[4].isinf().any()
    assert torch.equal(ours[4].isnan(), theirs[4].isnan())  # where a weight is 0: inf x 0
    exact = x.double() @ weight.T
    for row in (2, 3):
        scale = float(exact[row].abs().max())
        torch.testing.assert_close(ours[row].double(), exact[row], rtol=2**-7, atol=scale * 2**-7)


def tiny_int8_model() -> Transformer:
    config = TransformerConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=64,
                               intermediate_size=128, positions="rope", norm="rmsnorm",
                               mlp="swiglu", max_position_embeddings=64)  # fmt: skip
    return quantize_model(Transformer(config).to(torch.bfloat16), "int8")


@needs_kernel
def test_int8_kernel_setting_picks_the_kernel_of_each_layer_and_the_output_layer(tmp_path):
    model = tiny_int8_model()
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert isinstance(model.lm_head, Int8DynamicLinear)
    assert use_int8_kernel(model, "auto", tmp_path)
    assert {layer.kernel is not None for layer in layers} == {True}
    x = torch.randn(2, 3, 64).bfloat16()
    mlp_up = model.blocks[0].mlp.gate_up  # 64 -> 256
    ours, ours_logits = mlp_up(x), model.lm_head(x[:1, :1])  # one row: through our kernel
    assert ours.shape == (2, 3, 256) and ours.dtype == torch.bfloat16
    assert not use_int8_kernel(model, "pytorch", tmp_path)
    assert {layer.kernel is None for layer in layers} == {True}
    torch.testing.assert_close(ours.float(), mlp_up(x).float(), rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(
        ours_logits.float(), model.lm_head(x[:1, :1]).float(), rtol=2**-7, atol=1e-3
    )


def test_shapes_outside_whole_tasks_keep_pytorchs_kernel():
    assert can_run(49_152, 576) and can_run(8, 32)
    assert not can_run(12, 576)  # 8 output columns per task
    assert not can_run(64, 48)  # 32 inputs per power of two


def test_our_kernel_runs_where_pytorch_runs_its_avx2_kernel(monkeypatch):
    monkeypatch.setattr(cpu_info.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cpu_info.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_info, "cpu_flags", lambda: ["fpu", "avx2", "fma", "avx512f"])
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert unavailable_reason() is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert unavailable_reason() == (
        "PyTorch runs its AVX512 int8 kernel here; ours replaces its AVX2 one"
    )
    monkeypatch.setattr(cpu_info, "cpu_flags", lambda: ["fpu", "avx2"])
    assert unavailable_reason() == "this CPU lacks fma"
    monkeypatch.setattr(cpu_info.platform, "machine", lambda: "aarch64")
    assert "x86-64 Linux" in unavailable_reason()


def test_a_failed_build_falls_back_to_pytorchs_kernel(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(int8_kernel, "unavailable_reason", lambda: None)
    monkeypatch.setattr(native, "compiler", lambda: "/bin/false")  # exits 1, builds nothing
    load_int8_kernel.cache_clear()
    with caplog.at_level(logging.INFO, logger="src.models.int8_kernel"):
        assert load_int8_kernel(tmp_path) is None
    assert "the build failed" in caplog.text
    model = tiny_int8_model()
    assert not use_int8_kernel(model, "auto", tmp_path)
    assert model.lm_head(torch.randn(1, 64).bfloat16()).shape == (1, 64)
    load_int8_kernel.cache_clear()

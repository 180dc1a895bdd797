"""Our int8 kernel (src/models/kernels/int8_avx2.c): the same products as PyTorch's int8 kernel
on the same weights and scales, for one row up to many, and as close to the exact product as
a bf16 result allows; INT8_KERNEL picks it per layer (the output layer included); and where
it cannot run, PyTorch's kernel stays, never an error."""

import pytest
import torch
from torch import nn

from src.models import cpu_info, int8_kernel
from src.models.int8_kernel import can_run, load_int8_kernel, unavailable_reason
from src.models.quantize import Int8DynamicLinear, Int8Linear, use_int8_kernel
from src.models.transformer import Transformer
from tests import kernel_checks

pytestmark = pytest.mark.unit

needs_kernel = pytest.mark.skipif(
    unavailable_reason() is not None, reason=f"our int8 kernel cannot run: {unavailable_reason()}"
)


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
    ours = kernel(x, layer.weight_int8, layer.scales, layer.out_features).float()
    theirs = pytorch_product(layer, x).float()
    # Both round fp32 sums of the same products to bf16, summed in another order (ours with
    # the smallest activations rounded to 16-bit integers): at most one bf16 step apart, and
    # almost always equal.
    assert torch.allclose(ours, theirs, rtol=2**-7, atol=1e-3)
    assert (ours != theirs).float().mean() < 0.05
    # Each row on its own gives the same numbers as within the batch, wherever it sits.
    for row in range(rows):
        alone = kernel(x[row : row + 1], layer.weight_int8, layer.scales, layer.out_features)
        assert torch.equal(alone.float(), ours[row : row + 1])


@needs_kernel
@pytest.mark.parametrize("rows", [1, 4])
def test_our_kernel_is_as_exact_as_a_bf16_result_allows(kernel_cache, rows):
    """Activations whose magnitudes span 2^20 within each group of 32, which the kernel
    writes as 16-bit integers times a power of two."""
    layer, weight = layer_with_known_weights(576, 1536, seed=rows)
    x = kernel_checks.activations_spanning_2_to_the_20(rows, 576)
    ours = load_int8_kernel(kernel_cache)(x, layer.weight_int8, layer.scales, layer.out_features)
    kernel_checks.assert_within_bf16_of_exact(ours, x, weight)


@needs_kernel
def test_our_kernel_keeps_zeros_nans_infs_and_extreme_magnitudes(kernel_cache):
    layer, weight = layer_with_known_weights(576, 64, seed=0)
    x = kernel_checks.special_rows(576)
    ours = load_int8_kernel(kernel_cache)(x, layer.weight_int8, layer.scales, layer.out_features)
    kernel_checks.assert_special_rows_kept(ours, pytorch_product(layer, x), x.double() @ weight.T)


def tiny_int8_model() -> Transformer:
    return kernel_checks.tiny_quantized_model("int8")


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
    model = tiny_int8_model()
    kernel_checks.assert_a_failed_build_falls_back(
        int8_kernel,
        load_int8_kernel,
        use_int8_kernel,
        model,
        model.lm_head,
        tmp_path,
        monkeypatch,
        caplog,
    )

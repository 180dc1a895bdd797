"""Our int4 kernels (src/models/kernels/: int4_bf16.c for AVX-512 BF16, int4_avx2.c for AVX2
and FMA, whichever reads the packing PyTorch writes here): the same products as PyTorch's int4
kernel on the same packed weights, for one row up to many, and as close to the exact product
as a bf16 result allows; INT4_KERNEL picks it per layer; and a machine that cannot build or
run it falls back to PyTorch's kernel, never an error."""

import logging

import pytest
import torch
from torch import nn

from src.models import cpu_info, int4_kernel, native
from src.models.int4_kernel import can_run, load_int4_kernel, unavailable_reason
from src.models.quantize import Int4Linear, use_int4_kernel
from src.models.transformer import Transformer
from tests import kernel_checks

pytestmark = pytest.mark.unit

needs_kernel = pytest.mark.skipif(
    unavailable_reason() is not None, reason=f"our int4 kernel cannot run: {unavailable_reason()}"
)


def pytorch_product(layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        x, layer.packed, layer.group_size, layer.scales_and_offsets
    )


@needs_kernel
@pytest.mark.parametrize(("in_features", "out_features"), [(576, 960), (1536, 576), (64, 128)])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9, 37])
def test_our_kernel_multiplies_like_pytorchs(kernel_cache, in_features, out_features, rows):
    torch.manual_seed(rows)
    layer = Int4Linear.from_linear(nn.Linear(in_features, out_features, bias=False))
    x = (torch.randn(rows, in_features) * 3).bfloat16()
    kernel = load_int4_kernel(kernel_cache)
    ours = kernel(x, layer.packed, layer.scales_and_offsets, out_features).float()
    theirs = pytorch_product(layer, x).float()
    # Both round fp32 sums of the same products to bf16 (summed in another order; the AVX2
    # kernel also rounds the smallest activations to 16-bit integers): at most one bf16 step
    # apart, and almost always equal.
    assert torch.allclose(ours, theirs, rtol=2**-7, atol=1e-3)
    assert (ours != theirs).float().mean() < 0.05
    # Each row on its own gives the same numbers as within the batch, wherever it sits.
    for row in range(rows):
        alone = kernel(x[row : row + 1], layer.packed, layer.scales_and_offsets, out_features)
        assert torch.equal(alone.float(), ours[row : row + 1])


def layer_with_known_weights(in_features: int, out_features: int, seed: int):
    """An Int4Linear from random codes, scales and minimums, and its weights exactly as the
    kernels read them, in fp64: w = (q - 8) * scale + offset, with the stored bf16 scale and
    offset of each group."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_features, in_features), generator=generator)
    groups = in_features // 32
    scale = torch.rand(out_features, groups, generator=generator) * 0.02 + 0.001
    low = -8 * scale + torch.randn(out_features, groups, generator=generator) * 0.002
    layer = Int4Linear(in_features, out_features, bias=False)
    layer.store_groups(codes, scale, low)
    stored = layer.scales_and_offsets.double()  # (K / 32, N, 2)
    scales, offsets = (stored[..., i].T.repeat_interleave(32, dim=1) for i in (0, 1))
    return layer, (codes.double() - 8) * scales + offsets


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_our_kernel_is_as_exact_as_a_bf16_result_allows(kernel_cache, rows):
    """Activations whose magnitudes span 2^20 within each group of 32: the AVX2 kernel
    writes a group as 16-bit integers times a power of two, so it rounds the smallest."""
    layer, weight = layer_with_known_weights(576, 960, seed=rows)
    torch.manual_seed(rows)
    x = kernel_checks.activations_spanning_2_to_the_20(rows, 576)
    ours = load_int4_kernel(kernel_cache)(x, layer.packed, layer.scales_and_offsets, 960)
    kernel_checks.assert_within_bf16_of_exact(ours, x, weight)


@needs_kernel
def test_our_kernel_keeps_zeros_nans_infs_and_extreme_magnitudes(kernel_cache):
    layer, weight = layer_with_known_weights(576, 128, seed=0)
    torch.manual_seed(0)
    x = kernel_checks.special_rows(576)
    ours = load_int4_kernel(kernel_cache)(x, layer.packed, layer.scales_and_offsets, 128)
    kernel_checks.assert_special_rows_kept(ours, pytorch_product(layer, x), x.double() @ weight.T)


@needs_kernel
def test_a_layer_with_our_kernel_takes_any_leading_shape(kernel_cache):
    """The layer hands (B, T, K) inputs to the kernel as they are: the same numbers as the
    rows one by one, in the input's shape (the kernel must read K from the last dimension)."""
    torch.manual_seed(0)
    layer = Int4Linear.from_linear(nn.Linear(576, 960, bias=False))
    layer.kernel = load_int4_kernel(kernel_cache)
    x = torch.randn(2, 3, 576).bfloat16()
    y = layer(x)
    assert y.shape == (2, 3, 960) and y.dtype == torch.bfloat16
    rows = layer.kernel(x.reshape(6, 576), layer.packed, layer.scales_and_offsets, 960)
    assert torch.equal(y, rows.reshape(2, 3, 960))
    torch.testing.assert_close(y.float(), pytorch_product(layer, x.reshape(6, 576)).reshape(
        2, 3, 960).float(), rtol=2**-7, atol=1e-3)  # fmt: skip


@needs_kernel
def test_the_library_is_built_once_and_then_reused(tmp_path):
    load_int4_kernel(tmp_path)
    built = sorted((tmp_path / "kernels").glob(f"{int4_kernel.kernel_source().name}-*.so"))
    assert len(built) == 1
    modified = built[0].stat().st_mtime_ns
    load_int4_kernel.cache_clear()  # a new process: finds the library instead of building
    assert load_int4_kernel(tmp_path) is not None
    assert built[0].stat().st_mtime_ns == modified


def tiny_int4_model() -> Transformer:
    return kernel_checks.tiny_quantized_model("int4")


@needs_kernel
def test_int4_kernel_setting_picks_the_kernel_of_each_layer(tmp_path):
    model = tiny_int4_model()
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert use_int4_kernel(model, "auto", tmp_path)
    assert {layer.kernel is not None for layer in layers} == {True}
    x = torch.randn(6, 64).bfloat16()
    mlp_up = model.blocks[0].mlp.gate_up  # 64 -> 256
    ours = mlp_up(x)
    assert not use_int4_kernel(model, "pytorch", tmp_path)
    assert {layer.kernel is None for layer in layers} == {True}
    assert torch.allclose(ours.float(), mlp_up(x).float(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize(("capability", "block"), [("AVX512", 64), ("AVX2", 32)])
def test_shapes_outside_whole_column_blocks_keep_pytorchs_kernel(monkeypatch, capability, block):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert can_run(15 * block, 576) and can_run(block, 32)
    assert not can_run(block + 16, 576)  # PyTorch packs a partial block differently
    assert not can_run(block, 48)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert not can_run(15 * block, 576)  # a packing no kernel of ours reads


def test_each_packing_gets_the_kernel_that_reads_it_where_the_cpu_has_its_instructions(
    monkeypatch,
):
    avx2_cpu = ["fpu", "avx2", "fma"]
    avx512_cpu = [*avx2_cpu, "avx512f", "avx512bw", "avx512vl", "avx512_bf16"]
    monkeypatch.setattr(cpu_info.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cpu_info.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_info, "cpu_flags", lambda: avx512_cpu)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert unavailable_reason() is None
    assert int4_kernel.kernel_source().name == "int4_bf16"
    # ATEN_CPU_CAPABILITY=avx2 on the same CPU: PyTorch packs AVX2's layout, which the AVX2
    # kernel reads.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert unavailable_reason() is None
    assert int4_kernel.kernel_source().name == "int4_avx2"
    monkeypatch.setattr(cpu_info, "cpu_flags", lambda: avx512_cpu[:2])  # no FMA
    assert unavailable_reason() == "this CPU lacks fma"
    monkeypatch.setattr(cpu_info, "cpu_flags", lambda: avx2_cpu)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert unavailable_reason() == "this CPU lacks avx512f, avx512bw, avx512vl, avx512_bf16"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert "packs int4 weights for DEFAULT here; ours read AVX512 and AVX2's" in (
        unavailable_reason()
    )
    monkeypatch.setattr(cpu_info.platform, "machine", lambda: "aarch64")
    assert "x86-64 Linux" in unavailable_reason()


def test_a_failed_build_falls_back_to_pytorchs_kernel(tmp_path, monkeypatch, caplog):
    model = tiny_int4_model()
    kernel_checks.assert_a_failed_build_falls_back(
        int4_kernel,
        load_int4_kernel,
        use_int4_kernel,
        model,
        model.blocks[0].mlp.gate_up,
        tmp_path,
        monkeypatch,
        caplog,
    )


@needs_kernel
def test_without_a_compiler_a_built_library_is_still_used(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(native, "compiler", lambda: None)
    load_int4_kernel.cache_clear()
    with caplog.at_level(logging.INFO, logger="src.models.int4_kernel"):
        assert load_int4_kernel(tmp_path) is None  # nothing built in tmp_path yet
    assert "no C compiler" in caplog.text
    monkeypatch.undo()
    built = native.build(tmp_path, int4_kernel.kernel_source())  # at image build
    monkeypatch.setattr(native, "compiler", lambda: None)
    load_int4_kernel.cache_clear()
    assert load_int4_kernel(tmp_path) is not None
    assert native.library_path(tmp_path, int4_kernel.kernel_source()) == built
    load_int4_kernel.cache_clear()

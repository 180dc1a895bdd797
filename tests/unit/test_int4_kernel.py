"""Our int4 kernels (src/models/kernels/: int4_bf16.c for AVX-512 BF16, int4_avx2.c for AVX2
and FMA, whichever reads the packing PyTorch writes here): the same products as PyTorch's int4
kernel on the same packed weights, for one row up to many; INT4_KERNEL picks it per layer;
and a machine that cannot build or run it falls back to PyTorch's kernel, never an error."""

import logging

import pytest
import torch
from torch import nn

from src.models import int4_kernel, native
from src.models.int4_kernel import can_run, load_int4_kernel, unavailable_reason
from src.models.quantize import Int4Linear, quantize_model, use_int4_kernel
from src.models.transformer import Transformer, TransformerConfig

pytestmark = pytest.mark.unit

needs_kernel = pytest.mark.skipif(
    unavailable_reason() is not None, reason=f"our int4 kernel cannot run: {unavailable_reason()}"
)


def pytorch_product(layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        x, layer.packed, layer.group_size, layer.scales_and_offsets
    )


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
    """One cache folder for the product tests: the library is built once for all of them."""
    return tmp_path_factory.mktemp("kernel_cache")


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
    # Both round fp32 sums of the same products to bf16, summed in another order: at most
    # one bf16 step apart, and almost always equal.
    assert torch.allclose(ours, theirs, rtol=2**-7, atol=1e-3)
    assert (ours != theirs).float().mean() < 0.05
    # Each row on its own gives the same numbers as within the batch, wherever it sits.
    for row in range(rows):
        alone = kernel(x[row : row + 1], layer.packed, layer.scales_and_offsets, out_features)
        assert torch.equal(alone.float(), ours[row : row + 1])


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
    config = TransformerConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=64,
                               intermediate_size=128, positions="rope", norm="rmsnorm",
                               mlp="swiglu", max_position_embeddings=64)  # fmt: skip
    return quantize_model(Transformer(config).to(torch.bfloat16), "int4")


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
    monkeypatch.setattr(int4_kernel.platform, "system", lambda: "Linux")
    monkeypatch.setattr(int4_kernel.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(int4_kernel, "cpu_flags", lambda: avx512_cpu)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert unavailable_reason() is None
    assert int4_kernel.kernel_source().name == "int4_bf16"
    # ATEN_CPU_CAPABILITY=avx2 on the same CPU: PyTorch packs AVX2's layout, which the AVX2
    # kernel reads.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert unavailable_reason() is None
    assert int4_kernel.kernel_source().name == "int4_avx2"
    monkeypatch.setattr(int4_kernel, "cpu_flags", lambda: avx512_cpu[:2])  # no FMA
    assert unavailable_reason() == "this CPU lacks fma"
    monkeypatch.setattr(int4_kernel, "cpu_flags", lambda: avx2_cpu)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert unavailable_reason() == "this CPU lacks avx512f, avx512bw, avx512vl, avx512_bf16"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert "packs int4 weights for DEFAULT here; ours read AVX512 and AVX2's" in (
        unavailable_reason()
    )
    monkeypatch.setattr(int4_kernel.platform, "machine", lambda: "aarch64")
    assert "x86-64 Linux" in unavailable_reason()


def test_a_failed_build_falls_back_to_pytorchs_kernel(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(int4_kernel, "unavailable_reason", lambda: None)
    monkeypatch.setattr(native, "compiler", lambda: "/bin/false")  # exits 1, builds nothing
    load_int4_kernel.cache_clear()
    with caplog.at_level(logging.INFO, logger="src.models.int4_kernel"):
        assert load_int4_kernel(tmp_path) is None
    assert "the build failed" in caplog.text
    model = tiny_int4_model()
    assert not use_int4_kernel(model, "auto", tmp_path)
    x = torch.randn(8, 64).bfloat16()
    assert model.blocks[0].mlp.gate_up(x).shape == (8, 256)  # PyTorch's kernel still serves
    load_int4_kernel.cache_clear()


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

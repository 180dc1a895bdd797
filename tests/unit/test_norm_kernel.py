"""The RMSNorm in C (src/models/kernels/rms_norm.c, NORM_KERNEL): the numbers of the model's
own RMSNorm, one row or many; used only where it applies (bf16, Llama's weighting, no
gradients); a machine that cannot build it keeps PyTorch's operations, never an error."""

import logging

import pytest
import torch

from src.models import native
from src.models.norm_kernel import load_norm_kernel, use_norm_kernel
from src.models.transformer import RMSNorm, Transformer, TransformerConfig

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    built = load_norm_kernel(tmp_path_factory.mktemp("kernel_cache"))
    if built is None:
        pytest.skip("no C compiler here to build the kernel")
    return built


def pytorch_norm(width: int, seed: int) -> RMSNorm:
    torch.manual_seed(seed)
    norm = RMSNorm(width, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width) * 0.5 + 1)
    return norm


@pytest.mark.parametrize("width", [64, 576, 2048])
@pytest.mark.parametrize("rows", [1, 3, 64, 200])  # 64 and up: split between threads
def test_the_c_norm_gives_the_numbers_of_the_models_norm(kernel, width, rows):
    norm = pytorch_norm(width, seed=rows)
    x = (torch.randn(rows, width) * torch.rand(rows, 1) * 10).bfloat16()
    with torch.no_grad():
        theirs = norm(x)
        ours = kernel(x, norm.weight, norm.eps)
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape
    # The same steps; only the order of the sum of squares can differ, which now and then
    # moves the normalised number by one bf16 step (and so the result, once weighted, by up
    # to two).
    assert torch.allclose(ours.float(), theirs.float(), rtol=2**-6, atol=0)
    assert (ours != theirs).float().mean() < 0.01
    # Each row on its own gives the same numbers as within the batch.
    assert torch.equal(kernel(x[-1:], norm.weight, norm.eps), ours[-1:])


def tiny_model(style: str = "llama") -> Transformer:
    config = TransformerConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=64,
                               intermediate_size=128, positions="rope", norm="rmsnorm",
                               norm_style=style, mlp="swiglu",
                               max_position_embeddings=64)  # fmt: skip
    return Transformer(config).eval()


def test_norm_kernel_setting_gives_the_kernel_to_bf16_llama_norms_only(tmp_path, kernel):
    model = tiny_model().to(torch.bfloat16)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 5 and use_norm_kernel(model, "auto", tmp_path)
    assert all(norm.kernel is not None for norm in norms)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        ours = model(ids).logits
    assert not use_norm_kernel(model, "pytorch", tmp_path)
    assert all(norm.kernel is None for norm in norms)
    with torch.no_grad():
        theirs = model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0.05, atol=0.05)
    # fp32 models and Gemma's (1 + w) weighting keep PyTorch's norm.
    assert not use_norm_kernel(tiny_model(), "auto", tmp_path)
    assert not use_norm_kernel(tiny_model("gemma").to(torch.bfloat16), "auto", tmp_path)


def test_with_gradients_the_norm_is_pytorchs(tmp_path, kernel):
    """Training (LoRA, DPO) needs the norm's backward pass: the kernel is for decoding."""
    norm = pytorch_norm(64, seed=0)
    use_norm_kernel(norm, "auto", tmp_path)
    assert norm.kernel is not None
    x = torch.randn(3, 64).bfloat16().requires_grad_()
    norm(x).float().sum().backward()
    assert x.grad is not None and norm.weight.grad is not None


def test_a_failed_build_keeps_pytorchs_norm(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(native, "compiler", lambda: "/bin/false")  # exits 1, builds nothing
    load_norm_kernel.cache_clear()
    with caplog.at_level(logging.INFO, logger="src.models.norm_kernel"):
        assert not use_norm_kernel(tiny_model().to(torch.bfloat16), "auto", tmp_path)
    assert "the build failed" in caplog.text
    load_norm_kernel.cache_clear()


def test_a_changed_header_makes_a_new_library(tmp_path):
    """The kernels share bf16.h: a library built before the header changed is not reused."""
    source = tmp_path / "kernel.c"
    source.write_text('#include "bf16.h"\n')
    header = tmp_path / "bf16.h"
    header.write_text("/* one */\n")
    before = native.library_path(tmp_path, native.CSource(source))
    header.write_text("/* two */\n")
    assert native.library_path(tmp_path, native.CSource(source)) != before

"""Checks shared by the tests of our int4 and int8 matrix kernels: the bound against the exact
product, the rows of special values, and the fallback when the build fails."""

import logging
from collections.abc import Callable

import torch

from src.models import native
from src.models.quantize import quantize_model
from src.models.transformer import Transformer, TransformerConfig


def assert_within_bf16_of_exact(ours: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """``ours`` (M, N) against the exact product (fp64) of bf16 ``x`` (M, K) and ``weight``
    (N, K) as the kernel reads it: within half a bf16 step of the exact result, plus 2^-15 of
    each group of 32 activations' largest times its weights' magnitudes (the rounding of
    smaller activations to 16-bit integers), plus fp32 rounding. Activations rounded to 8
    bits, or a power of two one too large, would be far outside."""
    rows, n = x.shape[0], weight.shape[0]
    exact = x.double() @ weight.T
    largest = x.double().abs().reshape(rows, -1, 32).amax(dim=-1)  # (M, K / 32)
    activation_rounding = (largest * 2**-15) @ weight.abs().reshape(n, -1, 32).sum(-1).T
    fp32_rounding = 2**-16 * (x.double().abs() @ weight.abs().T)
    bound = exact.abs() * 2**-8 + (activation_rounding + fp32_rounding) * 1.01
    assert ((ours.double() - exact).abs() <= bound).all()


def activations_spanning_2_to_the_20(rows: int, width: int) -> torch.Tensor:
    """bf16 rows whose magnitudes span 2^20 within each group of 32."""
    magnitudes = 2.0 ** torch.randint(-20, 1, (rows, width)).float()
    return (torch.randn(rows, width) * magnitudes).bfloat16()


def special_rows(width: int) -> torch.Tensor:
    """Five bf16 rows: zeros, one NaN, near the bottom of bf16's range, near its top, one
    inf."""
    x = torch.randn(5, width)
    x[0] = 0.0
    x[1, 100] = float("nan")
    x[2] *= 1e-33
    x[3] *= 1e36
    x[4, 7] = float("inf")
    return x.bfloat16()


def assert_special_rows_kept(ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor):
    """Our products of ``special_rows`` against PyTorch's kernel's and the exact ones."""
    assert torch.equal(ours[0], torch.zeros_like(ours[0]))
    assert ours[1].isnan().all()  # a NaN spoils its own row, as in PyTorch's kernel
    assert torch.equal(ours[4].isinf(), theirs[4].isinf()) and ours[4].isinf().any()
    assert torch.equal(ours[4].isnan(), theirs[4].isnan())  # inf x 0 where a weight is 0
    for row in (2, 3):
        scale = float(exact[row].abs().max())
        torch.testing.assert_close(ours[row].double(), exact[row], rtol=2**-7, atol=scale * 2**-7)


def assert_a_failed_build_falls_back(
    module, load: Callable, use: Callable, model: torch.nn.Module, layer: torch.nn.Module,
    tmp_path, monkeypatch, caplog,
):  # fmt: skip
    """With a compiler that builds nothing, ``load`` logs why and gives None, ``use`` puts
    no kernel of ours on ``model``, and ``layer`` still multiplies (PyTorch's kernel)."""
    monkeypatch.setattr(module, "unavailable_reason", lambda: None)
    monkeypatch.setattr(native, "compiler", lambda: "/bin/false")  # exits 1, builds nothing
    load.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger=module.__name__):
            assert load(tmp_path) is None
        assert "the build failed" in caplog.text
        assert not use(model, "auto", tmp_path)
        x = torch.randn(8, layer.in_features).bfloat16()
        assert layer(x).shape == (8, layer.out_features)
    finally:
        load.cache_clear()


def tiny_quantized_model(method: str, layers: int = 1, **changes) -> Transformer:
    """A bf16 model of ``layers`` blocks quantised with ``method`` ("int4" or "int8"), its
    configuration with ``changes``."""
    config = TransformerConfig(**{**dict(vocab_size=64, n_layer=layers, n_head=2, n_kv_head=1,
                               n_embd=64, intermediate_size=128, positions="rope",
                               norm="rmsnorm", mlp="swiglu", max_position_embeddings=64),
                               **changes})  # fmt: skip
    return quantize_model(Transformer(config).to(torch.bfloat16), method)

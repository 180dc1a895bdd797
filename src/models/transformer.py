"""A decoder-only transformer from scratch, in one file, read top to bottom.

It covers the families users meet, as configuration switches rather than subclasses:

- GPT-2 / DialoGPT (Radford et al., 2019): learned position embeddings, LayerNorm, a GELU MLP,
  one fused QKV projection with biases, input and output embeddings tied.
- Llama / SmolLM2 (Touvron et al., 2023): RMSNorm (Zhang & Sennrich, 2019), rotary position
  embeddings (RoFormer, Su et al., 2021), a SwiGLU MLP (Shazeer, 2020), and grouped-query
  attention (GQA, Ainslie et al., 2023) where several query heads share one key/value head.
  Llama 3.1-3.3 stretch the rotary frequencies for long contexts (``rope_scaling`` "llama3").
- Mistral: Llama's architecture, where each query sees only the latest ``sliding_window``
  positions (``attention_window``; Mistral 7B v0.1).
- Qwen2 / Qwen2.5: Llama's, with biases on the q, k and v projections (not the output's), and
  a sliding window on some layers if the config turns it on (``windowed_layers``).
- Qwen3: Llama's, with an RMSNorm on every query and key head before the rotation
  (``qk_norm``).
- Gemma 2 (Gemma Team, 2024): Llama's, with norms on both sides of each sub-layer
  (``sandwich_norms``) whose weights count from 1 (``norm_style`` "gemma"), a GELU-gated
  MLP, embeddings scaled by sqrt(width), its own attention scale, tanh soft-capping of the
  attention scores and of the logits, and a sliding window on every other layer.
- Gemma 3 (text: ``gemma3_text``, Gemma Team, 2025): Gemma 2's, with Qwen3's per-head norms
  instead of soft-capping, and a rotary base of its own on the windowed layers (five in six).
- Phi-3: Llama's, its q, k, v and gate, up weights stored fused as ours are, with a sliding
  window in Phi-3-mini-4k; rotary on the first ``rotary_dim`` dimensions of each head where
  a config sets ``partial_rotary_factor``.

A sliding window is a mask here: the cache keeps every key, and a windowed layer hides those
more than the window behind each query, counted in the row's real tokens. So padded batches,
reused prefixes and dropped draft tokens work as for any other model.

Both are the architecture of "Attention Is All You Need" (Vaswani et al., 2017) with only the
decoder kept and the normalisation moved before each sub-layer (pre-norm, as in GPT-2).

``Transformer.from_hf`` loads the weights of a Hugging Face GPT2LMHeadModel or LlamaForCausalLM
(mapping every tensor by name, below), and the tests check that the logits match Hugging
Face's to 1e-4. ``forward`` takes the same arguments as a transformers model (``input_ids``,
``attention_mask``, ``position_ids``, ``cache``, ``logits_to_keep``), so the chat engines run
on it unchanged.

Shapes in comments: B batch, T new tokens, S all tokens (cache + new), C model width,
nh query heads, nkv key/value heads, hs head size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from src.models.norm_kernel import NormThenMatmul, fusable
from src.models.rope_kernel import RopeKernel
from src.models.single_steps import in_single_steps

# ------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------


@dataclass
class TransformerConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    n_kv_head: int | None = None  # None: as many as query heads (no GQA)
    head_dim: int | None = None  # None: n_embd // n_head
    intermediate_size: int | None = None  # None: 4 * n_embd, as in GPT-2
    max_position_embeddings: int = 1024
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    # "gemma": an RMSNorm's weight w scales by (1 + w), in fp32 before the cast back.
    norm_style: Literal["llama", "gemma"] = "llama"
    sandwich_norms: bool = False  # also a norm on each sub-layer's output (Gemma 2/3)
    scale_embeddings: bool = False  # embeddings times sqrt(n_embd) (Gemma)
    attention_scale: float | None = None  # scores times this; None: 1 / sqrt(head_dim)
    attention_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    logits_softcap: float | None = None  # the same on the logits (Gemma 2)
    norm_eps: float = 1e-5
    positions: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10_000.0
    mlp: Literal["gelu", "swiglu", "geglu"] = "gelu"
    attention_bias: bool = True  # biases on the q, k and v projections
    attention_output_bias: bool | None = None  # on the output projection; None: as q, k, v
    qk_norm: bool = False  # RMSNorm (over head_dim) on each query and key head: Qwen3
    # Rotary frequencies for long contexts: {"rope_type": "llama3" or "linear", and the
    # numbers ROPE_SCALING_KEYS names}; None: plain rotary.
    rope_scaling: dict[str, Any] | None = None
    window_rope_theta: float | None = None  # windowed layers' own rotary base (Gemma 3)
    rotary_dim: int | None = None  # rotary on this many leading dimensions of a head (None: all)
    weight_names: Literal["gpt2", "llama", "phi3"] | None = None  # None: by positions
    attention_window: int | None = None  # a query sees only this many latest positions ...
    windowed_layers: tuple[int, ...] | None = None  # ... in these layers (None: all of them)
    mlp_bias: bool = True  # biases on the MLP projections
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(
                    f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                    "each head gets n_embd // n_head dimensions"
                )
            self.head_dim = self.n_embd // self.n_head
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}: "
                "in grouped-query attention each key/value head serves a whole group of heads"
            )
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        if self.positions == "rope" and (self.rotary_dim % 2 or self.rotary_dim > self.head_dim):
            raise ValueError(
                f"rotary_dim={self.rotary_dim} must be even and at most head_dim={self.head_dim}"
            )
        if self.weight_names is None:
            self.weight_names = "gpt2" if self.positions == "learned" else "llama"
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.attention_output_bias is None:
            self.attention_output_bias = self.attention_bias
        if self.attention_window is None:
            self.windowed_layers = ()
        elif self.attention_window < 1:
            raise ValueError(f"attention_window must be positive, got {self.attention_window}")
        elif self.windowed_layers is None:
            self.windowed_layers = tuple(range(self.n_layer))
        self.windowed_layers = tuple(self.windowed_layers)
        choices = {
            "norm": ("layernorm", "rmsnorm"),
            "positions": ("learned", "rope"),
            "mlp": ("gelu", "swiglu", "geglu"),
            "norm_style": ("llama", "gemma"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; allowed: {', '.join(allowed)}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")

    @classmethod
    def from_hf(cls, hf_config: Any) -> TransformerConfig:
        """Read a transformers GPT2Config or LlamaConfig."""
        if hf_config.model_type == "gpt2":
            if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ValueError(f"unsupported GPT-2 activation {hf_config.activation_function}")
            return cls(
                vocab_size=hf_config.vocab_size,
                n_layer=hf_config.n_layer,
                n_head=hf_config.n_head,
                n_embd=hf_config.n_embd,
                intermediate_size=hf_config.n_inner,
                max_position_embeddings=hf_config.n_positions,
                norm_eps=hf_config.layer_norm_epsilon,
                tie_embeddings=True,
            )
        if hf_config.model_type in LLAMA_LIKE:
            return cls.from_llama_like(hf_config)
        if hf_config.model_type in ("gemma2", "gemma3_text"):
            return cls.from_gemma(hf_config)
        raise ValueError(
            f"model_type {hf_config.model_type!r}: supported are {', '.join(SUPPORTED_FAMILIES)}"
        )

    @classmethod
    def from_llama_like(cls, hf_config: Any, check_activation: bool = True) -> TransformerConfig:
        """Llama and the families built like it (Mistral, Qwen2, Qwen3, Phi-3): see the module
        doc. Gemma starts from it too."""
        kind = hf_config.model_type
        activation = getattr(hf_config, "hidden_act", "silu")
        if check_activation and activation != "silu":
            raise ValueError(f"{kind} with hidden_act {activation!r}: only silu is supported")
        window, windowed_layers = sliding_window_settings(hf_config)
        theta, scaling = rope_settings(hf_config)
        parameters = getattr(hf_config, "rope_parameters", None) or {}
        partial = parameters.get("partial_rotary_factor", None) or getattr(
            hf_config, "partial_rotary_factor", 1.0
        )
        head_dim = getattr(hf_config, "head_dim", None) or (
            hf_config.hidden_size // hf_config.num_attention_heads
        )
        qkv_bias = kind == "qwen2" or bool(getattr(hf_config, "attention_bias", False))
        return cls(
            vocab_size=hf_config.vocab_size,
            n_layer=hf_config.num_hidden_layers,
            n_head=hf_config.num_attention_heads,
            n_kv_head=getattr(hf_config, "num_key_value_heads", None),
            n_embd=hf_config.hidden_size,
            head_dim=getattr(hf_config, "head_dim", None),
            intermediate_size=hf_config.intermediate_size,
            max_position_embeddings=hf_config.max_position_embeddings,
            norm="rmsnorm",
            norm_eps=hf_config.rms_norm_eps,
            positions="rope",
            rope_theta=theta,
            rope_scaling=scaling,
            rotary_dim=int(head_dim * partial),
            weight_names="phi3" if kind == "phi3" else "llama",
            attention_window=window,
            windowed_layers=windowed_layers,
            mlp="swiglu",
            attention_bias=qkv_bias,
            attention_output_bias=qkv_bias and kind != "qwen2",  # Qwen2's o_proj has none
            qk_norm=kind == "qwen3",
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            tie_embeddings=getattr(hf_config, "tie_word_embeddings", False),
        )

    @classmethod
    def from_gemma(cls, hf_config: Any) -> TransformerConfig:
        """Gemma 2 and Gemma 3 (text): see the module doc."""
        kind = hf_config.model_type
        activation = getattr(hf_config, "hidden_activation", "gelu_pytorch_tanh")
        if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"{kind} with hidden_activation {activation!r}: not supported")
        if getattr(hf_config, "use_bidirectional_attention", False):
            raise ValueError(f"{kind} with bidirectional attention (an embedding model)")
        llama_like = cls.from_llama_like(hf_config, check_activation=False)
        gemma3 = kind == "gemma3_text"
        return dataclasses.replace(
            llama_like,
            qk_norm=gemma3,
            window_rope_theta=rope_settings(hf_config, "sliding_attention")[0] if gemma3 else None,
            norm_style="gemma",
            sandwich_norms=True,
            scale_embeddings=True,
            attention_scale=hf_config.query_pre_attn_scalar**-0.5,
            attention_softcap=getattr(hf_config, "attn_logit_softcapping", None),
            logits_softcap=getattr(hf_config, "final_logit_softcapping", None),
            mlp="geglu",
            tie_embeddings=getattr(hf_config, "tie_word_embeddings", True),
        )


# model_type values built like Llama (RMSNorm, rotary, SwiGLU, GQA); with GPT-2, every family
# this file builds.
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "phi3")
SUPPORTED_FAMILIES = ("gpt2", *LLAMA_LIKE, "gemma2", "gemma3_text")
# The rope scalings this file computes, and the numbers each reads.
ROPE_SCALING_KEYS = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "linear": ("factor",),  # every frequency divided by the factor (Gemma 3's global layers)
}


def sliding_window_settings(hf_config: Any) -> tuple[int | None, tuple[int, ...] | None]:
    """(window, windowed layers) as transformers applies them: on the layers ``layer_types``
    marks, or where a config file has none, Mistral's window on every layer, Qwen2/3's (only
    with ``use_sliding_window``) from ``max_window_layers`` on, Gemma's on all but every
    ``sliding_window_pattern``-th."""
    window = getattr(hf_config, "sliding_window", None)
    if hf_config.model_type in ("qwen2", "qwen3") and not getattr(
        hf_config, "use_sliding_window", False
    ):
        window = None
    if window is None:
        return None, None
    layers = getattr(hf_config, "layer_types", None)
    if layers is None and hf_config.model_type in ("qwen2", "qwen3"):
        first = getattr(hf_config, "max_window_layers", 0)
        return window, tuple(range(first, hf_config.num_hidden_layers))
    if layers is None and hf_config.model_type in ("gemma2", "gemma3_text"):
        # Gemma: windowed but every ``pattern``-th layer (2 for Gemma 2, 6 for Gemma 3).
        pattern = getattr(hf_config, "sliding_window_pattern", None) or (
            2 if hf_config.model_type == "gemma2" else 6
        )
        count = hf_config.num_hidden_layers
        return window, tuple(i for i in range(count) if (i + 1) % pattern)
    if layers is None:
        return window, None
    return window, tuple(i for i, kind in enumerate(layers) if kind == "sliding_attention")


def rope_settings(
    hf_config: Any, layer_type: str = "full_attention"
) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling or None) from a config as transformers 5 writes it
    (``rope_parameters``, per layer type for Gemma 3) or as older files have it
    (``rope_theta`` and ``rope_scaling``; Gemma 3's ``rope_local_base_freq``)."""
    parameters = dict(getattr(hf_config, "rope_parameters", None) or {})
    if layer_type in parameters:
        parameters = dict(parameters[layer_type])
    elif layer_type == "sliding_attention":  # an older Gemma 3 file: a theta, no scaling
        return getattr(hf_config, "rope_local_base_freq", 10_000.0), None
    scaling = parameters or dict(getattr(hf_config, "rope_scaling", None) or {})
    theta = parameters.get("rope_theta", getattr(hf_config, "rope_theta", 10_000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return theta, {"rope_type": kind} | {key: scaling[key] for key in ROPE_SCALING_KEYS[kind]}


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Scale by the root mean square (no mean subtraction, no bias): cheaper than LayerNorm
    and as good in practice (Zhang & Sennrich, 2019)."""

    def __init__(self, width: int, eps: float, style: str = "llama") -> None:
        super().__init__()
        self.eps, self.style = eps, style
        self.weight = nn.Parameter(torch.ones(width) if style == "llama" else torch.zeros(width))

    # The same norm in one C call (src/models/norm_kernel.py, NORM_KERNEL), set for bf16
    # norms with Llama's weighting; used when decoding, without gradients.
    kernel: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_kernel(x):
            return self.kernel(x, self.weight, self.eps)
        # x / sqrt(mean(x^2) + eps), computed in fp32 whatever the input dtype, as in Llama.
        # PyTorch's fused rms_norm gives the same numbers as writing it out in five operations,
        # in one: this runs twice per layer for every token.
        normalised = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return norm_weighted(normalised, self.weight, self.style, x.dtype)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether the C kernel normalises ``x``: bf16, and no gradients (training needs
        PyTorch's backward pass)."""
        return self.kernel is not None and x.dtype == torch.bfloat16 and not torch.is_grad_enabled()


def norm_weighted(
    normalised: torch.Tensor, weight: torch.Tensor, style: str, dtype: torch.dtype
) -> torch.Tensor:
    """An RMSNorm's fp32 output scaled by its weight and cast to ``dtype``: Llama casts then
    multiplies by w; Gemma multiplies by (1 + w) in fp32, then casts."""
    if style == "gemma":
        return (normalised * (1.0 + weight.float())).to(dtype)
    return weight * normalised.to(dtype)


def make_norm(config: TransformerConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps, config.norm_style)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


class RotaryEmbedding(nn.Module):
    """RoFormer: rotate each (x_i, x_{i+hs/2}) pair of q and k by an angle proportional to the
    position, so that q·k depends only on the distance between the two tokens."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, float] | None = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One frequency per pair of dimensions: theta^(-2i/hs), i = 0 .. hs/2 - 1. Computed
        # here in fp32 (a handful of numbers) rather than kept as a buffer, which model.to(bf16)
        # would round: bf16 frequencies shift every angle and cost accuracy.
        exponents = torch.arange(0, self.head_dim, 2, device=positions.device).float()
        inverse_frequency = 1.0 / self.theta ** (exponents / self.head_dim)
        if self.scaling is not None and self.scaling["rope_type"] == "llama3":
            inverse_frequency = llama3_frequencies(inverse_frequency, self.scaling)
        elif self.scaling is not None:  # "linear"
            inverse_frequency = inverse_frequency / self.scaling["factor"]
        angles = positions.float()[..., None] * inverse_frequency  # (B, T, hs/2)
        angles = torch.cat([angles, angles], dim=-1)  # (B, T, hs): halves share frequencies
        return angles.cos()[:, None], angles.sin()[:, None]  # (B, 1, T, hs) each


def rotary_for(
    rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) of ``positions`` in ``dtype``, as every layer's attention takes them."""
    cos, sin = (part.to(dtype) for part in rotary(positions))
    return cos, signed_sin(sin)


def llama3_frequencies(inverse_frequency: torch.Tensor, scaling: dict[str, float]) -> torch.Tensor:
    """Llama 3.1's long-context rotary: wavelengths longer than the original context's (over
    ``low_freq_factor``) are stretched by ``factor``, those shorter than it over
    ``high_freq_factor`` kept, and the ones between blended smoothly (the operations of
    transformers' ``_compute_llama3_parameters``, in its order, for the same numbers)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inverse_frequency
    stretched = torch.where(wavelength > original / low, inverse_frequency / factor,
                            inverse_frequency)  # fmt: skip
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    between = ~(wavelength < original / high) * ~(wavelength > original / low)
    return torch.where(between, blended, stretched)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: what ``apply_rotary_rolled`` multiplies by."""
    first, second = sin.chunk(2, dim=-1)
    return torch.cat([-first, second], dim=-1)


def apply_rotary_rolled(
    x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor
) -> torch.Tensor:
    """``apply_rotary`` in four operations instead of six, bit for bit: rotate_half(x) * sin
    is roll(x) * signed_sin(sin), since (-x2) * s == x2 * (-s) exactly. The model runs it once
    per layer on the query and key heads together, with ``signed_sin`` computed once per
    forward pass: one token's step has hundreds of small operations, and each costs
    microseconds of dispatch."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class KVCache:
    """Keys and values of every position seen so far, per layer: (B, nkv, S, hs).

    Each layer keeps its tensors in a buffer with room to spare, grown by a quarter (rounded up
    to ``KV_BLOCK`` positions) when full, so that adding a token writes one position instead of
    copying the whole cache (``torch.cat`` on every step costs time in proportion to the
    conversation's length). The buffers are the cache's own from the first append: the keys
    and values a forward pass hands in are views of its larger q/k/v projections, and keeping
    those views would keep the whole projections alive (five times the keys and values: after
    a 16-row prefill, 700 MB for 160 MB of cache). Capacities are multiples of ``KV_BLOCK``, so
    the allocator sees a few recurring sizes rather than one per length. The attribute names
    (``layers[i].keys``, ``.values``, ``batch_select_indices``) follow transformers'
    DynamicCache, so the batching engine handles both the same way.
    """

    class Layer:
        def __init__(self) -> None:
            self._keys: torch.Tensor | None = None  # (B, nkv, capacity, hs)
            self._values: torch.Tensor | None = None
            # Positions in use, one count per tensor: the batching engine replaces keys and
            # values one after the other, reading the old values after setting new keys.
            self._key_length = self._value_length = 0

        @property
        def length(self) -> int:
            return self._key_length

        @property
        def keys(self) -> torch.Tensor | None:
            return None if self._keys is None else self._keys[:, :, : self._key_length]

        @keys.setter
        def keys(self, keys: torch.Tensor) -> None:
            self._keys, self._key_length = keys, keys.shape[2]

        @property
        def values(self) -> torch.Tensor | None:
            return None if self._values is None else self._values[:, :, : self._value_length]

        @values.setter
        def values(self, values: torch.Tensor) -> None:
            self._values, self._value_length = values, values.shape[2]

        def append(
            self, keys: torch.Tensor, values: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if self._keys is None:
                # Copies, never the views handed in (see the class docstring).
                length = keys.shape[2]
                self._keys = grow(keys, length, kv_capacity(length))
                self._values = grow(values, length, kv_capacity(length))
                self._key_length = self._value_length = length
                return self.keys, self.values
            key_buffer, value_buffer, start = self.reserve(keys.shape[2])
            key_buffer[:, :, start : start + keys.shape[2]] = keys
            value_buffer[:, :, start : start + keys.shape[2]] = values
            return self.advance(keys.shape[2])

        def reserve(self, count: int) -> tuple[torch.Tensor, torch.Tensor, int]:
            """The key and value buffers (B, nkv, capacity, hs), with room for ``count`` more
            positions from the returned start (the cache must hold some already); write them,
            then ``advance``."""
            length = self._key_length
            new_length = length + count
            if new_length > min(self._keys.shape[2], self._values.shape[2]):
                # Full: move to buffers a quarter larger (amortised O(1) per token; the
                # batching engine rebuilds its cache whenever a row joins or leaves anyway).
                capacity = kv_capacity(max(length + length // 4, new_length))
                self._keys = grow(self._keys, length, capacity)
                self._values = grow(self._values, length, capacity)
            return self._keys, self._values, length

        def advance(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Count ``count`` positions written after ``reserve``; all keys and values so far."""
            self._key_length = self._value_length = self._key_length + count
            return self.keys, self.values

    def __init__(self, n_layer: int) -> None:
        self.layers = [KVCache.Layer() for _ in range(n_layer)]

    @classmethod
    def from_layers(cls, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> KVCache:
        """A cache holding copies of ``layers`` (keys, values per layer), with room to grow."""
        cache = cls(len(layers))
        for entry, (keys, values) in zip(cache.layers, layers, strict=True):
            length = keys.shape[2]
            entry._keys, entry._values = (
                grow(keys, length, kv_capacity(length)),
                grow(values, length, kv_capacity(length)),
            )
            entry._key_length = entry._value_length = length
        return cache

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions' keys and values; return all of them so far."""
        return self.layers[layer].append(keys, values)

    def get_seq_length(self) -> int:
        return self.layers[0].length

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (a negative count, as transformers'
        ``DynamicCache.crop`` takes it): a draft's rejected tokens."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of positions, not {tokens_to_remove}")
        for entry in self.layers:
            entry._key_length = entry._value_length = entry.length + tokens_to_remove

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for entry in self.layers:
            entry.keys, entry.values = entry.keys[indices], entry.values[indices]


KV_BLOCK = 64  # KV buffers hold a multiple of this many positions


def kv_capacity(length: int) -> int:
    """Room for at least ``length`` positions, and at least one more: ``length`` rounded up
    to the next multiple of ``KV_BLOCK`` strictly above it (a prefill's cache then takes its
    first decoding steps without a copy)."""
    return (length // KV_BLOCK + 1) * KV_BLOCK


def grow(buffer: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    """A copy of ``buffer``'s first ``used`` positions (dim 2) in a buffer of ``capacity``."""
    B, heads, _, head_size = buffer.shape
    larger = buffer.new_empty(B, heads, capacity, head_size)
    larger[:, :, :used] = buffer[:, :, :used]
    return larger


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.n_head, self.n_kv_head, self.head_dim = (config.n_head, config.n_kv_head,
                                                      config.head_dim)  # fmt: skip
        # One matrix makes q, k and v in one multiplication (as GPT-2's c_attn); with GQA the
        # k and v parts are smaller than the q part.
        qkv_width = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_width, bias=config.attention_bias)
        self.proj = nn.Linear(config.n_head * config.head_dim, config.n_embd,
                              bias=config.attention_output_bias)  # fmt: skip
        if config.qk_norm:  # Qwen3: each query and key head normalised before the rotation
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps, config.norm_style)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps, config.norm_style)
        self.qk_norm = config.qk_norm
        self.scale, self.softcap = config.attention_scale, config.attention_softcap
        self.rotary_dim = config.rotary_dim

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
        written_out: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.attend_qkv(self.qkv(x), mask, rotary, cache, written_out)

    def attend_qkv(
        self,
        qkv: torch.Tensor,
        mask: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
        written_out: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rest of ``forward`` from the qkv projection's output (B, T, qkv width)."""
        B, T, _ = qkv.shape
        q_width, kv_width = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        if self.rotates_into_cache(qkv, rotary, cache, written_out):
            q, k, v = self.rope_kernel(qkv, *rotary, cache.layers[self.layer_index],
                                       self.n_head, self.n_kv_head)  # fmt: skip
            return self.attend(q, k, v, mask, written_out=False)
        heads = self.n_head + self.n_kv_head
        q_and_k = qkv[..., : q_width + kv_width].view(B, T, heads, self.head_dim)
        if self.qk_norm:
            q_and_k = self.normalise_heads(q_and_k)
        q_and_k = q_and_k.transpose(1, 2)
        if rotary is not None and self.rotary_dim == self.head_dim:
            # (cos, signed sin): see apply_rotary_rolled. All heads of q and k at once.
            q_and_k = apply_rotary_rolled(q_and_k, *rotary)
        elif rotary is not None:  # partial rotary: the other dimensions pass through
            rotated = apply_rotary_rolled(q_and_k[..., : self.rotary_dim], *rotary)
            q_and_k = torch.cat([rotated, q_and_k[..., self.rotary_dim :]], dim=-1)
        q, k = q_and_k.split([self.n_head, self.n_kv_head], dim=1)  # (B, nh|nkv, T, hs)
        v = qkv[..., q_width + kv_width :].view(B, T, self.n_kv_head, self.head_dim)
        v = v.transpose(1, 2)  # (B, nkv, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (B, nkv, S, hs)
        return self.attend(q, k, v, mask, written_out)

    # The rotation and the cache write of a decoding step in one C call
    # (src/models/rope_kernel.py, ROPE_KERNEL), set where this layer's rotation covers whole
    # heads and it has no per-head norms.
    rope_kernel: RopeKernel | None = None

    def rotates_into_cache(
        self,
        qkv: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
        written_out: bool,
    ) -> bool:
        """Whether this step's rotation and cache write go to the C function: bf16, no
        gradients, and positions added to our cache's existing buffers."""
        return (
            self.rope_kernel is not None
            and rotary is not None
            and isinstance(cache, KVCache)
            and cache.layers[self.layer_index].length > 0
            and qkv.dtype == torch.bfloat16
            and not written_out
            and not torch.is_grad_enabled()
        )

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        written_out: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of q (B, nh, T, hs) to all keys and values (B, nkv, S, hs), through the
        output projection: (B, T, C), and the weights where written out."""
        B, _, T, _ = q.shape
        group = self.n_head // self.n_kv_head
        if written_out:
            # GQA: each key/value head serves n_head // n_kv_head consecutive query heads.
            if group > 1:
                k = k.repeat_interleave(group, dim=1)  # (B, nh, S, hs)
                v = v.repeat_interleave(group, dim=1)
            y, weights = self.written_out_attention(q, k, v, mask)
        elif T == 1:
            y, weights = self.attend_one_token(q, k, v, mask), None
        elif in_single_steps():
            # Each new token as a one-token step would attend (src/models/single_steps.py):
            # to the keys up to its own position, through the same kernel.
            S = k.shape[2]
            y = torch.cat(
                [
                    self.attend_one_token(
                        q[:, :, i : i + 1],
                        k[:, :, : S - T + i + 1],
                        v[:, :, : S - T + i + 1],
                        None if mask is None else mask[:, :, i : i + 1, : S - T + i + 1],
                    )
                    for i in range(T)
                ],
                dim=2,
            )
            weights = None
        else:
            # The fused kernel computes the same softmax(q k^T / sqrt(hs) + mask) v. mask=None
            # means causal (a prompt with no cache).
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None,
                enable_gqa=group > 1,
                scale=self.scale,
            )
            weights = None
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hs)
        return self.proj(y), weights

    def normalise_heads(self, q_and_k: torch.Tensor) -> torch.Tensor:
        """q_norm on the query heads and k_norm on the key heads of (B, T, nh + nkv, hs), in
        one pass: each head's weight row, as RMSNorm would apply it."""
        weight = torch.cat([self.q_norm.weight.expand(self.n_head, -1),
                            self.k_norm.weight.expand(self.n_kv_head, -1)])  # fmt: skip
        normalised = F.rms_norm(q_and_k.float(), (self.head_dim,), eps=self.q_norm.eps)
        return norm_weighted(normalised, weight, self.q_norm.style, q_and_k.dtype)

    def attend_one_token(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One new token's attention through the fused kernel, q (B, nh, 1, hs); ``mask`` None
        when nothing is hidden, else (B, 1, 1, S) for padding."""
        B, group = q.shape[0], self.n_head // self.n_kv_head
        if group == 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        # The `group` query heads that share a key/value head are attended as `group` queries
        # of that one head, (B, nkv, group, hs). Same numbers, no copies of k and v, and ten
        # times faster here than enable_gqa. A padding mask broadcasts over those queries.
        return F.scaled_dot_product_attention(
            q.reshape(B, self.n_kv_head, group, self.head_dim),
            k,
            v,
            attn_mask=mask,
            scale=self.scale,
        ).reshape(B, self.n_head, 1, self.head_dim)

    def written_out_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled dot-product attention step by step (Vaswani et al., 2017, eq. 1); with
        Gemma 2's soft-capping of the scores, the only way this model attends."""
        if self.scale is None:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, nh, T, S)
        else:
            scores = (q @ k.transpose(-2, -1)) * self.scale
        if self.softcap is not None:
            scores = soft_cap(scores, self.softcap)
        scores = scores + mask  # 0 where allowed, a huge negative number where not
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # rows sum to 1
        return weights @ v, weights  # (B, nh, T, hs), (B, nh, T, S)


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        hidden = config.intermediate_size
        if self.kind in ("swiglu", "geglu"):
            # SwiGLU (Shazeer, 2020): a SiLU-gated linear unit, down(silu(gate(x)) * up(x)).
            # The gate and up matrices are one (as qkv): one multiplication per layer instead
            # of two, the same numbers.
            self.gate_up = nn.Linear(config.n_embd, 2 * hidden, bias=config.mlp_bias)
        else:
            self.up = nn.Linear(config.n_embd, hidden, bias=config.mlp_bias)
        self.down = nn.Linear(hidden, config.n_embd, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind in ("swiglu", "geglu"):
            return self.gated(self.gate_up(x))
        # GPT-2 uses the tanh approximation of GELU ("gelu_new").
        return self.down(F.gelu(self.up(x), approximate="tanh"))

    def gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The rest of ``forward`` from the gate-up projection's output (..., 2 hidden)."""
        gate, up = gate_up.chunk(2, dim=-1)
        if self.kind == "swiglu":
            return self.down(F.silu(gate) * up)
        # Gemma: the gate through GELU (tanh approximation)
        return self.down(F.gelu(gate, approximate="tanh") * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: TransformerConfig, layer_index: int) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attention = Attention(config, layer_index)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)
        self.sandwich = config.sandwich_norms
        if self.sandwich:  # Gemma: each sub-layer's output is normalised before the residual
            self.attention_out_norm = make_norm(config)
            self.mlp_out_norm = make_norm(config)

    # Each norm in the C call of the product after it (src/models/norm_kernel.py), set by
    # NORM_KERNEL; used where both are ours (``fuses``).
    norm_then_matmul: NormThenMatmul | None = None

    def forward(self, x, mask, rotary, cache, written_out):
        if self.fuses(x):
            # The same steps as below, bit for bit, in fewer calls: norm1 inside the qkv
            # product's call, and the residual addition and norm2 inside gate-up's.
            qkv, _ = self.norm_then_matmul(self.norm1, self.attention.qkv, x)
            attended, weights = self.attention.attend_qkv(qkv, mask, rotary, cache, written_out)
            gate_up, x = self.norm_then_matmul(self.norm2, self.mlp.gate_up, x, attended)
            return x + self.mlp.gated(gate_up), weights
        attended, weights = self.attention(self.norm1(x), mask, rotary, cache, written_out)
        if self.sandwich:
            attended = self.attention_out_norm(attended)
        x = x + attended
        transformed = self.mlp(self.norm2(x))
        if self.sandwich:
            transformed = self.mlp_out_norm(transformed)
        return x + transformed, weights

    def fuses(self, x: torch.Tensor) -> bool:
        """Whether this call goes through ``norm_then_matmul``: no sandwich norms, both norms
        in C for ``x`` (bf16, no gradients) and both products (qkv, gate-up) ours."""
        return (
            self.norm_then_matmul is not None
            and not self.sandwich
            and isinstance(self.norm1, RMSNorm)
            and self.norm1.uses_kernel(x)
            and self.norm2.uses_kernel(x)
            and hasattr(self.mlp, "gate_up")
            and fusable(self.attention.qkv)
            and fusable(self.mlp.gate_up)
        )


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------


@dataclass
class TransformerOutput:
    logits: torch.Tensor  # (B, T or logits_to_keep, V)
    cache: KVCache | None = None
    attentions: list[torch.Tensor] = field(default_factory=list)  # per layer (B, nh, T, S)
    hidden_states: list[torch.Tensor] = field(default_factory=list)  # embeddings + per layer


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        if config.positions == "learned":
            self.position_embedding = nn.Embedding(config.max_position_embeddings, config.n_embd)
        else:
            self.rotary = RotaryEmbedding(config.rotary_dim, config.rope_theta, config.rope_scaling)
            if config.window_rope_theta is not None:
                self.window_rotary = RotaryEmbedding(config.rotary_dim, config.window_rope_theta)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Input and output embeddings share one matrix (Press & Wolf, 2017; GPT-2).
            self.lm_head.weight = self.token_embedding.weight
        self.generation_config = None  # set by from_hf: which tokens end a reply

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        sdpa: bool = True,
    ) -> TransformerOutput:
        """``input_ids`` (B, T); ``attention_mask`` (B, S) with 0 for padding; ``cache``
        holds the S - T earlier positions. ``sdpa=False`` (or ``output_attentions``) uses the
        written-out attention."""
        B, T = input_ids.shape
        if use_cache and cache is None:
            cache = KVCache(self.config.n_layer)
        past = cache.get_seq_length() if cache is not None else 0
        S = past + T
        if self.config.max_position_embeddings < S:
            raise ValueError(f"sequence of {S} tokens is longer than max_position_embeddings="
                             f"{self.config.max_position_embeddings}")  # fmt: skip
        # Soft-capped scores (Gemma 2) are not something the fused kernel can do.
        written_out = output_attentions or not sdpa or self.config.attention_softcap is not None
        # Without padding, the fused kernel needs no mask when the causal rule alone applies
        # (a prompt with no cache) or hides nothing (one new token, or each token of a pass in
        # single steps, see Attention): skipping it saves building a (B, 1, T, S) tensor for
        # every generated token.
        one_at_a_time = T == 1 or in_single_steps()
        no_mask_needed = attention_mask is None and (past == 0 or one_at_a_time) and not written_out
        # Windowed layers need their own mask once the sequence is longer than the window.
        window = self.config.attention_window
        windowed = self.config.windowed_layers if window is not None and window < S else ()
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            # Padding does not count: a row's first real token is at position 0.
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)

        x = self.token_embedding(input_ids)  # (B, T, C)
        if self.config.scale_embeddings:  # Gemma, with sqrt(C) rounded to the model's dtype
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        rotary = None
        if self.config.positions == "learned":
            x = x + self.position_embedding(position_ids)
        else:
            # Angles in fp32; cos and sin then cast once to the model's dtype for all layers.
            rotary = rotary_for(self.rotary, position_ids, x.dtype)
            if self.config.window_rope_theta is not None:
                window_rotary = rotary_for(self.window_rotary, position_ids, x.dtype)
        mask = None if no_mask_needed else attention_bias(attention_mask, T, x.dtype)  # (B,1,T,S)
        window_mask = attention_bias(attention_mask, T, x.dtype, window) if windowed else None
        output = TransformerOutput(logits=x, cache=cache if use_cache else None)
        for index, block in enumerate(self.blocks):
            if output_hidden_states:
                output.hidden_states.append(x)
            layer_mask = window_mask if index in windowed else mask
            layer_rotary = rotary
            if self.config.window_rope_theta is not None and index in self.config.windowed_layers:
                layer_rotary = window_rotary
            x, weights = block(x, layer_mask, layer_rotary, cache, written_out)
            if output_attentions:
                output.attentions.append(weights)
        x = self.final_norm(x)
        if output_hidden_states:
            output.hidden_states.append(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]  # only the last positions are needed when generating
        output.logits = self.lm_head(x)  # (B, T, V)
        if self.config.logits_softcap is not None:
            output.logits = soft_cap(output.logits, self.config.logits_softcap)
        return output

    # ---- generation ----------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        stop_token_ids: set[int] | frozenset[int] = frozenset(),
        seed: int | None = None,
    ) -> Iterator[int]:
        """Yield new token ids one by one (streaming), reusing the KV cache: the prompt goes
        through the model once, then each step feeds only the newest token. Temperature 0 is
        greedy decoding; otherwise sample from the ``top_k`` likeliest (0: all). Stops after a
        stop token (which is yielded) or ``max_new_tokens``.

        The short reference loop, as nanoGPT keeps one: chat runs through the engine
        (``src/engine/batching.py``), which batches requests and has the full sampler, and the
        tests check the two agree."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        next_input = torch.tensor([prompt_ids])  # (1, T): the prompt on the first step
        cache = KVCache(self.config.n_layer)
        for _ in range(max_new_tokens):
            logits = self(next_input, cache=cache, use_cache=True, logits_to_keep=1).logits
            logits = logits[0, -1].float()  # (V,)
            if temperature == 0:
                token = int(logits.argmax())
            else:
                logits = logits / temperature
                if 0 < top_k < logits.numel():
                    threshold = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < threshold, float("-inf"))
                probabilities = torch.softmax(logits, dim=-1)
                token = int(torch.multinomial(probabilities, 1, generator=generator))
            yield token
            if token in stop_token_ids:
                return
            next_input = torch.tensor([[token]])  # (1, 1): only the new token from now on

    # ---- loading Hugging Face weights ----------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
        """Build straight from a Hugging Face model folder (config.json, *.safetensors and
        generation_config.json), without importing transformers: the CLI starts a second
        sooner. Raises ValueError for a folder this cannot read (pickle weights, an
        architecture or config it does not know); ``from_hf`` handles those through
        transformers."""
        from safetensors.torch import load_file

        folder = Path(folder)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no .safetensors weights in {folder}")
        model = cls.skeleton_from_folder(folder)
        hf_weights: dict[str, torch.Tensor] = {}
        for file in files:
            hf_weights.update(load_file(file))
        try:
            weights = hf_weight_map(model.config, hf_weights)
        except KeyError as exc:
            raise ValueError(f"the weights in {folder} have no tensor {exc}") from exc
        model.load_weights(weights)
        return model.to(dtype).eval()

    @classmethod
    def skeleton_from_folder(cls, folder: Path) -> Transformer:
        """The model of a folder's config.json with no weights yet (on the meta device: no
        memory, no random initialisation), and its generation config."""
        import json
        from types import SimpleNamespace

        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        try:
            config = TransformerConfig.from_hf(SimpleNamespace(**raw))
        except AttributeError as exc:
            raise ValueError(f"{folder / 'config.json'} lacks a field: {exc}") from exc
        with torch.device("meta"), without_initialisation():
            model = cls(config)
        generation = folder / "generation_config.json"
        if generation.is_file():
            values = json.loads(generation.read_text(encoding="utf-8"))
            model.generation_config = SimpleNamespace(**values)
        return model

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Put ``weights`` (our names) into a skeleton, tying the embeddings as configured."""
        missing, unexpected = self.load_state_dict(weights, strict=False, assign=True)
        tied = {"lm_head.weight"} if self.config.tie_embeddings else set()
        if set(missing) - tied or unexpected:
            raise ValueError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
        # (A quantised skeleton's lm_head has its own weights and no .weight to tie.)
        if self.config.tie_embeddings and type(self.lm_head) is nn.Linear:
            self.lm_head.weight = self.token_embedding.weight

    @classmethod
    def from_hf(cls, model_or_folder: Any) -> Transformer:
        """Build from a transformers GPT2LMHeadModel / LlamaForCausalLM (or its folder)."""
        hf_model = model_or_folder
        if isinstance(model_or_folder, (str, Path)):
            from transformers import AutoModelForCausalLM

            hf_model = AutoModelForCausalLM.from_pretrained(model_or_folder, dtype=torch.float32)
        config = TransformerConfig.from_hf(hf_model.config)
        model = cls(config)
        weights = hf_weight_map(config, hf_model.state_dict())
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = {"lm_head.weight"} if config.tie_embeddings else set()
        if set(missing) - tied or unexpected:
            raise ValueError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
        model.generation_config = getattr(hf_model, "generation_config", None)
        return model.to(next(hf_model.parameters()).dtype).eval()


@contextmanager
def without_initialisation() -> Iterator[None]:
    """Build layers without drawing random initial weights (they are overwritten by loading
    right after). On the meta device this also avoids torch's Python reference kernels for
    random numbers, whose first use imports a second's worth of modules."""
    classes = (nn.Linear, nn.Embedding, nn.LayerNorm)
    saved = {cls: cls.reset_parameters for cls in classes}
    for cls in classes:
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for cls, reset in saved.items():
            cls.reset_parameters = reset


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): about x when small, never beyond +-cap (Gemma 2)."""
    return torch.tanh(x / cap) * cap


def attention_bias(
    attention_mask: torch.Tensor, T: int, dtype: torch.dtype, window: int | None = None
) -> torch.Tensor:
    """Additive mask (B, 1, T, S): 0 where a query may look, the dtype's minimum where not.

    A query may look at a key if the key is not padding and not in the future (causal), and,
    with a ``window``, if it is one of the query's ``window`` latest real tokens (its own
    included; padding inside a row does not count). We
    use the minimum rather than -inf so a fully masked row (a padding query) softmaxes to a
    harmless uniform row instead of NaN, which would leak into every row through ``@ v``.
    """
    B, S = attention_mask.shape
    query_positions = torch.arange(S - T, S, device=attention_mask.device)[:, None]  # (T, 1)
    key_positions = torch.arange(S, device=attention_mask.device)[None, :]  # (1, S)
    causal = key_positions <= query_positions  # (T, S)
    allowed = causal[None] & attention_mask[:, None, :].bool()  # (B, T, S)
    if window is not None:
        real = attention_mask.cumsum(-1)  # (B, S): a row's real tokens up to each position
        allowed &= (real[:, -T:, None] - real[:, None, :]) < window
    bias = torch.zeros(B, 1, T, S, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


# Which Hugging Face linear layers make each of ours, per family: several are concatenated
# along the output in this order (Llama's q, k and v become our one qkv, gate and up our
# gate_up). LoRA adapters, which
# name Hugging Face's layers, are mapped onto ours with the same table (src/models/lora_view.py).
HF_BLOCK_PREFIX = {
    "gpt2": "transformer.h.{}.",
    "llama": "model.layers.{}.",
    "phi3": "model.layers.{}.",
}
HF_LINEAR_NAMES: dict[str, dict[str, list[str]]] = {
    "gpt2": {
        "attention.qkv": ["attn.c_attn"],
        "attention.proj": ["attn.c_proj"],
        "mlp.up": ["mlp.c_fc"],
        "mlp.down": ["mlp.c_proj"],
    },
    "llama": {
        "attention.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "attention.proj": ["self_attn.o_proj"],
        "mlp.gate_up": ["mlp.gate_proj", "mlp.up_proj"],
        "mlp.down": ["mlp.down_proj"],
    },
    "phi3": {
        "attention.qkv": ["self_attn.qkv_proj"],
        "attention.proj": ["self_attn.o_proj"],
        "mlp.gate_up": ["mlp.gate_up_proj"],
        "mlp.down": ["mlp.down_proj"],
    },
}


def family(config: TransformerConfig) -> str:
    """ "gpt2", "llama" or "phi3": whose Hugging Face names the weights have."""
    return str(config.weight_names)


def hf_weight_map(config: TransformerConfig, hf: dict[str, torch.Tensor]) -> dict:
    """Rename (and where needed transpose or concatenate) Hugging Face tensors to ours."""
    ours: dict[str, torch.Tensor] = {}
    kind = family(config)
    if kind == "gpt2":
        ours["token_embedding.weight"] = hf["transformer.wte.weight"]
        ours["position_embedding.weight"] = hf["transformer.wpe.weight"]
        ours["final_norm.weight"] = hf["transformer.ln_f.weight"]
        ours["final_norm.bias"] = hf["transformer.ln_f.bias"]
        norms = {"norm1": "ln_1", "norm2": "ln_2"}
    else:
        ours["token_embedding.weight"] = hf["model.embed_tokens.weight"]
        ours["final_norm.weight"] = hf["model.norm.weight"]
        if not config.tie_embeddings:
            ours["lm_head.weight"] = hf["lm_head.weight"]
        norms = {"norm1": "input_layernorm", "norm2": "post_attention_layernorm"}
        if config.sandwich_norms:  # Gemma's names: its post_attention_layernorm is an output's
            norms = {
                "norm1": "input_layernorm",
                "attention_out_norm": "post_attention_layernorm",
                "norm2": "pre_feedforward_layernorm",
                "mlp_out_norm": "post_feedforward_layernorm",
            }
    for i in range(config.n_layer):
        theirs, mine = HF_BLOCK_PREFIX[kind].format(i), f"blocks.{i}."
        for new, old in norms.items():
            ours[f"{mine}{new}.weight"] = hf[f"{theirs}{old}.weight"]
            if kind == "gpt2":
                ours[f"{mine}{new}.bias"] = hf[f"{theirs}{old}.bias"]
        if config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                ours[f"{mine}attention.{norm}.weight"] = hf[f"{theirs}self_attn.{norm}.weight"]
        for new, parts in HF_LINEAR_NAMES[kind].items():
            # GPT-2 stores Conv1D weights as (in, out); nn.Linear wants (out, in).
            weights = [hf[f"{theirs}{part}.weight"] for part in parts]
            weights = [w.t() for w in weights] if kind == "gpt2" else weights
            ours[f"{mine}{new}.weight"] = weights[0] if len(parts) == 1 else torch.cat(weights)
            if has_bias(config, new):
                biases = [hf[f"{theirs}{part}.bias"] for part in parts]
                ours[f"{mine}{new}.bias"] = biases[0] if len(parts) == 1 else torch.cat(biases)
    return ours


def has_bias(config: TransformerConfig, layer: str) -> bool:
    """Whether our ``layer`` ("attention.qkv", "mlp.up", ...) has a bias in this config."""
    if layer == "attention.proj":
        return bool(config.attention_output_bias)
    return config.attention_bias if layer.startswith("attention.") else config.mlp_bias

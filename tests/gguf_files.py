"""GGUF files written in tests, the way llama.cpp's converter writes them, from tiny Hugging
Face models: tensor names from gguf-py's own name map, Llama's q and k rows permuted, Gemma's
norms stored plus one, the config as the architecture's metadata keys, and the tokenizer and
chat template copied from the bundled GGUF file. Each tensor takes the type a test chooses;
K-quants, which gguf-py cannot quantise, are written as random blocks with sane scales."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    get_tensor_name_map,
    quantize,
)

from src.models.bundled import bundled_gguf_path

TypeChooser = Callable[[str, tuple[int, ...]], GGMLQuantizationType]
GEMMA = ("gemma2", "gemma3")


def gguf_architecture(model_type: str) -> str:
    """GGUF's name for a transformers model type (Mistral is written as Llama)."""
    return {"mistral": "llama", "gemma3_text": "gemma3"}.get(model_type, model_type)


def write_gguf(model: torch.nn.Module, path: Path, choose: TypeChooser) -> Path:
    """``model`` (a transformers causal LM) as a GGUF file at ``path``."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    config = model.config
    arch = gguf_architecture(config.model_type)
    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{config.model_type}")
    for key, attribute in GGUF_CONFIG_MAPPING[gguf_mapping_name(config.model_type)].items():
        value = getattr(config, attribute, None) if attribute else None
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            writer.add_uint32(f"{arch}.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
    copy_tokenizer_fields(writer, config.vocab_size)
    arch_enum = next(key for key, name in MODEL_ARCH_NAMES.items() if name == arch)
    names = get_tensor_name_map(arch_enum, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        weights = tensor.float().numpy()
        if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            heads = config.num_attention_heads
            if ".attn_k." in gguf_name:
                heads = config.num_key_value_heads
            weights = permute_rows(weights, heads)
        if arch in GEMMA and gguf_name.endswith("norm.weight"):
            weights = weights + 1
        kind = choose(gguf_name, weights.shape) if weights.ndim == 2 else GGMLQuantizationType.F32
        add_tensor(writer, gguf_name, weights, kind)
    rope = getattr(config, "rope_parameters", None) or {}
    if arch == "llama" and rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama3_rope_factors(config) -> np.ndarray:
    """What llama.cpp's converter writes as ``rope_freqs.weight`` for Llama 3.1: by how much
    each rotary frequency is divided."""
    from src.models.transformer import llama3_frequencies

    rope = config.rope_parameters
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inverse = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2).double() / head_dim)
    return (inverse / llama3_frequencies(inverse, rope)).float().numpy()


def gguf_mapping_name(model_type: str) -> str:
    return {"gemma3_text": "gemma3"}.get(model_type, model_type)


def permute_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of q and k rows (transformers undoes it on loading)."""
    shape = weights.shape
    return (
        weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def add_tensor(writer: GGUFWriter, name: str, weights: np.ndarray, kind: GGMLQuantizationType):
    if kind == GGMLQuantizationType.F32:
        writer.add_tensor(name, weights.astype(np.float32))
    elif kind == GGMLQuantizationType.F16:
        writer.add_tensor(name, weights.astype(np.float16))
    elif kind in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K):
        writer.add_tensor(name, random_k_blocks(weights.shape, kind), raw_dtype=kind)
    else:
        writer.add_tensor(name, quantize(weights, kind), raw_dtype=kind)


def random_k_blocks(shape: tuple[int, ...], kind: GGMLQuantizationType) -> np.ndarray:
    """Random K-quant blocks (rows, bytes): random codes and sub-scales, and fp16 super-block
    scales small enough for weights of the usual size."""
    block, size = GGML_QUANT_SIZES[kind]
    rows, width = shape
    generator = np.random.default_rng(rows * 7919 + width)
    blocks = generator.integers(0, 256, (rows * width // block, size), dtype=np.uint8)
    scale = generator.uniform(0.001, 0.004, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    if kind == GGMLQuantizationType.Q4_K:  # d, dmin, then 12 bytes of sub-scales, codes
        blocks[:, 0:2] = scale
        blocks[:, 2:4] = scale
    else:  # Q6_K: codes, 16 int8 sub-scales, then d last
        blocks[:, -2:] = scale
    return blocks.reshape(rows, -1)


def copy_tokenizer_fields(writer: GGUFWriter, vocab_size: int) -> None:
    """The bundled file's tokenizer (SmolLM2's byte-level BPE, BOS 1, EOS 2) and chat
    template, cut to its first ``vocab_size`` tokens and the merges among them (a small
    vocabulary keeps reading and converting test files quick)."""
    fields = bundled_tokenizer_fields()
    kept = set(fields["tokenizer.ggml.tokens"][0][:vocab_size])
    for key, (value, kind, sub_type) in fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            value = value[:vocab_size]
        elif key == "tokenizer.ggml.merges":
            value = [merge for merge in value if merge_within(merge, kept)]
        writer.add_key_value(key, value, kind, sub_type=sub_type)


@functools.cache
def bundled_tokenizer_fields() -> dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]:
    """The bundled file's ``tokenizer.*`` fields: value, type, element type (read once)."""
    reader = GGUFReader(bundled_gguf_path())
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            kind = field.types[0]
            sub_type = field.types[-1] if kind == GGUFValueType.ARRAY else None
            fields[key] = (field.contents(), kind, sub_type)
    return fields


def merge_within(merge: str, tokens: set[str]) -> bool:
    left, _, right = merge.partition(" ")
    return left in tokens and right in tokens and left + right in tokens


def by_name(default: GGMLQuantizationType, **special: GGMLQuantizationType) -> TypeChooser:
    """A chooser: ``special`` types for tensors whose name contains a key (``attn_v``,
    ``token_embd``, ...), ``default`` for the rest."""

    def choose(name: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
        return next((kind for part, kind in special.items() if part in name), default)

    return choose

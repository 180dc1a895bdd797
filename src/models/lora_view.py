"""A saved peft LoRA adapter served on our Transformer, unmerged, sharing the base's weights.

Merging an adapter (W + B A) needs a whole copy of the model per adapter, and on int4 weights
it also rounds the update into 4 bits. Here the adapter stays a separate low-rank update on
each layer (``LoRALinear``: y = W x + B A x, scaling folded into B), and everything else (the
embeddings, the norms and every base weight, int4 or not) is the very same tensors as the
base model's: an adapter costs its own A and B matrices (about 10 MB for SmolLM2-135M at
rank 8, kept in fp32: see ``LoRALinear``), and the base keeps its exact weights.

Llama's q, k and v projections are one ``qkv`` layer in our model, and its gate and up
projections one ``gate_up``: their adapters are joined into one update, A stacked along the
rank and B block-diagonal, which gives the same outputs as peft's separate updates.

``read_adapter`` accepts what this path computes exactly (peft's plain LoRA on the linear
layers of the blocks) and raises ``UnsupportedAdapter`` naming anything else (DoRA, adapted
embeddings, ``modules_to_save``, ...): such an adapter is served by transformers and peft
instead (src/models/inference.py).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from src.errors import ModelLoadingError
from src.models.lora_wrapper import ADAPTER_CONFIG, ADAPTER_SAFETENSORS, LoRALinear
from src.models.transformer import (
    HF_BLOCK_PREFIX,
    HF_LINEAR_NAMES,
    Transformer,
    TransformerConfig,
    family,
)

PEFT_PREFIX = "base_model.model."  # peft's saved names: this, then the model's own name

# adapter_config.json keys whose value does not change what the adapter computes at
# inference (provenance, training-time settings); any other key set to a non-default value
# is something this path does not implement.
HARMLESS_KEYS = {
    "peft_type", "task_type", "r", "lora_alpha", "use_rslora", "target_modules", "bias",
    "fan_in_fan_out", "lora_dropout", "inference_mode", "base_model_name_or_path", "revision",
    "auto_mapping", "peft_version", "layers_to_transform", "layers_pattern", "exclude_modules",
    "rank_pattern", "megatron_core", "megatron_config", "qalora_group_size", "init_lora_weights",
    "ensure_weight_tying",
}  # fmt: skip
PLAIN_INITIALISATION = (True, False, "gaussian")  # others (PiSSA, OLoRA) change the base


class UnsupportedAdapter(ValueError):
    """The adapter uses something only peft implements; the message says what."""


@dataclass
class LayerUpdate:
    """One of our linear layers' low-rank update: y += B (A x), the scaling already in B."""

    lora_A: torch.Tensor  # (r, in), fp32 whatever the model's dtype (see LoRALinear)
    lora_B: torch.Tensor  # (out, r), fp32


def read_adapter(folder: Path, model: Transformer) -> dict[str, LayerUpdate]:
    """The updates of the adapter saved in ``folder`` (peft's format), by our layer name
    ("blocks.3.attention.qkv"). Raises ``UnsupportedAdapter`` for what only peft can run and
    ``ModelLoadingError`` for an adapter that does not fit ``model``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from src.models.folder_check import check_safetensors_file

    folder = Path(folder)
    config = read_config(folder)
    weights_file = folder / ADAPTER_SAFETENSORS
    if not weights_file.is_file():
        raise UnsupportedAdapter(f"{folder.name} has no {ADAPTER_SAFETENSORS}")
    check_safetensors_file(weights_file)
    try:
        saved = load_file(weights_file)
    except (OSError, SafetensorError) as exc:
        raise ModelLoadingError(f"Could not read the adapter {weights_file}: {exc}") from exc
    tensors = {name.removeprefix(PEFT_PREFIX): tensor for name, tensor in saved.items()}
    alpha, rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora"))
    updates: dict[str, LayerUpdate] = {}
    kind = family(model.config)
    for i, block in enumerate(model.blocks):
        prefix = HF_BLOCK_PREFIX[kind].format(i)
        for ours, parts in HF_LINEAR_NAMES[kind].items():
            layer = block.get_submodule(ours)
            found = [
                lora_pair(tensors, f"{prefix}{part}", alpha, rslora, layer.in_features)
                for part in parts
            ]
            if all(pair is None for pair in found):
                continue
            widths = part_widths(model.config, layer.out_features, len(parts))
            updates[f"blocks.{i}.{ours}"] = join_parts(found, widths, f"{prefix}{ours}")
    if not updates:
        raise ModelLoadingError(
            f"The adapter in {folder} does not fit this model: none of its tensors "
            f"({', '.join(sorted(tensors)[:2]) or 'none'}, ...) is a layer of it."
        )
    if tensors:  # every tensor used above was taken out
        raise UnsupportedAdapter(
            f"it adapts {sorted(tensors)[0]}, which is not a linear layer of a block"
        )
    return updates


def read_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadingError(f"Could not read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadingError(f"{path} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapter(f"peft_type is {config['peft_type']!r}, not LORA")
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapter(f"bias={config['bias']!r} (it trains the base biases)")
    if config.get("init_lora_weights", True) not in PLAIN_INITIALISATION:
        raise UnsupportedAdapter(f"init_lora_weights={config['init_lora_weights']!r}")
    for key, value in config.items():
        if key not in HARMLESS_KEYS and value:
            raise UnsupportedAdapter(f"{key}={value!r}")
    return config


def lora_pair(
    tensors: dict[str, torch.Tensor], module: str, alpha: float, rslora: bool, in_features: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, scaled B) of one Hugging Face module, taken out of ``tensors``; None if absent."""
    names = (f"{module}.lora_A.weight", f"{module}.lora_B.weight")
    if not any(name in tensors for name in names):
        return None
    if not all(name in tensors for name in names):
        raise ModelLoadingError(f"The adapter has only one of {names[0]} and {names[1]}.")
    lora_A, lora_B = (tensors.pop(name).float() for name in names)
    rank = lora_A.shape[0]
    if (
        lora_A.ndim != 2
        or lora_B.ndim != 2
        or lora_A.shape[1] != in_features
        or (lora_B.shape[1] != rank)
    ):
        raise ModelLoadingError(
            f"The adapter does not fit this model: {module} has A {tuple(lora_A.shape)} and "
            f"B {tuple(lora_B.shape)}, but the layer takes {in_features} inputs."
        )
    # peft's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA (rank from the tensor, which
    # also covers rank_pattern).
    scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
    return lora_A, lora_B * scaling


def part_widths(config: TransformerConfig, out_features: int, parts: int) -> list[int]:
    """Output widths of the Hugging Face modules that make one of our layers."""
    if parts == 3:  # Llama's q, k, v
        kv = config.n_kv_head * config.head_dim
        return [config.n_head * config.head_dim, kv, kv]
    return [out_features // parts] * parts  # Llama's gate and up: halves


def join_parts(
    found: list[tuple[torch.Tensor, torch.Tensor] | None],
    widths: list[int],
    name: str,
) -> LayerUpdate:
    """One update for a layer made of several modules (stacked A, block-diagonal B); a
    module without an adapter adds no rank and zero rows."""
    for pair, width in zip(found, widths, strict=True):
        if pair is not None and pair[1].shape[0] != width:
            raise ModelLoadingError(
                f"The adapter does not fit this model: {name} needs {width} outputs per part, "
                f"the adapter's B has {pair[1].shape[0]}."
            )
    lora_A = torch.cat([pair[0] for pair in found if pair is not None])
    lora_B = torch.block_diag(
        *(pair[1] if pair is not None else torch.zeros(width, 0)
          for pair, width in zip(found, widths, strict=True))
    )  # fmt: skip
    return LayerUpdate(lora_A, lora_B)


def with_adapter(model: Transformer, folder: Path) -> Transformer:
    """``model`` with the adapter in ``folder``: a new model object whose adapted layers are
    ``LoRALinear`` around the base's layers and whose other parts are the base's own."""
    updates = read_adapter(folder, model)
    layers = {
        name: LoRALinear.around(model.get_submodule(name), update.lora_A, update.lora_B)
        for name, update in updates.items()
    }
    return sharing_copy(model, layers)


def sharing_copy(module: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A new module tree holding the same submodules, parameters and buffers as ``module``,
    except ``replacements`` (by dotted name). Nothing is copied but the tree itself."""
    copied = copy.copy(module)  # a new object with the same attributes, dicts included
    copied._parameters = dict(module._parameters)
    copied._buffers = dict(module._buffers)
    copied._modules = {}
    for name, child in module._modules.items():
        below = {
            key.removeprefix(f"{name}."): layer
            for key, layer in replacements.items()
            if key.startswith(f"{name}.")
        }
        if name in replacements:
            copied._modules[name] = replacements[name]
        elif below:
            copied._modules[name] = sharing_copy(child, below)
        else:
            copied._modules[name] = child
    return copied

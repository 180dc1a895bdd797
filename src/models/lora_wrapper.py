"""LoRA (Hu et al., 2021): fine-tune a model by learning a small low-rank update per layer.

A frozen weight W (out x in) gets an update B @ A with A (r x in) and B (out x r), r small,
scaled by alpha / r: y = W x + (alpha / r) B A x. B starts at zero, so training starts from
exactly the base model. Only A and B are trained: for SmolLM2-135M at r=8 that is under 2%
of the parameters.

Two implementations:
- the peft path (``apply_lora``, ``load_adapter``, ``merge_and_save``), used for training and
  serving, in peft's standard format so adapters move between tools;
- ``LoRALinear``, the same idea written out in a few lines to read (tested equal to peft).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src.errors import ModelLoadingError
from src.models.transformer import LLAMA_LIKE

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"

# Which layers get LoRA by default, per architecture (the linear layers of attention and MLP).
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGET_MODULES = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **{kind: LLAMA_LINEARS for kind in LLAMA_LIKE},  # Llama's layer names in every such family
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],  # stored fused
}


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: DEFAULT_TARGET_MODULES for the model


def target_modules_for(model: Any, requested: list[str] | None) -> list[str]:
    if requested:
        return list(requested)
    model_type = model.config.model_type
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"no default LoRA target modules for model_type {model_type!r}; set "
            "lora.target_modules in the config"
        )
    return DEFAULT_TARGET_MODULES[model_type]


def apply_lora(model: Any, settings: LoraSettings) -> Any:
    """Wrap ``model`` in a trainable peft LoRA model (base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_modules_for(model, settings.target_modules),
        task_type="CAUSAL_LM",
        # GPT-2's Conv1D stores weights as (in, out); peft must know to transpose them.
        fan_in_fan_out=model.config.model_type == "gpt2",
    )
    return get_peft_model(model, config)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def describe_parameters(model: nn.Module) -> str:
    trainable, total = parameter_counts(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"


def load_adapter(model: Any, adapter_dir: Path, allow_pickle: bool = False) -> Any:
    """Attach a saved peft LoRA adapter to ``model`` for inference. Pickle weights
    (adapter_model.bin) are refused unless ``allow_pickle`` (ALLOW_PICKLE=true)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise ModelLoadingError(
            f"Adapter folder {adapter_dir} has no {ADAPTER_CONFIG}: is it a peft adapter?"
        )
    pickle_only = (adapter_dir / ADAPTER_PICKLE).is_file() and not (
        adapter_dir / ADAPTER_SAFETENSORS
    ).is_file()  # peft prefers the safetensors file when both exist
    if pickle_only and not allow_pickle:
        raise ModelLoadingError(
            f"Adapter folder {adapter_dir} has only pickle weights ({ADAPTER_PICKLE}), which "
            "can run code when loaded; they are refused unless you set ALLOW_PICKLE=true "
            "(only for an adapter you trust), or save the adapter as safetensors."
        )
    if (adapter_dir / ADAPTER_SAFETENSORS).is_file():  # truncated or corrupt: name the file
        from src.models.folder_check import check_safetensors_file

        check_safetensors_file(adapter_dir / ADAPTER_SAFETENSORS)
    from safetensors import SafetensorError

    try:
        adapted = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as exc:
        raise ModelLoadingError(f"Could not load the adapter in {adapter_dir}: {exc}") from exc
    adapted.eval()
    return adapted


def merge_and_save(adapted: Any, adapter_name: str, output_dir: Path, tokenizer: Any) -> Path:
    """Fold the adapter into the base weights and save a plain model (safetensors).

    Refuses an adapter with NaN or infinite weights (a diverged run), naming it, rather than
    writing a broken model.
    """
    bad = [name for name, tensor in adapted.state_dict().items()
           if "lora_" in name and not torch.isfinite(tensor).all()]  # fmt: skip
    if bad:
        raise ModelLoadingError(
            f"Adapter {adapter_name!r} has non-finite (NaN or inf) weights in {len(bad)} "
            f"tensors, e.g. {bad[0]}; refusing to merge. Retrain with a lower learning rate."
        )
    merged = adapted.merge_and_unload()
    output_dir = Path(output_dir)
    merged.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


class LoRALinear(nn.Module):
    """LoRA written out: a frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))  # (out, r): zero
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and peft do
        self.merged = False

    @classmethod
    def around(cls, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor) -> LoRALinear:
        """A frozen layer serving a trained update, B already scaled: ``base`` may be any
        layer with ``in_features`` and ``out_features`` (a quantised one too), and is shared,
        not copied (src/models/lora_view.py)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.base, layer.scaling, layer.merged = base, 1.0, False
        layer.lora_A = nn.Parameter(lora_A, requires_grad=False)
        layer.lora_B = nn.Parameter(lora_B, requires_grad=False)
        return layer

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.merged:
            # In A's dtype: fp32 when serving a bf16 model (lora_view.py), because PyTorch's
            # bf16 matmul keeps memory for every new row count it meets (hundreds of MB over
            # a server's varied prompt lengths) and is slower at these tiny ranks.
            update = x.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T
            update = update if self.scaling == 1.0 else update * self.scaling
            y = y + update.to(y.dtype)
        return y

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in), rank <= r

    @torch.no_grad()
    def merge(self) -> None:
        """Add B A into the base weight: same outputs, no extra cost at inference."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

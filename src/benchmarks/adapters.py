"""LoRA adapters with random weights for the bundled model, for load tests: enough to make
the server load, batch and evict adapters as it does with trained ones (their replies differ
from the base model's), without a training run."""

from __future__ import annotations

from pathlib import Path

import torch

from src.models.lora_wrapper import LoraSettings, apply_lora

# Large enough that each adapter's greedy reply to a question departs from the base model's
# within a few tokens, small enough that the replies are still sentences.
B_SCALE = 0.05


def make_random_adapters(
    base_folder: Path, adapters_dir: Path, count: int, seed: int = 0
) -> list[str]:
    """Save ``count`` adapters (``random-0``, ``random-1``, ...) for the model in
    ``base_folder`` into ``adapters_dir``; returns their names."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    adapted = apply_lora(model, LoraSettings(rank=4, alpha=8.0, dropout=0.0))
    names = []
    for number in range(count):
        # Both matrices from the adapter's own generator: the same seed gives the same adapter
        # whatever ran before in the process (lora_A's initialisation draws from torch's).
        generator = torch.Generator().manual_seed(seed * 1000 + number)
        with torch.no_grad():
            for name, parameter in adapted.named_parameters():
                if "lora_A" in name:  # the range peft's initialisation uses: +-1/sqrt(in)
                    bound = parameter.shape[1] ** -0.5
                    parameter.copy_(
                        (torch.rand(parameter.shape, generator=generator) * 2 - 1) * bound
                    )
                elif "lora_B" in name:  # zero when created: the adapter would change nothing
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * B_SCALE)
        names.append(f"random-{number}")
        adapted.save_pretrained(Path(adapters_dir) / names[-1])
    return names

"""Held-out perplexity: how well a model predicts real replies it was not tuned on. The
benchmark compares precisions and quantisations with it, and QUANTIZE=auto uses it to decide
whether a checkpoint keeps its quality in int4 or int8 (src/models/auto_quantization.py), on
the conversations of ``src/training/calibration.py``."""

from __future__ import annotations

from typing import Any

import torch


@torch.inference_mode()
def held_out_perplexity(model: Any, examples: list[dict[str, list[int]]]) -> float:
    """Perplexity on assistant tokens of held-out conversations (tokenized for training)."""
    total, count = 0.0, 0
    for example in examples:
        ids = torch.tensor([example["input_ids"]])
        labels = torch.tensor([example["labels"]])
        logits = model(ids).logits[0, :-1].float()
        targets = labels[0, 1:]
        keep = targets != -100
        loss = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
        total, count = total + float(loss), count + int(keep.sum())
    return float(torch.exp(torch.tensor(total / count)))

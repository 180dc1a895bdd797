"""Looking inside the model: attention heatmaps, and how far our transformer is from
Hugging Face's at every layer (used by scripts/inspect_model.py and the notebook)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from src.models.transformer import Transformer

PARITY_TOLERANCE = 1e-4


@dataclass
class ParityReport:
    hidden_state_diffs: list[float]  # embeddings, then after each layer (last: final norm)
    logits_diff: float

    @property
    def worst(self) -> float:
        return max([*self.hidden_state_diffs, self.logits_diff])

    @property
    def passed(self) -> bool:
        return self.worst <= PARITY_TOLERANCE

    def as_text(self) -> str:
        lines = ["layer                max |ours - HF|"]
        for index, diff in enumerate(self.hidden_state_diffs):
            last = index == len(self.hidden_state_diffs) - 1
            name = "embeddings" if index == 0 else ("final norm" if last else f"block {index}")
            lines.append(f"{name:<20} {diff:.3e}")
        lines.append(f"{'logits':<20} {self.logits_diff:.3e}")
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"{verdict}: worst {self.worst:.3e} (tolerance {PARITY_TOLERANCE:.0e})")
        return "\n".join(lines)


@torch.no_grad()
def parity_report(hf_model: Any, ours: Transformer, input_ids: torch.Tensor) -> ParityReport:
    """Run both models on the same ids and compare every hidden state and the logits."""
    theirs = hf_model(input_ids, output_hidden_states=True)
    mine = ours(input_ids, output_hidden_states=True)
    diffs = [(a - b).abs().max().item() for a, b in
             zip(theirs.hidden_states, mine.hidden_states, strict=True)]  # fmt: skip
    return ParityReport(diffs, (theirs.logits - mine.logits).abs().max().item())


@torch.no_grad()
def attention_map(ours: Transformer, input_ids: torch.Tensor, layer: int, head: int):
    """The (T, T) attention weights of one head of one layer, for a single sequence."""
    if not 0 <= layer < ours.config.n_layer:
        raise ValueError(f"layer={layer}: the model has layers 0..{ours.config.n_layer - 1}")
    if not 0 <= head < ours.config.n_head:
        raise ValueError(f"head={head}: the model has heads 0..{ours.config.n_head - 1}")
    weights = ours(input_ids, output_attentions=True).attentions[layer]  # (1, nh, T, T)
    return weights[0, head]


def plot_attention(weights: torch.Tensor, tokens: list[str], title: str, path: Path) -> Path:
    """Save a heatmap: row i shows where token i looks (each row sums to 1)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    size = max(4.0, 0.45 * len(tokens) + 2)
    figure, axes = plt.subplots(figsize=(size, size), dpi=100)
    image = axes.imshow(weights.numpy(), cmap="viridis", vmin=0.0)
    axes.set_xticks(range(len(tokens)), tokens, rotation=90)
    axes.set_yticks(range(len(tokens)), tokens)
    axes.set_xlabel("key (attended to)")
    axes.set_ylabel("query (attending)")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def readable_tokens(tokenizer: Any, ids: list[int]) -> list[str]:
    """Token labels for plots: the text of each token, spaces made visible."""
    return [tokenizer.decode([i]).replace(" ", "·").replace("\n", "\\n") or "∅" for i in ids]

"""The curves of a run, from its metrics.jsonl: LoRA fine-tuning's loss; DPO's loss and reward
margin."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(metrics_path: Path) -> list[dict]:
    if not Path(metrics_path).exists():
        return []
    return [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]


def series(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if r.get(key) is not None]


def plot_loss_curve(metrics_path: Path, output: Path) -> Path | None:
    records = read_metrics(metrics_path)
    if not records:
        return None
    train, evals = series(records, "loss"), series(records, "eval_loss")
    # A Figure of its own rather than pyplot: no GUI backend needed, and the backend of the
    # process (e.g. a notebook's inline plots) is left alone.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.subplots()
    if train:
        axes.plot(*zip(*train, strict=True), label="training loss", alpha=0.7)
    if evals:
        axes.plot(*zip(*evals, strict=True), "o-", label="validation loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (assistant tokens)")
    axes.set_title("LoRA fine-tuning")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    return output


def plot_dpo_curves(metrics_path: Path, output: Path) -> Path | None:
    """Two panels: the DPO loss, and the reward margin (chosen minus rejected), each for the
    training batches and the held-out pairs."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=100)
    loss_axes, margin_axes = figure.subplots(1, 2)
    panels = [
        (loss_axes, "loss", "eval_loss", "DPO loss"),
        (
            margin_axes,
            "rewards/margins",
            "eval_rewards/margins",
            "reward margin (chosen - rejected)",
        ),
    ]
    for axes, train_key, eval_key, title in panels:
        if train := series(records, train_key):
            axes.plot(*zip(*train, strict=True), label="training batches", alpha=0.6)
        if held_out := series(records, eval_key):
            axes.plot(*zip(*held_out, strict=True), "o-", label="held-out pairs")
        axes.set_xlabel("optimizer step")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle("Preference tuning (DPO)")
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    return output

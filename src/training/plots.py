"""The loss curve of a run, from its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_loss_curve(metrics_path: Path, output: Path) -> Path | None:
    if not Path(metrics_path).exists():
        return None
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
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

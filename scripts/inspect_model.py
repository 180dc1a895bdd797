"""Look inside the model: an attention heatmap, and a parity report against Hugging Face.

    python scripts/inspect_model.py --prompt "The cat sat on the mat" --layer 3 --head 0
    python scripts/inspect_model.py --model smollm2-135m-instruct --output outputs/attn.png

The heatmap (PNG) shows, for one head of one layer of our from-scratch transformer, how much
each token attends to each earlier one. The report prints the largest difference between our
hidden states and Hugging Face's after every layer, and between the logits; the exit status
is 1 if any is above the tolerance (1e-4).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401

from src.config import load_settings
from src.errors import MiniClaudeError
from src.models.inspection import (
    attention_map,
    parity_report,
    plot_attention,
    readable_tokens,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog.")
    parser.add_argument(
        "--model", help="hub id, folder or smollm2-135m-instruct (default: MODEL_NAME)"
    )
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--head", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("outputs/attention.png"))
    args = parser.parse_args(argv)

    import torch

    from src.models.loader import load_model
    from src.models.transformer import Transformer

    try:
        settings = load_settings()
        loaded = load_model(settings, model_name=args.model, dtype=torch.float32)
        ours = Transformer.from_hf(loaded.model)
        ids = loaded.tokenizer.encode(args.prompt)
        if not ids:
            raise ValueError("--prompt gives no tokens")
        input_ids = torch.tensor([ids])
        weights = attention_map(ours, input_ids, args.layer, args.head)
    except (MiniClaudeError, ValueError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    title = f"{loaded.name}: layer {args.layer}, head {args.head}"
    path = plot_attention(weights, readable_tokens(loaded.tokenizer, ids), title, args.output)
    print(f"Attention map ({len(ids)} tokens): {path}")
    report = parity_report(loaded.model, ours, input_ids)
    print(report.as_text())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())

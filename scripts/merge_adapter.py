"""Fold a LoRA adapter into its base model and save a plain model folder (safetensors).

    python scripts/merge_adapter.py --adapter outputs/adapters/chitchat-lora \\
        --output models/smollm2-chitchat-merged
    MODEL_NAME=models/smollm2-chitchat-merged python src/mvp_chatbot.py

The merged model needs no peft at inference and runs on every engine (ENGINE=scratch too).
An adapter with NaN or infinite weights (a diverged run) is refused, by name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401

from src.errors import MiniClaudeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--model", help="base model (default: MODEL_NAME)")
    args = parser.parse_args(argv)

    import torch

    from src.config import load_settings
    from src.models.loader import load_model
    from src.models.lora_wrapper import merge_and_save

    if args.output.exists() and any(args.output.iterdir()):
        print(f"Error: {args.output} exists and is not empty; choose a new folder", file=sys.stderr)
        return 2
    try:
        loaded = load_model(
            load_settings(), model_name=args.model, adapter_path=args.adapter, dtype=torch.float32
        )
        folder = merge_and_save(loaded.model, args.adapter.name, args.output, loaded.tokenizer)
    except MiniClaudeError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    print(f"Merged {args.adapter} into {loaded.name}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

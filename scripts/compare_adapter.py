"""Answer the same prompts with the base model and with base + LoRA adapter, side by side.

    python scripts/compare_adapter.py --adapter outputs/adapters/chitchat-lora
    python scripts/compare_adapter.py --adapter DIR --prompt "How was your weekend?" --prompt "Hi!"

One copy of the model is loaded; the base replies come from the same weights with the adapter
switched off (peft's ``disable_adapter``), so the difference is the adapter and nothing else.
Greedy decoding, so the comparison is repeatable.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
from pathlib import Path

import _bootstrap  # noqa: F401

from src.errors import MiniClaudeError

DEFAULT_PROMPTS = [
    "Hi! How was your weekend?",
    "I just got back from a trip to the mountains.",
    "What do you like to do in your free time?",
]


def side_by_side(left: str, right: str, width: int) -> str:
    column = (width - 3) // 2
    left_lines = [
        line for part in left.splitlines() or [""] for line in textwrap.wrap(part, column) or [""]
    ]
    right_lines = [
        line for part in right.splitlines() or [""] for line in textwrap.wrap(part, column) or [""]
    ]
    rows = max(len(left_lines), len(right_lines))
    left_lines += [""] * (rows - len(left_lines))
    right_lines += [""] * (rows - len(right_lines))
    return "\n".join(f"{a:<{column}} | {b}" for a, b in zip(left_lines, right_lines, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True, help="a peft LoRA adapter folder")
    parser.add_argument("--model", help="base model (default: MODEL_NAME)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    args = parser.parse_args(argv)

    from src.chat.service import ChatService
    from src.config import load_settings
    from src.models.loader import load_model
    from src.params import GenerationParams
    from src.stack import local_backend

    try:
        # No prefix cache: the base and the adapter read the same prompts with other weights.
        settings = load_settings().model_copy(update={"prefix_cache_mb": 0})
        loaded = load_model(settings, model_name=args.model, adapter_path=args.adapter)
        params = GenerationParams(do_sample=False, max_new_tokens=args.max_new_tokens)
    except MiniClaudeError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    # No response cache: the same prompt must be generated twice, once per setting.
    backend = local_backend(loaded.model, loaded.tokenizer, settings)
    service = ChatService(backend, loaded.name, cache_size=0)
    width = min(shutil.get_terminal_size((120, 24)).columns, 160)
    headers = side_by_side(f"BASE ({loaded.name})", f"WITH ADAPTER ({args.adapter.name})", width)
    for prompt in args.prompt or DEFAULT_PROMPTS:
        with loaded.model.disable_adapter():
            base = service.reply(service.new_conversation(), prompt, params).text
        adapted = service.reply(service.new_conversation(), prompt, params).text
        print(f"\n> {prompt}\n{headers}\n{'-' * width}\n{side_by_side(base, adapted, width)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

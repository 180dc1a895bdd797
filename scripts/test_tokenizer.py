"""Show how the configured model's tokenizer splits a text: each token and its id.

python scripts/test_tokenizer.py --text "Hello, world!"
python scripts/test_tokenizer.py --model smollm2-135m-instruct --text "héllo 🌸"
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401

from src.config import load_settings
from src.errors import MiniClaudeError
from src.models.loader import resolve_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", required=True, help="the text to tokenize")
    parser.add_argument(
        "--model", help="hub id, folder or smollm2-135m-instruct (default: MODEL_NAME)"
    )
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    try:
        settings = load_settings()
        folder, _source = resolve_model(args.model or settings.model_name, settings)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except MiniClaudeError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    ids = tokenizer.encode(args.text, add_special_tokens=False)
    print(f"Tokenizer: {folder} ({type(tokenizer).__name__}, vocabulary {len(tokenizer)})")
    print(f"Text: {args.text!r}")
    print(f"{len(ids)} tokens:")
    for position, token_id in enumerate(ids):
        piece = tokenizer.convert_ids_to_tokens(token_id)
        print(f"  {position:>4}  {token_id:>7}  {piece!r:<20} {tokenizer.decode([token_id])!r}")
    print(f"ids: {ids}")
    print(f"decoded back: {tokenizer.decode(ids)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

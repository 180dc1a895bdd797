"""Export the feedback given in the UI, the API and the CLI as preference pairs (JSONL).

    python scripts/export_preferences.py                        # DATA_DIR/preferences.jsonl
    python scripts/export_preferences.py --out pairs.jsonl --db other.sqlite3

Each line is one pair in TRL's conversational preference format: ``prompt`` (messages, the
system prompt first), ``chosen`` and ``rejected`` (one assistant message each), the input of
``python src/training/train_dpo.py``. What could not be paired is counted with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _bootstrap  # noqa: F401

from src.chat.feedback import FeedbackStore
from src.chat.preferences import preference_pairs
from src.chat.store import SessionStore
from src.config import load_settings
from src.errors import MiniClaudeError
from src.files import write_text_atomically


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, help="sessions database (default: DATA_DIR's)")
    parser.add_argument("--out", type=Path, help="output (default: DATA_DIR/preferences.jsonl)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        database = args.db or settings.sessions_db
        out = args.out or Path(settings.data_dir) / "preferences.jsonl"
        if not database.is_file():
            print(f"No feedback yet: {database} does not exist.", file=sys.stderr)
            return 1
        store = SessionStore(database)
        try:
            records = FeedbackStore.of(store).records()
        finally:
            store.close()
    except MiniClaudeError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    found = preference_pairs(records)
    print(f"{len(records)} judgements in {database}")
    for reason, count in found.skipped.most_common():
        print(f"  skipped {count}: {reason}")
    if not found.pairs:
        print("No preference pairs to export (rate two replies to one prompt, edit a reply, or "
              "choose between candidates).", file=sys.stderr)  # fmt: skip
        return 1
    try:
        lines = [json.dumps(pair.to_json(), ensure_ascii=False) + "\n" for pair in found.pairs]
        write_text_atomically(out, "".join(lines))
    except OSError as exc:
        print(f"Error: could not write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"Exported {len(found.pairs)} preference pairs to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

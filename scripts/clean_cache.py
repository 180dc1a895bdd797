"""List what the model cache holds, with sizes; delete only with --yes.

    python scripts/clean_cache.py                 # list
    python scripts/clean_cache.py --yes           # delete everything listed
    python scripts/clean_cache.py NAME --yes      # delete one entry (a name from the list)

Deletion never reaches outside MODEL_CACHE_DIR: entries are resolved and checked first.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import _bootstrap  # noqa: F401

from src.config import load_settings
from src.errors import MiniClaudeError
from src.models.catalog import folder_size, human_size


def is_inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="entries to delete (default: all)")
    parser.add_argument("--yes", action="store_true", help="really delete")
    args = parser.parse_args(argv)
    try:
        cache_dir = Path(load_settings().model_cache_dir)
    except MiniClaudeError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    if not cache_dir.is_dir():
        print(f"The cache {cache_dir} is empty (it does not exist yet).")
        return 0
    entries = sorted(p for p in cache_dir.iterdir() if not p.name.startswith(".locks"))
    if args.names:
        selected = []
        for name in args.names:
            candidate = cache_dir / name
            if not is_inside(candidate, cache_dir) or candidate.resolve() == cache_dir.resolve():
                print(
                    f"Error: {name!r} is outside the cache {cache_dir}; refusing.", file=sys.stderr
                )
                return 2
            if not candidate.exists():
                print(f"Error: {name!r} is not in the cache {cache_dir}.", file=sys.stderr)
                return 2
            selected.append(candidate)
        entries = selected
    total = 0
    print(f"Model cache: {cache_dir.resolve()}")
    for entry in entries:
        size = folder_size(entry)
        total += size
        print(f"  {human_size(size):>10}  {entry.name}")
    print(f"  {human_size(total):>10}  total")
    if not args.yes:
        print("Nothing deleted. Add --yes to delete the entries listed.")
        return 0
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    print(f"Deleted {len(entries)} entries ({human_size(total)}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

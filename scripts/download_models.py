"""Download (or prepare) a model into MODEL_CACHE_DIR, or report what the cache holds.

python scripts/download_models.py                          # MODEL_NAME from .env
python scripts/download_models.py --model microsoft/DialoGPT-medium
python scripts/download_models.py --model smollm2-135m-instruct   # convert the bundled one
python scripts/download_models.py --offline                # only look at the cache
python scripts/download_models.py --list                   # every model the cache holds
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401

from src.config import load_settings
from src.errors import MiniClaudeError
from src.models.bundled import BUNDLED_MODEL_NAME, bundled_model_dir
from src.models.catalog import catalog_lines
from src.models.folder_check import check_model_folder
from src.models.loader import download_from_hub, ensure_bundled_model, find_in_cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or smollm2-135m-instruct (default: MODEL_NAME)")
    parser.add_argument(
        "--offline",
        action="store_true",
        help="do not download; report whether the model is cached and complete",
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="list the cached models: size, family, precision, quantisation, prepared copies",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        if args.list:
            print("\n".join(catalog_lines(settings.model_cache_dir)))
            return 0
        name = args.model or settings.model_name
        if args.offline:
            return report_cached(name, settings)
        if name == BUNDLED_MODEL_NAME:
            folder = ensure_bundled_model(settings.model_cache_dir)
        else:
            folder = download_from_hub(name, settings.model_cache_dir, settings)
            check_model_folder(folder)
    except MiniClaudeError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(f"{name}: ready in {folder}")
    return 0


def report_cached(name: str, settings) -> int:
    cache_dir = settings.model_cache_dir
    if name == BUNDLED_MODEL_NAME:
        folder = bundled_model_dir(cache_dir)
        if not folder.exists():
            print(
                f"{name}: not converted yet (run without --offline to prepare it; "
                "it needs no network)"
            )
            return 1
    else:
        folder = find_in_cache(name, cache_dir)
        if folder is None:
            print(f"{name}: not in the cache {cache_dir}")
            return 1
    try:
        check_model_folder(folder)
    except MiniClaudeError as exc:
        print(f"{name}: cached in {folder} but INCOMPLETE: {exc}")
        return 1
    print(f"{name}: cached and complete in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

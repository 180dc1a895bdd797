"""What the model cache holds: each model with its size, family, stored precision and
quantisation, and the prepared copies made from it (``scripts/download_models.py --list``).

The hub's part of the cache is read with huggingface_hub's own ``scan_cache_dir``; the
converted GGUF files (the bundled model's among them) and the prepared files
(``src/models/prepared.py``) are ours.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from src.models.bundled import BUNDLED_MODEL_NAME, bundled_model_dir
from src.models.gguf_import import conversion_record

PREPARED_NAME = re.compile(r"^(?P<folder>.+)-(?P<precision>fp32|bf16)-(?P<quant>none|int8|int4)-")


@dataclass
class PreparedCopy:
    path: Path
    size_bytes: int
    precision: str  # "bf16" or "fp32"
    quantization: str  # "none", "int8" or "int4"


@dataclass
class CachedModel:
    name: str  # what MODEL_NAME takes
    folder: Path
    size_bytes: int
    family: str | None  # config.json's model_type
    stored: str | None  # the precision of the weights on disk (config.json's dtype)
    quantization: str  # of the weights on disk: "none", or the config's method
    prepared: list[PreparedCopy] = field(default_factory=list)


def cached_models(cache_dir: Path) -> list[CachedModel]:
    """Every model in ``cache_dir``: the bundled one if converted, then the hub's, by name."""
    cache_dir = Path(cache_dir)
    models = []
    bundled = bundled_model_dir(cache_dir)
    if (bundled / "config.json").is_file():
        models.append(describe_folder(BUNDLED_MODEL_NAME, bundled, folder_size(bundled)))
    models += gguf_models(cache_dir)
    models += sorted(hub_models(cache_dir), key=lambda model: model.name.lower())
    copies = prepared_copies(cache_dir)
    for model in models:
        model.prepared = copies.get(model.folder.name, [])
    return models


def hub_models(cache_dir: Path) -> list[CachedModel]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        scanned = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    models = []
    for repo in scanned.repos:
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:  # usually one
            if (revision.snapshot_path / "config.json").is_file():
                model = describe_folder(repo.repo_id, revision.snapshot_path, repo.size_on_disk)
                models.append(model)
    return models


def gguf_models(cache_dir: Path) -> list[CachedModel]:
    """The converted GGUF files, named by the file (what MODEL_NAME takes)."""
    models = []
    for folder in sorted((Path(cache_dir) / "gguf").glob("*/")):
        source = conversion_record(folder)
        if source.get("file") and (folder / "config.json").is_file():
            models.append(describe_folder(source["file"], folder, folder_size(folder)))
    return models


def describe_folder(name: str, folder: Path, size_bytes: int) -> CachedModel:
    config = read_json(folder / "config.json")
    quantization = (config.get("quantization_config") or {}).get("quant_method", "none")
    stored = config.get("dtype") or config.get("torch_dtype")
    types = conversion_record(folder).get("tensor_types")
    if types:  # converted from GGUF: the file's tensor types, most tensors first
        stored, quantization = "gguf", "+".join(sorted(types, key=lambda kind: -types[kind]))
    return CachedModel(name, folder, size_bytes, config.get("model_type"), stored, quantization)


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def prepared_copies(cache_dir: Path) -> dict[str, list[PreparedCopy]]:
    """The prepared files, by the name of the folder they were made from."""
    copies: dict[str, list[PreparedCopy]] = {}
    for path in sorted((Path(cache_dir) / "prepared").glob("*.safetensors")):
        match = PREPARED_NAME.match(path.name)
        if match:
            copy = PreparedCopy(path, path.stat().st_size, match["precision"], match["quant"])
            copies.setdefault(match["folder"], []).append(copy)
    return copies


def folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def catalog_lines(cache_dir: Path) -> list[str]:
    """The listing ``download_models.py --list`` prints."""
    models = cached_models(cache_dir)
    lines = [f"Model cache: {Path(cache_dir).resolve()}"]
    if not models:
        return [*lines, "  no models yet (python scripts/download_models.py --model ID)"]
    header = ("model", "family", "stored", "quantisation", "size", "prepared copies")
    rows = [
        (
            model.name,
            model.family or "?",
            model.stored or "?",
            model.quantization,
            human_size(model.size_bytes),
            ", ".join(
                f"{c.precision} {c.quantization} ({human_size(c.size_bytes)})"
                for c in model.prepared
            )
            or "-",
        )
        for model in models
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]
    for row in (header, *rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  " + "  ".join([*cells, row[-1]]))
    return lines

"""Checks that a model folder is complete before transformers tries to load it.

A partial download or a truncated file otherwise surfaces as a deep stack trace; here it is a
``ModelLoadingError`` that names the folder and the missing or broken file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from src.errors import ModelLoadingError

SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Any one of these sets of files is a usable tokenizer.
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))


def check_model_folder(folder: Path) -> None:
    """Raise ``ModelLoadingError`` unless ``folder`` holds a config, tokenizer and full weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadingError(f"Model folder {folder} does not exist.")
    _check_json(folder / "config.json", folder)
    if not any(all((folder / name).is_file() for name in names) for names in TOKENIZER_FILE_SETS):
        raise ModelLoadingError(
            f"Model folder {folder} has no tokenizer: expected tokenizer.json, "
            "vocab.json + merges.txt, or tokenizer.model."
        )
    for weights_file in weight_files(folder):
        if weights_file.suffix == ".safetensors":
            check_safetensors_file(weights_file)


def weight_files(folder: Path) -> list[Path]:
    """The weight files the folder declares, preferring safetensors; all must exist."""
    for single, index in ((SAFETENSORS_WEIGHTS, SAFETENSORS_INDEX), (PICKLE_WEIGHTS, PICKLE_INDEX)):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            weight_map = _check_json(folder / index, folder).get("weight_map")
            shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
            missing = [name for name in shards if not (folder / name).is_file()]
            if missing or not shards:
                raise ModelLoadingError(
                    f"Model folder {folder} is incomplete: {index} lists weight shards that are "
                    f"missing: {', '.join(missing) or '(none listed)'}. Download it again."
                )
            return [folder / name for name in shards]
    raise ModelLoadingError(
        f"Model folder {folder} has no weights: expected {SAFETENSORS_WEIGHTS} "
        f"(or {PICKLE_WEIGHTS}). Download it again with scripts/download_models.py."
    )


def check_safetensors_file(path: Path) -> None:
    """A safetensors file starts with an 8-byte header length and a JSON header listing each
    tensor's byte range; a truncated or corrupt file fails one of these checks."""
    size = path.stat().st_size
    truncated = f"Weights file {path} is truncated ({size} bytes): download or convert it again."
    try:
        with path.open("rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            if header_length > size - 8:
                # A plausible header length (under 100 MB) means the file was cut short.
                if header_length < 100_000_000:
                    raise ModelLoadingError(truncated)
                raise ValueError("the header length is not plausible")
            header = json.loads(handle.read(header_length))
        data_end = max(
            (entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
            default=0,
        )
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ModelLoadingError(f"Weights file {path} is corrupt ({exc}).") from None
    if 8 + header_length + data_end > size:
        raise ModelLoadingError(f"{truncated} Expected {8 + header_length + data_end} bytes.")


def _check_json(path: Path, folder: Path) -> dict:
    if not path.is_file():
        raise ModelLoadingError(f"Model folder {folder} is missing {path.name}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadingError(f"{path} is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ModelLoadingError(f"{path} should hold a JSON object, not {type(data).__name__}.")
    return data

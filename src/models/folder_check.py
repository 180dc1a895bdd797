"""Checks that a model folder is complete before transformers tries to load it.

A partial download or a truncated file otherwise surfaces as a deep stack trace; here it is a
``ModelLoadingError`` that names the folder and the missing or broken file.
"""

from __future__ import annotations

import json
import math
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


def check_inside(folder: Path, root: Path, setting: str) -> None:
    """Raise ``ModelLoadingError`` if the folder, or anything in it, is a link that leads
    outside ``root`` (the folder a setting names): the server reads only what lies in its own
    folders. Links inside it (the hub cache's snapshots pointing at its blobs) are fine."""
    root = Path(root).resolve()
    folder = Path(folder)
    for path in (folder, *folder.rglob("*")):
        target = path.resolve()
        if not target.is_relative_to(root):
            raise ModelLoadingError(
                f"{path} leads outside {setting} ({root}), to {target}: refused. Copy the file "
                f"into the folder instead of linking to it."
            )


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


# Bytes per element of each safetensors dtype (the sub-byte float types are left unchecked).
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "C64": 8, "F64": 8, "I64": 8, "U64": 8,
}  # fmt: skip


def check_safetensors_file(path: Path) -> None:
    """A safetensors file starts with an 8-byte header length and a JSON header listing each
    tensor's dtype, shape and byte range; a truncated or corrupt file fails one of these
    checks (only the header is read)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            check_header(path, handle, size)
    except OSError as exc:
        message = f"Weights file {path} cannot be read ({exc.strerror or exc})."
        raise ModelLoadingError(message) from None


def check_header(path: Path, handle, size: int) -> None:
    truncated = f"Weights file {path} is truncated ({size} bytes): download or convert it again."
    try:
        (header_length,) = struct.unpack("<Q", handle.read(8))
        if header_length > size - 8:
            # A plausible header length (under 100 MB) means the file was cut short.
            if header_length < 100_000_000:
                raise ModelLoadingError(truncated)
            raise ValueError("the header length is not plausible")
        header = json.loads(handle.read(header_length))
        data_end = max(
            (check_entry(key, entry) for key, entry in header.items() if key != "__metadata__"),
            default=0,
        )
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ModelLoadingError(f"Weights file {path} is corrupt ({exc}).") from None
    if 8 + header_length + data_end > size:
        raise ModelLoadingError(f"{truncated} Expected {8 + header_length + data_end} bytes.")


def check_entry(name: str, entry: dict) -> int:
    """One tensor's header entry is consistent (its byte range holds its dtype and shape);
    returns where its data ends."""
    start, end = entry["data_offsets"]
    shape, dtype = entry["shape"], entry["dtype"]
    if not all(isinstance(n, int) and n >= 0 for n in (start, end, *shape)) or start > end:
        raise ValueError(f"tensor {name}: bad shape {shape} or byte range {start}-{end}")
    if dtype not in DTYPE_BYTES and not str(dtype).startswith(("F4", "F6")):
        raise ValueError(f"tensor {name}: unknown dtype {dtype!r}")
    if dtype in DTYPE_BYTES and math.prod(shape) * DTYPE_BYTES[dtype] != end - start:
        raise ValueError(
            f"tensor {name}: {dtype} {shape} needs {math.prod(shape) * DTYPE_BYTES[dtype]} "
            f"bytes, its byte range holds {end - start}"
        )
    return end


def _check_json(path: Path, folder: Path) -> dict:
    if not path.is_file():
        raise ModelLoadingError(f"Model folder {folder} is missing {path.name}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelLoadingError(f"{path} cannot be read ({exc.strerror or exc}).") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelLoadingError(f"{path} is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ModelLoadingError(f"{path} should hold a JSON object, not {type(data).__name__}.")
    return data

"""The models this server offers under Ollama's names: the loaded model and each LoRA adapter
in ADAPTERS_DIR, as ``name:latest``, with the facts Ollama's ``/api/tags``, ``/api/show`` and
``/api/ps`` report (format, family, parameter count, quantisation, size on disk, a digest)."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from src.chat.adapter_pool import AdapterPool
from src.models.inference import model_type
from src.web.errors import HTTPProblem

TAG = "latest"  # the one tag each model has here


@dataclass(frozen=True)
class OfferedModel:
    name: str  # as Ollama's clients show it: "smollm2-135m-instruct:latest"
    adapter: str | None  # the adapter's folder name; None for the base model
    folder: Path | None  # the weights (the adapter's folder for an adapter)


def offered_models(pool: AdapterPool) -> list[OfferedModel]:
    base = pool.base
    loaded = getattr(base.backend, "loaded", None)
    models = [OfferedModel(f"{base.model_name}:{TAG}", None, getattr(loaded, "folder", None))]
    for adapter in pool.names():
        models.append(OfferedModel(f"{adapter}:{TAG}", adapter, pool.adapters_dir / adapter))
    return models


def find_model(name: str, pool: AdapterPool) -> OfferedModel:
    """The model a request names (``name`` or ``name:latest``, any case); 404 otherwise, as
    Ollama answers for a model it does not have."""
    wanted = name if ":" in name else f"{name}:{TAG}"
    for model in offered_models(pool):
        if model.name.casefold() == wanted.casefold():
            return model
    names = ", ".join(model.name for model in offered_models(pool))
    raise HTTPProblem(404, f"model '{name}' not found (models here: {names})", "not_found", "model")


def details(model: OfferedModel, pool: AdapterPool) -> dict[str, Any]:
    """Ollama's ``details`` of a model."""
    loaded = getattr(pool.base.backend, "loaded", None)
    base_folder = getattr(loaded, "folder", None)
    family = model_type(base_folder) if base_folder else None
    source = getattr(loaded, "source", "")
    return {
        "parent_model": pool.base.model_name if model.adapter else "",
        "format": "gguf" if source in ("gguf", "bundled") else "safetensors",
        "family": family or "",
        "families": [family] if family else None,
        "parameter_size": parameter_size(parameter_count(base_folder)) if base_folder else "",
        "quantization_level": quantization_level(getattr(loaded, "quantization", "none"), loaded),
    }


def quantization_level(quantization: str, loaded: Any) -> str:
    """Ollama names the weights' type (``Q4_0``, ``F16``); these are ours."""
    if quantization in ("int4", "int8"):
        return quantization.upper()
    dtype = str(getattr(getattr(loaded, "model", None), "dtype", ""))
    return "BF16" if dtype.endswith("bfloat16") else "F32"


def weight_files(folder: Path | None) -> list[Path]:
    if folder is None or not folder.is_dir():
        return []
    return sorted(folder.glob("*.safetensors"))


def parameter_count(folder: Path) -> int:
    """Parameters stored in the folder's safetensors files, read from their headers."""
    total = 0
    for path in weight_files(folder):
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, tensor in header.items():
            if name != "__metadata__":
                count = 1
                for size in tensor["shape"]:
                    count *= size
                total += count
    return total


def parameter_size(count: int) -> str:
    """As Ollama writes it: "135M", "1.7B"."""
    if count >= 10**9:
        return f"{count / 10**9:.1f}B".replace(".0B", "B")
    if count >= 10**6:
        return f"{count / 10**6:.0f}M"
    return f"{count / 10**3:.0f}K" if count else ""


def size_on_disk(folder: Path | None) -> int:
    return sum(path.stat().st_size for path in weight_files(folder))


def digest(model: OfferedModel) -> str:
    """A stable identity of the weights (names, sizes and times of their files): it changes
    when the files do, as an Ollama digest changes with a new pull."""
    material = [model.name] + [
        f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
        for path in weight_files(model.folder)
    ]
    return hashlib.sha256("\n".join(material).encode()).hexdigest()


def modified_at(model: OfferedModel) -> str:
    files = weight_files(model.folder)
    moment = max((path.stat().st_mtime for path in files), default=0.0)
    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")


def listing(model: OfferedModel, pool: AdapterPool) -> dict[str, Any]:
    """One entry of ``/api/tags``."""
    return {
        "name": model.name,
        "model": model.name,
        "modified_at": modified_at(model),
        "size": size_on_disk(model.folder),
        "digest": digest(model),
        "details": details(model, pool),
    }

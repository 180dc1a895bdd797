"""Find and load the chat model named by MODEL_NAME.

Resolution order:
1. the bundled offline model (``smollm2-135m-instruct``), converted once into the cache;
2. a GGUF file (``*.gguf``, or a folder holding one), converted once into the cache
   (``src/models/gguf_import.py``);
3. a local directory;
4. the Hugging Face cache in MODEL_CACHE_DIR;
5. a hub download (with progress bars);
6. if the model cannot be had, one clear notice and the bundled model
   (``MODEL_FALLBACK=none`` raises ``ModelLoadingError`` instead).

Safe by default: safetensors only (pickle weights need ALLOW_PICKLE=true), ``trust_remote_code``
off unless the operator sets it (TRUST_REMOTE_CODE=true).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from src.config import Settings
from src.errors import ModelLoadingError
from src.models.bundled import BUNDLED_MODEL_NAME, bundled_model_dir, convert_bundled_model
from src.models.folder_check import check_inside, check_model_folder, weight_files
from src.models.gguf_import import (
    convert_gguf,
    converted_dir,
    file_quantization,
    find_gguf_file,
    is_converted,
)

logger = logging.getLogger(__name__)

# Files worth downloading: configs, tokenizers, chat templates and safetensors weights. Pickle
# weights are fetched only when a repository has no safetensors and ALLOW_PICKLE=true.
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.safetensors"]
HUB_PICKLE_PATTERNS = ["pytorch_model*.bin"]
PICKLE_REFUSED = (
    "Pickle weights (pytorch_model.bin) can run code when loaded, so they are neither "
    "downloaded nor loaded unless you set ALLOW_PICKLE=true (only for a model you trust); "
    "or convert them to safetensors."
)


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (or a peft PeftModel around one)
    tokenizer: Any  # a transformers tokenizer
    name: str  # what users see, e.g. "smollm2-135m-instruct"
    path: Path  # the folder the weights came from
    source: str  # "bundled", "gguf", "local", "cache", "hub" or "bundled (fallback)"
    adapter: Path | None = None


def load_model(
    settings: Settings,
    model_name: str | None = None,
    adapter_path: Path | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Resolve, load and (optionally) attach a LoRA adapter. Raises ``ModelLoadingError``.

    ``dtype`` defaults to PRECISION's choice for inference; training passes torch.float32."""
    name = model_name or settings.model_name
    folder, source = resolve_model(name, settings)
    return load_resolved(
        settings, name, folder, source, adapter_path or settings.adapter_path, dtype
    )


def load_resolved(
    settings: Settings,
    name: str,
    folder: Path,
    source: str,
    adapter_path: Path | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """``load_model`` for a model ``resolve_model`` has already found, with ``adapter_path``
    attached if given (ADAPTER_PATH is not consulted here)."""
    dtype = dtype or inference_dtype(settings.precision, folder)
    model, tokenizer = load_from_folder(
        folder, settings.trust_remote_code, dtype, allow_pickle=settings.allow_pickle
    )
    shown_name = model_display_name(name, source)
    if adapter_path is not None:
        from src.models.lora_wrapper import load_adapter

        model = load_adapter(model, Path(adapter_path), allow_pickle=settings.allow_pickle)
    return LoadedModel(model, tokenizer, shown_name, folder, source, adapter_path)


def inference_dtype(precision: str, folder: Path) -> torch.dtype:
    """PRECISION's dtype; "auto" is bf16 for a model converted from a quantised GGUF file,
    the bundled one included (its weights are 4- or 8-bit already, the quantised layers take
    bf16 inputs, and the bundled model's perplexity stays within 0.1% of fp32, see README
    "Performance"), and fp32, exact, for any other model."""
    if precision == "auto":
        precision = "bf16" if file_quantization(folder) in ("int4", "int8") else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def model_display_name(name: str, source: str) -> str:
    """What users see: the bundled model's name, a GGUF file's name without ``.gguf``, or
    MODEL_NAME as given."""
    if source.startswith("bundled"):
        return BUNDLED_MODEL_NAME
    if source == "gguf":
        gguf = find_gguf_file(name)
        return gguf.stem if gguf is not None else name
    return name


def resolve_model(name: str, settings: Settings) -> tuple[Path, str]:
    """Return (folder, source) for ``name`` following the order in the module docstring."""
    cache_dir = Path(settings.model_cache_dir)
    if name == BUNDLED_MODEL_NAME:
        return ensure_bundled_model(cache_dir), "bundled"
    gguf = find_gguf_file(name)
    if gguf is not None:
        return ensure_converted_gguf(gguf, cache_dir), "gguf"
    local = Path(name).expanduser()
    if local.is_dir():
        return local, "local"
    if name.startswith((".", "/", "~")) or local.exists():
        # Clearly meant as a path: falling back to another model would hide the typo.
        raise ModelLoadingError(f"MODEL_NAME={name!r} looks like a path, but no such folder.")
    cached = find_in_cache(name, cache_dir)
    if cached is not None:
        check_inside(cached, cache_dir, "MODEL_CACHE_DIR")
        return cached, "cache"
    try:
        return download_from_hub(name, cache_dir, settings), "hub"
    except ModelLoadingError as exc:
        if settings.model_fallback == "none":
            raise ModelLoadingError(
                f"{exc} MODEL_FALLBACK=none, so there is no fallback: fix MODEL_NAME, connect "
                f"to the hub, or set MODEL_FALLBACK=bundled to use {BUNDLED_MODEL_NAME}."
            ) from exc
        logger.warning(
            "Notice: %s Falling back to the bundled offline model %s "
            "(set MODEL_FALLBACK=none to make this an error).",
            exc,
            BUNDLED_MODEL_NAME,
        )
        return ensure_bundled_model(cache_dir), "bundled (fallback)"


def ensure_bundled_model(cache_dir: Path) -> Path:
    """The converted bundled model, converting it on first use (or if the copy is damaged)."""
    folder = bundled_model_dir(cache_dir)
    return converted_once(folder, cache_dir, "the bundled model", convert_bundled_model)


def ensure_converted_gguf(path: Path, cache_dir: Path) -> Path:
    """The converted copy of a GGUF file, converting it on first use (or if damaged)."""
    folder = converted_dir(path, cache_dir)
    return converted_once(folder, cache_dir, path.name, lambda into: convert_gguf(path, into))


def converted_once(
    folder: Path, cache_dir: Path, what: str, convert: Callable[[Path], Path]
) -> Path:
    """``folder`` as ``convert`` makes it, converting only when no usable copy exists. Processes
    that start together (two servers, a server and a script) take turns on a lock file in the
    cache's ``.locks`` folder (where huggingface_hub keeps its own): the first converts, the
    others wait and then use its copy."""
    from filelock import FileLock

    if usable_conversion(folder, cache_dir, what):
        return folder
    locks = Path(cache_dir) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(locks / f"{folder.name}.lock"):
        if folder.exists() and usable_conversion(folder, cache_dir, what):
            return folder  # another process converted it while this one waited
        return convert(folder)


def usable_conversion(folder: Path, cache_dir: Path, what: str) -> bool:
    """Whether a converted folder can be used as it is (False: convert again)."""
    if not folder.exists():
        return False
    check_inside(folder, cache_dir, "MODEL_CACHE_DIR")  # never convert through a link
    try:
        check_model_folder(folder)
    except ModelLoadingError as exc:
        logger.warning("Notice: %s Converting %s again.", exc, what)
        return False
    if not is_converted(folder):
        logger.warning("Notice: %s was converted by an older version: converting again.", what)
        return False
    return True


def find_in_cache(repo_id: str, cache_dir: Path) -> Path | None:
    """The cached snapshot folder of a hub model, or None. Reads only the disk."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo_id, "config.json", cache_dir=str(cache_dir))
    except ValueError:  # not a valid repo id: it cannot be in the cache either
        return None
    return Path(config).parent if isinstance(config, str) else None


def download_from_hub(repo_id: str, cache_dir: Path, settings: Settings) -> Path:
    """Download a model snapshot into the cache (huggingface_hub shows progress bars)."""
    from huggingface_hub import snapshot_download

    token = settings.huggingface_token.get_secret_value() if settings.huggingface_token else None
    try:
        folder = Path(
            snapshot_download(
                repo_id, cache_dir=str(cache_dir), token=token, allow_patterns=HUB_PATTERNS
            )
        )
        if not any(folder.glob("*.safetensors")) and settings.allow_pickle:
            folder = Path(
                snapshot_download(
                    repo_id,
                    cache_dir=str(cache_dir),
                    token=token,
                    allow_patterns=HUB_PATTERNS + HUB_PICKLE_PATTERNS,
                )
            )
    except Exception as exc:  # the hub raises many types (network, auth, not found, bad id)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadingError(
            f"Could not get model '{repo_id}' from the Hugging Face hub "
            f"({type(exc).__name__}: {reason})."
        ) from exc
    if not any(folder.glob("*.safetensors")) and not settings.allow_pickle:
        raise ModelLoadingError(
            f"Could not get model '{repo_id}' from the Hugging Face hub: it has no safetensors "
            f"weights. {PICKLE_REFUSED}"
        )
    return folder


def load_from_folder(
    folder: Path,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> tuple[Any, Any]:
    """Load tokenizer and causal LM from a checked folder, in eval mode. Pickle weights are
    refused unless ``allow_pickle`` (ALLOW_PICKLE=true)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_folder(folder)
    pickles = [path.name for path in weight_files(folder) if path.suffix != ".safetensors"]
    if pickles and not allow_pickle:
        raise ModelLoadingError(
            f"Model folder {folder} has only pickle weights ({', '.join(pickles)}). "
            f"{PICKLE_REFUSED}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,  # never a .bin without opt-in
        )
    except Exception as exc:  # transformers raises many types for bad or unusual folders
        broken = damaged_json_file(folder)
        raise ModelLoadingError(
            f"Could not load the model in {folder}: {type(exc).__name__}: {exc}"
            + (f" ({broken} is not valid JSON)" if broken else "")
        ) from exc
    model.eval()
    return model, tokenizer


def damaged_json_file(folder: Path) -> Path | None:
    """The first JSON file of a model folder that does not parse (to name it in an error)."""
    for path in sorted(Path(folder).glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return path
    return None

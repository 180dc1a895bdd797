"""The from-scratch model ready to serve, cached on disk: converted, cast and quantised once.

Building the served model from a folder means reading fp32 weights (517 MB for the bundled
SmolLM2), casting them to bf16 and quantising every layer to int4: about 2.5 s, most of the
cold-start budget. The result is only ~140 MB, so it is saved once as a safetensors file
under MODEL_CACHE_DIR/prepared/ and later starts read it back (tenths of a second). The file
name carries a digest of the source files (path, size, modification time), the precision,
the quantisation and a format version, so a changed model or setting never reads a stale
file; ``scripts/clean_cache.py`` lists and deletes these files with the rest of the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from src.models.gguf_import import four_bit_file, keep_file_codes
from src.models.quantize import Quantization, int4_packing, quantize_model
from src.models.transformer import Transformer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the saved tensors' layout changes (2: gate and up joined)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def prepared_path(
    folder: Path, dtype: torch.dtype, quantization: Quantization, cache_dir: Path
) -> Path:
    """Where the prepared model for these sources and settings lives. Int4 weights are
    saved in PyTorch's packing, which depends on the CPU's instruction sets (64-column blocks
    on AVX-512, 32 on AVX2): the file names the packing, so a cache shared between machines
    (a container image, a network folder) never hands one CPU another's layout."""
    method = quantization
    if quantization == "int4":
        method += f"-{int4_packing()}"
    name = f"{folder.name}-{DTYPE_NAMES[dtype]}-{method}-{source_digest(folder)}"
    return Path(cache_dir) / "prepared" / f"{name}.safetensors"


def source_digest(folder: Path) -> str:
    """A digest of a model folder's weights and config (path, size, modification time): what
    is derived from them and cached carries it, so a changed model never reads stale work."""
    sources = sorted(folder.glob("*.safetensors")) + [folder / "config.json"]
    sources += [path for path in [four_bit_file(folder)] if path is not None]
    digest = hashlib.sha256(f"v{FORMAT_VERSION}|{folder.resolve()}".encode())
    for source in sources:
        stat = source.stat()
        digest.update(f"|{source.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def load_prepared_transformer(
    folder: Path, dtype: torch.dtype, quantization: Quantization, cache_dir: Path
) -> Transformer:
    """Our Transformer for ``folder`` in ``dtype`` with ``quantization``: from the prepared
    file if there is one, else built from the folder and saved for next time. Raises
    ValueError when the folder cannot be read without transformers (see from_folder)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = prepared_path(folder, dtype, quantization, cache_dir)
    if path.is_file():
        try:
            skeleton = Transformer.skeleton_from_folder(folder)
            model = quantize_model(skeleton, quantization, empty=True)
            model.load_weights(load_file(path))
            return model.eval()
        except Exception as exc:  # a damaged or foreign file: rebuild it rather than fail
            logger.warning("Notice: rebuilding %s (%s: %s)", path, type(exc).__name__, exc)
    model = Transformer.from_folder(folder, dtype)
    if quantization == "int4":
        keep_file_codes(model, folder)  # a GGUF file's own 4-bit codes, where it had them
    model = quantize_model(model, quantization)  # the layers left
    save_prepared(model, path)
    return model


def save_prepared(model: Transformer, path: Path) -> None:
    """Write atomically (a temporary file renamed into place): a crash mid-write leaves no
    half file to be read later. A read-only cache only costs the next start its speed."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    # Tied embeddings share storage, which safetensors refuses: save each tensor once.
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_embeddings and type(model.lm_head) is torch.nn.Linear:
        state.pop("lm_head.weight", None)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(temporary))
        os.replace(temporary, path)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own
        temporary.unlink(missing_ok=True)
        logger.warning("Notice: could not cache the prepared model in %s: %s", path, exc)

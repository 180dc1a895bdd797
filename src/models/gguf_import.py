"""GGUF files (llama.cpp's format, what Ollama and LM Studio keep) as MODEL_NAME.

A ``.gguf`` file, or a folder holding one, is converted once, with progress, into a model
folder in MODEL_CACHE_DIR/gguf/ (config, tokenizer and chat template from the file's
metadata, weights de-quantised to fp32 by transformers' own GGUF loader), and from there it is
served like any other folder: our transformer where it builds the family, int4 or int8 on the
fast path.

4-bit weights are kept as they are in the file. Q4_0, Q4_1 and Q4_K all store a weight as a
4-bit code times a scale plus a minimum, one (scale, minimum) pair per 32 weights of a row:
exactly the layout of our int4 layers (``Int4Linear``). The conversion saves those codes
beside the de-quantised weights (``gguf/four_bit.safetensors``), and the prepared int4 model
takes them as they are instead of rounding the de-quantised weights again; only the scales
and minimums are rounded, to bf16. Other types (Q5_K, Q6_K, Q8_0, F16, BF16, ...) are
de-quantised, and QUANTIZE decides what happens next.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from src.errors import ModelLoadingError

if TYPE_CHECKING:
    from src.models.transformer import Transformer

logger = logging.getLogger(__name__)

SUFFIX = ".gguf"
GGUF_SUBFOLDER = "gguf"  # inside a converted folder: what the file said, and its 4-bit codes
SOURCE_FILE = "source.json"
FOUR_BIT_FILE = "four_bit.safetensors"
CONVERSION_VERSION = 1  # bump when a converted folder's layout changes: old ones are redone

# Architectures (GGUF's names) our transformer builds; transformers' GGUF loader reads more,
# which then run on transformers' engine.
OUR_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2")
FOUR_BIT_TYPES = ("Q4_0", "Q4_1", "Q4_K")
OTHER_QUANTISED_TYPES = ("Q2_K", "Q3_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
FLOAT_TYPES = ("F32", "F16", "BF16")
SUPPORTED_TYPES = FOUR_BIT_TYPES + OTHER_QUANTISED_TYPES + FLOAT_TYPES
GROUP = 32  # weights per (scale, minimum) pair in every 4-bit type above


@dataclass(frozen=True)
class GGUFSummary:
    """What a file holds, read from its header (no tensor data)."""

    path: Path
    architecture: str
    name: str
    tensor_types: dict[str, int]  # type name -> how many tensors
    quantization: str  # what QUANTIZE=auto means for it: "int4", "int8" or "none"
    reader: Any = field(repr=False, compare=False)  # the open file (a GGUFReader), read once


def find_gguf_file(name: str) -> Path | None:
    """The GGUF file MODEL_NAME names (a ``.gguf`` file, or a folder with one and no
    config.json), or None when it names something else. Raises ``ModelLoadingError`` when it
    clearly means a GGUF file that cannot be used."""
    path = Path(name).expanduser()
    if name.lower().endswith(SUFFIX):
        if not path.is_file():
            raise ModelLoadingError(f"MODEL_NAME={name!r} names a GGUF file, but there is none.")
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    files = sorted(path.glob(f"*{SUFFIX}"))
    if len(files) > 1:
        listed = ", ".join(file.name for file in files)
        raise ModelLoadingError(
            f"{path} holds several GGUF files ({listed}): set MODEL_NAME to the one to serve."
        )
    return files[0] if files else None


def read_summary(path: Path) -> GGUFSummary:
    """Read the header; raise ``ModelLoadingError`` naming what we cannot serve."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError, struct.error, ... on damaged files
        raise ModelLoadingError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})."
        ) from exc
    architecture = _field(reader, "general.architecture") or "?"
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelLoadingError(
            f"{path.name} is a GGUF file of architecture {architecture!r}, which we cannot "
            f"load. Supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}."
        )
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    unsupported = sorted(set(types) - set(SUPPORTED_TYPES))
    if unsupported:
        example = next(t.name for t in reader.tensors if t.tensor_type.name in unsupported)
        raise ModelLoadingError(
            f"{path.name} has tensors of type {', '.join(unsupported)} (for example "
            f"{example}), which we cannot read. Supported: {', '.join(SUPPORTED_TYPES)}."
        )
    return GGUFSummary(
        path=path,
        architecture=architecture,
        name=_field(reader, "general.name") or path.stem,
        tensor_types=dict(types),
        quantization=auto_quantization(reader),
        reader=reader,
    )


def auto_quantization(reader: Any) -> str:
    """QUANTIZE=auto for a file: int4 where most of the matrices' weights are 4-bit (kept
    as they are), int8 where they are quantised otherwise (5 to 8 bits: int4 would lose what
    the file kept), none for float files."""
    weights: Counter[str] = Counter()
    for tensor in reader.tensors:
        if len(tensor.shape) == 2 and not tensor.name.startswith(("token_embd", "output.")):
            weights[tensor.tensor_type.name] += int(np.prod(tensor.shape))
    four_bit = sum(weights[kind] for kind in FOUR_BIT_TYPES)
    quantised = four_bit + sum(weights[kind] for kind in OTHER_QUANTISED_TYPES)
    total = sum(weights.values())
    if total and four_bit * 2 >= total:
        return "int4"
    return "int8" if total and quantised * 2 >= total else "none"


def _field(reader: Any, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


# ---- where conversions live ------------------------------------------------------------------


def converted_dir(path: Path, cache_dir: Path) -> Path:
    """The converted folder for this file: named by the file and a digest of its absolute
    path, size and modification time (a changed file is converted again)."""
    stat = path.stat()
    digest = hashlib.sha256(
        f"v{CONVERSION_VERSION}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    ).hexdigest()[:12]
    return Path(cache_dir) / "gguf" / f"{path.stem}-{digest}"


def conversion_record(folder: Path) -> dict[str, Any]:
    """What the conversion recorded of the file (``gguf/source.json``); {} for a folder that
    is not a GGUF conversion, or whose record is unreadable."""
    try:
        record = json.loads((folder / GGUF_SUBFOLDER / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def is_converted(folder: Path) -> bool:
    """Whether ``folder`` is a complete conversion of this version."""
    return conversion_record(folder).get("version") == CONVERSION_VERSION


def file_quantization(folder: Path) -> str | None:
    """QUANTIZE=auto's choice recorded for a converted GGUF folder; None for other folders."""
    return conversion_record(folder).get("quantization")


def four_bit_file(folder: Path) -> Path | None:
    """The saved 4-bit codes of a converted folder, if it has any."""
    path = Path(folder) / GGUF_SUBFOLDER / FOUR_BIT_FILE
    return path if path.is_file() else None


# ---- conversion ------------------------------------------------------------------------------


def convert_gguf(path: Path, destination: Path, shown_name: str | None = None) -> Path:
    """Convert the GGUF file once into a model folder, with progress. Written under a
    temporary name and renamed at the end: an interrupted conversion leaves nothing the loader
    would take for a model."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, destination = Path(path), Path(destination)
    summary = read_summary(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    label = shown_name or path.name
    steps = tqdm(total=4, desc=f"Converting {label} (one time)", unit="step")
    try:
        steps.set_postfix_str("reading tokenizer and chat template")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        steps.update()
        steps.set_postfix_str("de-quantising weights")
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        add_llama3_rope_scaling(summary, model.config)
        steps.update()
        steps.set_postfix_str("keeping 4-bit codes")
        codes = four_bit_codes(summary, model)
        steps.update()
        steps.set_postfix_str("saving safetensors")
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
        try:
            save_converted(model, tokenizer, staging)
            (staging / GGUF_SUBFOLDER).mkdir()
            if codes:
                save_file(codes, str(staging / GGUF_SUBFOLDER / FOUR_BIT_FILE))
            record = {
                "version": CONVERSION_VERSION,
                "file": str(path.resolve()),
                "architecture": summary.architecture,
                "name": summary.name,
                "tensor_types": summary.tensor_types,
                "quantization": summary.quantization,
                "four_bit_matrices_kept": len(codes) // 3,
            }
            (staging / GGUF_SUBFOLDER / SOURCE_FILE).write_text(
                json.dumps(record, indent=2), encoding="utf-8"
            )
            if destination.exists():
                shutil.rmtree(destination)
            os.replace(staging, destination)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        steps.update()
    finally:
        steps.close()
    return destination


def add_llama3_rope_scaling(summary: GGUFSummary, config: Any) -> None:
    """Llama 3.1-3.3 files keep their rope scaling as a tensor of per-frequency factors
    (``rope_freqs.weight``), which transformers' GGUF loader ignores: without it the model
    would be silently different from the file. Recover Llama 3's scaling parameters from the
    factors and put them in the config; refuse factors that are not Llama 3's."""
    from src.models.transformer import llama3_frequencies

    tensor = next((t for t in summary.reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return
    factors = torch.from_numpy(np.asarray(tensor.data, dtype=np.float32).copy()).double()
    theta = float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10_000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inverse = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    scaling = {"factor": float(factors.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaling["original_max_position_embeddings"] = round(original_context(factors, inverse, scaling))
    expected = inverse / llama3_frequencies(inverse, scaling)
    if len(expected) != len(factors) or not torch.allclose(expected, factors, rtol=1e-4):
        raise ModelLoadingError(
            f"{summary.path.name} scales its rotary frequencies (rope_freqs.weight) in a way "
            "that is not Llama 3's, which we cannot reproduce: not served, rather than served "
            "wrong."
        )
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": theta} | scaling


def original_context(factors: torch.Tensor, inverse: torch.Tensor, scaling: dict) -> float:
    """Llama 3's original context length, from a frequency between the kept and the
    stretched ones (blended by how its wavelength compares to that length); 8192, Llama
    3.1-3.3's, where no frequency is between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    between = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    if factor <= 1 or not bool(between.any()):
        return 8192.0
    index = int(between.nonzero()[0])
    smooth = (1 / factors[index] - 1 / factor) / (1 - 1 / factor)
    wavelength = 2 * torch.pi / inverse[index]
    return float(wavelength * (smooth * (high - low) + low))


def save_converted(model: Any, tokenizer: Any, folder: Path) -> None:
    """The de-quantised model as a plain folder. (``save_pretrained`` refuses a model loaded
    from GGUF, so the weights, config and generation config are written one by one.)"""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]  # as save_pretrained would write it
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as the embeddings
    save_file(
        {name: tensor.contiguous() for name, tensor in state.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def four_bit_codes(summary: GGUFSummary, model: Any) -> dict[str, torch.Tensor]:
    """Every Q4_0/Q4_1/Q4_K matrix of the file as its codes and per-group scales and
    minimums, under the Hugging Face name of the weight (``{name}.codes``, packed two per
    byte, low half first; ``{name}.scale``; ``{name}.low``), in the row order transformers
    gives the weight. Empty for GPT-2 files (their matrices are transposed on loading, which
    breaks the groups)."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    architecture = summary.architecture
    if architecture == "gpt2":
        return {}
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    kept: dict[str, torch.Tensor] = {}
    for tensor in summary.reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in FOUR_BIT_TYPES or tensor.name not in names:
            continue
        codes, scale, low = four_bit_groups(np.asarray(tensor.data), kind)
        # The same row reordering transformers applies to the weight (Llama's q and k).
        codes, scale, low = (
            processor.process(weights=part, name=tensor.name).weights
            for part in (codes, scale, low)
        )
        name = names[tensor.name]
        kept[f"{name}.codes"] = torch.from_numpy(np.ascontiguousarray(pack_codes(codes)))
        kept[f"{name}.scale"] = torch.from_numpy(np.ascontiguousarray(scale))
        kept[f"{name}.low"] = torch.from_numpy(np.ascontiguousarray(low))
    return kept


def four_bit_groups(data: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 4-bit matrix's raw blocks, (rows, bytes per row) uint8, as codes (rows, K) uint8 in
    0..15 and scale and low (rows, K/32) float32, with weight = code * scale + low."""
    rows = data.shape[0]
    if kind == "Q4_K":  # 256 weights: d, dmin (fp16), 12 bytes of 6-bit sub-scales, 128 of codes
        from gguf.quants import Q4_K

        blocks = data.reshape(-1, 144)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        scales, mins = Q4_K.get_scale_min(blocks[:, 4:16].copy())
        scale = d * scales.astype(np.float32)  # (blocks, 8): one per 32 weights
        low = -(dmin * mins.astype(np.float32))
        # Each 32 bytes hold two groups: the low halves then the high halves.
        packed = blocks[:, 16:].reshape(-1, 4, 1, 32)
        codes = (packed >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    else:  # Q4_0: d, 16 bytes of codes; Q4_1: d, m, 16 bytes (fp16 d and m)
        header = 2 if kind == "Q4_0" else 4
        blocks = data.reshape(-1, header + GROUP // 2)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        scale = d
        if kind == "Q4_0":
            low = -8 * d  # weight = (code - 8) * d
        else:
            low = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        packed = blocks[:, header:]
        codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)
    return (
        codes.reshape(rows, -1).astype(np.uint8),
        scale.reshape(rows, -1),
        low.reshape(rows, -1),
    )


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """(rows, K) codes in 0..15 as (rows, K/2) bytes, the even column in the low half."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def keep_file_codes(model: Transformer, folder: Path) -> int:
    """Make int4 layers of ``model`` (not quantised yet) from the codes the GGUF file had,
    where every part of a layer was 4-bit in the file; ``quantize_model`` then quantises the
    layers left (our q, k, v are one matrix: if the file stored v in Q6_K, that layer is
    quantised from its de-quantised weights). Returns how many layers took the file's codes."""
    from safetensors.torch import load_file

    from src.models.quantize import Int4Linear, can_quantize
    from src.models.transformer import HF_BLOCK_PREFIX, HF_LINEAR_NAMES, family

    path = four_bit_file(folder)
    if path is None:
        return 0
    saved = load_file(path)
    kind = family(model.config)
    taken = 0
    for index, block in enumerate(model.blocks):
        prefix = HF_BLOCK_PREFIX[kind].format(index)
        for ours, parts in HF_LINEAR_NAMES[kind].items():
            linear = block.get_submodule(ours)
            names = [f"{prefix}{part}.weight" for part in parts]
            if type(linear) is not torch.nn.Linear or not can_quantize(linear, "int4"):
                continue
            if not all(f"{name}.codes" in saved for name in names):
                continue
            layer = Int4Linear(linear.in_features, linear.out_features, linear.bias is not None)
            layer.store_groups(
                torch.cat([unpack_codes(saved[f"{n}.codes"]) for n in names]),
                torch.cat([saved[f"{n}.scale"] for n in names]),
                torch.cat([saved[f"{n}.low"] for n in names]),
            )
            if linear.bias is not None:
                layer.bias = torch.nn.Parameter(linear.bias.detach().clone())
            parent, _, leaf = ours.rpartition(".")
            setattr(block.get_submodule(parent), leaf, layer)
            taken += 1
    return taken

"""The model that serves chat: which engine, precision and quantisation, loaded fast.

ENGINE, PRECISION and QUANTIZE default to "auto", resolved here from what the benchmark
measured (README "Performance"):

- ENGINE=auto runs our from-scratch transformer (``src/models/transformer.py``, exact
  against transformers and faster per token) for the families it implements (GPT-2, the
  Llama-like ones, Gemma 2 and 3), with LoRA adapters unmerged on the base's own weights
  (``src/models/lora_view.py``); transformers' model otherwise, and for the adapters only
  peft can run (DoRA, adapted embeddings, ...), merged into a copy of the model.
- PRECISION=auto / QUANTIZE=auto: for a model converted from a GGUF file (the bundled one
  included) what the file holds: bf16 + int4 where its matrices are 4-bit (int4 keeps their
  codes), bf16 + int8 where they are 5 to 8 bits, fp32 + none for a float file. For any
  other model on our engine, measured once (``src/models/auto_quantization.py``): bf16 + int4
  if its held-out perplexity stays within 2% of fp32's, else bf16 + int8 if that does, else
  fp32 + none (exact); on transformers' engine, fp32 + none.

The from-scratch engine loads without importing transformers at all (``Transformer``
straight from safetensors, ``LightTokenizer`` from tokenizer.json, the cast and quantised
result cached by ``src/models/prepared.py``): that is what brings the CLI's cold start under
three seconds. Anything that path cannot read falls back to the transformers path.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from src.config import Settings
from src.errors import ModelLoadingError
from src.models.gguf_import import file_quantization
from src.models.transformer import SUPPORTED_FAMILIES

if TYPE_CHECKING:
    from src.models.auto_quantization import Calibration, MeasuredChoice

logger = logging.getLogger(__name__)


@dataclass
class InferenceModel:
    model: Any  # a transformers model or our Transformer, ready for the decode engine
    tokenizer: Any
    name: str  # what users see, e.g. "smollm2-135m-instruct" or "base+adapter"
    engine: str  # "hf" or "scratch": whose forward pass runs
    description: str  # e.g. "scratch engine, bf16, int4", for --verbose and logs
    # The same model without its LoRA adapter, on the same weights (scratch engine only):
    # what other adapters are put on. None when the model has no adapter.
    plain: InferenceModel | None = None
    # Where the weights came from and how they run (what Ollama's /api/tags and /api/show
    # describe): the model folder, the loader's source ("bundled", "gguf", "local", ...),
    # QUANTIZE's outcome, and the adapter folder if there is one.
    folder: Path | None = None
    source: str = ""
    quantization: str = "none"
    adapter: Path | None = None

    def without_adapter(self) -> InferenceModel:
        return self.plain or self


def load_for_inference(
    settings: Settings,
    model_name: str | None = None,
    adapter_path: Path | None = None,
    engine_name: str | None = None,
    shared_base: InferenceModel | None = None,
    calibration: Calibration | None = None,
) -> InferenceModel:
    """Resolve the model (see ``src.models.loader``) and load it as configured. With
    ``shared_base`` (the same model, already loaded by the scratch engine) an adapter is put
    on its weights instead of loading them again. ``calibration`` makes the conversations
    QUANTIZE=auto measures perplexity on (without it, auto keeps such a model exact). Raises
    ``ModelLoadingError``."""
    from src.models.loader import inference_dtype, resolve_model
    from src.models.native import use_kernels
    from src.models.quantize import resolve_quantization

    adapter = adapter_path or settings.adapter_path
    requested = engine_name or settings.engine
    if shared_base is not None and adapter is not None and shared_base.engine == "scratch":
        adapted = put_adapter_on(shared_base.without_adapter(), Path(adapter), requested)
        # None: only peft can run it, on transformers' model with the adapter merged.
        return adapted or load_for_inference(settings, model_name, adapter_path, "hf")
    name = model_name or settings.model_name
    folder, source = resolve_model(name, settings)
    dtype = inference_dtype(settings.precision, folder)
    quantization = resolve_quantization(settings.quantize, folder)
    loaded, kind, why_not, measured = None, model_type(folder), None, None
    if requested == "scratch" or (requested == "auto" and kind in SUPPORTED_FAMILIES):
        try:
            if settings.quantize == "auto" and file_quantization(folder) is None and calibration:
                measured = measured_quantization(folder, settings, calibration)
            chosen = measured.method if measured else quantization
            chosen_dtype = dtype
            if measured and settings.precision == "auto" and chosen != "none":
                chosen_dtype = torch.bfloat16  # what the quantised layers take
            loaded = load_scratch_fast(folder, source, name, chosen_dtype, chosen, settings)
            quantization = chosen
        except ValueError as exc:  # a folder the direct path cannot read: use transformers
            logger.info("Loading %s through transformers: %s", folder, exc)
            why_not, measured = str(exc), None
    if loaded is None:
        loaded = load_through_transformers(
            settings, name, folder, source, adapter, requested, dtype, quantization
        )
    loaded.description += "; " + choices_explained(
        settings, requested, kind, loaded.engine, why_not, file_quantization(folder), measured
    )
    for kernel in use_kernels(loaded.model, Path(settings.model_cache_dir), settings.int4_kernel,
                              settings.int8_kernel, settings.norm_kernel,
                              settings.rope_kernel):  # fmt: skip
        loaded.description += f" ({kernel})"
    loaded.folder, loaded.source, loaded.quantization = folder, source, quantization
    loaded.adapter = Path(adapter) if adapter is not None else None
    if adapter is not None and loaded.engine == "scratch":
        adapted = put_adapter_on(loaded, Path(adapter), requested)
        return adapted or load_for_inference(settings, model_name, adapter_path, "hf")
    return loaded


def put_adapter_on(base: InferenceModel, adapter: Path, requested: str) -> InferenceModel | None:
    """``base`` (scratch engine, no adapter) with a LoRA adapter on its weights, or None if
    the adapter needs peft and ENGINE=auto allows transformers instead."""
    from src.models.lora_view import UnsupportedAdapter, with_adapter

    try:
        model = with_adapter(base.model, adapter)
    except UnsupportedAdapter as exc:
        if requested == "scratch":
            raise ModelLoadingError(
                f"ENGINE=scratch cannot run the LoRA adapter in {adapter}: {exc}. "
                "ENGINE=auto (or hf) runs it through transformers and peft."
            ) from exc
        logger.warning(
            "Notice: the LoRA adapter %s needs peft (%s): it runs on transformers' engine, "
            "merged into its own copy of the model.",
            adapter.name,
            exc,
        )
        return None
    return InferenceModel(
        model,
        base.tokenizer,
        f"{base.name}+{adapter.name}",
        "scratch",
        f"{base.description}, LoRA adapter {adapter.name} on the shared weights",
        plain=base,
        folder=base.folder,
        source=base.source,
        quantization=base.quantization,
        adapter=adapter,
    )


def model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


def choices_explained(
    settings: Settings,
    requested: str,
    kind: str | None,
    engine: str,
    why_not: str | None,
    from_file: str | None,
    measured: MeasuredChoice | None = None,
) -> str:
    """Why this engine, precision and quantisation: for the start-up line. ``from_file``: the
    quantisation a GGUF file's weights suggest (None: not from a GGUF file); ``measured``:
    what QUANTIZE=auto measured for another model on our engine."""
    if requested != "auto":
        engine_reason = f"ENGINE={requested}"
    elif engine == "scratch":
        engine_reason = f"ENGINE=auto: our transformer builds {kind}"
    elif kind in SUPPORTED_FAMILIES:
        engine_reason = f"ENGINE=auto: transformers, as our transformer cannot read it ({why_not})"
    else:
        engine_reason = f"ENGINE=auto: transformers, as our transformer does not build {kind}"
    quantised_file = from_file in ("int4", "int8") or (measured and measured.method != "none")
    precision_reason = f"PRECISION={settings.precision}"
    if settings.precision == "auto":
        precision_reason += ": bf16 for quantised weights" if quantised_file else ": fp32, exact"
    quantize_reason = f"QUANTIZE={settings.quantize}"
    if settings.quantize == "auto" and measured is not None:
        quantize_reason += ": " + measured.reason()
    elif settings.quantize == "auto":
        quantize_reason += {
            "int4": ": int4 keeps the GGUF file's 4-bit codes",
            "int8": ": int8 for the GGUF file's 5- to 8-bit weights",
        }.get(from_file or "", ": none, exact")
    return f"{engine_reason}; {precision_reason}; {quantize_reason}"


def describe(engine: str, dtype: Any, quantization: str) -> str:
    precision = "bf16" if str(dtype).endswith("bfloat16") else "fp32"
    weights = "" if quantization == "none" else f", {quantization} weights"
    return f"{engine} engine, {precision}{weights}"


def load_scratch_fast(
    folder: Path, source: str, name: str, dtype: Any, quantization: str, settings: Settings
) -> InferenceModel:
    """Our Transformer and a tokenizer, without transformers where the folder allows."""
    from src.models.folder_check import check_model_folder
    from src.models.loader import model_display_name
    from src.models.prepared import load_prepared_transformer

    check_model_folder(folder)
    model = load_prepared_transformer(folder, dtype, quantization, Path(settings.model_cache_dir))
    return InferenceModel(
        model,
        folder_tokenizer(folder),
        model_display_name(name, source),
        "scratch",
        describe("scratch", dtype, quantization),
    )


def folder_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, without importing transformers where the folder allows."""
    from src.models.light_tokenizer import LightTokenizer, can_load_light

    if can_load_light(folder):
        return LightTokenizer(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def measured_quantization(
    folder: Path, settings: Settings, calibration: Calibration
) -> MeasuredChoice:
    """QUANTIZE=auto for a model that is not a GGUF conversion (src/models/auto_quantization.py).
    Raises ValueError where our transformer cannot read the folder."""
    from src.models.auto_quantization import choose_quantization
    from src.models.folder_check import check_model_folder

    check_model_folder(folder)
    cache_dir = Path(settings.model_cache_dir)
    return choose_quantization(folder, folder_tokenizer(folder), cache_dir, calibration)


def load_through_transformers(
    settings: Settings,
    name: str,
    folder: Path,
    source: str,
    adapter: Path | None,
    requested: str,
    dtype: Any,
    quantization: str,
) -> InferenceModel:
    from src.models.loader import load_resolved
    from src.models.quantize import quantize_for_inference
    from src.models.transformer import Transformer

    # On the scratch engine the adapter is put on afterwards (load_for_inference).
    scratch = requested == "scratch"
    loaded = load_resolved(settings, name, folder, source, None if scratch else adapter, dtype)
    shown = loaded.name if loaded.adapter is None else f"{loaded.name}+{loaded.adapter.name}"
    model, engine = loaded.model, "hf"
    if scratch:
        try:
            model, engine = Transformer.from_hf(loaded.model), "scratch"
        except ValueError as exc:
            raise ModelLoadingError(f"ENGINE=scratch cannot run {loaded.name}: {exc}") from exc
    model = quantize_for_inference(model, quantization)  # merges an adapter first
    return InferenceModel(
        model, loaded.tokenizer, shown, engine, describe(engine, dtype, quantization)
    )

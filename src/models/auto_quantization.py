"""QUANTIZE=auto for a checkpoint whose weights were not quantised: measured, once per model.

int4 weights decode two to three times faster than fp32 on a CPU, but rounding a model's
weights to 4 bits costs some models more quality than others. So before serving such a model
the first time, the held-out perplexity of its replies (the last conversations of the bundled
chitchat data, in the model's own chat format: ``src/training/calibration.py``, handed in by
the composition root, ``src/stack.py``) is measured in fp32, then in bf16 with int4
weights, then, if int4 costs too much, with int8 weights. The first that stays within
``PERPLEXITY_TOLERANCE`` (2%) of fp32 is chosen; if neither does, the model stays exact (fp32,
no quantisation). The result is saved beside the prepared models
(``MODEL_CACHE_DIR/prepared/<model>-auto-<digest>.json``), so later starts only read it, and
the start-up line says what was measured.

GGUF files are not measured: what they hold decides (src/models/gguf_import.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from src.files import write_text_atomically

logger = logging.getLogger(__name__)

PERPLEXITY_TOLERANCE = 0.02
CANDIDATES = ("int4", "int8")  # fastest first
# tokenizer -> tokenized conversations with labels (see src/training/calibration.py)
Calibration = Callable[[Any], list[dict[str, list[int]]]]


@dataclass(frozen=True)
class MeasuredChoice:
    method: str  # "int4", "int8" or "none"
    perplexities: dict[str, float]  # "fp32" and each candidate measured

    def reason(self) -> str:
        """For the start-up line."""
        fp32 = self.perplexities["fp32"]
        costs = ", ".join(
            f"{method} {100 * (value / fp32 - 1):+.1f}%"
            for method, value in self.perplexities.items()
            if method != "fp32"
        )
        limit = f"{100 * PERPLEXITY_TOLERANCE:.0f}%"
        if self.method == "none":
            return f"none, as quantising cost more than {limit} perplexity ({costs}; measured once)"
        return f"{self.method}, within {limit} of fp32's perplexity ({costs}; measured once)"


def choice_path(folder: Path, cache_dir: Path) -> Path:
    from src.models.prepared import source_digest

    return Path(cache_dir) / "prepared" / f"{folder.name}-auto-{source_digest(folder)}.json"


def choose_quantization(
    folder: Path, tokenizer: Any, cache_dir: Path, calibration: Calibration
) -> MeasuredChoice:
    """The measured choice for the model in ``folder`` (read back if measured before)."""
    path = choice_path(folder, cache_dir)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        return MeasuredChoice(saved["method"], saved["perplexities"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not measured yet, or a damaged file: measure again
    choice = measure(folder, calibration(tokenizer))
    save_choice(choice, path)
    return choice


def measure(folder: Path, examples: list[dict[str, list[int]]]) -> MeasuredChoice:
    from src.models.perplexity import held_out_perplexity
    from src.models.quantize import quantize_model
    from src.models.transformer import Transformer

    perplexities: dict[str, float] = {}
    method = "none"
    steps = tqdm(
        total=1 + len(CANDIDATES), desc=f"QUANTIZE=auto for {folder.name} (one time)", unit="pass"
    )
    try:
        steps.set_postfix_str("fp32")
        perplexities["fp32"] = held_out_perplexity(Transformer.from_folder(folder), examples)
        steps.update()
        for candidate in CANDIDATES:
            steps.set_postfix_str(f"bf16 + {candidate}")
            model = quantize_model(Transformer.from_folder(folder, torch.bfloat16), candidate)
            perplexities[candidate] = held_out_perplexity(model, examples)
            del model
            steps.update()
            if perplexities[candidate] <= perplexities["fp32"] * (1 + PERPLEXITY_TOLERANCE):
                method = candidate
                break
    finally:
        steps.close()
    return MeasuredChoice(method, perplexities)


def save_choice(choice: MeasuredChoice, path: Path) -> None:
    """Atomically; a cache that cannot be written only costs the next start a measurement."""
    try:
        write_text_atomically(path, json.dumps(asdict(choice), indent=2))
    except OSError as exc:
        logger.warning("Notice: could not save the QUANTIZE=auto measurement in %s: %s", path, exc)

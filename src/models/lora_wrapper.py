"""LoRA adapters on top of a loaded model (peft)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from src.errors import ModelLoadingError

ADAPTER_CONFIG = "adapter_config.json"


def load_adapter(model: Any, adapter_dir: Path) -> Any:
    """Attach a saved peft LoRA adapter to ``model`` for inference."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise ModelLoadingError(
            f"Adapter folder {adapter_dir} has no {ADAPTER_CONFIG}: is it a peft adapter?"
        )
    try:
        adapted = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:  # bad files
        raise ModelLoadingError(f"Could not load the adapter in {adapter_dir}: {exc}") from exc
    adapted.eval()
    return adapted

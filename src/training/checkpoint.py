"""Resumable checkpoints, written atomically.

A checkpoint is a folder ``checkpoints/step-000150`` holding the LoRA adapter (peft format),
the optimizer and scheduler states, every process's random-number states, the step and the
position in the data. It is written under a temporary name and renamed when complete, so a
kill at any moment leaves the previous checkpoints intact and never a half-written one under
a real name; a write that fails (a full disk) raises ``CheckpointError`` and changes nothing
saved before. States are loaded with ``weights_only=True``: no pickled code is ever run.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from src.errors import CheckpointError, TrainingConfigError

STEP_FOLDER = re.compile(r"^step-(\d{6})$")
TRAINER_STATE = "trainer_state.pt"


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),  # the Mersenne Twister state as plain ints
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(
        ("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0)
    )


def save_checkpoint(
    output_dir: Path, step: int, save_adapter, trainer_state: dict[str, Any], keep: int
) -> Path:
    """``save_adapter(folder)`` writes the adapter; ``trainer_state`` goes next to it.

    Everything is written into a staging folder that is renamed into place when complete. A
    write that fails (a full disk) raises ``CheckpointError`` naming the folder, and removes
    the staging folder; the checkpoints saved before are untouched either way."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:06d}"
    staging = root / f".step-{step:06d}.partial"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".step-*"):  # staging folders of runs killed mid-write
            shutil.rmtree(leftover, ignore_errors=True)
        staging.mkdir()
        save_adapter(staging)
        torch.save(trainer_state, staging / TRAINER_STATE)
    except (OSError, RuntimeError, SafetensorError) as exc:
        # torch.save reports a full disk as RuntimeError, safetensors as SafetensorError.
        shutil.rmtree(staging, ignore_errors=True)
        previous = latest_checkpoint(output_dir)
        kept = f"the last good checkpoint, {previous}, is intact" if previous else "no checkpoint"
        raise CheckpointError(
            f"could not write checkpoint {final} ({type(exc).__name__}: {exc}); {kept}"
        ) from exc
    if final.exists():  # the same step saved again: the new one replaces it whole
        delete_checkpoint(final)
    os.replace(staging, final)  # atomic: the folder appears complete or not at all
    for old in list_checkpoints(output_dir)[:-keep]:
        delete_checkpoint(old)
    return final


def delete_checkpoint(folder: Path) -> None:
    """Rename it out of sight first (atomic), then delete it: a kill half-way through never
    leaves a half-deleted folder under a checkpoint's name."""
    retired = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    os.replace(folder, retired)
    shutil.rmtree(retired, ignore_errors=True)


def remove_checkpoints(output_dir: Path) -> None:
    """Delete every checkpoint (a fresh run: what --resume finds must be this run's)."""
    for folder in list_checkpoints(output_dir):
        delete_checkpoint(folder)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (partial ones are never listed)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_FOLDER.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_FOLDER.match(p.name).group(1)))


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / TRAINER_STATE
    try:
        return torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise TrainingConfigError(f"checkpoint {checkpoint} is unreadable ({exc})") from None


def publish_adapter(save_adapter, output_dir: Path) -> Path:
    """Write the final adapter into ``output_dir`` so that a server watching ADAPTERS_DIR
    never loads half of it: ``save_adapter(folder)`` writes into a staging folder, then every
    file is moved in with ``adapter_config.json`` last (a folder is an adapter once that file
    is there, and by then its weights are whole)."""
    from src.models.lora_wrapper import ADAPTER_CONFIG

    output_dir = Path(output_dir)
    staging = output_dir / ".adapter.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        save_adapter(staging)
        files = sorted(staging.iterdir(), key=lambda path: path.name == ADAPTER_CONFIG)
        for path in files:
            os.replace(path, output_dir / path.name)
    except (OSError, SafetensorError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise CheckpointError(f"could not write the adapter into {output_dir}: {reason}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir

"""The training configuration: a YAML file (configs/lora_default.yaml), then the brief's
environment variables (BATCH_SIZE, LEARNING_RATE, LORA_RANK) when set, then command-line
overrides such as ``training.max_steps=50``. Unknown keys and bad values are errors naming
the key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from src.errors import TrainingConfigError
from src.validation import describe_validation_error

# Environment variables of the brief and the keys they set.
ENVIRONMENT_OVERRIDES = {
    "BATCH_SIZE": "training.batch_size",
    "LEARNING_RATE": "training.learning_rate",
    "LORA_RANK": "lora.rank",
}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Section):
    source: str = "chitchat"
    max_length: int = Field(256, ge=16, le=8192)
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    max_examples: int | None = Field(None, ge=2)


class LoraConfig(Section):
    rank: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None


class TrainingSection(Section):
    batch_size: int = Field(4, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(10, ge=0)
    max_steps: int = Field(200, ge=1)
    max_grad_norm: float = Field(1.0, gt=0.0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 42
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=1)
    save_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    output_dir: Path = Path("outputs/adapters/chitchat-lora")


class TrainingConfig(Section):
    model: str = "smollm2-135m-instruct"
    data: DataConfig = DataConfig()
    lora: LoraConfig = LoraConfig()
    training: TrainingSection = TrainingSection()


def set_dotted(values: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TrainingConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = value


def describe_yaml_error(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return " ".join(str(exc).split())  # PyYAML's messages span several lines


def load_training_config(
    path: Path | None = None, overrides: list[str] = (), environ: dict | None = None
) -> TrainingConfig:
    values: dict = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise TrainingConfigError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError, RecursionError) as exc:
            # ValueError: an integer of over 4300 digits; RecursionError: nesting too deep.
            raise TrainingConfigError(
                f"{path}: cannot read it as YAML ({describe_yaml_error(exc)})"
            ) from None
        if not isinstance(values, dict):
            raise TrainingConfigError(f"{path}: the top level must be a mapping of sections")
    environ = os.environ if environ is None else environ
    for variable, key in ENVIRONMENT_OVERRIDES.items():
        if environ.get(variable):
            set_dotted(values, key, environ[variable])
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise TrainingConfigError(
                f"override {override!r}: expected KEY=VALUE, e.g. training.max_steps=50"
            )
        try:
            value = yaml.safe_load(raw) if raw else None
        except (yaml.YAMLError, ValueError, RecursionError) as exc:
            raise TrainingConfigError(
                f"override {override!r}: the value is not valid YAML ({describe_yaml_error(exc)})"
            ) from None
        set_dotted(values, key.strip(), value)
    try:
        return TrainingConfig.model_validate(values)
    except ValidationError as exc:
        where = f"{path}: " if path else ""
        raise TrainingConfigError(where + describe_validation_error(exc)) from None

"""The training configuration, from one precedence rule (each layer wins over the one before):

1. the YAML file (configs/lora_default.yaml), over ``TrainingConfig``'s own defaults;
2. ``BATCH_SIZE``, ``LEARNING_RATE`` and ``LORA_RANK`` from ``.env`` or the process
   environment, read through ``Settings`` like every other setting (so the environment wins
   over ``.env``, as everywhere else in the app);
3. command-line overrides such as ``training.max_steps=50``.

Only the variables a user set override the YAML: unset, they are None in ``Settings``. Unknown
keys and bad values are errors naming the key (or the variable). ``resolve_training_config``
also says where each value came from, for the dump printed and saved at the start of a run.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from src.config import Settings, load_settings
from src.errors import TrainingConfigError
from src.files import write_text_atomically
from src.validation import describe_validation_error

# The settings that override training keys: Settings field (the variable is its name in
# capitals: BATCH_SIZE, LEARNING_RATE, LORA_RANK) -> the key it sets. The only such mapping.
SETTINGS_KEYS = {
    "batch_size": "training.batch_size",
    "learning_rate": "training.learning_rate",
    "lora_rank": "lora.rank",
}

# Where a value came from.
DEFAULT, YAML, ENVIRONMENT, COMMAND_LINE = "default", "yaml", ".env/environment", "command line"

# Written into training.output_dir at the start of every run, beside the adapter.
CONFIG_FILE_NAME = "training_config.yaml"


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
    # Left out or null: ADAPTERS_DIR / ADAPTER_NAME, set when the configuration is resolved.
    output_dir: Path | None = None


class TrainingConfig(Section):
    SCRIPT: ClassVar[str] = "src/training/train_lora.py"  # what repeats a run of it
    ADAPTER_NAME: ClassVar[str] = "chitchat-lora"  # its folder in ADAPTERS_DIR by default

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


@dataclass(frozen=True)
class Assignment:
    """One layer's value for a key; the key "" is the whole configuration (the YAML file)."""

    key: str
    value: Any
    source: str


@dataclass(frozen=True)
class ResolvedConfig:
    """A validated configuration and where each of its values came from."""

    config: Section  # a TrainingConfig, or another schema's (DpoConfig)
    sources: dict[str, str]  # every key, e.g. "training.batch_size" -> YAML, ENVIRONMENT...
    path: Path | None  # the YAML file, if any

    def describe(self) -> str:
        """One line per key: its value and where it came from, for the start of a run."""
        values = {key: format_value(value) for key, value in flat_values(self.config).items()}
        key_width = max(map(len, values))
        value_width = min(max(map(len, values.values())), 40)
        lines = [f"Training configuration ({precedence(self.path)}):"]
        lines += [
            f"  {key:<{key_width}}  {value:<{value_width}}  {self.sources[key]}"
            for key, value in values.items()
        ]
        return "\n".join(lines)

    def save(self, folder: Path) -> Path:
        """Write ``folder/training_config.yaml``: the configuration as a YAML file that
        ``--config`` accepts, so the run can be repeated, headed by comments naming the values
        that did not come from the YAML file. Written aside and renamed: never half a file."""
        path = Path(folder) / CONFIG_FILE_NAME
        others = [f"#   {key}: {source}" for key, source in self.sources.items() if source != YAML]
        header = [
            "# The resolved configuration of a training run, written when it started.",
            f"# Repeat it with: python {self.config.SCRIPT} --config <this file>",
            "# (BATCH_SIZE, LEARNING_RATE, LORA_RANK and KEY=VALUE arguments still override it)",
            f"# Precedence: {precedence(self.path)}.",
            *(["# Not from the YAML file:", *others] if others else []),
        ]
        body = yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False)
        try:
            write_text_atomically(path, "\n".join(header) + "\n" + body)
        except OSError as exc:
            raise TrainingConfigError(f"Cannot write {path}: {exc.strerror or exc}") from None
        return path


def load_training_config(
    path: Path | None = None, overrides: Iterable[str] = (), settings: Settings | None = None
) -> TrainingConfig:
    """The configuration of ``path`` (YAML), then ``settings`` (read from .env and the
    environment with ``load_settings()`` when None), then ``overrides`` (``KEY=VALUE``)."""
    return resolve_training_config(path, overrides, settings).config


def resolve_training_config(
    path: Path | None = None,
    overrides: Iterable[str] = (),
    settings: Settings | None = None,
    schema: type[Section] = TrainingConfig,
) -> ResolvedConfig:
    """``load_training_config``, and where each value came from. ``schema``: the kind of run
    (LoRA fine-tuning's ``TrainingConfig``, preference tuning's ``DpoConfig``)."""
    settings = load_settings() if settings is None else settings
    assignments = []
    if path is not None:
        assignments.append(Assignment("", read_yaml(Path(path)), YAML))
    assignments += settings_assignments(settings)
    assignments += [parse_override(override) for override in overrides]
    values: dict = {}
    for assignment in assignments:
        if assignment.key:
            set_dotted(values, assignment.key, assignment.value)
        else:
            values = assignment.value
    default_output = default_output_dir(values, settings, schema)
    if default_output is not None:
        assignments.append(default_output)
        set_dotted(values, default_output.key, default_output.value)
    try:
        config = schema.model_validate(values)
    except ValidationError as exc:
        where = f"{path}: " if path else ""
        raise TrainingConfigError(where + describe_validation_error(exc)) from None
    sources = {key: source_of(key, assignments) for key in flat_values(config)}
    return ResolvedConfig(config, sources, Path(path) if path is not None else None)


def no_settings() -> Settings:
    """Settings with nothing set, as if there were no .env and no environment: for runs that
    must be the same on every machine (the training benchmark, the notebook)."""
    return Settings.model_construct()  # builds without reading .env or the environment


def read_yaml(path: Path) -> dict:
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise TrainingConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError, RecursionError) as exc:
        # ValueError: an integer of over 4300 digits; RecursionError: nesting too deep.
        raise TrainingConfigError(
            f"{path}: cannot read it as YAML ({describe_yaml_error(exc)})"
        ) from None
    if not isinstance(values, dict):
        raise TrainingConfigError(f"{path}: the top level must be a mapping of sections")
    return values


def settings_assignments(settings: Settings) -> list[Assignment]:
    """The training keys set in .env or the environment. ``model_fields_set`` holds only the
    fields pydantic-settings found there, so nothing the user did not set replaces the YAML."""
    return [
        Assignment(key, getattr(settings, field), ENVIRONMENT)
        for field, key in SETTINGS_KEYS.items()
        if field in settings.model_fields_set and getattr(settings, field) is not None
    ]


def default_output_dir(
    values: dict, settings: Settings, schema: type[Section]
) -> Assignment | None:
    """``training.output_dir`` left out or null: the run's own folder in ADAPTERS_DIR, where
    a running server offers the adapter by name."""
    training = values.get("training", {})
    if not isinstance(training, dict) or training.get("output_dir") is not None:
        return None  # set (or a wrong shape, which validation names)
    folder = Path(settings.adapters_dir) / schema.ADAPTER_NAME  # type: ignore[attr-defined]
    return Assignment("training.output_dir", str(folder), "ADAPTERS_DIR")


def parse_override(override: str) -> Assignment:
    key, sep, raw = override.partition("=")
    key = key.strip()
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
    return Assignment(key, value, COMMAND_LINE)


def source_of(key: str, assignments: list[Assignment]) -> str:
    """Where ``key``'s value came from: the last assignment to it or to a section holding it.
    A section assigned without the key (``training={...}`` on the command line) leaves it at
    its default. (Later assignments write into earlier values, but only below their own key,
    which this backward scan meets first.)"""
    parts = key.split(".")
    for assignment in reversed(assignments):
        prefix = assignment.key.split(".") if assignment.key else []
        if parts[: len(prefix)] == prefix:
            found = holds(assignment.value, parts[len(prefix) :])
            return assignment.source if found else DEFAULT
    return DEFAULT


def holds(value: Any, parts: list[str]) -> bool:
    for part in parts:
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def flat_values(config: Section) -> dict[str, Any]:
    """Every key of ``config`` ("training.batch_size") and its value, sections flattened."""
    flat = {}
    for name, value in config.model_dump(mode="json").items():
        if isinstance(value, dict):
            flat.update({f"{name}.{key}": inner for key, inner in value.items()})
        else:
            flat[name] = value
    return flat


def format_value(value: Any) -> str:
    return "null" if value is None else str(value)


def precedence(path: Path | None) -> str:
    first = json.dumps(str(path)) if path is not None else "defaults"  # quoted: no newlines
    return f"{first} < {ENVIRONMENT} < {COMMAND_LINE}"


def parse_run_arguments(
    argv: list[str] | None, description: str, default_config: str, example: str
) -> argparse.Namespace:
    """A training command's arguments: ``--config``, ``--resume`` and KEY=VALUE overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=Path(default_config))
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in training.output_dir",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help=f"override any config key, e.g. {example}",
    )
    return parser.parse_args(argv)


def at_most(items: Sequence, limit: int | None, seed: int) -> list:
    """``limit`` of ``items`` drawn at random (reproducibly), or all of them."""
    if limit and len(items) > limit:
        return random.Random(seed).sample(list(items), limit)
    return list(items)

"""The configuration of a preference-tuning run (DPO), resolved like LoRA fine-tuning's: the
YAML file < BATCH_SIZE, LEARNING_RATE, LORA_RANK from .env or the environment < KEY=VALUE
arguments (``resolve_training_config(..., schema=DpoConfig)``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from src.config import REPO_ROOT
from src.training.config import LoraConfig, Section

DEMO_PREFERENCES = REPO_ROOT / "assets" / "demo_preferences.jsonl"


class PreferenceDataConfig(Section):
    source: str = "demo"
    max_length: int = Field(256, ge=16, le=8192)
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_examples: int | None = Field(None, ge=2)

    @property
    def path(self) -> Path:
        """The JSONL file: ``demo`` is the bundled demonstration set."""
        return DEMO_PREFERENCES if self.source == "demo" else Path(self.source)


class DpoSection(Section):
    beta: float = Field(0.1, gt=0.0, le=10.0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"


class DpoTrainingSection(Section):
    batch_size: int = Field(4, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    learning_rate: float = Field(5e-5, gt=0.0, le=1.0)
    warmup_steps: int = Field(5, ge=0)
    max_steps: int = Field(30, ge=1)
    max_grad_norm: float = Field(1.0, gt=0.0)
    seed: int = 42
    eval_every: int = Field(15, ge=1)
    save_every: int = Field(15, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    # Left out or null: ADAPTERS_DIR / ADAPTER_NAME, set when the configuration is resolved.
    output_dir: Path | None = None


class DpoConfig(Section):
    SCRIPT: ClassVar[str] = "src/training/train_dpo.py"
    ADAPTER_NAME: ClassVar[str] = "dpo-demo"  # its folder in ADAPTERS_DIR by default

    model: str = "smollm2-135m-instruct"
    start_adapter: Path | None = None
    data: PreferenceDataConfig = PreferenceDataConfig()
    lora: LoraConfig = LoraConfig()
    dpo: DpoSection = DpoSection()
    training: DpoTrainingSection = DpoTrainingSection()

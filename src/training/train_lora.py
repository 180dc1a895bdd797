"""Fine-tune a LoRA adapter.

    python src/training/train_lora.py --config configs/lora_default.yaml
    python src/training/train_lora.py --config configs/lora_default.yaml training.max_steps=50
    python src/training/train_lora.py --config configs/lora_default.yaml --resume
    accelerate launch --num_processes 2 src/training/train_lora.py --config ...   # DDP

Precedence: the YAML file < BATCH_SIZE, LEARNING_RATE, LORA_RANK in .env or the environment <
KEY=VALUE arguments. The resolved configuration is printed when the run starts and saved as
training_config.yaml in training.output_dir, where the final adapter (peft format),
metrics.jsonl, loss_curve.png and checkpoints go too. Load the adapter with ``--adapter`` in
the CLI, ADAPTER_PATH for the API, or pick it in the web UI when it sits under ADAPTERS_DIR.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import argparse
from typing import TYPE_CHECKING

from src.errors import MiniClaudeError

if TYPE_CHECKING:
    from src.training.config import ResolvedConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from src.training.config import parse_run_arguments

    return parse_run_arguments(
        argv,
        "Fine-tune a LoRA adapter.",
        "configs/lora_default.yaml",
        "training.max_steps=50 lora.rank=4",
    )


def prepare_data(config, tokenizer):
    """The tokenized training and validation examples of ``config`` (a TrainingConfig)."""
    from src.chat.prompts import detect_prompt_format
    from src.training.config import at_most
    from src.training.data import load_examples, tokenize_examples

    examples = load_examples(config.data.source)
    examples = at_most(examples, config.data.max_examples, config.training.seed)
    return tokenize_examples(
        examples,
        tokenizer,
        detect_prompt_format(tokenizer),
        config.data.max_length,
        config.data.validation_fraction,
        config.training.seed,
    )


def build_trainer(config, settings=None):
    """Model, data and trainer for ``config`` (a TrainingConfig), the model loaded with
    ``settings`` (read from .env and the environment when None). Raises MiniClaudeError."""
    import torch

    from src.config import load_settings
    from src.models.loader import load_model
    from src.models.lora_wrapper import LoraSettings, apply_lora
    from src.training.trainer import LoraTrainer, set_seed

    set_seed(config.training.seed)  # LoRA's random A matrices depend on it
    # fp32 whatever PRECISION says (that is for inference): training has its own precision.
    settings = load_settings() if settings is None else settings
    loaded = load_model(settings, model_name=config.model, dtype=torch.float32)
    data = prepare_data(config, loaded.tokenizer)
    model = apply_lora(loaded.model, LoraSettings(**config.lora.model_dump()))
    return LoraTrainer(config, model, loaded.tokenizer, data), loaded


def announce_config(resolved: ResolvedConfig) -> Path:
    """Print the resolved configuration and save it into training.output_dir before any
    step, so that even a run that crashes says what it ran with. Returns the file."""
    print(resolved.describe())
    return resolved.save(resolved.config.training.output_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    from src.config import load_settings
    from src.models.lora_wrapper import describe_parameters
    from src.training.config import resolve_training_config

    try:
        settings = load_settings()  # one reading of .env: for the model and the config alike
        resolved = resolve_training_config(args.config, args.overrides, settings)
        config = resolved.config
        trainer, loaded = build_trainer(config, settings)
        main_process = trainer.accelerator.is_main_process
        if main_process:
            announce_config(resolved)
    except (MiniClaudeError, ValueError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    data = trainer.data
    if main_process:
        stats = data.stats
        print(f"Model {loaded.name}; {describe_parameters(trainer.model)}")
        print(
            f"Data {config.data.source}: {stats['train']} training and {stats['validation']} "
            f"validation examples, {stats['train_tokens']:,} training tokens; "
            f"{stats['truncated_examples']} examples cut to {config.data.max_length} tokens "
            f"({stats['truncated_tokens']:,} tokens), {stats['dropped_examples']} dropped"
        )
    try:
        result = trainer.train(resume=args.resume)
    except MiniClaudeError as exc:  # a checkpoint that cannot be written or read back
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    if main_process:
        before = f"{result.first_eval_loss:.4f}" if result.first_eval_loss is not None else "-"
        after = f"{result.last_eval_loss:.4f}" if result.last_eval_loss is not None else "-"
        print(
            f"Done: {result.steps} steps in {result.seconds:.0f} s "
            f"({result.tokens_per_second:.0f} tokens/s); validation loss {before} -> {after}"
        )
        print(
            f"Adapter: {result.adapter_dir}  (try: python src/mvp_chatbot.py --model "
            f"{config.model} --adapter {result.adapter_dir})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Preference-tune a LoRA adapter with DPO (TRL's trainer, peft).

    python src/training/train_dpo.py --config configs/dpo_default.yaml
    python src/training/train_dpo.py --config configs/dpo_default.yaml \
        data.source=data/preferences.jsonl training.output_dir=outputs/adapters/my-dpo
    python src/training/train_dpo.py --config configs/dpo_default.yaml --resume

The pairs: the bundled demonstration set (``data.source: demo``) or a file written by
``scripts/export_preferences.py`` from the feedback given in the UI, the API and the CLI.
Precedence: the YAML file < BATCH_SIZE, LEARNING_RATE, LORA_RANK in .env or the environment <
KEY=VALUE arguments. The resolved configuration is printed and saved as training_config.yaml
in training.output_dir, where the final adapter, metrics.jsonl, dpo_curves.png,
preference_report.json and the checkpoints go too. Under ADAPTERS_DIR (the default output)
the running server offers the adapter by its folder name, without a restart.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import argparse
import json
from typing import Any

from src.errors import MiniClaudeError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from src.training.config import parse_run_arguments

    return parse_run_arguments(
        argv,
        "Preference-tune a LoRA adapter with DPO.",
        "configs/dpo_default.yaml",
        "training.max_steps=20 dpo.beta=0.2",
    )


def prepare_pairs(config, tokenizer):
    from src.chat.prompts import detect_prompt_format
    from src.training.config import at_most
    from src.training.preference_data import load_pairs, tokenize_pairs

    pairs = at_most(load_pairs(config.data.path), config.data.max_examples, config.training.seed)
    return tokenize_pairs(
        pairs,
        tokenizer,
        detect_prompt_format(tokenizer),
        config.data.max_length,
        config.data.validation_fraction,
        config.training.seed,
    )


def policy_model(config, base: Any) -> Any:
    """A new LoRA adapter on ``base``, or the SFT adapter ``start_adapter`` to go on training.
    TRL's trainer keeps a frozen copy of it as the adapter "ref": the reference model."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if config.start_adapter is not None:
        return PeftModel.from_pretrained(base, str(config.start_adapter), is_trainable=True)
    lora = config.lora
    return get_peft_model(
        base,
        LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules or "all-linear",
            task_type="CAUSAL_LM",
        ),
    )


def reference_of(model: Any):
    """The reference model's context: the "ref" adapter, or no adapter at all."""
    from trl.trainer.utils import use_adapter

    return use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None)


def build(config, settings) -> tuple[Any, Any, Any]:
    """(trainer, tokenized pairs, loaded model) for ``config`` (a DpoConfig)."""
    import torch
    from datasets import Dataset
    from transformers import set_seed

    from src.models.loader import load_model
    from src.training.dpo import METRICS_FILE, MetricsLog, PreferenceTrainer, trainer_arguments

    set_seed(config.training.seed)
    loaded = load_model(settings, model_name=config.model, dtype=torch.float32)
    data = prepare_pairs(config, loaded.tokenizer)
    model = policy_model(config, loaded.model)
    output = config.training.output_dir
    trainer = PreferenceTrainer(
        model=model,
        args=trainer_arguments(config),
        train_dataset=Dataset.from_list(data.train),
        eval_dataset=Dataset.from_list(data.held_out) if data.held_out else None,
        processing_class=loaded.tokenizer,
        callbacks=[MetricsLog(output / METRICS_FILE)],
    )
    return trainer, data, loaded


def held_out_logps(model, data, pad_id: int, reference: bool = False):
    """Log-probabilities of each held-out pair's replies under the model as it is now, or
    under the reference (which training never changes: measured once)."""
    from src.training.dpo import reply_logps

    if not reference:
        return reply_logps(model, data.held_out, pad_id)
    with reference_of(model):
        return reply_logps(model, data.held_out, pad_id)


def log_start(metrics: Path, before, loss_type: str) -> None:
    """A new metrics.jsonl, whose first line is step 0: the held-out pairs before training,
    in the columns TRL's evaluations write later. (Its accuracy counts a tie as half where
    TRL's counts it as 0; every pair is a tie at step 0 and none is after training, so the
    column means one thing: how often chosen wins, 0.5 being chance.)"""
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.unlink(missing_ok=True)
    if before is not None:
        record = {
            "step": 0,
            "eval_rewards/margins": before.margin,
            "eval_rewards/accuracies": before.accuracy,
        }
        if loss_type == "sigmoid":  # TRL's eval_loss is the loss it trains with
            record["eval_loss"] = before.loss
        metrics.write_text(json.dumps(record) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    from src.config import load_settings
    from src.training.checkpoint import publish_adapter
    from src.training.config import resolve_training_config
    from src.training.dpo import METRICS_FILE, preference_report
    from src.training.dpo_config import DpoConfig
    from src.training.plots import plot_dpo_curves
    from src.training.train_lora import announce_config

    try:
        settings = load_settings()
        resolved = resolve_training_config(args.config, args.overrides, settings, DpoConfig)
        config = resolved.config
        trainer, data, loaded = build(config, settings)
        announce_config(resolved)
    except (MiniClaudeError, ValueError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    print(
        f"Model {loaded.name}; pairs from {config.data.path}: {len(data.train)} for training, "
        f"{len(data.held_out)} held out; {data.truncated} with replies cut to "
        f"{config.data.max_length} tokens, {data.dropped} dropped (prompt too long)"
    )
    beta, model = config.dpo.beta, trainer.model
    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    before = after = None
    if data.held_out:  # before training the policy is its reference: every reward is 0
        reference = held_out_logps(model, data, pad_id, reference=True)
        before = preference_report(reference, reference, beta)
    checkpoints = config.training.output_dir / "checkpoints"
    resume = args.resume and any(checkpoints.glob("checkpoint-*"))
    if args.resume and not resume:
        print("(no checkpoint to resume from: starting from the beginning)")
    if not resume:  # a new run's log starts with the held-out pairs as they were
        log_start(config.training.output_dir / METRICS_FILE, before, config.dpo.loss_type)
    trainer.train(resume_from_checkpoint=True if resume else None)
    if data.held_out:
        after = preference_report(held_out_logps(model, data, pad_id), reference, beta)
    output = config.training.output_dir
    try:  # the trained adapter only (not the frozen "ref" copy of a start adapter)
        publish_adapter(
            lambda folder: model.save_pretrained(folder, selected_adapters=["default"]), output
        )
    except MiniClaudeError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    plot_dpo_curves(output / METRICS_FILE, output / "dpo_curves.png")
    if before is not None and after is not None:
        report = {
            "held_out_pairs": len(data.held_out),
            "before": vars(before),
            "after": vars(after),
        }
        (output / "preference_report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"Held-out pairs before: {before.describe()}")
        print(f"Held-out pairs after:  {after.describe()}")
    print(
        f"Adapter: {output}  (offered as {output.name!r} by a server whose ADAPTERS_DIR holds it)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

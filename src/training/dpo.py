"""Preference tuning (DPO) of a LoRA adapter with TRL's ``DPOTrainer`` and peft.

What is ours around TRL's trainer: the pairs are tokenized by the chat core's encoder
(``preference_data``), so TRL's own tokenization is skipped; ``metrics.jsonl`` gets every log
line (and is cut back to the checkpoint on ``--resume``, so a resumed run's log equals an
uninterrupted one's); the final adapter is published atomically into the output folder; and
``preference_report`` measures held-out pairs before and after in a few readable lines, the
DPO loss among them.

DPO in one line: for a pair, the implicit reward of a reply is beta times how much more
likely the tuned model makes it than the reference model; the loss is
``-log sigmoid(reward(chosen) - reward(rejected))``, which pushes the tuned model to prefer
the chosen reply by more than the reference did, without drifting far from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from src.training.dpo_config import DpoConfig

METRICS_FILE = "metrics.jsonl"


class PreferenceTrainer(DPOTrainer):
    """TRL's DPOTrainer on pairs that arrive tokenized (``prompt_ids``, ``chosen_ids``,
    ``rejected_ids``) by the chat core's encoder: one encoder for chat and training."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


class MetricsLog(TrainerCallback):
    """Every log line of the run as one JSON line (``step`` first), in ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        """A resumed run continues the log from its checkpoint's step, dropping what the
        interrupted run wrote after it."""
        if not state.is_world_process_zero or not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= state.global_step
        ]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, **{k: round(v, 6) for k, v in logs.items()}}
            with self.path.open("a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")


def trainer_arguments(config: DpoConfig) -> DPOConfig:
    """TRL's arguments from our configuration (checkpoints under output_dir/checkpoints)."""
    training = config.training
    return DPOConfig(
        output_dir=str(training.output_dir / "checkpoints"),
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=training.warmup_steps,
        max_steps=training.max_steps,
        max_grad_norm=training.max_grad_norm,
        seed=training.seed,
        data_seed=training.seed,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=training.eval_every,
        save_strategy="steps",
        save_steps=training.save_every,
        save_total_limit=training.keep_checkpoints,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        beta=config.dpo.beta,
        loss_type=[config.dpo.loss_type],
        max_length=config.data.max_length,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        # Recomputing activations saves memory a small model does not need, at a third more
        # time per step.
        gradient_checkpointing=False,
    )


# ---- the measurement: DPO written out ------------------------------------------------------


@torch.no_grad()
def reply_logps(model: Any, pairs: list[dict], pad_id: int, batch_size: int = 8) -> torch.Tensor:
    """log p(reply | prompt) summed over the reply's tokens, for each pair's chosen and
    rejected reply: a tensor of shape (pairs, 2)."""
    collate = DataCollatorForPreference(pad_token_id=pad_id)
    model.eval()
    found = []
    for start in range(0, len(pairs), batch_size):
        batch = collate(pairs[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts t + 1
        targets = batch["input_ids"][:, 1:]
        token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        mask = batch["completion_mask"][:, 1:]  # only the reply's tokens count
        sums = (token_logps * mask).sum(dim=1)
        chosen, rejected = sums.chunk(2)  # the collator puts chosen first, rejected second
        found.append(torch.stack([chosen, rejected], dim=1))
    return torch.cat(found)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """The DPO loss of pairs, from (pairs, 2) log-probabilities [chosen, rejected]."""
    rewards = beta * (policy - reference)  # implicit rewards of chosen and rejected
    margins = rewards[:, 0] - rewards[:, 1]
    return -F.logsigmoid(margins).mean()


@dataclass(frozen=True)
class PreferenceReport:
    accuracy: float  # how often the implicit reward prefers chosen (ties count half)
    margin: float  # mean reward(chosen) - reward(rejected)
    loss: float  # the DPO paper's (sigmoid) loss, whichever dpo.loss_type trains

    def describe(self) -> str:
        return (
            f"preference accuracy {self.accuracy:.2f}, reward margin {self.margin:+.3f}, "
            f"DPO (sigmoid) loss {self.loss:.4f}"
        )


def preference_report(
    policy: torch.Tensor, reference: torch.Tensor, beta: float
) -> PreferenceReport:
    """Held-out pairs measured. Before training the tuned model is the reference, so every
    reward is 0: accuracy 0.5 (all ties) and margin 0 by construction."""
    margins = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    accuracy = (margins > 0).float().mean() + 0.5 * (margins == 0).float().mean()
    return PreferenceReport(
        accuracy=float(accuracy),
        margin=float(margins.mean()),
        loss=float(dpo_loss(policy, reference, beta)),
    )

"""The LoRA training loop, written to be read.

Per optimizer step: ``gradient_accumulation_steps`` micro-batches forward and backward (loss
only on assistant tokens), gradients clipped, one AdamW step, the learning rate following a
linear warm-up then a cosine decay to zero. Every ``eval_every`` steps: validation loss and
perplexity. Every ``save_every`` steps: an atomic, resumable checkpoint. Metrics go to
``metrics.jsonl`` and a loss-curve PNG; a progress bar shows loss and tokens/s.

It runs the same on one CPU or under ``accelerate launch`` (DDP): each process takes its own
share of every global batch, and accelerate averages the gradients.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from src.files import write_text_atomically
from src.training import checkpoint as ckpt
from src.training.config import TrainingConfig
from src.training.data import TokenizedData, collate


def warmup_cosine(step: int, warmup_steps: int, max_steps: int) -> float:
    """Learning-rate multiplier: 0 -> 1 linearly over warm-up, then cosine from 1 to 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def use_bf16(precision: str) -> bool:
    if precision == "bf16":
        return True
    return precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class DataPosition:
    """Where the run is in the data: which epoch, and which global batch within it."""

    epoch: int = 0
    batch: int = 0


@dataclass
class TrainResult:
    steps: int
    first_eval_loss: float | None
    last_eval_loss: float | None
    train_tokens: int
    seconds: float
    adapter_dir: Path

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.seconds if self.seconds else 0.0


class LoraTrainer:
    def __init__(self, config: TrainingConfig, model: Any, tokenizer: Any, data: TokenizedData):
        from accelerate import Accelerator

        self.config = config
        self.settings = config.training
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.tokenizer = tokenizer
        self.data = data
        self.pad_id = (
            tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else (tokenizer.eos_token_id)
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=self.settings.learning_rate, weight_decay=self.settings.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, self.settings.warmup_steps, self.settings.max_steps),
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.trainable = trainable
        self.output_dir = Path(self.settings.output_dir)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.step = 0
        self.position = DataPosition()
        self.autocast = (
            torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16)
            if use_bf16(self.settings.precision)
            else nullcontext()
        )

    # ---- data ----------------------------------------------------------------------------

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This process's micro-batches, from ``self.position`` on, epoch after epoch. The
        order of each epoch depends only on the seed and the epoch number, so a resumed run
        sees exactly the batches an uninterrupted one would."""
        size, world = self.settings.batch_size, self.accelerator.num_processes
        rank = self.accelerator.process_index
        per_global_batch = size * world
        while True:
            order = list(range(len(self.data.train)))
            random.Random(self.settings.seed + self.position.epoch).shuffle(order)
            n_batches = max(1, len(order) // per_global_batch)
            while self.position.batch < n_batches:
                start = self.position.batch * per_global_batch + rank * size
                chosen = [order[i % len(order)] for i in range(start, start + size)]
                self.position.batch += 1
                yield collate([self.data.train[i] for i in chosen], self.pad_id)
            self.position = DataPosition(self.position.epoch + 1, 0)

    def loss_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {name: tensor.to(self.accelerator.device) for name, tensor in batch.items()}
        with self.autocast:
            return self.model(**batch).loss  # mean over the assistant (labelled) tokens

    # ---- evaluation ----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Validation loss, averaged over labelled tokens (the first eval_batches batches)."""
        examples = self.data.validation[: self.settings.eval_batches * self.settings.batch_size]
        if not examples:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for start in range(0, len(examples), self.settings.batch_size):
            batch = collate(examples[start : start + self.settings.batch_size], self.pad_id)
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += float(self.loss_of(batch)) * tokens
            count += tokens
        self.model.train()
        return total / max(1, count)

    # ---- checkpoints ---------------------------------------------------------------------

    def save(self) -> None:
        state = {
            "step": self.step,
            "epoch": self.position.epoch,
            "batch": self.position.batch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            # Every process's random state (it drives dropout), gathered to the main process.
            "rng": list(gather_object([ckpt.rng_state()])),
        }
        if self.accelerator.is_main_process:
            unwrapped = self.accelerator.unwrap_model(self.model)
            ckpt.save_checkpoint(
                self.output_dir,
                self.step,
                unwrapped.save_pretrained,
                state,
                self.settings.keep_checkpoints,
            )
        self.accelerator.wait_for_everyone()

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint; False if there is none."""
        from peft import set_peft_model_state_dict
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from src.errors import TrainingConfigError

        latest = ckpt.latest_checkpoint(self.output_dir)
        if latest is None:
            return False
        state = ckpt.load_trainer_state(latest)
        adapter_file = latest / "adapter_model.safetensors"
        try:
            adapter = load_file(adapter_file)
        except (OSError, SafetensorError) as exc:
            message = f"checkpoint file {adapter_file} is unreadable ({exc})"
            raise TrainingConfigError(message) from None
        unwrapped = self.accelerator.unwrap_model(self.model)
        set_peft_model_state_dict(unwrapped, adapter)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.restore_rng_state(state["rng"][self.accelerator.process_index])
        self.step = state["step"]
        self.position = DataPosition(state["epoch"], state["batch"])
        self.truncate_metrics(after_step=self.step)
        return True

    # ---- metrics -------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with self.metrics_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records of steps that the resumed run will do again."""
        if not self.accelerator.is_main_process or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= after_step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                pass  # a line cut short by a kill while it was being written
        # Written aside and renamed: a kill now leaves the old log or the new one, whole.
        write_text_atomically(self.metrics_path, "".join(line + "\n" for line in kept))

    # ---- the loop ------------------------------------------------------------------------

    def train(self, resume: bool = False) -> TrainResult:
        settings = self.settings
        if not (resume and self.resume()):
            set_seed(settings.seed)
            if self.accelerator.is_main_process:
                # A fresh run starts a fresh log, and --resume must find this run's
                # checkpoints, never those of an earlier run in the same folder.
                self.metrics_path.unlink(missing_ok=True)
                ckpt.remove_checkpoints(self.output_dir)
            self.accelerator.wait_for_everyone()
            first_eval = self.evaluate()
            self.log(
                {"step": 0, "eval_loss": first_eval, "eval_perplexity": perplexity(first_eval)}
            )
        first_eval = first_eval_loss(self.metrics_path)
        last_eval = first_eval
        self.model.train()
        batches = self.batches()
        progress = tqdm(
            total=settings.max_steps,
            initial=self.step,
            desc="LoRA training",
            unit="step",
            disable=not self.accelerator.is_main_process,
        )
        started, trained_tokens = time.perf_counter(), 0
        while self.step < settings.max_steps:
            step_started, step_loss, step_tokens = time.perf_counter(), 0.0, 0
            for _ in range(settings.gradient_accumulation_steps):
                batch = next(batches)
                loss = self.loss_of(batch)
                self.accelerator.backward(loss / settings.gradient_accumulation_steps)
                step_loss += float(loss.detach()) / settings.gradient_accumulation_steps
                step_tokens += int(batch["attention_mask"].sum())
            self.accelerator.clip_grad_norm_(self.trainable, settings.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            losses = self.accelerator.gather(
                torch.tensor([step_loss], device=self.accelerator.device)
            )
            step_tokens *= self.accelerator.num_processes
            trained_tokens += step_tokens
            speed = step_tokens / (time.perf_counter() - step_started)
            record = {
                "step": self.step,
                "loss": float(losses.mean()),
                "lr": self.scheduler.get_last_lr()[0],
                "tokens_per_second": round(speed),
            }
            if self.step % settings.eval_every == 0 or self.step == settings.max_steps:
                last_eval = self.evaluate()
                record.update(eval_loss=last_eval, eval_perplexity=perplexity(last_eval))
            self.log(record)
            progress.update()
            progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{speed:.0f}")
            if self.step % settings.save_every == 0 or self.step == settings.max_steps:
                self.save()
            self.after_step()
        progress.close()
        adapter_dir = self.finish()
        return TrainResult(
            self.step,
            first_eval,
            last_eval,
            trained_tokens,
            time.perf_counter() - started,
            adapter_dir,
        )

    def after_step(self) -> None:
        """A hook between steps (tests use it to interrupt a run)."""

    def finish(self) -> Path:
        """Save the final adapter (peft format) and the loss curve next to it."""
        if self.accelerator.is_main_process:
            from src.training.plots import plot_loss_curve

            model = self.accelerator.unwrap_model(self.model)
            ckpt.publish_adapter(model.save_pretrained, self.output_dir)
            plot_loss_curve(self.metrics_path, self.output_dir / "loss_curve.png")
        self.accelerator.wait_for_everyone()
        return self.output_dir


def perplexity(loss: float | None) -> float | None:
    return math.exp(loss) if loss is not None and loss < 50 else None


def first_eval_loss(metrics_path: Path) -> float | None:
    if not metrics_path.exists():
        return None
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["step"] == 0:
            return record.get("eval_loss")
    return None


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

"""LoRA training speed and memory: our trainer (src/training) against a plain transformers
``Trainer`` with ``peft.get_peft_model``, on the same model, examples, LoRA settings and
optimizer steps.

Each side runs in its own process (peak memory is per process):

    python -m src.benchmarks.training --side ours --steps 10 --json ours.json

Both sides load the bundled model through the project's loader (fp32), tokenize the same
chitchat conversations with the same code (``prepare_data``), and see the same micro-batches
in the same order: the baseline's dataset is laid out in the order our trainer draws it and
read with ``train_sampling_strategy="sequential"``. Timed: the wall time of the optimizer
steps after ``warmup`` steps (first-step allocations excluded), measured between step ends;
our trainer's evaluation and checkpoints are switched off, as the baseline does neither.
Tokens: the non-padding tokens (attention mask) of every micro-batch, for both sides.

What differs is each trainer's own implementation: the Trainer's default optimizer is fused
AdamW (ours: torch's default AdamW) and its cosine schedule's warm-up starts from 0 (ours from
1 / (warmup + 1)); same learning rate, warm-up steps, weight decay and gradient clipping.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from src.config import REPO_ROOT

SIDES = ("baseline", "ours")
NAMES = {"baseline": "transformers Trainer + peft (baseline)", "ours": "our LoraTrainer"}


# ---- the shared setup ------------------------------------------------------------------------


def benchmark_config(steps: int, examples: int, output_dir: Path, max_length: int | None = None):
    """configs/lora_default.yaml with ``steps`` optimizer steps on ``examples`` conversations
    (cut to ``max_length`` tokens if given), fp32, and evaluation and checkpoints pushed past
    the end of the run."""
    from src.training.config import load_training_config, no_settings

    overrides = {
        **({"data.max_length": max_length} if max_length else {}),
        "training.max_steps": steps,
        "training.precision": "fp32",
        "training.eval_every": steps + 1,
        "training.save_every": steps + 1,
        "training.output_dir": str(output_dir),
        "data.max_examples": examples,
    }
    return load_training_config(
        REPO_ROOT / "configs" / "lora_default.yaml",
        [f"{key}={value}" for key, value in overrides.items()],
        # BATCH_SIZE and friends in .env or the environment must not make the two sides differ
        settings=no_settings(),
    )


def training_order(n_train: int, batch_size: int, seed: int, count: int) -> list[int]:
    """The first ``count`` example indices our trainer draws (``LoraTrainer.batches`` on one
    process): each epoch shuffled by ``seed + epoch``, whole batches only."""
    drawn: list[int] = []
    epoch = 0
    while len(drawn) < count:
        order = list(range(n_train))
        random.Random(seed + epoch).shuffle(order)
        for batch in range(max(1, n_train // batch_size)):
            start = batch * batch_size
            drawn.extend(order[i % n_train] for i in range(start, start + batch_size))
        epoch += 1
    return drawn[:count]


class BatchLog:
    """Non-padding tokens and a fingerprint of the micro-batches a trainer was given."""

    def __init__(self) -> None:
        self.tokens = 0
        self.digests: list[str] = []

    def add(self, batch: dict) -> None:
        self.tokens += int(batch["attention_mask"].sum())
        digest = hashlib.sha256(batch["input_ids"].numpy().tobytes())
        digest.update(batch["labels"].numpy().tobytes())
        self.digests.append(digest.hexdigest())

    def fingerprint(self, batches: int) -> str:
        return hashlib.sha256("".join(self.digests[:batches]).encode()).hexdigest()[:16]


def memory_mb(field: str) -> float | None:
    """VmRSS or VmHWM of this process, in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_memory() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+), so the peak measured next is training's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def held_out_loss(model: Any, examples: list[dict], pad_id: int, batch_size: int) -> float | None:
    """Loss per labelled token on ``examples`` (eval mode, no dropout): the same function for
    both sides, so the two adapters are compared on equal terms."""
    import torch

    from src.training.data import collate

    if not examples:
        return None
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id)
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * tokens
            count += tokens
    return total / max(1, count)


# ---- one side, in this process ---------------------------------------------------------------


def run_side(
    side: str, steps: int, warmup: int, examples: int, max_length: int | None = None
) -> dict[str, Any]:
    """Train ``warmup + steps`` optimizer steps with one side's trainer; time the last
    ``steps``."""
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as folder:
        config = benchmark_config(warmup + steps, examples, Path(folder) / "run", max_length)
        runner = run_ours if side == "ours" else run_baseline
        result = runner(config, warmup)
    settings = config.training
    result.update(
        side=side,
        steps=steps,
        warmup_steps=warmup,
        tokens_per_second=result["tokens"] / result["seconds"],
        step_seconds=result["seconds"] / steps,
        training_extra_memory_mb=(
            result["training_peak_memory_mb"] - result["ready_memory_mb"]
            if result["training_peak_memory_mb"] and result["ready_memory_mb"]
            else None
        ),
        settings={
            "examples": examples,
            "max_length": config.data.max_length,
            "batch_size": settings.batch_size,
            "gradient_accumulation_steps": settings.gradient_accumulation_steps,
            "learning_rate": settings.learning_rate,
            "warmup_steps": settings.warmup_steps,
            **{f"lora_{key}": value for key, value in config.lora.model_dump().items()},
        },
    )
    return result


def timed_window(marks: list[tuple[float, int]], warmup: int) -> tuple[float, int]:
    """(seconds, tokens) from the end of step ``warmup`` to the end of the last step; marks
    holds (time, tokens so far) at the end of every step."""
    start_time, start_tokens = marks[warmup - 1]
    end_time, end_tokens = marks[-1]
    return end_time - start_time, end_tokens - start_tokens


def each_step(marks: list[tuple[float, int]], warmup: int) -> dict[str, list]:
    """The wall time and non-padding tokens of each timed step."""
    steps = range(warmup, len(marks))
    return {
        "each_step_seconds": [marks[i][0] - marks[i - 1][0] for i in steps],
        "each_step_tokens": [marks[i][1] - marks[i - 1][1] for i in steps],
    }


def run_ours(config, warmup: int) -> dict[str, Any]:
    from src.training.train_lora import build_trainer

    trainer, _ = build_trainer(config)  # the code path of train_lora.py
    log, marks, losses = BatchLog(), [], []
    draw_batches, write_log = trainer.batches, trainer.log

    def counted_batches():
        for batch in draw_batches():
            log.add(batch)
            yield batch

    def logged(record: dict) -> None:
        if "loss" in record:
            losses.append(record["loss"])
        write_log(record)

    trainer.batches = counted_batches
    trainer.log = logged
    trainer.after_step = lambda: marks.append((time.perf_counter(), log.tokens))
    # Only training steps: no validation passes, checkpoints, final adapter or loss plot.
    trainer.evaluate = lambda: None
    trainer.save = lambda: None
    trainer.finish = lambda: trainer.output_dir
    ready = memory_mb("VmRSS")
    load_peak = memory_mb("VmHWM")
    peak_reset = reset_peak_memory()
    trainer.train()
    peak = memory_mb("VmHWM")
    seconds, tokens = timed_window(marks, warmup)
    settings = config.training
    return {
        "seconds": seconds,
        "tokens": tokens,
        **each_step(marks, warmup),
        "batches_fingerprint": log.fingerprint(
            settings.max_steps * settings.gradient_accumulation_steps
        ),
        "train_loss_mean": statistics.fmean(losses),
        "held_out_loss": held_out_loss(
            trainer.model, trainer.data.validation, trainer.pad_id, settings.batch_size
        ),
        "ready_memory_mb": ready,
        "training_peak_memory_mb": peak,
        "process_peak_memory_mb": max(filter(None, (load_peak, peak)), default=None),
        "peak_reset": peak_reset,  # False: the training peak includes loading
    }


def run_baseline(config, warmup: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from src.config import load_settings
    from src.models.loader import load_model
    from src.models.lora_wrapper import target_modules_for
    from src.training.train_lora import prepare_data

    settings = config.training
    set_seed(settings.seed)
    # fp32 whatever PRECISION says (that is for inference): training has its own precision.
    loaded = load_model(load_settings(), model_name=config.model, dtype=torch.float32)
    tokenizer = loaded.tokenizer
    data = prepare_data(config, tokenizer)
    model = get_peft_model(
        loaded.model,
        LoraConfig(
            r=config.lora.rank,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=target_modules_for(loaded.model, config.lora.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    micro_batches = settings.max_steps * settings.gradient_accumulation_steps
    order = training_order(
        len(data.train), settings.batch_size, settings.seed, micro_batches * settings.batch_size
    )
    log, marks = BatchLog(), []
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def collator(features):
        batch = pad(features)
        log.add(batch)
        return batch

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), state.num_input_tokens_seen))

    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=settings.max_steps,
            per_device_train_batch_size=settings.batch_size,
            gradient_accumulation_steps=settings.gradient_accumulation_steps,
            learning_rate=settings.learning_rate,
            weight_decay=settings.weight_decay,
            lr_scheduler_type="cosine",
            warmup_steps=settings.warmup_steps,
            max_grad_norm=settings.max_grad_norm,
            seed=settings.seed,
            use_cpu=not torch.cuda.is_available(),
            train_sampling_strategy="sequential",  # the dataset below is already in our order
            include_num_input_tokens_seen="non_padding",
            remove_unused_columns=False,
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=[data.train[i] for i in order],
            data_collator=collator,
            callbacks=[StepTimes()],
        )
        ready = memory_mb("VmRSS")
        load_peak = memory_mb("VmHWM")
        peak_reset = reset_peak_memory()
        set_seed(settings.seed)  # as our trainer does at the start of train()
        output = trainer.train()
        peak = memory_mb("VmHWM")
    seconds, tokens = timed_window(marks, warmup)
    return {
        "seconds": seconds,
        "tokens": tokens,
        **each_step(marks, warmup),
        "batches_fingerprint": log.fingerprint(micro_batches),
        "train_loss_mean": output.training_loss,
        "held_out_loss": held_out_loss(
            trainer.model, data.validation, tokenizer.pad_token_id, settings.batch_size
        ),
        "ready_memory_mb": ready,
        "training_peak_memory_mb": peak,
        "process_peak_memory_mb": max(filter(None, (load_peak, peak)), default=None),
        "peak_reset": peak_reset,  # False: the training peak includes loading
    }


# ---- both sides, each in its own process -----------------------------------------------------


def run_in_process(
    side: str, steps: int, warmup: int, examples: int, max_length: int | None = None
) -> dict[str, Any]:
    from src.benchmarks.processes import bench_env

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "result.json"
        command = [sys.executable, "-m", "src.benchmarks.training", "--side", side]
        command += ["--steps", str(steps), "--warmup", str(warmup), "--examples", str(examples)]
        command += ["--max-length", str(max_length)] if max_length else []
        completed = subprocess.run(
            [*command, "--json", str(path)],
            cwd=REPO_ROOT,
            env=bench_env(PRECISION="fp32"),
            capture_output=True,
            text=True,
        )
        if completed.returncode != 0 or not path.exists():
            raise RuntimeError(f"training benchmark ({side}) failed:\n{completed.stderr[-3000:]}")
        return json.loads(path.read_text())


def measure_training(
    steps: int,
    repetitions: int,
    examples: int,
    max_length: int | None = None,
    warmup: int = 1,
    progress=print,
) -> dict[str, Any]:
    """Both sides ``repetitions`` times (alternating which goes first); medians per side."""
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for repetition in range(repetitions):
        for side in SIDES if repetition % 2 == 0 else reversed(SIDES):
            progress(f"  training: {NAMES[side]}, run {repetition + 1} of {repetitions}")
            runs[side].append(run_in_process(side, steps, warmup, examples, max_length))
    rows = []
    for side in SIDES:
        results = runs[side]

        def median(key: str, results=results) -> float | None:
            values = [r[key] for r in results if r.get(key) is not None]
            return statistics.median(values) if values else None

        # Speed: the median over every timed step of every run, so that a step slowed down by
        # another process on the machine moves it little. Both sides time the same steps.
        seconds = [t for r in results for t in r["each_step_seconds"]]
        tokens = [n for r in results for n in r["each_step_tokens"]]
        rows.append(
            {
                "name": NAMES[side],
                "side": side,
                "tokens": results[0]["tokens"],
                "tokens_per_second": statistics.median(
                    n / t for n, t in zip(tokens, seconds, strict=True)
                ),
                "step_seconds": statistics.median(seconds),
                "training_peak_memory_mb": median("training_peak_memory_mb"),
                "ready_memory_mb": median("ready_memory_mb"),
                "training_extra_memory_mb": median("training_extra_memory_mb"),
                "process_peak_memory_mb": median("process_peak_memory_mb"),
                "train_loss_mean": median("train_loss_mean"),
                "held_out_loss": median("held_out_loss"),
                "batches_fingerprint": results[0]["batches_fingerprint"],
                "runs": results,
            }
        )
    baseline, ours = rows
    return {
        "steps": steps,
        "warmup_steps": warmup,
        "repetitions": repetitions,
        "settings": runs["ours"][0]["settings"],
        "same_batches": baseline["batches_fingerprint"] == ours["batches_fingerprint"],
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One side of the LoRA training benchmark.")
    parser.add_argument("--side", choices=SIDES, required=True)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--examples", type=int, default=200, help="chitchat conversations")
    parser.add_argument("--max-length", type=int, help="default: the config's data.max_length")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    result = run_side(args.side, args.steps, args.warmup, args.examples, args.max_length)
    args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

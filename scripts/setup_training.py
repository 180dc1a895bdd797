"""Check that this machine is ready for LoRA training, and write a starter config.

    python scripts/setup_training.py                         # check, write configs/my_lora.yaml
    python scripts/setup_training.py --data my_dialogs.jsonl --output configs/mine.yaml

Checks: Python and library versions, the device (CUDA or CPU threads), free memory and disk,
the dataset (every record is parsed), and the base model (loaded once). Each failed check
says what to fix; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from pathlib import Path

import _bootstrap

MIN_FREE_MEMORY_GB = 2.0
MIN_FREE_DISK_GB = 1.0


def free_memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="chitchat", help="chitchat, chatterbot or a file")
    parser.add_argument("--output", type=Path, default=Path("configs/my_lora.yaml"))
    args = parser.parse_args(argv)
    problems: list[str] = []

    def check(ok: bool, label: str, fix: str = "") -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {label}")
        if not ok:
            problems.append(f"{label}: {fix}")

    print("Environment")
    check(sys.version_info >= (3, 11), f"Python {sys.version.split()[0]}", "use Python 3.11+")
    for package in ("torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            module = importlib.import_module(package)
            check(True, f"{package} {module.__version__}")
        except ImportError:
            check(False, f"{package} missing", "run `make setup`")
    import torch

    if torch.cuda.is_available():
        check(
            True,
            f"device: CUDA ({torch.cuda.get_device_name(0)}); bf16 autocast: "
            f"{torch.cuda.is_bf16_supported()}",
        )
    else:
        check(
            True,
            f"device: CPU, {torch.get_num_threads()} threads (expect ~100-200 "
            "tokens/s for SmolLM2-135M; keep max_steps in the hundreds)",
        )
    memory = free_memory_gb()
    if memory is not None:
        check(
            memory >= MIN_FREE_MEMORY_GB,
            f"free memory {memory:.1f} GB",
            f"training SmolLM2-135M needs about {MIN_FREE_MEMORY_GB} GB; close other programs "
            "or lower training.batch_size",
        )
    disk = shutil.disk_usage(Path.cwd()).free / 1024**3
    check(
        disk >= MIN_FREE_DISK_GB,
        f"free disk {disk:.1f} GB",
        "free some space (python scripts/clean_cache.py lists the model cache)",
    )

    from src.config import load_settings
    from src.errors import MiniClaudeError
    from src.models.loader import load_model
    from src.training.data import load_examples

    print("Data")
    try:
        examples = load_examples(args.data)
        check(True, f"{args.data}: {len(examples)} conversations, every record valid")
    except MiniClaudeError as exc:
        check(False, f"dataset {args.data}", str(exc))
    print("Model")
    try:
        loaded = load_model(load_settings(), model_name=args.model, dtype=torch.float32)
        check(True, f"{loaded.name} loads ({loaded.source}, {loaded.path})")
    except MiniClaudeError as exc:
        check(False, f"model {args.model}", str(exc))

    print("Config")
    if args.output.exists():
        print(f"  [ok] {args.output} exists; left as it is")
    else:
        template = (Path(_bootstrap.REPO_ROOT) / "configs" / "lora_default.yaml").read_text()
        template = template.replace("model: smollm2-135m-instruct", f"model: {args.model}")
        template = template.replace("  source: chitchat", f"  source: {args.data}")
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(template)
        print(f"  [ok] wrote {args.output}")
    if problems:
        print("\nFix these first:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"\nReady: python src/training/train_lora.py --config {args.output}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.exit(main())

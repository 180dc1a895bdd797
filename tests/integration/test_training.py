"""The LoRA training pipeline end to end on a tiny Llama with SmolLM2's real tokenizer."""

import json
import re

import pytest
import torch
import yaml

from src.config import REPO_ROOT
from src.errors import TrainingConfigError
from src.training import checkpoint as ckpt
from src.training.config import load_training_config
from src.training.train_lora import build_trainer
from tests.integration.conftest import run_python

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DIALOGS = [
    ("What is the capital of France?", "Paris."),
    ("What colour is the sky?", "Blue, on a clear day."),
    ("How many legs does a spider have?", "Eight."),
    ("Who wrote Hamlet?", "William Shakespeare."),
    ("What is 2 + 2?", "Four."),
    ("Name a primary colour.", "Red."),
    ("What do bees make?", "Honey."),
    ("What is frozen water called?", "Ice."),
]


@pytest.fixture()
def dataset(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            )
            + "\n"
            for q, a in DIALOGS
        )
    )
    return path


def config_for(tiny_llama_path, dataset, output_dir, **training):
    values = {
        "model": str(tiny_llama_path),
        "data": {"source": str(dataset), "max_length": 64, "validation_fraction": 0.25},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.1},
        "training": {
            "batch_size": 2,
            "gradient_accumulation_steps": 2,
            "learning_rate": 5e-3,
            "warmup_steps": 2,
            "max_steps": 8,
            "eval_every": 4,
            "eval_batches": 1,
            "save_every": 2,
            "output_dir": str(output_dir),
            **training,
        },
    }
    return load_training_config(overrides=[f"{k}={json.dumps(v)}" for k, v in values.items()])


def losses(output_dir):
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_loss_falls_when_overfitting_and_only_lora_weights_change(
    tiny_llama_path, dataset, tmp_path
):
    config = config_for(
        tiny_llama_path,
        dataset,
        tmp_path / "run",
        max_steps=30,
        gradient_accumulation_steps=1,
        eval_every=30,
        save_every=30,
    )
    trainer, _ = build_trainer(config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.train()
    records = [r for r in losses(tmp_path / "run") if "loss" in r]
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert result.last_eval_loss < result.first_eval_loss
    for name, parameter in trainer.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(parameter.detach(), before[name]), f"{name} changed"
    assert any(
        not torch.equal(p.detach(), before[n])
        for n, p in trainer.model.named_parameters()
        if "lora_B" in n
    )
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert records[0]["tokens_per_second"] > 0 and "lr" in records[0]


class Interrupted(Exception):
    pass


def test_interrupted_and_resumed_equals_uninterrupted(tiny_llama_path, dataset, tmp_path):
    straight, _ = build_trainer(config_for(tiny_llama_path, dataset, tmp_path / "straight"))
    straight.train()

    interrupted, _ = build_trainer(config_for(tiny_llama_path, dataset, tmp_path / "resumed"))

    def stop_at_step_five():
        if interrupted.step == 5:
            raise Interrupted  # as if killed after step 5 (the last checkpoint is step 4)

    interrupted.after_step = stop_at_step_five
    with pytest.raises(Interrupted):
        interrupted.train()
    assert ckpt.latest_checkpoint(tmp_path / "resumed").name == "step-000004"

    resumed, _ = build_trainer(config_for(tiny_llama_path, dataset, tmp_path / "resumed"))
    resumed.train(resume=True)
    expected, actual = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [r["step"] for r in actual] == [r["step"] for r in expected] == list(range(9))
    for want, got in zip(expected, actual, strict=True):
        for key in ("loss", "eval_loss"):
            if key in want:
                assert got[key] == pytest.approx(want[key], abs=1e-6), (want["step"], key)


def test_a_checkpoint_write_cut_half_way_never_replaces_the_last_good_one(
    tiny_llama_path, dataset, tmp_path, monkeypatch
):
    trainer, _ = build_trainer(config_for(tiny_llama_path, dataset, tmp_path / "run"))
    real_save = torch.save
    calls = []

    def dying_save(obj, path):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: the adapter is written, then we "die"
            raise Interrupted
        real_save(obj, path)

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(Interrupted):
        trainer.train()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-000002"]
    state = ckpt.load_trainer_state(tmp_path / "run" / "checkpoints" / "step-000002")
    assert state["step"] == 2


def test_config_errors_name_the_key(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("training: [unclosed")
    with pytest.raises(TrainingConfigError, match="cannot read it as YAML"):
        load_training_config(bad_yaml)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump({"training": {"max_stpes": 3}}))
    with pytest.raises(TrainingConfigError, match="training.max_stpes: unknown parameter"):
        load_training_config(unknown)
    with pytest.raises(TrainingConfigError, match="training.learning_rate=-1"):
        load_training_config(overrides=["training.learning_rate=-1"])
    with pytest.raises(TrainingConfigError, match="expected KEY=VALUE"):
        load_training_config(overrides=["max_steps"])
    with pytest.raises(TrainingConfigError, match="no such config file"):
        load_training_config(tmp_path / "missing.yaml")


def test_environment_overrides_of_the_brief(monkeypatch):
    for variable, value in {"BATCH_SIZE": "8", "LEARNING_RATE": "1e-3", "LORA_RANK": "32"}.items():
        monkeypatch.setenv(variable, value)
    config = load_training_config(overrides=["lora.rank=4"])
    assert config.training.batch_size == 8 and config.training.learning_rate == 1e-3
    assert config.lora.rank == 4  # the command line wins over the environment


def test_the_default_config_is_valid_and_every_key_is_commented():
    path = REPO_ROOT / "configs" / "lora_default.yaml"
    config = load_training_config(path)
    assert config.model == "smollm2-135m-instruct" and config.data.source == "chitchat"
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines):
        if ":" in line and not line.lstrip().startswith("#") and not line.endswith(":"):
            assert lines[number - 1].lstrip().startswith("#"), f"uncommented key: {line}"


def write_config(tiny_llama_path, dataset, output_dir, path, **training):
    config = config_for(tiny_llama_path, dataset, output_dir, **training)
    path.write_text(yaml.safe_dump(json.loads(config.model_dump_json())))
    return path


def test_command_line_training_then_chat_with_the_adapter(tiny_llama_path, dataset, tmp_path):
    config = write_config(
        tiny_llama_path, dataset, tmp_path / "out", tmp_path / "c.yaml", max_steps=4
    )
    trained = run_python(
        ["src/training/train_lora.py", "--config", str(config), "training.eval_every=2"]
    )
    assert trained.returncode == 0, trained.stderr
    assert "Done: 4 steps" in trained.stdout and "validation loss" in trained.stdout
    assert "trainable parameters" in trained.stdout
    # The resolved configuration is printed and saved beside the adapter (with its source).
    assert re.search(r"training\.eval_every +2 +command line", trained.stdout)
    assert load_training_config(tmp_path / "out" / "training_config.yaml").training.eval_every == 2
    chat = run_python(
        ["src/mvp_chatbot.py", "--model", str(tiny_llama_path), "--adapter", str(tmp_path / "out")],
        stdin="Hello\n",
        MAX_NEW_TOKENS="5",
    )
    assert chat.returncode == 0, chat.stderr


@pytest.mark.slow  # two trainer processes; the single-process tests cover the rest
def test_distributed_data_parallel_with_two_cpu_processes(tiny_llama_path, dataset, tmp_path):
    config = write_config(
        tiny_llama_path,
        dataset,
        tmp_path / "ddp",
        tmp_path / "c.yaml",
        max_steps=3,
        save_every=3,
        eval_every=3,
    )
    result = run_python(
        [
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "2",
            "--cpu",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "src/training/train_lora.py",
            "--config",
            str(config),
        ],
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Done: 3 steps") == 1  # printed by the main process only
    assert (tmp_path / "ddp" / "adapter_model.safetensors").is_file()
    assert len([r for r in losses(tmp_path / "ddp") if "loss" in r]) == 3


@pytest.mark.slow  # about 20 s: two runs of the script, each a process importing torch
def test_setup_training_checks_and_writes_a_starter_config(tiny_llama_path, dataset, tmp_path):
    output = tmp_path / "configs" / "mine.yaml"
    ready = run_python(
        [
            "scripts/setup_training.py",
            "--model",
            str(tiny_llama_path),
            "--data",
            str(dataset),
            "--output",
            str(output),
        ]
    )
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert "8 conversations, every record valid" in ready.stdout and "Ready:" in ready.stdout
    config = load_training_config(output)
    assert config.model == str(tiny_llama_path) and config.data.source == str(dataset)

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "no reply"}]}\n')
    failed = run_python(
        [
            "scripts/setup_training.py",
            "--model",
            str(tmp_path / "no-model"),
            "--data",
            str(broken),
            "--output",
            str(output),
        ]
    )
    assert failed.returncode == 1
    assert "Fix these first" in failed.stdout
    assert f"{broken}:1: 'messages' must end with an assistant reply" in failed.stdout
    assert "looks like a path, but no such folder" in failed.stdout


def test_compare_adapter_shows_base_and_adapter_side_by_side(tiny_llama_path, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    lora = LoraConfig(
        r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(base, lora).save_pretrained(tmp_path / "visible-lora")
    result = run_python(
        [
            "scripts/compare_adapter.py",
            "--model",
            str(tiny_llama_path),
            "--adapter",
            str(tmp_path / "visible-lora"),
            "--prompt",
            "Hello there",
            "--max-new-tokens",
            "8",
        ],
        COLUMNS="100",
    )
    assert result.returncode == 0, result.stderr
    assert "> Hello there" in result.stdout
    assert "BASE (" in result.stdout and "WITH ADAPTER (visible-lora)" in result.stdout
    rows = [line for line in result.stdout.splitlines() if " | " in line][1:]
    left = " ".join(row.split(" | ")[0].strip() for row in rows)
    right = " ".join(row.split(" | ")[1].strip() for row in rows)
    assert left and right and left != right  # the adapter changes the reply


@pytest.mark.slow  # a training run, a merge and a chat in three processes
def test_merge_adapter_script_writes_a_model_that_chats(tiny_llama_path, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "adapter"
    )
    merged = run_python(
        [
            "scripts/merge_adapter.py",
            "--model",
            str(tiny_llama_path),
            "--adapter",
            str(tmp_path / "adapter"),
            "--output",
            str(tmp_path / "merged"),
        ]
    )
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    chat = run_python(
        ["src/mvp_chatbot.py", "--model", str(tmp_path / "merged")],
        stdin="Hi\n",
        MAX_NEW_TOKENS="4",
    )
    assert chat.returncode == 0, chat.stderr
    again = run_python(
        [
            "scripts/merge_adapter.py",
            "--model",
            str(tiny_llama_path),
            "--adapter",
            str(tmp_path / "adapter"),
            "--output",
            str(tmp_path / "merged"),
        ]
    )
    assert again.returncode == 2 and "not empty" in again.stderr

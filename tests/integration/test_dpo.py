"""Preference tuning on a tiny Llama with the genuine SmolLM2 tokenizer: the loss falls, only
the adapter's weights change, a resumed run equals an uninterrupted one, the DPO loss written
out in src/training/dpo.py equals TRL's on the same batch, and the adapter is published so that
a running server offers it without a restart (never half of it)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import TrainerCallback
from trl.trainer.dpo_trainer import DataCollatorForPreference

from src.config import load_settings
from src.models.adapters import list_adapters
from src.training.checkpoint import publish_adapter
from src.training.dpo import dpo_loss, reply_logps
from src.training.dpo_config import DpoConfig
from src.training.train_dpo import build, main, reference_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

QUESTIONS = ["Hi!", "What is the sea?", "Name a colour.", "Is it late?", "Why?", "Who are you?"]


def pairs_file(tmp_path):
    """Twelve pairs: a short friendly answer chosen over a rambling one."""
    lines = []
    for number in range(12):
        question = QUESTIONS[number % len(QUESTIONS)] + " " * (number // len(QUESTIONS))
        lines.append(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": question}],
                    "chosen": [{"role": "assistant", "content": "Happy to help!"}],
                    "rejected": [{"role": "assistant", "content": "no no no " * 3}],
                }
            )
        )
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def config_for(tmp_path, tiny_llama_path, **training) -> DpoConfig:
    return DpoConfig.model_validate(
        {
            "model": str(tiny_llama_path),
            "data": {"source": str(pairs_file(tmp_path)), "validation_fraction": 0.25},
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
            "training": {
                "batch_size": 3,
                "learning_rate": 1e-2,
                "warmup_steps": 0,
                "max_steps": 6,
                "eval_every": 3,
                "save_every": 3,
                "output_dir": str(tmp_path / "adapters" / "tiny-dpo"),
                **training,
            },
        }
    )


def settings_for(tmp_path):
    return load_settings(_env_file=None, data_dir=tmp_path / "data")


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_the_loss_falls_and_only_the_adapter_changes(tmp_path, tiny_llama_path):
    config = config_for(tmp_path, tiny_llama_path)
    trainer, _, _ = build(config, settings_for(tmp_path))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in name for name in changed)
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)
    records = [
        json.loads(line)
        for line in (config.training.output_dir / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: the policy is the reference
    assert losses[-1] < losses[0] - 0.1


def test_the_hand_written_dpo_loss_equals_trls_on_the_same_batch(tmp_path, tiny_llama_path):
    config = config_for(tmp_path, tiny_llama_path, max_steps=2)
    trainer, data, loaded = build(config, settings_for(tmp_path))
    trainer.train()  # a policy that differs from its reference
    model = trainer.model
    pad_id = loaded.tokenizer.pad_token_id
    batch = DataCollatorForPreference(pad_token_id=pad_id)(data.train[:3])
    model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(model, batch)
    policy = reply_logps(model, data.train[:3], pad_id)
    with reference_of(model):
        reference = reply_logps(model, data.train[:3], pad_id)
    ours = dpo_loss(policy, reference, config.dpo.beta)
    assert float(ours) == pytest.approx(float(theirs), abs=1e-5)
    assert float(ours) != pytest.approx(0.6931, abs=1e-3)  # the policy moved


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.slow  # three training runs; the LoRA trainer's resume is tested in make test
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_llama_path):
    whole_config = config_for(tmp_path / "whole", tiny_llama_path)
    whole, _, _ = build(whole_config, settings_for(tmp_path))
    whole.train()

    parts_config = config_for(tmp_path / "parts", tiny_llama_path)
    first, _, _ = build(parts_config, settings_for(tmp_path))
    first.add_callback(StopAt(3))  # killed after the checkpoint of step 3
    first.train()
    second, _, _ = build(parts_config, settings_for(tmp_path))
    second.train(resume_from_checkpoint=True)

    expected, resumed = adapter_weights(whole.model), adapter_weights(second.model)
    assert expected.keys() == resumed.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(resumed[name], weight, rtol=1e-5, atol=1e-6)

    def losses(config):
        lines = (config.training.output_dir / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r.get("loss")) for r in map(json.loads, lines) if "loss" in r]

    assert [s for s, _ in losses(parts_config)] == [s for s, _ in losses(whole_config)]
    for (_, a), (_, b) in zip(losses(parts_config), losses(whole_config), strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_the_command_trains_reports_and_a_running_server_offers_the_adapter(
    tmp_path, tiny_llama_path, monkeypatch, capsys
):
    from tests.integration.test_security import serve

    config = config_for(tmp_path, tiny_llama_path)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    yaml_file = tmp_path / "dpo.yaml"
    yaml_file.write_text(json.dumps(config.model_dump(mode="json")))  # JSON is YAML
    output = config.training.output_dir
    served = serve(
        tmp_path / "server",
        tiny_llama_path,
        adapters_dir=output.parent,
        model_name=str(tiny_llama_path),
    )
    with served as live, live.client() as http:

        def offered() -> list[str]:
            return [m["name"] for m in http.get("/api/tags").json()["models"]]

        assert not any(name.startswith("tiny-dpo") for name in offered())
        assert main(["--config", str(yaml_file)]) == 0
        assert "tiny-dpo:latest" in offered()  # no restart
        reply = http.post("/chat", json={"message": "Hi!", "adapter": "tiny-dpo"})
        assert reply.status_code == 200, reply.text
    out = capsys.readouterr().out
    assert "Held-out pairs before: preference accuracy 0.50, reward margin +0.000" in out
    report = json.loads((output / "preference_report.json").read_text())
    assert report["after"]["accuracy"] > 0.5 and report["after"]["margin"] > 0
    assert report["held_out_pairs"] == 3
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_config.yaml"):
        assert (output / name).is_file(), name
    assert (output / "dpo_curves.png").read_bytes()[:4] == b"\x89PNG"
    first = json.loads((output / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["eval_loss"] == pytest.approx(0.6931, abs=1e-3)


def test_an_adapter_appears_only_once_its_weights_are_whole(tmp_path, monkeypatch):
    adapters = tmp_path / "adapters"
    output = adapters / "new"
    seen: list[list[str]] = []
    real_replace = os.replace

    def watched_replace(source, target):
        seen.append(list_adapters(adapters))
        real_replace(source, target)

    def save(folder):
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        (folder / "adapter_config.json").write_text("{}")
        (folder / "README.md").write_text("card")

    monkeypatch.setattr(os, "replace", watched_replace)
    publish_adapter(save, output)
    assert seen == [[], [], []]  # not listed while any file was still moving in
    assert list_adapters(adapters) == ["new"]
    assert not (output / ".adapter.partial").exists()


def test_training_can_start_from_an_sft_adapter_which_is_then_the_reference(
    tmp_path, tiny_llama_path
):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    sft = tmp_path / "sft-adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(sft)
    config = config_for(tmp_path, tiny_llama_path, max_steps=3)
    config = config.model_copy(update={"start_adapter": sft})
    trainer, data, loaded = build(config, settings_for(tmp_path))
    model = trainer.model
    assert set(model.peft_config) == {"default", "ref"}
    pad_id = loaded.tokenizer.pad_token_id
    before = reply_logps(model, data.held_out, pad_id)
    with reference_of(model):
        reference = reply_logps(model, data.held_out, pad_id)
    torch.testing.assert_close(before, reference)  # the SFT adapter is the starting point
    with model.disable_adapter():
        base_only = reply_logps(model, data.held_out, pad_id)
    assert not torch.allclose(base_only, reference)  # ... and not the bare base model
    trainer.train()
    with reference_of(model):
        torch.testing.assert_close(reply_logps(model, data.held_out, pad_id), reference)
    assert not torch.allclose(reply_logps(model, data.held_out, pad_id), reference)
    saved = tmp_path / "published"
    publish_adapter(lambda to: model.save_pretrained(to, selected_adapters=["default"]), saved)
    assert not (saved / "ref").exists()
    weights = load_file(saved / "adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)

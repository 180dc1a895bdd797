"""LoRA: the written-out layer against peft, and the peft path's guarantees."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from src.errors import ModelLoadingError
from src.models.lora_wrapper import (
    DEFAULT_TARGET_MODULES,
    LoRALinear,
    LoraSettings,
    apply_lora,
    load_adapter,
    merge_and_save,
    parameter_counts,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 12)

    def forward(self, x):
        return self.proj(x)


def test_written_out_lora_equals_peft():
    torch.manual_seed(0)
    model = OneLayer()
    ours = LoRALinear(nn.Linear(16, 12), rank=4, alpha=8)
    ours.base.load_state_dict(model.proj.state_dict())
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False)
    )
    layer = peft_model.base_model.model.proj
    with torch.no_grad():
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
    x = torch.randn(5, 16)
    assert torch.allclose(ours(x), peft_model(x), atol=1e-6)


def test_b_starts_at_zero_so_lora_equals_the_base():
    base = nn.Linear(16, 12)
    lora = LoRALinear(base, rank=4, alpha=8)
    x = torch.randn(3, 16)
    assert torch.equal(lora(x), base(x))
    assert not lora.base.weight.requires_grad
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_merge_and_unmerge_keep_outputs_and_merging_twice_changes_nothing():
    torch.manual_seed(1)
    lora = LoRALinear(nn.Linear(16, 12), rank=4, alpha=8)
    nn.init.normal_(lora.lora_B)
    x = torch.randn(3, 16)
    before = lora(x)
    original_weight = lora.base.weight.clone()
    lora.merge()
    lora.merge()
    assert torch.allclose(lora(x), before, atol=1e-5)
    lora.unmerge()
    assert torch.allclose(lora.base.weight, original_weight, atol=1e-6)
    assert torch.allclose(lora(x), before, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_gpt2_path", "tiny_llama_path"])
def test_apply_lora_targets_the_architecture_and_freezes_the_base(request, fixture):
    base = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture))
    total_before = sum(p.numel() for p in base.parameters())
    model = apply_lora(base, LoraSettings(rank=2, alpha=4, dropout=0.0))
    trainable, total = parameter_counts(model)
    assert 0 < trainable < total and total > total_before
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in names)
    targets = DEFAULT_TARGET_MODULES[base.config.model_type]
    assert {t for t in targets if any(f".{t}." in n for n in names)} == set(targets)


def test_disabled_adapter_gives_the_base_output_and_merged_equals_unmerged(
    tiny_llama_path, tmp_path
):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    ids = torch.tensor([[1, 5, 9, 22, 7]])
    with torch.no_grad():
        base_logits = base(ids).logits.clone()
    model = get_peft_model(
        base,
        LoraConfig(
            r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    ).eval()
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            disabled = model(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-4)
    assert torch.allclose(disabled, base_logits, atol=1e-6)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    merged_dir = merge_and_save(model, "random-lora", tmp_path / "merged", tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert (merged_dir / "model.safetensors").is_file()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted, atol=1e-4)


def test_merge_refuses_non_finite_weights_and_names_the_adapter(tiny_llama_path, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(ModelLoadingError, match="Adapter 'diverged-run' has non-finite"):
        merge_and_save(model, "diverged-run", tmp_path / "merged", None)
    assert not (tmp_path / "merged").exists()


def test_adapters_move_between_plain_peft_and_ours(tiny_llama_path, tmp_path):
    ids = torch.tensor([[1, 5, 9]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    ours = apply_lora(base, LoraSettings(rank=2, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
        expected = ours(ids).logits
    ours.save_pretrained(tmp_path / "ours")
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_path), tmp_path / "ours"
    )
    reloaded = load_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_llama_path), tmp_path / "ours"
    )
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, expected, atol=1e-5)
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)

"""LoRA adapters on the scratch engine, unmerged on the base's shared weights: exact against
peft, sharing rather than copying, and what only peft can run handed back to it."""

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from src.config import load_settings
from src.errors import ModelLoadingError
from src.models.inference import load_for_inference
from src.models.lora_view import UnsupportedAdapter, read_adapter, with_adapter
from src.models.lora_wrapper import LoRALinear
from src.models.quantize import quantize_model
from src.models.transformer import Transformer

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

TARGETS = {
    "llama": [
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ["q_proj", "v_proj"],  # peft's usual choice: our fused qkv gets no k update
        ["k_proj", "down_proj"],
    ],
    "gpt2": [["c_attn", "c_proj", "c_fc"], ["c_attn"]],
}


def save_adapter(folder, path, targets, seed=0, **config):
    """A peft adapter with random A and B (B is zero when peft creates it) saved in path;
    returns the peft model it came from."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gpt2 = base.config.model_type == "gpt2"
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, fan_in_fan_out=gpt2,
        **config,
    )  # fmt: skip
    adapted = get_peft_model(base, lora).eval()
    adapted.save_pretrained(path)
    return adapted


def padded_batch():
    ids = torch.tensor([[0, 0, 5, 9, 22, 7, 31], [1, 44, 5, 9, 22, 7, 3]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    return ids, mask


def both_logits(peft_model, ours, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        actual = ours(ids, attention_mask=mask).logits
    return expected[mask.bool()], actual[mask.bool()]


# The other families: their own layer names (Phi-3's fused layers are peft's targets there).
FAMILY_TARGETS = [
    ("qwen2", ["q_proj", "v_proj", "o_proj", "down_proj"]),  # q, v with biases in the base
    ("qwen3", ["q_proj", "k_proj", "up_proj"]),
    ("gemma2", ["q_proj", "gate_proj", "down_proj"]),
    ("phi3", ["qkv_proj", "gate_up_proj"]),
]


@pytest.mark.parametrize(
    "model, targets",
    [(f"tiny_{kind}_path", t) for kind, options in TARGETS.items() for t in options]
    + FAMILY_TARGETS,
)
def test_logits_equal_peft_on_a_padded_batch(request, model, targets, tmp_path):
    if model.startswith("tiny_"):
        folder = request.getfixturevalue(model)
    else:  # a family of tests/conftest.py's TINY_FAMILIES
        folder = request.getfixturevalue("tiny_family_paths")[model]
    peft_model = save_adapter(folder, tmp_path / "adapter", targets)
    base = Transformer.from_folder(folder)
    ours = with_adapter(base, tmp_path / "adapter")
    expected, actual = both_logits(peft_model, ours, *padded_batch())
    assert (actual - expected).abs().max() < 1e-4
    with torch.no_grad(), peft_model.disable_adapter():
        base_expected, base_actual = both_logits(peft_model, base, *padded_batch())
    assert (base_actual - base_expected).abs().max() < 1e-4  # the base is left as it was
    assert (actual - base_actual).abs().max() > 1e-2  # and the adapter does change things


def test_greedy_generation_equals_peft_token_for_token(tiny_llama_path, tmp_path):
    peft_model = save_adapter(tiny_llama_path, tmp_path / "adapter", TARGETS["llama"][0])
    ours = with_adapter(Transformer.from_folder(tiny_llama_path), tmp_path / "adapter")
    prompt = [1, 5, 9, 22, 7]
    expected = peft_model.generate(
        input_ids=torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None
    )[0, len(prompt) :].tolist()
    assert list(ours.generate(prompt, 24, stop_token_ids=set())) == expected


@pytest.mark.parametrize("config", [{"use_rslora": True}, {"rank_pattern": {"q_proj": 2}}])
def test_scaling_follows_peft_for_rslora_and_per_layer_ranks(tiny_llama_path, tmp_path, config):
    peft_model = save_adapter(tiny_llama_path, tmp_path / "a", TARGETS["llama"][0], **config)
    ours = with_adapter(Transformer.from_folder(tiny_llama_path), tmp_path / "a")
    expected, actual = both_logits(peft_model, ours, *padded_batch())
    assert (actual - expected).abs().max() < 1e-4


def test_the_adapted_model_shares_every_base_weight_and_adds_only_a_and_b(
    tiny_llama_path, tmp_path
):
    save_adapter(tiny_llama_path, tmp_path / "adapter", ["q_proj", "v_proj"])
    base = quantize_model(Transformer.from_folder(tiny_llama_path), "int4")
    ours = with_adapter(base, tmp_path / "adapter")
    base_storage = {t.data_ptr() for t in [*base.parameters(), *base.buffers()]}
    new = [t for t in [*ours.parameters(), *ours.buffers()] if t.data_ptr() not in base_storage]
    lora_layers = [m for m in ours.modules() if isinstance(m, LoRALinear)]
    assert len(lora_layers) == base.config.n_layer  # qkv of each block
    assert {t.data_ptr() for t in new} == {
        t.data_ptr() for layer in lora_layers for t in (layer.lora_A, layer.lora_B)
    }
    assert all(
        layer.base is block.attention.qkv
        for layer, block in zip(lora_layers, base.blocks, strict=True)
    )
    assert not any(isinstance(m, LoRALinear) for m in base.modules())  # the base is untouched
    # On int4 weights too the update is exact: the base's output plus B A x in full precision.
    x = torch.randn(3, base.config.n_embd)
    layer = lora_layers[0]
    assert torch.allclose(layer(x), layer.base(x) + x @ layer.lora_A.T @ layer.lora_B.T)


def peft_config_file(path, **values):
    import json

    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **values}))


@pytest.mark.parametrize(
    "change, named",
    [
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"bias": "all"}, "bias"),
    ],
)
def test_what_only_peft_can_run_is_named(tiny_llama_path, tmp_path, change, named):
    save_adapter(tiny_llama_path, tmp_path / "adapter", ["q_proj"])
    peft_config_file(tmp_path / "adapter", **change)
    with pytest.raises(UnsupportedAdapter, match=named):
        read_adapter(tmp_path / "adapter", Transformer.from_folder(tiny_llama_path))


def test_an_adapter_on_the_output_layer_is_left_to_peft(tiny_llama_path, tmp_path):
    save_adapter(tiny_llama_path, tmp_path / "adapter", ["q_proj", "lm_head"])
    with pytest.raises(UnsupportedAdapter, match="lm_head"):
        read_adapter(tmp_path / "adapter", Transformer.from_folder(tiny_llama_path))


def test_an_adapter_for_another_model_is_refused_with_the_layer_named(
    tiny_llama_path, tiny_gpt2_path, tmp_path
):
    save_adapter(tiny_gpt2_path, tmp_path / "gpt2-adapter", ["c_attn"])
    with pytest.raises(ModelLoadingError, match="does not fit this model.*transformer.h.0"):
        read_adapter(tmp_path / "gpt2-adapter", Transformer.from_folder(tiny_llama_path))
    save_adapter(tiny_llama_path, tmp_path / "llama-adapter", ["q_proj"])
    wider = Transformer.from_folder(tiny_llama_path)
    wider.blocks[0].attention.qkv = torch.nn.Linear(16, 64)
    with pytest.raises(ModelLoadingError, match="does not fit this model: model.layers.0"):
        read_adapter(tmp_path / "llama-adapter", wider)


def test_engine_auto_puts_the_adapter_on_the_scratch_engine_or_hands_it_to_peft(
    tiny_llama_path, tmp_path, caplog
):
    settings = load_settings(
        _env_file=None, model_name=str(tiny_llama_path), model_cache_dir=tmp_path / "cache"
    )
    save_adapter(tiny_llama_path, tmp_path / "plain", ["q_proj", "v_proj"])
    loaded = load_for_inference(settings, adapter_path=tmp_path / "plain")
    assert loaded.engine == "scratch" and loaded.name.endswith("+plain")
    assert "LoRA adapter plain on the shared weights" in loaded.description
    other = load_for_inference(settings, adapter_path=tmp_path / "plain", shared_base=loaded)
    assert other.plain is loaded.plain  # the second adapter went on the same base
    save_adapter(tiny_llama_path, tmp_path / "dora", ["q_proj"], use_dora=True)
    with caplog.at_level(logging.WARNING):
        dora = load_for_inference(settings, adapter_path=tmp_path / "dora", shared_base=loaded)
    assert dora.engine == "hf" and "needs peft (use_dora=True)" in caplog.text
    with pytest.raises(ModelLoadingError, match="ENGINE=scratch cannot run the LoRA adapter"):
        load_for_inference(settings, adapter_path=tmp_path / "dora", engine_name="scratch")


def test_serving_a_bf16_model_keeps_no_memory_per_prompt_length():
    """PyTorch's bf16 matmul keeps memory for every new row count (about 1 MB each at these
    shapes): the update runs in fp32, and a server's varied prompt lengths cost nothing."""

    def anonymous_mb() -> float:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("RssAnon"))
        return int(line.split()[1]) / 1024

    base = torch.nn.Linear(576, 576, dtype=torch.bfloat16)
    layer = LoRALinear.around(base, torch.randn(4, 576), torch.randn(576, 4))
    inputs = [torch.randn(rows, 576, dtype=torch.bfloat16) for rows in range(1, 600, 3)]
    with torch.inference_mode():
        for x in inputs:  # the base layer's own bf16 matmul meets every row count first
            base(x)
        before = anonymous_mb()
        for x in inputs:
            layer(x)
    assert anonymous_mb() - before < 40  # in bf16 the update kept about 150 MB more

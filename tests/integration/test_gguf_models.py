"""GGUF files as MODEL_NAME, end to end: tiny random models of several families and tensor
types written in fixtures (tests/gguf_files.py), converted once, checked against
transformers' own GGUF loading, served on our engine with the file's 4-bit codes, and chatting
in the CLI and through the API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from src.config import load_settings
from src.errors import ModelLoadingError
from src.models.inference import load_for_inference
from src.models.quantize import Int4Linear, quantize_model
from src.models.transformer import Transformer
from tests.conftest import TINY_FAMILIES, random_tiny_model
from tests.gguf_files import by_name, write_gguf
from tests.integration.conftest import run_python

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# The tiny models' shape with the bundled tokenizer's first 2,048 tokens (copied into each
# file: a small vocabulary keeps writing and converting quick).
SHAPE = {"vocab_size": 2048, "pad_token_id": 0}
# Family -> (extra config, the tensor types the file holds, what QUANTIZE=auto then means).
FILES = {
    # q and k Q4_0 (rows permuted in the file), v Q4_1: one 4-bit qkv matrix of two types.
    "mistral": ({}, by_name(Q.Q4_0, token_embd=Q.Q8_0, attn_v=Q.Q4_1), "int4"),
    "qwen2": ({}, by_name(Q.Q4_1, token_embd=Q.F16), "int4"),
    "qwen3": ({}, by_name(Q.Q8_0), "int8"),
    "gemma2": ({}, by_name(Q.Q4_0, token_embd=Q.BF16), "int4"),
    "phi3": ({}, by_name(Q.F16), "none"),
    # A wider Llama for K-quants (blocks of 256): ffn_down Q4_K in one layer, Q6_K in the other.
    "llama": (
        {"hidden_size": 64, "intermediate_size": 256},
        by_name(Q.Q4_0, **{"blk.0.ffn_down": Q.Q4_K, "blk.1.ffn_down": Q.Q6_K}),
        "int4",
    ),
}
CONFIG_CLASSES = {
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
}


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory) -> dict[str, Path]:
    """Each family of FILES written as a GGUF file, in a folder of its own."""
    files = {}
    for kind, (extra, choose, _) in FILES.items():
        model = tiny_model(*CONFIG_CLASSES[kind], extra)
        folder = tmp_path_factory.mktemp(f"gguf-{kind}")
        files[kind] = write_gguf(model, folder / f"tiny-{kind}.gguf", choose)
    return files


def tiny_model(config_name: str, model_name: str, extra: dict) -> torch.nn.Module:
    return random_tiny_model(config_name, model_name, SHAPE | extra)


def settings_for(path: Path, **overrides):
    values = {"model_name": str(path), "model_cache_dir": path.parent / "cache"}
    return load_settings(_env_file=None, **values | overrides)


def transformers_gguf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


# Three files in the default suite (Llama's permuted q/k with K-quants, Qwen2's biases, a
# qkv of two 4-bit types); the other families with `make test-slow`.
SLOW_FAMILIES = ("gemma2", "phi3", "qwen3")
EVERY_FILE = [
    pytest.param(kind, marks=pytest.mark.slow) if kind in SLOW_FAMILIES else kind
    for kind in sorted(FILES)
]


@pytest.mark.parametrize("kind", EVERY_FILE)
def test_a_gguf_file_serves_on_our_engine_as_transformers_reads_it(gguf_files, kind):
    path = gguf_files[kind]
    loaded = load_for_inference(settings_for(path, precision="fp32", quantize="none"))
    assert loaded.engine == "scratch" and loaded.name == f"tiny-{kind}"
    reference = transformers_gguf_model(path)
    # The converted folder holds exactly the weights transformers de-quantises.
    folder = next((path.parent / "cache" / "gguf").iterdir())
    from safetensors.torch import load_file

    converted = load_file(folder / "model.safetensors")
    for name, tensor in converted.items():
        assert torch.equal(tensor, reference.state_dict()[name]), name
    # Logits on a left-padded batch, as the engine runs it.
    ids = torch.tensor([[0, 0, 5, 17, 901], [3, 44, 12, 8, 77]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = loaded.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        theirs = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=0)
    # The chat template came from the file's metadata (the bundled SmolLM2's).
    assert "<|im_start|>" in loaded.tokenizer.chat_template


@pytest.mark.parametrize("kind", EVERY_FILE)
def test_quantize_auto_follows_the_file_and_says_so(gguf_files, kind):
    loaded = load_for_inference(settings_for(gguf_files[kind]))
    expected = FILES[kind][2]
    reason = {
        "int4": "QUANTIZE=auto: int4 keeps the GGUF file's 4-bit codes",
        "int8": "QUANTIZE=auto: int8 for the GGUF file's 5- to 8-bit weights",
        "none": "QUANTIZE=auto: none, exact",
    }[expected]
    assert reason in loaded.description
    precision = "bf16" if expected != "none" else "fp32"
    assert loaded.description.startswith(f"scratch engine, {precision}")


def effective_weight(layer: Int4Linear) -> torch.Tensor:
    """What an int4 layer multiplies by: its product with the identity, (N, K)."""
    eye = torch.eye(layer.in_features, dtype=torch.bfloat16)
    return layer.matmul(eye).float().t()


@pytest.mark.parametrize("kind", ["mistral", "llama"])
def test_int4_layers_take_the_files_codes_instead_of_rounding_again(gguf_files, kind):
    """Each int4 layer whose parts were 4-bit in the file multiplies by the file's weights up
    to bf16 rounding of its scales; rounding the de-quantised weights again (what a layer
    with a Q6_K part gets) is several times further off."""
    loaded = load_for_inference(settings_for(gguf_files[kind], precision="fp32"))
    folder = next((gguf_files[kind].parent / "cache" / "gguf").iterdir())
    again = quantize_model(Transformer.from_folder(folder), "int4")
    exact = Transformer.from_folder(folder)
    kept = requantised = 0
    for name, layer in loaded.model.named_modules():
        if not isinstance(layer, Int4Linear):
            continue
        truth = exact.get_submodule(name).weight
        error = (effective_weight(layer) - truth).abs().max()
        rounded_again = (effective_weight(again.get_submodule(name)) - truth).abs().max()
        if name == "blocks.1.mlp.down" and kind == "llama":  # Q6_K in the file
            assert error == rounded_again
            requantised += 1
            continue
        scale = truth.abs().max()
        assert error < 0.01 * scale, name  # bf16 scales and bf16 products
        assert error * 4 < rounded_again, name
        kept += 1
    assert kept >= 7 and requantised == (kind == "llama")


def test_a_gguf_file_chats_in_the_cli(gguf_files):
    path = gguf_files["mistral"]
    result = run_python(
        ["src/mvp_chatbot.py", "--verbose"],
        stdin="Hello there\n/quit\n",
        MODEL_NAME=str(path.parent),  # the folder that holds the file works too
        MODEL_CACHE_DIR=str(path.parent / "cache"),
        DO_SAMPLE="false",
        MAX_NEW_TOKENS="6",
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "tiny-mistral" in output and "int4 keeps the GGUF file's 4-bit codes" in output
    converted = next((path.parent / "cache" / "gguf").iterdir())
    assert json.loads((converted / "gguf" / "source.json").read_text())["quantization"] == "int4"
    listed = run_python(
        ["scripts/download_models.py", "--list"], MODEL_CACHE_DIR=str(path.parent / "cache")
    )
    row = next(line for line in listed.stdout.splitlines() if "tiny-mistral.gguf" in line)
    # (transformers reads Mistral files as Llama, which they are without a window.)
    assert row.split()[1:4] == ["llama", "gguf", "Q4_0+F32+Q4_1+Q8_0"]


def test_a_gguf_file_chats_through_the_api(gguf_files):
    from openai import OpenAI

    from src.web.api import create_app
    from tests.live_server import LiveServer

    path = gguf_files["qwen2"]
    settings = settings_for(path, api_key=None)
    with LiveServer(create_app(settings, mount_ui=False)) as live:
        client = OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        assert [model.id for model in client.models.list()] == ["tiny-qwen2"]
        reply = client.chat.completions.create(
            model="tiny-qwen2",
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=5,
            temperature=0,
        )
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage.completion_tokens >= 1


def test_llama3_rope_scaling_kept_as_factors_in_the_file_is_recovered(tmp_path):
    """llama.cpp stores Llama 3.1's rope scaling as a tensor of factors, which transformers'
    GGUF loader ignores: the conversion recovers the parameters, so the converted model is
    the original one (float weights here: logits equal)."""
    original = tiny_model(*TINY_FAMILIES["llama3"])
    path = write_gguf(original, tmp_path / "tiny-llama3.gguf", by_name(Q.F32))
    loaded = load_for_inference(settings_for(path, precision="fp32", quantize="none"))
    folder = next((tmp_path / "cache" / "gguf").iterdir())
    rope = json.loads((folder / "config.json").read_text())["rope_parameters"]
    assert rope == original.config.rope_parameters | {"rope_type": "llama3"}
    ids = torch.tensor([list(range(5, 200, 3))])  # past the original context of 64
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-4, rtol=0
        )


def test_rope_factors_that_are_not_llama3s_are_refused(tmp_path):
    from gguf import GGUFReader

    original = tiny_model(*TINY_FAMILIES["llama3"])
    path = write_gguf(original, tmp_path / "odd-rope.gguf", by_name(Q.F32))
    factors = next(t for t in GGUFReader(path, "r+").tensors if t.name == "rope_freqs.weight")
    factors.data[:] = np.linspace(1.0, 3.0, len(factors.data))  # a ramp: not Llama 3's shape
    with pytest.raises(ModelLoadingError, match="not Llama 3's, which we cannot reproduce"):
        load_for_inference(settings_for(path))


@pytest.mark.slow  # a process of its own (~12 s); GGUF loading is tested in process above
def test_the_inspection_script_reads_a_gguf_file(gguf_files, tmp_path):
    path = gguf_files["gemma2"]
    result = run_python(
        ["scripts/inspect_model.py", "--model", str(path), "--output", str(tmp_path / "map.png")],
        MODEL_CACHE_DIR=str(path.parent / "cache"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # (exit status 0: our transformer matched transformers layer by layer on the converted file)
    assert "Attention map (" in result.stdout and (tmp_path / "map.png").is_file()

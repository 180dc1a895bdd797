"""Shared fixtures: tiny random-weight models with the genuine tokenizers, and the real
bundled SmolLM2 model (converted once into ./models and shared with the CLI)."""

from __future__ import annotations

import os
from pathlib import Path

# Under pytest-xdist two workers share the machine's two cores: one thread each (and for the
# servers and commands they start), instead of two threads each competing for a core
# (measured: the unit tests 16% faster). Set before torch starts its thread pool.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

from src.chat.adapter_pool import AdapterPool
from src.chat.local import LocalBackend
from src.chat.service import ChatService
from src.config import REPO_ROOT, Settings, load_settings
from src.engine.batching import BatchingEngine
from src.models.bundled import BUNDLED_MODEL_NAME, gpt2_tokenizer_dir
from src.models.loader import ensure_bundled_model, load_from_folder
from src.models.model_info import eos_token_ids, max_positions
from src.params import GenerationParams
from src.stack import ChatStack, build_chat_stack, build_service

# The count of fuzz cases tried, printed after any run that includes them (a plugin here, at
# the root, so that a pytest-xdist controller adds up its workers' counts).
pytest_plugins = ["tests.fuzz.cases"]

# The real model cache of the repository: the bundled model is converted there once per
# machine (about 25 s) and then loads in about a second, for the tests and the CLI alike.
REPO_MODEL_CACHE = REPO_ROOT / "models"

GREEDY = GenerationParams(do_sample=False, repetition_penalty=1.0, max_new_tokens=16)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never read a developer's .env or settings from the calling shell."""
    setting_names = {name.upper() for name in Settings.model_fields}
    for name in list(os.environ):
        if name.upper() in setting_names:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(Settings.model_config, "env_file", None)


@pytest.fixture(scope="session")
def gpt2_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gpt2_tokenizer_dir(tmp_path_factory.mktemp("gpt2-tokenizer"))


@pytest.fixture(scope="session")
def tiny_gpt2_path(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer_path: Path) -> Path:
    """A 2-layer GPT-2 with DialoGPT conventions: the genuine GPT-2 BPE, turns joined by EOS,
    no chat template."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    # A wide initialisation (GPT-2 uses 0.02) so that random outputs depend on the input.
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=50257, initializer_range=0.3
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gpt2_tokenizer_path).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for a module's tests of a C kernel: each library is built once."""
    return tmp_path_factory.mktemp("kernel_cache")


@pytest.fixture(scope="session")
def bundled_model_path() -> Path:
    return ensure_bundled_model(REPO_MODEL_CACHE)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path) -> Path:
    """A 2-layer Llama (GQA, RoPE, SwiGLU) with SmolLM2's real tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
        initializer_range=0.3,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(bundled_model_path).save_pretrained(folder)
    return folder


# Tiny random models of the other families src/models/transformer.py builds, each from
# transformers' own config class, with extra settings that make the family's difference
# count (Llama 3's rope scaling acts on wavelengths around a short "original" context).
TINY_FAMILIES: dict[str, tuple[str, str, dict[str, object]]] = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    # Qwen3 sets head_dim apart from the width.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    # Gemma 2: every other layer windowed (shortened), soft caps low enough to bite.
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "sliding_window": 8,
            "head_dim": 8,
            "query_pre_attn_scalar": 6,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    # Gemma 3 (text): two windowed layers then a full one, each with its own rotary base;
    # Llama 3-style "linear" scaling on the full layers.
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "num_hidden_layers": 3,
            "sliding_window": 8,
            "head_dim": 8,
            "query_pre_attn_scalar": 6,
            "sliding_window_pattern": 3,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        },
    ),
    # As Phi-3-mini-4k, a window (shortened here); Phi-4-mini rotates 3/4 of each head.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": 8}),
    "phi3-partial": ("Phi3Config", "Phi3ForCausalLM", {"partial_rotary_factor": 0.5}),
    # A window shorter than the test prompts and replies: every layer, and Qwen2's from layer 1.
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen2-window": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    ),
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10_000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
}


def tiny_family_model(tmp_path_factory: pytest.TempPathFactory, kind: str, tokenizer: Path) -> Path:
    """A 2-layer model of ``kind`` (GQA, SmolLM2's tokenizer and chat template) whose biases
    and norm weights are random too (transformers starts them at 0 and 1, which would hide a
    bias or a norm applied in the wrong place)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp(f"tiny-{kind}")
    model = random_tiny_model(*TINY_FAMILIES[kind])
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
    return folder


# The tiny models' shape: SmolLM2's vocabulary, two layers of width 32, grouped queries.
TINY_SHAPE: dict[str, object] = {
    "vocab_size": 49152,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": True,
    "initializer_range": 0.3,
}


def random_tiny_model(config_name: str, model_name: str, extra: dict[str, object]):
    """A transformers model of TINY_SHAPE (changed by ``extra``) with random weights, its
    norms away from 1 and biases away from 0 so that they count."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**TINY_SHAPE | extra)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.3)
            elif "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_family_paths(
    tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path
) -> dict[str, Path]:
    """Each of TINY_FAMILIES' tiny models, by family."""
    return {
        kind: tiny_family_model(tmp_path_factory, kind, bundled_model_path)
        for kind in TINY_FAMILIES
    }


def make_service(folder: Path, context_window: int | None = None, **kwargs: object) -> ChatService:
    """A service on the model in ``folder``, its context window the model's own limit unless
    given. The engine and tokenizer are reachable as ``service.backend.engine`` and
    ``service.backend.tokenizer``."""
    model, tokenizer = load_from_folder(folder)
    engine = BatchingEngine(model, eos_token_ids(model, tokenizer))
    window = context_window or max_positions(model.config)
    return ChatService(LocalBackend(engine, tokenizer, window), model_name=folder.name, **kwargs)


@pytest.fixture()
def tiny_gpt2_service(tiny_gpt2_path: Path) -> ChatService:
    return make_service(tiny_gpt2_path, default_params=GREEDY)


@pytest.fixture()
def tiny_llama_service(tiny_llama_path: Path) -> ChatService:
    return make_service(tiny_llama_path, default_params=GREEDY)


def bundled_settings(**overrides: object) -> Settings:
    """Settings for the bundled model from the repository's model cache, ignoring any .env."""
    return load_settings(
        _env_file=None, model_name=BUNDLED_MODEL_NAME, model_cache_dir=REPO_MODEL_CACHE, **overrides
    )


# Settings for transformers' own model with exact fp32 outputs (the default for the bundled
# model is our scratch engine in bf16 with int4 weights: faster and slightly different).
EXACT = {"engine": "hf", "precision": "fp32", "quantize": "none"}


@pytest.fixture(scope="session")
def bundled_service(bundled_model_path: Path) -> ChatService:
    """The bundled model as users get it by default (scratch engine, bf16, int4 weights)."""
    return build_chat_stack(bundled_settings()).service


@pytest.fixture(scope="session")
def bundled_exact_service(bundled_model_path: Path) -> ChatService:
    """transformers' model of the bundled weights in fp32, unquantised: exact outputs."""
    return build_chat_stack(bundled_settings(**EXACT)).service


def stack_around(service: ChatService, settings: Settings) -> ChatStack:
    """The chat stack the API serves, around a service a test built itself (adapters load
    as in production: the settings' model with the adapter)."""
    adapters = AdapterPool(
        service,
        settings.adapters_dir,
        lambda path: build_service(settings, adapter_path=path, store=service.store),
    )
    return ChatStack(service, adapters, service.store)

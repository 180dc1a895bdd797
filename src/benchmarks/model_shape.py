"""Single-stream decoding on a bigger model shape: a Llama with the shape of Llama 3.2 1B and
random weights (speed depends on the shape, not on the values; nothing here can be
downloaded), our engine at each precision against plain transformers ``generate`` in fp32, so
that users who bring a 1-2B model know what to expect from the numbers of the bundled one."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from src.benchmarks.decode import (
    EngineStream,
    engine_first_token_seconds,
    generate_first_token_seconds,
    time_engine,
    time_generate,
)

# Llama 3.2 1B's published configuration (without its rope scaling, which changes no cost).
LLAMA_3_2_1B_SHAPE: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
}


def random_llama(shape: dict[str, Any], seed: int = 0) -> Any:
    """A transformers Llama of ``shape`` with random weights, in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**shape)).eval()


def weights_mb(model: torch.nn.Module) -> float:
    """Megabytes of the model's parameters and buffers (quantised weights are buffers)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def measure_model_shape(
    prompt: list[int],
    long_prompt: list[int],
    new_tokens: int,
    repetitions: int,
    kernel_cache_dir: Path,
    shape: dict[str, Any] = LLAMA_3_2_1B_SHAPE,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Rows as in the decode section (tokens/s, first token, first token after
    ``long_prompt``) plus each model's weight memory. One model in memory at a time: each row
    is made from the previous one (fp32, then bf16, then int4 in place)."""
    from src.models.native import use_kernels
    from src.models.quantize import quantize_model
    from src.models.transformer import Transformer

    rows = []

    def measure(name: str, model: Any, engine: bool) -> None:
        progress(f"  model shape: {name}")
        if engine:
            speed, first, _ = time_engine(EngineStream(model, prompt, new_tokens), repetitions)
            long_first = engine_first_token_seconds(model, long_prompt, repetitions)
        else:
            speed, first, _ = time_generate(model, prompt, new_tokens, repetitions)
            long_first = generate_first_token_seconds(model, long_prompt, repetitions)
        rows.append(
            {
                "name": name,
                "tokens_per_second": speed,
                "first_token_seconds": first,
                "long_prompt_first_token_seconds": long_first,
                "weights_mb": weights_mb(model),
            }
        )

    hf_model = random_llama(shape)
    parameters = sum(p.numel() for p in hf_model.parameters())
    measure("transformers generate fp32 (baseline)", hf_model, engine=False)
    ours = Transformer.from_hf(hf_model)
    del hf_model
    gc.collect()
    measure("scratch engine fp32", ours, engine=True)
    ours = ours.to(torch.bfloat16)
    measure("scratch engine bf16", ours, engine=True)
    quantize_model(ours, "int4")
    use_kernels(ours, kernel_cache_dir)
    measure("scratch engine bf16 + int4", ours, engine=True)
    return {
        "shape": dict(shape),
        "parameters": parameters,
        "new_tokens": new_tokens,
        "repetitions": repetitions,
        "long_prompt_tokens": len(long_prompt),
        "rows": rows,
    }

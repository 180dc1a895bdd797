"""The optional llama.cpp row of the decode table: the bundled GGUF file itself (Q4_1) run by
llama-cpp-python, what an Ollama user gets on the same model.

llama-cpp-python is an optional extra (``make setup-llamacpp``: pip builds it from source,
about 10 minutes on 2 cores); without it the benchmark leaves the row out and says so. The
prompt and the held-out conversations are the same token ids as every other row's (the GGUF
file carries the same vocabulary our tokenizer was converted from).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def load(gguf: Path, threads: int, context: int = 2048, logits_all: bool = False) -> Any:
    from llama_cpp import Llama

    return Llama(
        model_path=str(gguf),
        n_ctx=context,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,  # every position's logits: needed for perplexity only
        verbose=False,
    )


def llama_cpp_stream(llm: Any, prompt: list[int], new_tokens: int) -> Callable[[], Iterator[int]]:
    """Greedy decoding of exactly ``new_tokens`` tokens (like the baseline, through EOS)."""

    def stream() -> Iterator[int]:
        # Forget the previous repetition: llama-cpp-python would otherwise reuse the prompt's
        # cached keys and values, and time to first token would skip the prompt (our engines
        # in this table run it every time).
        llm.reset()
        tokens = llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True)
        for _, token in zip(range(new_tokens), tokens, strict=False):
            yield int(token)

    return stream


def llama_cpp_perplexity(llm: Any, examples: list[dict[str, list[int]]]) -> float:
    """Perplexity on the assistant tokens of held-out conversations, as
    ``src.benchmarks.decode.held_out_perplexity`` computes it for the PyTorch rows. ``llm``
    must be loaded with ``logits_all=True``."""
    total, count = 0.0, 0
    for example in examples:
        ids, labels = example["input_ids"], example["labels"]
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)  # (T - 1, V)
        targets = np.asarray(labels[1:])
        keep = targets != -100
        logits, targets = logits[keep], targets[keep]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total -= float(log_probs[np.arange(len(targets)), targets].sum())
        count += int(keep.sum())
    return math.exp(total / count)

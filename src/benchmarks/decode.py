"""Single-stream decoding speed: each of our engines and precisions against plain
transformers ``generate`` (fp32), same prompt, same number of new tokens, greedy, measured
side by side in one process. Medians of several repetitions."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from src.engine.batching import BatchingEngine
from src.params import GenerationParams


@dataclass
class DecodeResult:
    name: str
    tokens_per_second: float
    first_token_seconds: float
    tokens: list[int]


def time_stream(stream: Callable[[], Iterator[int]], repetitions: int) -> tuple[float, float, list]:
    """Median tokens/s (after the first token) and median time to first token."""
    speeds, firsts, tokens = [], [], []
    for _ in range(repetitions):
        started = time.perf_counter()
        first_at = None
        tokens = []
        for token in stream():
            tokens.append(token)
            if first_at is None:
                first_at = time.perf_counter()
        ended = time.perf_counter()
        firsts.append(first_at - started)
        speeds.append((len(tokens) - 1) / (ended - first_at) if len(tokens) > 1 else 0.0)
    return statistics.median(speeds), statistics.median(firsts), tokens


def transformers_generate_stream(model: Any, prompt: list[int], new_tokens: int):
    """Plain ``model.generate`` (the baseline), streamed through transformers' streamer API
    so that time to first token is measured the same way."""
    import queue
    import threading

    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.items: queue.Queue = queue.Queue()
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:  # the first call carries the prompt
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                self.items.put(token)

        def end(self):
            self.items.put(None)

    def stream():
        streamer = Collect()
        worker = threading.Thread(
            target=lambda: model.generate(
                torch.tensor([prompt]),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=streamer,
                pad_token_id=0,
            )
        )
        worker.start()
        while (token := streamer.items.get()) is not None:
            yield token
        worker.join()

    return stream


class EngineStream:
    """Our decode engine (the one every front end uses) on ``model``, one request at a time,
    its loop run by the caller as in the CLI (``background=False``). No end-of-sequence ids:
    it always generates exactly ``new_tokens``, like the baseline."""

    def __init__(self, model: Any, prompt: list[int], new_tokens: int) -> None:
        self.engine = BatchingEngine(model, eos_token_ids=frozenset(), background=False)
        self.prompt = prompt
        self.params = GenerationParams(
            do_sample=False, max_new_tokens=new_tokens, repetition_penalty=1.0
        )

    def __call__(self) -> Iterator[int]:
        return self.engine.generate_token_ids(self.prompt, self.params)

    def close(self) -> None:
        self.engine.close()


@torch.inference_mode()
def held_out_perplexity(model: Any, examples: list[dict[str, list[int]]]) -> float:
    """Perplexity on assistant tokens of held-out conversations (tokenized for training)."""
    total, count = 0.0, 0
    for example in examples:
        ids = torch.tensor([example["input_ids"]])
        labels = torch.tensor([example["labels"]])
        logits = model(ids).logits[0, :-1].float()
        targets = labels[0, 1:]
        keep = targets != -100
        loss = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
        total, count = total + float(loss), count + int(keep.sum())
    return float(torch.exp(torch.tensor(total / count)))

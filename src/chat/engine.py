"""Token generation with a Hugging Face causal LM: a plain loop over the KV cache.

We write the loop instead of calling ``model.generate`` so that streaming, cancellation and
stop sequences are ordinary Python between two tokens (no background thread, no streamer
queue), and so the same loop can later batch several requests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from src.chat.prefix_cache import PrefixCache, cache_from_layers, row_layers
from src.chat.sampling import choose_next_token, sampling_generator
from src.errors import ModelLoadingError
from src.params import GenerationParams


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends a reply: the tokenizer's EOS and the generation config's (which for
    chat models is often the end-of-turn token, e.g. <|im_end|>)."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def max_positions(config: Any) -> int:
    """The longest sequence the model was trained for (names differ between families)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelLoadingError(
        f"cannot tell the context length of {type(config).__name__}: "
        "it has no max_position_embeddings or n_positions"
    )


def uses_sliding_window(model: Any) -> bool:
    """Whether some layer attends only to a window of recent positions (Mistral, Gemma 2/3):
    such layers drop old keys on their own schedule, so their caches are neither shared
    between requests nor reused."""
    config = model.config
    if getattr(config, "sliding_window", None):
        return True
    return "sliding_attention" in (getattr(config, "layer_types", None) or [])


class HFEngine:
    """Generates token ids one at a time from a transformers model (or ours: same interface).

    With a ``PrefixCache``, a prompt that starts like an earlier sequence (the previous turn
    of the conversation, the shared system prompt) only runs its new tokens through the model.
    """

    def __init__(self, model: Any, tokenizer: Any, prefix_cache: PrefixCache | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.max_positions = max_positions(model.config)
        self.prefix_cache = None if uses_sliding_window(model) else prefix_cache

    @torch.inference_mode()
    def generate_token_ids(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[int]:
        """Yield new token ids until EOS (yielded too), max_new_tokens, or ``should_stop()``."""
        generator = sampling_generator(params)
        previous_ids = torch.tensor(prompt_ids, dtype=torch.long)  # for the repetition penalty
        cache = None  # the KV cache: keys and values of every position seen so far
        reused = 0
        if self.prefix_cache is not None:
            reused, layers = self.prefix_cache.longest_prefix(prompt_ids)
            if reused:
                cache = cache_from_layers(self.model, layers)
        next_input = previous_ids[reused:].unsqueeze(0)  # (1, T): the prompt on the first step
        failed = False
        try:
            for _ in range(params.max_new_tokens):
                if should_stop():
                    return
                # logits_to_keep=1: only the last position's logits are needed, which saves a
                # (T, vocab) projection on the prompt.
                output = self.model(
                    input_ids=next_input, cache=cache, use_cache=True, logits_to_keep=1
                )
                cache = output.cache
                token_id = choose_next_token(output.logits[0, -1], previous_ids, params, generator)
                yield token_id
                if token_id in self.eos_token_ids:
                    return
                previous_ids = torch.cat([previous_ids, torch.tensor([token_id])])
                next_input = torch.tensor([[token_id]])  # (1, 1): only the new token from now on
        except Exception:
            failed = True  # a forward pass that failed may have updated only some layers
            raise
        finally:
            # Also when the consumer stops early (a stop sequence, a cancelled stream).
            if self.prefix_cache is not None and cache is not None and not failed:
                read = cache.get_seq_length()  # the tokens the cache holds keys and values of
                columns = torch.arange(read)
                self.prefix_cache.store(previous_ids[:read], row_layers(cache, 0, columns))

"""Choosing the next token from the model's logits.

Written out (rather than transformers' logits processors) so the order of operations is visible
and both engines (Hugging Face and the from-scratch transformer) share it.
"""

from __future__ import annotations

import torch

from src.chat.params import GenerationParams


def apply_repetition_penalty(
    logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL (Keskar et al., 2019): make every token seen so far less likely.

    Positive logits are divided by the penalty and negative ones multiplied, so the token
    always moves towards "less likely" whatever the sign. ``logits``: (V,), ``previous_ids``: (T,).
    """
    if penalty == 1.0 or previous_ids.numel() == 0:
        return logits
    seen = logits.gather(0, previous_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(0, previous_ids, seen)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits; the rest become -inf. k=0 keeps all."""
    if k <= 0 or k >= logits.numel():
        return logits
    threshold = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al., 2019): keep the smallest set of tokens whose
    probabilities add up to at least p. The likeliest token is always kept."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # Drop a token if the tokens before it already reach p.
    drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= p
    # Keep the first one whatever p is: a p below float32's smallest number (1e-300) rounds
    # to 0, which would drop every token and leave nothing to sample from.
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token_distribution(
    logits: torch.Tensor, previous_ids: torch.Tensor, params: GenerationParams
) -> torch.Tensor:
    """Processed logits for sampling: penalty, then temperature, then top-k, then top-p."""
    logits = apply_repetition_penalty(logits.float(), previous_ids, params.repetition_penalty)
    if params.is_greedy:
        return logits
    logits = logits / params.temperature
    logits = filter_top_k(logits, params.top_k)
    return filter_top_p(logits, params.top_p)


def sampling_generator(params: GenerationParams) -> torch.Generator | None:
    """The random source of one request: seeded when ``params.seed`` is set (reproducible),
    fresh otherwise; None for greedy decoding, which draws nothing."""
    if params.is_greedy:
        return None
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def choose_next_token(
    logits: torch.Tensor,
    previous_ids: torch.Tensor,
    params: GenerationParams,
    generator: torch.Generator | None = None,
) -> int:
    """One token id from last-position ``logits`` (V,), greedy or sampled."""
    processed = next_token_distribution(logits, previous_ids, params)
    if params.is_greedy:
        return int(torch.argmax(processed))
    probabilities = torch.softmax(processed, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))

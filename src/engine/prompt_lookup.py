"""Draft tokens for speculative decoding by prompt lookup (Saxena, 2023).

Replies often repeat their context: a summary quotes its text, an edited function repeats
most of the code. When the last tokens of a sequence occurred earlier in it, the tokens that
followed them then are a good guess for what comes next. The engine runs the guess through
the model in one pass with the row's last token and keeps the longest run the model itself
would have chosen (``BatchingEngine._lookup_step``), so the reply is the same as without a
draft, only sooner when the guess is right. The n-gram search is transformers' own
(``PromptLookupCandidateGenerator``, what ``generate(prompt_lookup_num_tokens=...)`` uses).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

MATCHING_NGRAM = 2  # the longest n-gram matched (transformers' default), then shorter ones


@functools.cache
def prepare_prompt_lookup() -> Any:
    """transformers' candidate generator class, imported on first use: the default engine
    does not import transformers otherwise (it costs a second of start-up)."""
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    return PromptLookupCandidateGenerator


def draft_tokens(seen: torch.Tensor, count: int, eos_token_ids: torch.Tensor) -> torch.Tensor:
    """Up to ``count`` tokens that followed an earlier occurrence (the first, as transformers
    searches) of the last n-gram of ``seen`` (1-D), cut before any end-of-reply token; empty
    if nothing matches."""
    if count <= 0 or len(seen) < 2:
        return seen[:0]
    lookup = prepare_prompt_lookup()(
        eos_token_id=eos_token_ids if len(eos_token_ids) else None,
        num_output_tokens=count,
        max_matching_ngram_size=MATCHING_NGRAM,
        max_length=len(seen) + count + 1,
    )
    candidates, _ = lookup.get_candidates(seen.unsqueeze(0))
    return candidates[0, len(seen) :]

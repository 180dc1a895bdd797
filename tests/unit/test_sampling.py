"""Our sampling functions against transformers' reference logits processors."""

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from src.chat.params import GenerationParams
from src.chat.sampling import (
    apply_repetition_penalty,
    choose_next_token,
    filter_top_k,
    filter_top_p,
)

pytestmark = pytest.mark.unit


@pytest.fixture()
def logits() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(50) * 3


def test_repetition_penalty_matches_transformers(logits):
    previous = torch.tensor([3, 7, 7, 11, 20])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(previous[None], logits[None].clone())[0]
    assert torch.allclose(apply_repetition_penalty(logits, previous, 1.3), expected)


def test_repetition_penalty_makes_seen_tokens_less_likely_whatever_their_sign():
    logits = torch.tensor([2.0, -2.0, 1.0])
    penalised = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert penalised.tolist() == [1.0, -4.0, 1.0]


@pytest.mark.parametrize("k", [1, 5, 49])
def test_top_k_matches_transformers(logits, k):
    expected = TopKLogitsWarper(k)(None, logits[None].clone())[0]
    assert torch.equal(filter_top_k(logits, k), expected)
    assert torch.isfinite(filter_top_k(logits, k)).sum() == k


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(logits, p):
    expected = TopPLogitsWarper(p)(None, logits[None].clone())[0]
    assert torch.equal(torch.isfinite(filter_top_p(logits, p)), torch.isfinite(expected))


def test_top_p_always_keeps_the_likeliest_token():
    logits = torch.tensor([10.0, 0.0, 0.0])
    assert torch.isfinite(filter_top_p(logits, 0.01)).tolist() == [True, False, False]
    # Found by the API fuzz: a top_p below float32's range rounds to 0 in the comparison,
    # which dropped every token, and sampling from nothing raised (a 500).
    assert torch.isfinite(filter_top_p(logits, 1e-300)).tolist() == [True, False, False]
    params = GenerationParams(do_sample=True, top_p=5e-324)
    assert choose_next_token(logits, torch.tensor([], dtype=torch.long), params) == 0


def test_greedy_picks_the_argmax_even_with_temperature(logits):
    params = GenerationParams(do_sample=False, temperature=3.0, repetition_penalty=1.0)
    assert choose_next_token(logits, torch.tensor([], dtype=torch.long), params) == int(
        logits.argmax()
    )


def test_sampling_is_reproducible_with_a_seeded_generator(logits):
    params = GenerationParams(do_sample=True, temperature=1.5, top_k=0, top_p=1.0)
    none = torch.tensor([], dtype=torch.long)

    def draw(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [choose_next_token(logits, none, params, generator) for _ in range(20)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert len(set(draw(1))) > 1  # really sampling, not argmax

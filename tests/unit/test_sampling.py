"""Our sampling functions against transformers' reference logits processors."""

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from src.chat.sampling import (
    apply_repetition_penalty,
    candidate_distribution,
    choose_next_token,
    filter_top_k,
    filter_top_p,
    greedy_tokens,
    next_token_distribution,
    penalise_rows,
)
from src.params import GenerationParams

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


@pytest.mark.parametrize(
    "settings",
    [
        {"top_k": 50, "top_p": 0.9, "temperature": 0.7},  # the defaults
        {"top_k": 5, "top_p": 1.0, "temperature": 1.3},
        {"top_k": 0, "top_p": 0.5, "temperature": 1.0},  # top-k off: the whole vocabulary
        {"top_k": 2000, "top_p": 0.99, "temperature": 2.0},  # k above the vocabulary size
    ],
)
def test_candidates_are_the_full_distribution_where_it_is_not_zero(settings):
    """The sampler draws from the top-k candidates only; that must be exactly the
    distribution over the whole vocabulary (penalty, temperature, top-k, top-p)."""
    torch.manual_seed(3)
    logits = torch.randn(1000) * 4
    previous = torch.tensor([int(logits.argmax()), 5, 17])  # the penalty moves the top token
    params = GenerationParams(repetition_penalty=1.3, **settings)
    full = torch.softmax(next_token_distribution(logits, previous, params), dim=-1)
    probabilities, token_ids = candidate_distribution(logits, previous, params)
    scattered = torch.zeros_like(full).scatter(0, token_ids, probabilities)
    assert torch.allclose(scattered, full, atol=1e-6)
    kept = int((full > 0).sum())
    assert 1 < kept < 1000  # the filters really cut something and kept a choice
    assert set(token_ids[probabilities > 0].tolist()) == set(full.nonzero().squeeze(1).tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_rows_chosen_together_are_chosen_as_alone(dtype):
    torch.manual_seed(4)
    logits = (torch.randn(5, 300) * 3).to(dtype)
    given = logits.clone()
    # Each row has seen its own argmax, so a penalty changes the choice.
    previous = [torch.tensor([int(row.argmax()), 7]) for row in logits]
    previous[2] = torch.tensor([], dtype=torch.long)  # nothing seen yet
    penalties = [1.3, 1.0, 1.3, 5.0, 0.5]
    together = greedy_tokens(logits, previous, penalties)
    alone = [
        choose_next_token(row, seen, GenerationParams(do_sample=False, repetition_penalty=p))
        for row, seen, p in zip(logits, previous, penalties, strict=True)
    ]
    assert together == alone
    assert together[0] != int(logits[0].argmax())  # the penalty did act
    assert torch.equal(logits, given)  # the caller's logits are left alone


def test_rows_penalised_together_equal_rows_penalised_alone():
    torch.manual_seed(5)
    scores = torch.randn(4, 500) * 4
    # Repeated ids, an empty history, a penalty of 1 (no-op) and one below 1.
    previous = [torch.tensor([3, 9, 3, 499]), torch.tensor([], dtype=torch.long),
                torch.tensor([0, 1, 2]), torch.tensor([7, 7, 8])]  # fmt: skip
    penalties = [1.3, 2.0, 1.0, 0.7]
    expected = torch.stack(
        [
            apply_repetition_penalty(row, seen, penalty)
            for row, seen, penalty in zip(scores, previous, penalties, strict=True)
        ]
    )
    together = scores.clone()
    penalise_rows(together, previous, penalties)
    assert torch.equal(together, expected)
    assert not torch.equal(together, scores)  # it did change something

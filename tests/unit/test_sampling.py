"""The logits pipeline (src/engine/logits.py) against transformers' reference logits processors,
row by row in batches whose rows all have their own settings."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from src.engine.logits import (
    LogitsPipeline,
    draw,
    grammar_mask,
    logit_bias,
    presence_and_frequency_penalty,
    repetition_penalty,
    sampling_generator,
    temperature,
    top_k,
    top_p,
    unpack_bitmask,
)
from src.params import GenerationParams

pytestmark = pytest.mark.unit

NOTHING = torch.tensor([], dtype=torch.long)  # a history with nothing seen yet


@dataclass
class Row:
    """What the pipeline reads of a request: its parameters, its history, its generator."""

    params: GenerationParams
    seen: torch.Tensor
    generator: torch.Generator | None = None
    constraint: object = None
    reply: torch.Tensor = NOTHING  # the part of ``seen`` the model wrote


def sampled(seed: int | None = None, **settings) -> GenerationParams:
    return GenerationParams(do_sample=True, seed=seed, **settings)


def seeded(params: GenerationParams, seen: torch.Tensor = NOTHING, seed: int = 0) -> Row:
    return Row(params, seen, torch.Generator().manual_seed(seed))


def reference(logits: torch.Tensor, seen: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """transformers' chain on one row (V,): penalty, temperature, top-k, top-p."""
    scores = logits[None].float().clone()
    scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(seen[None], scores)
    scores = TemperatureLogitsWarper(params.temperature)(None, scores)
    if params.top_k:  # 0 means off (transformers refuses k=0)
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    scores = TopPLogitsWarper(params.top_p)(None, scores)
    return scores[0]


@pytest.fixture()
def logits() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(50) * 3


# ---- the repetition penalty ----------------------------------------------------------------


def test_repetition_penalty_matches_transformers_for_each_row_of_a_batch():
    torch.manual_seed(5)
    scores = torch.randn(5, 500) * 4
    # Repeated ids, the first and last ids, an empty history, a penalty of 1 (no-op), one below
    # 1 (which favours seen tokens) and a strong one.
    histories = [torch.tensor([3, 9, 3, 499, 0]), NOTHING, torch.tensor([0, 1, 2]),
                 torch.tensor([7, 7, 8]), torch.tensor([int(scores[4].argmax()), 42])]  # fmt: skip
    penalties = [1.3, 2.0, 1.0, 0.7, 5.0]
    rows = [
        Row(GenerationParams(repetition_penalty=penalty), seen)
        for penalty, seen in zip(penalties, histories, strict=True)
    ]
    together = scores.clone()
    repetition_penalty(together, rows)
    for index, (seen, penalty) in enumerate(zip(histories, penalties, strict=True)):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(seen[None], scores[index : index + 1])
        assert torch.equal(together[index], expected[0]), index
        alone = scores[index : index + 1].clone()
        repetition_penalty(alone, [rows[index]])
        assert torch.equal(alone[0], together[index]), index
    assert torch.equal(together[1], scores[1])  # nothing seen: nothing changes
    assert torch.equal(together[2], scores[2])  # a penalty of 1 changes nothing
    changed = (together != scores).any(dim=-1)
    assert changed.tolist() == [True, False, False, True, True]


def test_repetition_penalty_makes_seen_tokens_less_likely_whatever_their_sign():
    scores = torch.tensor([[2.0, -2.0, 1.0]])
    # Token 0 seen twice is penalised once.
    repetition_penalty(
        scores, [Row(GenerationParams(repetition_penalty=2.0), torch.tensor([0, 1, 0]))]
    )
    assert scores.tolist() == [[1.0, -4.0, 1.0]]


def test_the_pipeline_penalises_a_copy_and_leaves_the_logits_alone():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    row = Row(GenerationParams(repetition_penalty=2.0), torch.tensor([0, 1]))
    assert LogitsPipeline().scores(logits, [row]).tolist() == [[1.0, -4.0, 1.0]]
    assert logits.tolist() == [[2.0, -2.0, 1.0]]


# ---- the distribution over the whole vocabulary --------------------------------------------

# Two batches, each row with its own settings: rows that use top-p, and rows with top-p off
# (1.0). They are not mixed here: see test_top_p_of_1_keeps_every_token_next_to_top_p_rows.
NUCLEUS = [
    {"top_k": 50, "top_p": 0.9, "temperature": 0.7},  # the defaults
    {"top_k": 0, "top_p": 0.5, "temperature": 1.0},  # top-k off: the whole vocabulary
    {"top_k": 2000, "top_p": 0.99, "temperature": 2.0},  # k above the vocabulary size
    {"top_k": 1, "top_p": 0.9, "temperature": 1.0},  # one candidate
    {"top_k": 300, "top_p": 0.95, "temperature": 1.0, "repetition_penalty": 0.8},  # penalty < 1
    {"top_k": 40, "top_p": 0.8, "temperature": 1.0, "repetition_penalty": 1.0},  # no penalty
]
NO_NUCLEUS = [
    {"top_k": 5, "top_p": 1.0, "temperature": 1.3},  # top-p off
    {"top_k": 0, "top_p": 1.0, "temperature": 0.3},  # no filter at all
    {"top_k": 2000, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 0.8},
    {"top_k": 1, "top_p": 1.0, "temperature": 2.0, "repetition_penalty": 1.0},
]


def batch_of(settings: list[dict], seed: int, vocabulary: int = 1000):
    """Logits (B, V) and one sampled row per entry of ``settings``, each with its own history
    and generator."""
    torch.manual_seed(seed)
    logits = torch.randn(len(settings), vocabulary) * 2  # top-p keeps tens of tokens, not one
    rows = []
    for index, values in enumerate(settings):
        # The penalty moves the top token (seen twice); the first row has seen nothing yet.
        top = int(logits[index].argmax())
        seen = torch.tensor([top, 5, 17, 5, top]) if index else NOTHING
        rows.append(seeded(sampled(**{"repetition_penalty": 1.3, **values}), seen, index))
    return logits, rows


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("settings", [NUCLEUS, NO_NUCLEUS], ids=["top-p", "top-p off"])
def test_distribution_matches_transformers_for_each_row_of_a_batch(settings, seed):
    logits, rows = batch_of(settings, seed)
    distribution = LogitsPipeline().distribution(logits, rows)
    assert distribution.shape == logits.shape
    for index, row in enumerate(rows):
        expected = reference(logits[index], row.seen, row.params)
        kept = torch.isfinite(distribution[index])
        assert torch.equal(kept, torch.isfinite(expected)), settings[index]
        assert torch.allclose(
            distribution[index].exp(), torch.softmax(expected, dim=-1), atol=1e-6
        ), settings[index]
    counts = torch.isfinite(distribution).sum(dim=-1).tolist()
    if settings is NO_NUCLEUS:
        assert counts == [5, 1000, 1000, 1]
    else:
        assert counts[3] == 1 and all(1 < count < 1000 for count in counts[:3] + counts[4:])
        assert len(set(counts)) > 4  # the rows really were filtered differently


def test_top_p_of_1_keeps_every_token_next_to_top_p_rows():
    torch.manual_seed(0)
    logits = torch.randn(2, 1000) * 4
    rows = [
        Row(sampled(top_k=0, top_p=1.0, temperature=0.3, repetition_penalty=1.0), NOTHING),
        Row(sampled(top_k=0, top_p=0.5, temperature=1.0, repetition_penalty=1.0), NOTHING),
    ]
    pipeline = LogitsPipeline()
    alone = pipeline.distribution(logits[:1], rows[:1])[0]
    assert bool(torch.isfinite(alone).all())  # alone: top-p off keeps the whole vocabulary
    together = pipeline.distribution(logits, rows)[0]
    assert bool(torch.isfinite(together).all())  # fails: 7 of the 1000 tokens are kept
    assert torch.allclose(together.exp(), alone.exp(), atol=0)


def test_top_k_keeps_k_tokens_like_transformers(logits):
    ks = [1, 5, 49, 0]
    rows = [Row(sampled(top_k=k, top_p=1.0, temperature=1.0), NOTHING) for k in ks]
    distribution = LogitsPipeline().distribution(logits.expand(len(ks), -1), rows)
    for k, row in zip(ks, distribution, strict=True):
        expected = TopKLogitsWarper(k)(None, logits[None].clone())[0] if k else logits
        assert torch.equal(torch.isfinite(row), torch.isfinite(expected))
        assert int(torch.isfinite(row).sum()) == (k or 50)


def test_top_p_keeps_tokens_like_transformers(logits):
    ps = [0.1, 0.5, 0.9, 0.99]
    rows = [Row(sampled(top_k=0, top_p=p, temperature=1.0), NOTHING) for p in ps]
    distribution = LogitsPipeline().distribution(logits.expand(len(ps), -1), rows)
    for p, row in zip(ps, distribution, strict=True):
        expected = TopPLogitsWarper(p)(None, logits[None].clone())[0]
        assert torch.equal(torch.isfinite(row), torch.isfinite(expected)), p


def test_candidate_processors_work_row_by_row():
    candidates = torch.tensor([[4.0, 2.0, 1.0, 0.0], [4.0, 2.0, 1.0, 0.0]])
    rows = [Row(sampled(top_k=2, temperature=2.0), NOTHING), Row(sampled(top_k=0), NOTHING)]
    temperature(candidates, rows)
    assert candidates[0].tolist() == [2.0, 1.0, 0.5, 0.0]
    assert torch.allclose(candidates[1], torch.tensor([4.0, 2.0, 1.0, 0.0]) / 0.7)
    top_k(candidates, rows)
    assert torch.isfinite(candidates).tolist() == [[True, True, False, False], [True] * 4]


@pytest.mark.parametrize(
    "ks",
    [
        [5, 50, 20],  # the candidates are the 50 likeliest of 1000
        [5, 0, 2000, 50],  # top-k off and k above the vocabulary: all 1000
    ],
)
def test_candidates_are_the_full_distribution_where_it_is_not_zero(ks):
    """next_tokens draws from the top-k candidates only; for every row of the batch, those
    must be exactly the distribution over the whole vocabulary (penalty, temperature, top-k,
    top-p)."""
    torch.manual_seed(3)
    logits = torch.randn(len(ks), 1000) * 4
    temperatures = [0.7, 1.3, 1.0, 2.0]
    rows = [
        # The penalty moves each row's top token.
        Row(
            sampled(top_k=k, top_p=0.95, temperature=t, repetition_penalty=1.3),
            torch.tensor([int(row.argmax()), 5, 17]),
        )
        for k, t, row in zip(ks, temperatures[: len(ks)], logits, strict=True)
    ]
    pipeline = LogitsPipeline()
    full = pipeline.distribution(logits, rows).exp()
    values, token_ids = pipeline.candidates(pipeline.scores(logits, rows), rows)
    assert values.shape[-1] == (1000 if 0 in ks else min(max(ks), 1000))
    probabilities = torch.softmax(values, dim=-1)
    scattered = torch.zeros_like(full).scatter(1, token_ids, probabilities)
    assert torch.allclose(scattered, full, atol=1e-6)
    for index in range(len(ks)):
        kept = int((full[index] > 0).sum())
        assert 1 < kept < 1000  # the filters really cut something and kept a choice
        drawable = set(token_ids[index][probabilities[index] > 0].tolist())
        assert drawable == set(full[index].nonzero().squeeze(1).tolist())


# ---- top-p's edge ----------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.01, 1e-300, 5e-324])
def test_top_p_always_keeps_the_likeliest_token(p):
    # Found by the API fuzz: a top_p below float32's range rounds to 0 in the comparison,
    # which dropped every token, and sampling from nothing raised (a 500).
    for logits in ([10.0, 0.0, 0.0], [1.0, 0.9, 0.9]):
        candidates = torch.tensor([logits])
        top_p(candidates, [Row(sampled(top_p=p), NOTHING)])
        assert torch.isfinite(candidates).tolist() == [[True, False, False]]
    logits = torch.tensor([[0.0, 10.0, 0.0], [1.0, 0.9, 0.9]])
    rows = [seeded(sampled(top_p=p, top_k=0), seed=seed) for seed in (1, 2)]
    pipeline = LogitsPipeline()
    kept = torch.isfinite(pipeline.distribution(logits, rows))
    assert kept.tolist() == [[False, True, False], [True, False, False]]
    for _ in range(5):
        assert pipeline.next_tokens(logits, rows) == [1, 0]


# ---- greedy rows -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_rows_pick_the_argmax_after_the_penalty_even_with_a_temperature(dtype):
    torch.manual_seed(4)
    logits = (torch.randn(5, 300) * 3).to(dtype)
    given = logits.clone()
    # Each row has seen its own argmax, so a penalty changes the choice.
    histories = [torch.tensor([int(row.argmax()), 7]) for row in logits]
    histories[2] = NOTHING
    penalties = [1.3, 1.0, 1.3, 5.0, 0.5]
    rows = [
        # do_sample=False, or temperature 0: greedy either way, whatever the other knobs say.
        Row(GenerationParams(do_sample=index % 2 == 0, temperature=0.0 if index % 2 == 0 else 3.0,
                             top_k=1 + index, top_p=0.5, repetition_penalty=penalty), seen)
        for index, (penalty, seen) in enumerate(zip(penalties, histories, strict=True))
    ]  # fmt: skip
    assert all(row.params.is_greedy for row in rows)
    chosen = LogitsPipeline().next_tokens(logits, rows)
    expected = [
        int(RepetitionPenaltyLogitsProcessor(penalty)(seen[None], row[None].float()).argmax())
        for row, seen, penalty in zip(logits, histories, penalties, strict=True)
    ]
    assert chosen == expected
    assert chosen[0] != int(logits[0].argmax())  # the penalty did act
    assert chosen[1] == int(logits[1].argmax())  # no penalty: the plain argmax
    assert torch.equal(logits, given)  # the caller's logits are left alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_callers_logits_are_left_alone(dtype):
    torch.manual_seed(6)
    logits = (torch.randn(3, 200) * 3).to(dtype)
    given = logits.clone()
    seen = torch.tensor([int(logits[0].argmax()), 3, 4])
    rows = [
        seeded(sampled(repetition_penalty=1.5, temperature=0.5, top_k=10), seen, 1),
        Row(GenerationParams(do_sample=False, repetition_penalty=1.5), seen),
        seeded(sampled(repetition_penalty=0.7, top_k=0, top_p=0.5), seen, 2),
    ]
    pipeline = LogitsPipeline()
    pipeline.next_tokens(logits, rows)
    pipeline.distribution(logits[::2], [rows[0], rows[2]])  # a view, rows 0 and 2
    pipeline.scores(logits, rows)
    assert torch.equal(logits, given)
    # Nor is a (B, T, V) model output whose last position is a view.
    output = (torch.randn(3, 4, 200) * 3).to(dtype)
    before = output.clone()
    pipeline.next_tokens(output[:, -1], rows)
    assert torch.equal(output, before)


# ---- sampling --------------------------------------------------------------------------------


def test_sampling_is_reproducible_with_a_seeded_generator(logits):
    def draws(seed: int) -> list[int]:
        params = sampled(seed=seed, temperature=1.5, top_k=0, top_p=1.0)
        row = Row(params, NOTHING, sampling_generator(params))
        return [LogitsPipeline().next_tokens(logits[None], [row])[0] for _ in range(20)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
    assert len(set(draws(1))) > 1  # really sampling, not argmax


def test_sampling_generator():
    assert sampling_generator(GenerationParams(do_sample=False, seed=3)) is None
    assert sampling_generator(GenerationParams(temperature=0.0)) is None
    one, two = sampling_generator(sampled(seed=7)), sampling_generator(sampled(seed=7))
    assert torch.equal(torch.rand(5, generator=one), torch.rand(5, generator=two))
    fresh = [sampling_generator(sampled()) for _ in range(2)]
    assert not torch.equal(torch.rand(5, generator=fresh[0]), torch.rand(5, generator=fresh[1]))


def test_a_row_gets_the_same_token_alone_as_in_a_batch():
    """Each row's choice depends only on its own logits, settings, history and generator:
    decoded alone, in a batch, or in another batch in another order, the tokens are the same."""
    settings = [
        GenerationParams(do_sample=False, repetition_penalty=1.3),
        sampled(temperature=0.7, top_k=50, top_p=0.9),
        sampled(temperature=1.5, top_k=0, top_p=1.0, repetition_penalty=1.0),
        sampled(temperature=1.0, top_k=5, top_p=0.5, repetition_penalty=0.8),
        GenerationParams(temperature=0.0, repetition_penalty=1.0),
        sampled(temperature=2.0, top_k=2000, top_p=0.99, repetition_penalty=2.0),
    ]

    def rows() -> list[Row]:  # the same seeds every time: twin generators for each run
        return [
            Row(params, torch.tensor([1, 2, 3]), sampling_generator(params.updated(seed=index)))
            for index, params in enumerate(settings)
        ]

    batch, alone, shuffled = rows(), rows(), rows()
    order = [3, 0, 5, 1, 4, 2]
    pipeline = LogitsPipeline()
    torch.manual_seed(8)
    for _ in range(25):
        logits = torch.randn(len(settings), 400) * 3
        together = pipeline.next_tokens(logits, batch)
        one_by_one = [
            pipeline.next_tokens(logits[index : index + 1], [row])[0]
            for index, row in enumerate(alone)
        ]
        reordered = pipeline.next_tokens(logits[order], [shuffled[index] for index in order])
        assert together == one_by_one
        assert [together[index] for index in order] == reordered
        for rows_of_a_run in (batch, alone, shuffled):  # each row's history grows on its own
            for row, token in zip(rows_of_a_run, together, strict=True):
                row.seen = torch.cat([row.seen, torch.tensor([token])])
    assert len({tuple(row.seen[3:].tolist()) for row in batch}) == len(settings)


@pytest.mark.parametrize(
    "params",
    [
        sampled(temperature=0.9, top_k=4, top_p=0.95, repetition_penalty=1.3),
        sampled(temperature=1.5, top_k=0, top_p=0.8, repetition_penalty=0.8),
        sampled(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
    ],
)
def test_next_tokens_samples_from_the_distribution(params):
    """Empirical frequencies over 4000 draws against the distribution's probabilities."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, -1.0, -3.0]])
    seen = torch.tensor([0, 4])
    pipeline = LogitsPipeline()
    probabilities = pipeline.distribution(logits, [Row(params, seen)])[0].exp()
    generator = torch.Generator().manual_seed(11)
    draws = 4000
    rows = [Row(params, seen, generator)] * draws  # one row, many times: one generator
    tokens = pipeline.next_tokens(logits.expand(draws, -1), rows)
    frequencies = torch.bincount(torch.tensor(tokens), minlength=6) / draws
    assert (frequencies - probabilities).abs().max() < 0.03, (frequencies, probabilities)
    assert bool((frequencies[probabilities == 0] == 0).all())  # never an impossible token


def test_draw_never_picks_a_dropped_candidate(monkeypatch):
    """Inverse transform sampling on (S, K) probabilities with the dropped candidates last:
    whatever the uniform number, even 1.0 (which torch.rand never returns) where every
    cumulative probability is below it, the draw stops at the last candidate that can be
    drawn."""
    probabilities = torch.tensor([[0.3, 0.3, 0.4, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    rows = [Row(sampled(), NOTHING, torch.Generator()) for _ in range(2)]
    cases = [(0.0, [0, 0]), (0.29, [0, 0]), (0.5, [1, 0]), (1 - 2**-24, [2, 0]), (1.0, [2, 0])]
    for uniform, expected in cases:
        monkeypatch.setattr(torch, "rand", lambda *args, u=uniform, **kwargs: torch.tensor(u))
        assert draw(probabilities, rows).tolist() == expected, uniform


# ---- OpenAI's penalties, logit bias, min-p and the grammar mask --------------------------------


def test_presence_and_frequency_penalties_follow_openais_definition():
    """mu[j] -= c[j] * frequency + (c[j] > 0) * presence, c[j] counted in the reply only."""
    logits = torch.randn(2, 10)
    reply = torch.tensor([3, 3, 5])
    prompt = torch.tensor([7])
    rows = [
        Row(GenerationParams(presence_penalty=0.5, frequency_penalty=0.25), prompt, reply=reply),
        Row(GenerationParams(), prompt, reply=reply),  # no penalty: unchanged
    ]
    scores = logits.clone()
    presence_and_frequency_penalty(scores, rows)
    expected = logits[0].clone()
    expected[3] -= 2 * 0.25 + 0.5
    expected[5] -= 1 * 0.25 + 0.5
    assert torch.allclose(scores[0], expected)  # token 7, only in the prompt: unchanged
    assert torch.equal(scores[1], logits[1])


def test_logit_bias_adds_and_minus_100_bans():
    logits = torch.zeros(1, 6)
    rows = [Row(GenerationParams(logit_bias={1: 5.0, 2: -100.0, 4: -1.5}), NOTHING)]
    logit_bias(logits, rows)
    assert logits[0].tolist() == [0.0, 5.0, float("-inf"), 0.0, -1.5, 0.0]


@pytest.mark.parametrize("floor", [0.05, 0.3, 0.9])
def test_min_p_keeps_tokens_like_transformers(logits, floor):
    params = sampled(min_p=floor, top_k=0, top_p=1.0, temperature=0.8)
    expected = MinPLogitsWarper(floor)(None, TemperatureLogitsWarper(0.8)(None, logits[None]))
    kept = torch.isfinite(LogitsPipeline().distribution(logits[None], [seeded(params)]))
    assert torch.equal(kept[0], torch.isfinite(expected[0]))


class AllowOnly:
    """A stand-in grammar: only ``allowed`` may come next."""

    def __init__(self, allowed: list[int]) -> None:
        self.allowed = allowed

    def fill_mask(self, bitmask: torch.Tensor) -> None:
        for token in self.allowed:
            bitmask[token // 32] |= 1 << (token % 32)

    def advance(self, token_id: int) -> None:
        assert token_id in self.allowed


def test_the_grammar_mask_touches_only_constrained_rows():
    logits = torch.randn(2, 70)
    rows = [
        Row(GenerationParams(), NOTHING, constraint=AllowOnly([3, 40, 69])),
        Row(GenerationParams(), NOTHING),
    ]
    scores = logits.clone()
    grammar_mask(scores, rows)
    assert torch.isfinite(scores[0]).nonzero().squeeze(1).tolist() == [3, 40, 69]
    assert torch.equal(scores[1], logits[1])
    tokens = LogitsPipeline().next_tokens(logits, [seeded(sampled(), seed=s) for s in (0, 1)])
    assert len(tokens) == 2
    with pytest.raises(ValueError, match="allows no next token"):
        grammar_mask(logits.clone(), [Row(GenerationParams(), NOTHING, constraint=AllowOnly([]))])


def test_unpack_bitmask_reads_bit_j_of_word_w_as_token_32w_plus_j():
    bitmask = torch.tensor([[1 - 2**31, 0, 1 << 4]], dtype=torch.int32)  # bits 0 and 31
    assert unpack_bitmask(bitmask, 70).nonzero()[:, 1].tolist() == [0, 31, 68]

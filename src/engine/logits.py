"""The logits pipeline: from one decoding step's logits (B, V) to each row's next token.

Every row of a batch is a request with its own ``GenerationParams``. The pipeline runs in two
stages, each a list of processors that handle all rows of the step in a few tensor operations:

1. **Score processors** change scores over the whole vocabulary, in place: the repetition
   penalty, presence and frequency penalties, logit bias, and a grammar's token mask (which
   sets every token that would break the grammar to -inf).
2. **The choice**: greedy rows take the argmax of their scores. Sampled rows keep their top-k
   *candidates* (sorted, largest first; dividing by a positive temperature keeps the order, so
   the k likeliest are the same before and after), candidate processors (temperature, top-p;
   min-p would be one more) drop or rescale them, and one number from the row's own random
   generator picks a candidate (inverse transform sampling). Top-p then sorts k numbers, not
   the whole vocabulary: with SmolLM2's 49,152 tokens, that sort took 2 ms of every sampled
   token.

A row's choice depends only on its own logits, parameters, history and generator, never on the
other rows of the batch: a request gets the same reply alone as in a crowd.

The order is the one transformers and vLLM use: penalties, bias and mask, then temperature,
top-k, top-p, min-p.

**Log-probabilities** (``logprobs``) come from the model's own distribution: the log-softmax of
the raw logits, before any penalty, bias, mask or temperature. So they are the same for greedy
and sampled requests and for every setting: they say what the model thinks of each token,
not how likely the sampler was to pick it (which, for a greedy row, would always be 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from src.params import GenerationParams


class Row(Protocol):
    """What the pipeline reads of one request (the engine's requests have these)."""

    params: GenerationParams
    generator: torch.Generator | None  # None for greedy rows, which draw nothing
    constraint: TokenConstraint | None  # a grammar the reply must follow, or None

    @property
    def seen(self) -> torch.Tensor:
        """(T,) the prompt's and the reply's token ids so far."""

    @property
    def reply(self) -> torch.Tensor:
        """(R,) the reply's token ids so far."""


class TokenConstraint(Protocol):
    """Which tokens may come next (a grammar's matcher; see ``src/engine/grammar.py``)."""

    def fill_mask(self, bitmask: torch.Tensor) -> None:
        """Write the allowed tokens into ``bitmask``, (ceil(V / 32),) int32, one bit a token."""

    def advance(self, token_id: int) -> None:
        """The token was chosen: move past it."""


# A score processor changes (B, V) float32 scores in place for the rows it applies to.
ScoreProcessor = Callable[[torch.Tensor, Sequence[Row]], None]
# A candidate processor changes (S, K) candidate scores of the sampled rows in place (sorted,
# largest first; -inf for a candidate that was dropped).
CandidateProcessor = Callable[[torch.Tensor, Sequence[Row]], None]


# ---- score processors ----------------------------------------------------------------------


def repetition_penalty(scores: torch.Tensor, rows: Sequence[Row]) -> None:
    """CTRL (Keskar et al., 2019): make every token seen so far less likely. Positive scores
    are divided by the penalty and negative ones multiplied, so the token always moves towards
    "less likely" whatever the sign. A token seen twice is penalised once.

    One pass for the whole batch: the rows' seen ids become positions in the flattened (B * V)
    scores."""
    penalised = [index for index, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    penalised = [index for index in penalised if rows[index].seen.numel()]
    if not penalised:
        return
    lengths = torch.tensor([rows[index].seen.numel() for index in penalised])
    vocabulary = scores.shape[-1]
    offsets = torch.repeat_interleave(torch.tensor(penalised) * vocabulary, lengths)
    positions = torch.cat([rows[index].seen for index in penalised]) + offsets
    penalty = torch.repeat_interleave(
        torch.tensor(
            [rows[index].params.repetition_penalty for index in penalised], dtype=scores.dtype
        ),
        lengths,
    )
    flat = scores.view(-1)
    seen = flat.gather(0, positions)
    flat.scatter_(0, positions, torch.where(seen < 0, seen * penalty, seen / penalty))


def presence_and_frequency_penalty(scores: torch.Tensor, rows: Sequence[Row]) -> None:
    """OpenAI's definitions: a token already in the reply loses ``presence_penalty`` once and
    ``frequency_penalty`` for every time it appears there. The prompt does not count."""
    for index, row in enumerate(rows):
        presence, frequency = row.params.presence_penalty, row.params.frequency_penalty
        if (presence == 0.0 and frequency == 0.0) or not row.reply.numel():
            continue
        counts = torch.bincount(row.reply, minlength=scores.shape[-1])[: scores.shape[-1]]
        counts = counts.to(scores.dtype)
        scores[index] -= counts * frequency + (counts > 0).to(scores.dtype) * presence


def logit_bias(scores: torch.Tensor, rows: Sequence[Row]) -> None:
    """Add each row's bias to the logits of the tokens it names (-100 bans a token)."""
    for index, row in enumerate(rows):
        if row.params.logit_bias:
            token_ids = torch.tensor(list(row.params.logit_bias), dtype=torch.long)
            biases = torch.tensor(list(row.params.logit_bias.values()), dtype=scores.dtype)
            scores[index].index_add_(0, token_ids, biases)
            scores[index, token_ids[biases <= -100.0]] = float("-inf")  # banned, whatever else


def grammar_mask(scores: torch.Tensor, rows: Sequence[Row]) -> None:
    """Set every token a row's grammar forbids to -inf, so that whatever is chosen, the reply
    stays a prefix of something the grammar accepts. Rows without a grammar are untouched, so
    constrained and free requests share a batch."""
    constrained = [index for index, row in enumerate(rows) if row.constraint is not None]
    if not constrained:
        return
    vocabulary = scores.shape[-1]
    bitmask = torch.zeros(len(constrained), (vocabulary + 31) // 32, dtype=torch.int32)
    for position, index in enumerate(constrained):
        rows[index].constraint.fill_mask(bitmask[position])
    allowed = unpack_bitmask(bitmask, vocabulary)
    if not bool(allowed.any(dim=-1).all()):
        raise ValueError("the grammar allows no next token")
    for position, index in enumerate(constrained):  # in place, row by row: no copies
        scores[index].masked_fill_(~allowed[position], float("-inf"))


def unpack_bitmask(bitmask: torch.Tensor, vocabulary: int) -> torch.Tensor:
    """(R, ceil(V / 32)) int32 words -> (R, V) booleans: bit j of word w is token 32 * w + j."""
    bits = torch.arange(32, dtype=torch.int32)
    unpacked = (bitmask[:, :, None] >> bits) & 1  # (R, W, 32)
    return unpacked.reshape(bitmask.shape[0], -1)[:, :vocabulary].bool()


# ---- candidate processors ------------------------------------------------------------------


def temperature(candidates: torch.Tensor, rows: Sequence[Row]) -> None:
    """Divide by each row's temperature: below 1 sharpens the distribution, above 1 flattens."""
    # A greedy row (temperature 0, or do_sample off) keeps its scores as they are.
    temperatures = torch.tensor(
        [1.0 if row.params.is_greedy else row.params.temperature for row in rows],
        dtype=candidates.dtype,
    )
    candidates /= temperatures[:, None]


def top_k(candidates: torch.Tensor, rows: Sequence[Row]) -> None:
    """Keep each row's k likeliest candidates (k=0 keeps all). The candidates are as many as
    the largest k of the step, so a row with a smaller k drops the rest of its columns."""
    width = candidates.shape[-1]
    limits = torch.tensor([row.params.top_k or width for row in rows])
    beyond = torch.arange(width)[None, :] >= limits[:, None]
    candidates.masked_fill_(beyond, float("-inf"))


def top_p(candidates: torch.Tensor, rows: Sequence[Row]) -> None:
    """Nucleus sampling (Holtzman et al., 2019): keep the smallest set of candidates whose
    probabilities add up to at least p. The likeliest one is always kept."""
    masses = torch.tensor([row.params.top_p for row in rows], dtype=candidates.dtype)
    if bool((masses >= 1.0).all()):
        return
    probabilities = torch.softmax(candidates, dim=-1)
    before = probabilities.cumsum(dim=-1) - probabilities  # the mass of the likelier ones
    # Drop a candidate if the ones before it already reach p. Keep the first whatever p is: a
    # p below float32's smallest number (1e-300) rounds to 0, which would drop every token.
    drop = (before >= masses[:, None]) & (masses < 1.0)[:, None]  # p=1 keeps all: rounding
    drop[:, 0] = False
    candidates.masked_fill_(drop, float("-inf"))


def min_p(candidates: torch.Tensor, rows: Sequence[Row]) -> None:
    """Min-p sampling (Nguyen et al., 2024; vLLM's ``min_p``): drop candidates whose probability
    is below ``min_p`` times the likeliest one's, so the cut follows the model's confidence."""
    floors = torch.tensor([row.params.min_p for row in rows], dtype=candidates.dtype)
    if not bool((floors > 0).any()):
        return
    probabilities = torch.softmax(candidates, dim=-1)
    drop = probabilities < floors[:, None] * probabilities[:, :1]  # the first is the likeliest
    drop[:, 0] = False
    candidates.masked_fill_(drop, float("-inf"))


# ---- the pipeline --------------------------------------------------------------------------


class LogitsPipeline:
    """Turns a step's logits into next tokens: score processors, then the choice."""

    def __init__(
        self,
        score_processors: Sequence[ScoreProcessor] = (
            repetition_penalty,
            presence_and_frequency_penalty,
            logit_bias,
            grammar_mask,
        ),
        candidate_processors: Sequence[CandidateProcessor] = (temperature, top_k, top_p, min_p),
    ) -> None:
        self.score_processors = list(score_processors)
        self.candidate_processors = list(candidate_processors)

    def scores(self, logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
        """(B, V) float32 scores after the score processors (a copy: ``logits`` is left
        alone)."""
        scores = logits.float()
        if scores is logits:  # already float32: work on a copy
            scores = logits.clone()
        for processor in self.score_processors:
            processor(scores, rows)
        return scores

    def candidates(
        self, scores: torch.Tensor, rows: Sequence[Row], width: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampled rows' candidates: (S, K) processed scores, largest first (-inf where
        dropped), and their (S, K) token ids. K is the largest top-k of the rows, or
        ``width`` (the whole vocabulary, for ``distribution``)."""
        vocabulary = scores.shape[-1]
        if width is None:
            limits = [row.params.top_k for row in rows]
            width = vocabulary if 0 in limits else min(max(limits), vocabulary)
        values, token_ids = torch.topk(scores, width, dim=-1)  # sorted, largest first
        for processor in self.candidate_processors:
            processor(values, rows)
        return values, token_ids

    def distribution(self, logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
        """(B, V) log-probabilities each row would draw from if sampled (-inf for the tokens
        it cannot draw; a greedy row's are its scores after top-k and top-p): the reference
        the candidates are checked against, and what a notebook plots."""
        scores = self.scores(logits, rows)
        values, token_ids = self.candidates(scores, rows, width=scores.shape[-1])
        full = torch.full_like(scores, float("-inf")).scatter(1, token_ids, values)
        return torch.log_softmax(full, dim=-1)

    def next_tokens(self, logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
        """Each row's next token id from the step's last-position ``logits`` (B, V)."""
        scores = self.scores(logits, rows)
        chosen = [0] * len(rows)
        greedy = [index for index, row in enumerate(rows) if row.params.is_greedy]
        if greedy:
            for index, token in zip(greedy, scores[greedy].argmax(dim=-1).tolist(), strict=True):
                chosen[index] = token
        sampled = [index for index, row in enumerate(rows) if not row.params.is_greedy]
        if sampled:
            sampled_rows = [rows[index] for index in sampled]
            values, token_ids = self.candidates(scores[sampled], sampled_rows)
            drawn = draw(torch.softmax(values, dim=-1), sampled_rows)
            tokens = token_ids.gather(1, drawn[:, None]).squeeze(1).tolist()
            for index, token in zip(sampled, tokens, strict=True):
                chosen[index] = token
        return chosen


@dataclass(frozen=True)
class GeneratedToken:
    """A token the engine produced, with its log-probability under the model and the likeliest
    alternatives when the request asked for them (``logprob`` is None otherwise, and for the
    first token of a prompt, which nothing predicts). ``in_prompt``: one of the prompt's own
    tokens, scored for a request with ``prompt_logprobs`` (echo)."""

    token_id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), likeliest first
    in_prompt: bool = False


def token_logprobs(
    logits: torch.Tensor, token_ids: Sequence[int], top: Sequence[int], in_prompt: bool = False
) -> list[GeneratedToken]:
    """The chosen ``token_ids`` (one per row of ``logits``, (B, V)) with their log-probabilities
    under the model (log-softmax of the raw logits) and each row's ``top[row]`` alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(token_ids)[:, None]).squeeze(1).tolist()
    width = max(top, default=0)
    values, alternatives = torch.topk(logprobs, width, dim=-1) if width else (None, None)
    result = []
    for row, (token_id, logprob) in enumerate(zip(token_ids, chosen, strict=True)):
        best = ()
        if top[row]:
            pairs = zip(
                alternatives[row, : top[row]].tolist(),
                values[row, : top[row]].tolist(),
                strict=True,
            )
            best = tuple(pairs)
        result.append(GeneratedToken(token_id, logprob, best, in_prompt))
    return result


def draw(probabilities: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """One candidate index per row (S,), from (S, K) probabilities whose non-zero entries come
    first: a uniform number from the row's own generator, then the first candidate whose
    cumulative probability exceeds it. One number per token, so a seeded request draws the
    same tokens whatever else is in the batch."""
    uniform = torch.stack([torch.rand((), generator=row.generator) for row in rows])
    cumulative = probabilities.cumsum(dim=-1)
    index = (cumulative <= uniform[:, None] * cumulative[:, -1:]).sum(dim=-1)
    last_possible = (probabilities > 0).sum(dim=-1) - 1  # rounding must not pick a dropped one
    return torch.minimum(index, last_possible)


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

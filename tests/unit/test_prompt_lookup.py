"""Speculative decoding by prompt lookup (src/engine/prompt_lookup.py, the engine's
``_lookup_step``): drafts come from earlier n-grams, and a reply is token for token the one
plain decoding gives, greedy or sampled with a seed, constrained or not, with the same
log-probabilities, on transformers' models (DynamicCache) and ours (KVCache)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import src.engine.batching as batching
from src.chat.local import LocalBackend
from src.chat.service import ChatService
from src.engine.batching import BatchingEngine
from src.engine.prompt_lookup import draft_tokens
from src.models.quantize import quantize_model
from src.models.transformer import Transformer
from src.params import GenerationParams

pytestmark = [pytest.mark.unit, pytest.mark.timeout(180)]

GREEDY = GenerationParams(do_sample=False, repetition_penalty=1.0, max_new_tokens=48)
SAMPLED = GenerationParams(temperature=0.3, top_k=3, max_new_tokens=48, seed=3)
PENALISED = GREEDY.updated(repetition_penalty=1.3)
REPEATING = "Copy this exactly: the cat sat on the mat. the cat sat on the mat. the cat sat on"
NO_EOS = torch.tensor([], dtype=torch.long)
ROOT = Path(__file__).resolve().parents[2]


def test_a_draft_is_what_followed_the_last_ngram_earlier():
    seen = torch.tensor([5, 6, 7, 8, 9, 5, 6])
    assert draft_tokens(seen, 3, NO_EOS).tolist() == [7, 8, 9]
    assert draft_tokens(seen, 10, NO_EOS).tolist() == [7, 8, 9, 5, 6]  # up to the end
    assert draft_tokens(seen, 3, torch.tensor([8])).tolist() == [7]  # never past an EOS
    assert draft_tokens(torch.tensor([1, 2, 3, 4]), 3, NO_EOS).tolist() == []  # no match
    assert draft_tokens(seen, 0, NO_EOS).tolist() == []


def with_lookup(service: ChatService, model=None, tokens: int = 5) -> ChatService:
    """The service's model (or ``model``) behind an engine that drafts ``tokens`` a step."""
    plain = service.backend.engine
    engine = BatchingEngine(model or plain.model, plain.eos_token_ids, prompt_lookup_tokens=tokens)
    backend = LocalBackend(engine, service.backend.tokenizer, service.backend.context_window)
    return ChatService(backend, model_name="lookup")


def tokens_of(service: ChatService, params: GenerationParams, message: str = REPEATING):
    prompt = service.start_reply(service.new_conversation(), message, params).prompt.input_ids
    tokens = list(service.backend.engine.generate(prompt, params))
    return prompt, [(t.token_id, t.logprob) for t in tokens]


def oracle(prompt: list[int], reply: list[int], wrong_every: int):
    """A stand-in for the n-gram search that drafts the reply's true next tokens, except
    that every ``wrong_every``-th drafted position (0: none) is a wrong token."""

    def draft(seen: torch.Tensor, count: int, eos_token_ids: torch.Tensor) -> torch.Tensor:
        done = len(seen) - len(prompt)
        ahead = torch.tensor(reply[done : done + count], dtype=torch.long)
        if wrong_every:
            for index in range(len(ahead)):
                if (done + index) % wrong_every == 0:
                    ahead[index] = (ahead[index] + 1) % 100
        return ahead

    return draft


@pytest.mark.parametrize("model_kind", ["transformers", "ours", "ours, bf16 + int4"])
@pytest.mark.parametrize(
    "params",
    [GREEDY, SAMPLED, PENALISED, GREEDY.updated(logprobs=True, top_logprobs=3)],
    ids=["greedy", "sampled", "repetition_penalty", "logprobs"],
)
@pytest.mark.parametrize("wrong_every", [0, 3, 1], ids=["right", "partly_right", "all_wrong"])
def test_replies_are_the_same_as_without_drafts(
    tiny_llama_service, model_kind, params, wrong_every, monkeypatch
):
    """Drafts right, partly right and all wrong (the n-gram search replaced by an oracle, so
    every path is taken): the same tokens and log-probabilities as plain decoding, in fewer
    passes when the drafts are right."""
    plain = tiny_llama_service
    model = None
    if model_kind != "transformers":
        model = Transformer.from_hf(plain.backend.engine.model)
        if model_kind == "ours, bf16 + int4":  # the default's layers: int8 output layer too
            model = quantize_model(model.to(torch.bfloat16), "int4")
        plain = with_lookup(plain, model, tokens=0)
    drafting = with_lookup(plain, model)
    prompt, expected = tokens_of(plain, params)
    reply = [t for t, _ in expected]
    monkeypatch.setattr(batching, "draft_tokens", oracle(prompt, reply, wrong_every))
    _, got = tokens_of(drafting, params)
    assert [t for t, _ in got] == reply
    if params.logprobs:
        # Ours computes each drafted position as a one-token step would (src/models/
        # single_steps.py): with int4 layers (products row by row) the very same numbers.
        # Dense fp32 products of several rows round differently from one row's.
        tolerance = 0.0 if "int4" in model_kind else 1e-4
        assert torch.allclose(
            torch.tensor([p for _, p in got]),
            torch.tensor([p for _, p in expected]),
            rtol=0.0,
            atol=tolerance,
        )
    stats = drafting.backend.engine.stats
    assert stats.drafted > 0
    if wrong_every == 1:
        assert stats.accepted == 0
    else:
        assert stats.accepted > 0 and stats.steps < len(reply) - 1
    if wrong_every == 0:  # five drafted tokens and one of the model's own per pass
        assert stats.steps <= len(reply) // 6 + 1


def test_the_ngram_search_drafts_from_a_repeating_prompt(tiny_llama_service):
    drafting = with_lookup(tiny_llama_service)
    _, expected = tokens_of(tiny_llama_service, GREEDY)
    _, got = tokens_of(drafting, GREEDY)
    assert got == expected and drafting.backend.engine.stats.drafted > 0


@pytest.mark.parametrize("wrong_every", [0, 3], ids=["right", "partly_right"])
def test_a_constrained_reply_is_the_same_as_without_drafts(
    tiny_llama_service, wrong_every, monkeypatch
):
    """The grammar advances token by token through accepted drafts as in plain decoding."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}},
        "required": ["name"],
    }
    params = GREEDY.updated(response_format={"type": "json_schema", "json_schema": schema})
    engine, reply_ids = tiny_llama_service.backend.engine, []
    original = engine.generate

    def recorded(*args, **kwargs):
        for token in original(*args, **kwargs):
            reply_ids.append(token.token_id)
            yield token

    monkeypatch.setattr(engine, "generate", recorded)
    start = tiny_llama_service.start_reply(tiny_llama_service.new_conversation(), REPEATING, params)
    expected = start.complete().text
    drafting = with_lookup(tiny_llama_service)
    oracle_drafts = oracle(start.prompt.input_ids, reply_ids, wrong_every)
    monkeypatch.setattr(batching, "draft_tokens", oracle_drafts)
    got = drafting.start_reply(drafting.new_conversation(), REPEATING, params).complete().text
    assert got == expected and drafting.backend.engine.stats.accepted > 0


def test_rows_of_a_batch_do_not_draft(tiny_llama_service):
    drafting = with_lookup(tiny_llama_service)
    engine = drafting.backend.engine
    with drafting.backend.together():
        streams = [
            drafting.start_reply(drafting.new_conversation(), REPEATING, GREEDY) for _ in range(2)
        ]
    texts = {s.complete().text for s in streams}
    assert len(texts) == 1 and engine.stats.rows_decoded > engine.stats.steps
    assert engine.stats.drafted == 0


def test_the_engine_imports_transformers_only_to_draft():
    """The default engine starts without transformers (a second of start-up); an engine that
    drafts imports its n-gram search when it is made, not in the middle of a reply."""
    script = (
        "import sys\n"
        "from src.engine.batching import BatchingEngine\n"
        "from src.stack import build_chat_stack\n"
        "assert 'transformers' not in sys.modules\n"
        "from src.models.transformer import Transformer, TransformerConfig\n"
        "config = TransformerConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=64,"
        " intermediate_size=128, positions='rope', norm='rmsnorm', mlp='swiglu',"
        " max_position_embeddings=64)\n"
        "BatchingEngine(Transformer(config), frozenset(), background=False)\n"
        "assert 'transformers' not in sys.modules\n"
        "BatchingEngine(Transformer(config), frozenset(), background=False,"
        " prompt_lookup_tokens=4)\n"
        "assert 'transformers' in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr

"""The bundled model as served by default (ENGINE=auto -> scratch, PRECISION=auto -> bf16,
QUANTIZE=auto -> int4): the layers really are 4-bit, the replies are right, batching is
unchanged, held-out perplexity stays within the issue's 2% of the exact fp32 model, and the
prepared-model cache is used, checked and rebuilt."""

import pytest
import torch

from src.models.perplexity import held_out_perplexity
from src.models.prepared import load_prepared_transformer, prepared_path
from src.models.quantize import Int4Linear, Int8Linear
from src.models.transformer import Transformer
from src.params import GenerationParams
from src.stack import build_service
from src.training.calibration import calibration_examples
from tests.batching_helpers import alone_and_together, assert_same_up_to_a_near_tie, prompts_for
from tests.conftest import bundled_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

GREEDY = GenerationParams(do_sample=False, max_new_tokens=24)
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?"]


def test_default_service_runs_the_scratch_engine_with_int4_layers_in_bf16(bundled_service):
    model = bundled_service.backend.engine.model
    assert isinstance(model, Transformer)
    assert isinstance(model.blocks[0].attention.qkv, Int4Linear)
    assert isinstance(model.blocks[-1].mlp.down, Int4Linear)
    assert isinstance(model.lm_head, Int8Linear)
    assert model.token_embedding.weight.dtype == torch.bfloat16
    reply = bundled_service.reply(bundled_service.new_conversation(), QUESTIONS[0], GREEDY)
    assert "Paris" in reply.text


@pytest.mark.slow  # about 20 s: ENGINE=hf loads and quantises transformers' model
def test_engine_hf_quantises_the_transformers_model_too(bundled_model_path):
    settings = bundled_settings()
    service = build_service(settings, engine_name="hf")
    model = service.backend.engine.model
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int4Linear)
    assert isinstance(model.lm_head, Int8Linear)
    reply = service.reply(service.new_conversation(), QUESTIONS[0], GREEDY)
    assert "Paris" in reply.text


@pytest.mark.slow  # 84 s on an AVX2 CPU; make bench and QUANTIZE=auto measure it too
def test_int4_perplexity_is_within_two_percent_of_fp32(bundled_service, bundled_exact_service):
    held_out = calibration_examples(bundled_exact_service.backend.tokenizer, conversations=12)
    exact = held_out_perplexity(bundled_exact_service.backend.engine.model, held_out)
    quantized = held_out_perplexity(bundled_service.backend.engine.model, held_out)
    assert abs(quantized - exact) / exact < 0.02, (exact, quantized)


def test_default_engine_batches_like_one_request_at_a_time(bundled_service):
    prompts = prompts_for(bundled_service, QUESTIONS, GREEDY)
    alone, together, engine = alone_and_together(bundled_service, prompts, GREEDY)
    for prompt, reference, batched in zip(prompts, alone, together, strict=True):
        assert_same_up_to_a_near_tie(
            bundled_service.backend.engine.model, prompt, reference, batched
        )
    assert engine.stats.prefill_passes == 1
    assert engine.stats.rows_decoded > engine.stats.steps


def test_the_prepared_model_is_cached_reused_and_rebuilt_when_damaged(
    bundled_model_path, tmp_path, monkeypatch
):
    built = load_prepared_transformer(bundled_model_path, torch.bfloat16, "int4", tmp_path)
    path = prepared_path(bundled_model_path, torch.bfloat16, "int4", tmp_path)
    assert path.is_file() and path.stat().st_size < 200e6  # about 150 MB, not 517 MB
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        expected = built(ids).logits

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the prepared file should have been read")

    with monkeypatch.context() as patch:
        patch.setattr(Transformer, "from_folder", no_rebuild)
        reused = load_prepared_transformer(bundled_model_path, torch.bfloat16, "int4", tmp_path)
    with torch.no_grad():
        assert torch.equal(reused(ids).logits, expected)

    path.write_bytes(b"not a safetensors file")  # damaged: rebuilt, not an error
    rebuilt = load_prepared_transformer(bundled_model_path, torch.bfloat16, "int4", tmp_path)
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, expected)
    assert path.stat().st_size > 1e6
    # Another setting is another file, and so is another CPU's packing of int4 weights.
    assert prepared_path(bundled_model_path, torch.float32, "none", tmp_path) != path
    assert torch.backends.cpu.get_cpu_capability().lower() in path.name
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "OTHER")
    assert prepared_path(bundled_model_path, torch.bfloat16, "int4", tmp_path) != path


def test_the_next_turn_reuses_the_conversation_so_far(bundled_service, bundled_model_path):
    """With the default PREFIX_CACHE_MB, a second turn runs only its new tokens through the
    model, and its reply starts as it does without the cache."""
    cache = bundled_service.backend.engine.prefix_cache
    conversation = bundled_service.new_conversation()
    first = bundled_service.start_reply(conversation, "Name three colours.", GREEDY)
    first.complete()
    reused_before = cache.tokens_reused
    second = bundled_service.start_reply(conversation, "And three animals?", GREEDY)
    prompt = second.prompt.input_ids
    second.abandon()  # (the engine is asked directly, for token ids)
    cached = list(bundled_service.backend.engine.generate_token_ids(prompt, GREEDY))
    # The whole first prompt and the start of its reply (as re-encoded in the history).
    assert cache.tokens_reused - reused_before > len(first.prompt.input_ids) + 5

    uncached = build_service(bundled_settings(prefix_cache_mb=0))
    assert uncached.backend.engine.prefix_cache is None
    expected = list(uncached.backend.engine.generate_token_ids(prompt, GREEDY))
    assert_same_up_to_a_near_tie(uncached.backend.engine.model, prompt, expected, cached)


def test_the_near_tie_check_refuses_a_reply_that_is_really_different(bundled_service):
    """The check above must not pass anything: another question's reply, or a reply with
    one wrong token, leaves the reference where its logits are far apart."""
    model = bundled_service.backend.engine.model
    prompts = prompts_for(bundled_service, QUESTIONS[:2], GREEDY)
    replies = [list(bundled_service.backend.engine.generate_token_ids(p, GREEDY)) for p in prompts]
    with pytest.raises(AssertionError, match="below it"):
        assert_same_up_to_a_near_tie(model, prompts[0], replies[0], replies[1])
    wrong = replies[0][:3] + [replies[0][3] + 1] + replies[0][4:]
    with pytest.raises(AssertionError, match="below it"):
        assert_same_up_to_a_near_tie(model, prompts[0], replies[0], wrong)

"""The from-scratch transformer on the real bundled SmolLM2 (30 layers, GQA, RoPE, SwiGLU):
exact against Hugging Face, and serving chat through the same engines."""

import pytest
import torch

from src.errors import ModelLoadingError
from src.models.bundled import BUNDLED_MODEL_NAME
from src.models.transformer import Transformer
from src.params import GenerationParams
from src.stack import build_service
from tests.batching_helpers import alone_and_together, prompts_for
from tests.conftest import EXACT, bundled_settings
from tests.integration.conftest import run_python

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?"]
GREEDY = GenerationParams(do_sample=False, max_new_tokens=32)


@pytest.fixture(scope="module")
def scratch_service(bundled_model_path):
    settings = bundled_settings(**EXACT)
    return build_service(settings, engine_name="scratch")


def test_logits_equal_hugging_face_on_the_bundled_model(bundled_exact_service):
    hf = bundled_exact_service.backend.engine.model
    ours = Transformer.from_hf(hf)
    tokenizer = bundled_exact_service.backend.tokenizer
    encoded = [tokenizer.encode(q) for q in QUESTIONS]
    length = max(map(len, encoded))
    ids = torch.tensor([[2] * (length - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (length - len(e)) + [1] * len(e) for e in encoded])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        actual = ours(ids, attention_mask=mask).logits
    assert (actual - expected)[mask.bool()].abs().max() < 1e-4


def test_greedy_32_tokens_equal_hugging_face(bundled_exact_service):
    hf = bundled_exact_service.backend.engine.model
    ours = Transformer.from_hf(hf)
    stop = bundled_exact_service.backend.engine.eos_token_ids
    for question in QUESTIONS:
        prompt = bundled_exact_service.start_reply(
            bundled_exact_service.new_conversation(), question, GREEDY
        ).prompt.input_ids
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
        assert list(ours.generate(prompt, 32, stop_token_ids=stop)) == (
            expected[0, len(prompt) :].tolist()
        )


def test_engine_scratch_gives_the_same_replies_as_the_default_engine(
    bundled_exact_service, scratch_service
):
    assert scratch_service.backend.engine.model.__class__ is Transformer
    for question in QUESTIONS:
        exact = bundled_exact_service
        default = exact.reply(exact.new_conversation(), question, GREEDY)
        scratch = scratch_service.reply(scratch_service.new_conversation(), question, GREEDY)
        assert scratch.text == default.text


def test_scratch_model_batches_like_one_request_at_a_time(scratch_service):
    prompts = prompts_for(scratch_service, QUESTIONS, GREEDY)
    alone, together, engine = alone_and_together(scratch_service, prompts, GREEDY)
    assert together == alone
    assert engine.stats.prefill_passes == 1  # the three prompts were prefilled in one pass
    assert engine.stats.rows_decoded > engine.stats.steps  # some steps decoded several requests


def test_cli_engine_flag(bundled_model_path):
    result = run_python(
        ["src/mvp_chatbot.py", "--model", BUNDLED_MODEL_NAME, "--engine", "scratch"],
        stdin="What is the capital of France?\n",
        DO_SAMPLE="false",
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_scratch_engine_refuses_adapters(bundled_model_path, tmp_path):
    settings = bundled_settings(
        engine="scratch",
    )
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(bundled_model_path)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadingError, match="LoRA adapters need ENGINE=hf"):
        build_service(settings, adapter_path=tmp_path)

"""The from-scratch transformer on the real bundled SmolLM2 (30 layers, GQA, RoPE, SwiGLU):
exact against Hugging Face, and serving chat through the same engines."""

import pytest
import torch

from src.benchmarks.adapters import make_random_adapters
from src.models.bundled import BUNDLED_MODEL_NAME
from src.models.transformer import Transformer
from src.params import GenerationParams
from src.stack import build_chat_stack, build_service
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


@pytest.mark.slow  # the engine test below compares the same replies
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


@pytest.mark.slow  # test_quantized_model checks the default engine
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


@pytest.mark.slow  # two fp32 copies of the model and peft; tests/unit/test_lora_view.py is quick
def test_scratch_engine_runs_an_adapter_as_peft_does(bundled_model_path, tmp_path):
    make_random_adapters(bundled_model_path, tmp_path, 1)
    peft = build_service(bundled_settings(**EXACT), adapter_path=tmp_path / "random-0")
    scratch_settings = bundled_settings(**{**EXACT, "engine": "scratch"})
    ours = build_service(scratch_settings, adapter_path=tmp_path / "random-0")
    assert ours.backend.engine.model.__class__ is Transformer
    for question in QUESTIONS:
        expected = peft.reply(peft.new_conversation(), question, GREEDY)
        assert ours.reply(ours.new_conversation(), question, GREEDY).text == expected.text


def test_random_adapters_depend_on_their_seed_only(bundled_model_path, tmp_path):
    """Load tests and the test below get the same adapters whatever ran before them."""
    for run in ("first", "second"):
        torch.manual_seed(len(run))  # a different global state each time
        make_random_adapters(bundled_model_path, tmp_path / run, 1)
    weights = [(tmp_path / run / "random-0" / "adapter_model.safetensors").read_bytes()
               for run in ("first", "second")]  # fmt: skip
    assert weights[0] == weights[1]


def test_adapters_picked_by_name_share_the_base_weights(bundled_model_path, tmp_path):
    """The default server (int4 weights): each adapter adds its A and B, nothing else."""
    make_random_adapters(bundled_model_path, tmp_path, 2)
    stack = build_chat_stack(bundled_settings(adapters_dir=tmp_path), background=False)
    base = stack.service.backend.engine.model
    base_storage = {t.data_ptr() for t in [*base.parameters(), *base.buffers()]}
    replies = {}
    for name in (None, "random-0", "random-1"):
        service = stack.adapters.get(name)
        model = service.backend.engine.model
        added = [t for t in [*model.parameters(), *model.buffers()]
                 if t.data_ptr() not in base_storage]  # fmt: skip
        assert sum(t.nbytes for t in added) < 10 * 2**20  # A and B: about 5 MB
        replies[name] = service.reply(service.new_conversation(), QUESTIONS[2], GREEDY).text
    assert len(set(replies.values())) == 3  # each adapter changes the reply its own way
    stack.close()

"""Issue 7, "Security", below the HTTP layer: how keys are read and compared, session ids,
the request-limit settings, trust_remote_code, and pickle weights refused without an opt-in.
(tests/integration/test_security.py tests the same protections over HTTP.)"""

from __future__ import annotations

import ast
import base64
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch

from src.chat.conversation import is_session_id, new_conversation_id
from src.config import REPO_ROOT, load_settings
from src.errors import ConfigError, ModelLoadingError
from src.models.loader import download_from_hub, load_model
from src.web import security
from src.web.errors import HTTPProblem
from src.web.security import ClientSlots, is_browser_path, key_accepted, presented_keys
from tests.unit.test_loader import fake_hub_with

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

KEY = load_settings(api_key="the-key").api_key


# ---- API key -------------------------------------------------------------------------------


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("headers", "accepted"),
    [
        ({"authorization": "Bearer the-key"}, True),
        ({"authorization": "BEARER   the-key  "}, True),
        ({"x-api-key": "the-key"}, True),
        ({"authorization": basic("anyone", "the-key")}, True),
        ({"authorization": basic("", "the-key")}, True),
        ({"authorization": basic("the-key", "")}, False),
        ({"authorization": "Bearer wrong", "x-api-key": "the-key"}, True),
        ({}, False),
        ({"authorization": "Bearer "}, False),
        ({"authorization": "the-key"}, False),
        ({"authorization": "Bearer the-key2"}, False),
        ({"authorization": "Bearer the-ke"}, False),
        ({"authorization": "Bearer THE-KEY"}, False),
        ({"authorization": "Basic %%%"}, False),
        ({"authorization": "Basic " + base64.b64encode(b"\xff\xfe:x").decode()}, False),
        ({"x-api-key": ""}, False),
        ({"cookie": "api_key=the-key"}, False),
    ],
)
def test_which_credentials_are_accepted(headers, accepted):
    assert key_accepted(headers, KEY) is accepted


def test_without_a_key_everything_is_accepted():
    assert key_accepted({}, None)


def test_keys_are_compared_in_constant_time(monkeypatch):
    compared = []
    real = security.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    assert key_accepted({"authorization": "Bearer nope", "x-api-key": "the-key"}, KEY)
    # Every presented key went through compare_digest (no early exit on the first match).
    assert compared == [(b"nope", b"the-key"), (b"the-key", b"the-key")]
    assert presented_keys({"authorization": "Bearer nope", "x-api-key": "the-key"}) == [
        "nope",
        "the-key",
    ]


def test_a_blank_api_key_is_refused():
    for blank in ("", "   "):
        with pytest.raises(ConfigError, match="API_KEY.*must not be blank"):
            load_settings(api_key=blank)


def test_a_non_ascii_api_key_is_refused_at_start_up():
    # Headers are read as Latin-1, so "clé" could never be sent as a Bearer or X-API-Key.
    with pytest.raises(ConfigError, match="API_KEY.*must be ASCII"):
        load_settings(api_key="clé-secrète")


def test_browser_paths_are_the_ui_and_the_docs():
    for path in ("/ui", "/ui/", "/ui/gradio_api/queue/join", "/docs", "/redoc", "/openapi.json"):
        assert is_browser_path(path), path
    for path in ("/chat", "/v1/models", "/uix", "/sessions/ui", "/health"):
        assert not is_browser_path(path), path


def test_the_standalone_ui_asks_for_the_key_when_one_is_set(monkeypatch):
    """``python src/web_app.py`` (no API in front) hands the key to Gradio's login."""
    import gradio

    import src.stack
    import src.web_app
    from src.chat.adapter_pool import AdapterPool

    def fake_stack(settings, *args, **kwargs):
        service = FakeService()
        return src.stack.ChatStack(service, AdapterPool(service, settings.adapters_dir, None), None)

    launched = {}
    monkeypatch.setenv("API_KEY", "the-key")
    monkeypatch.setattr(src.stack, "build_chat_stack", fake_stack)
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs))
    assert src.web_app.main(["--port", "7999"]) == 0
    auth = launched["auth"]
    assert auth("anyone", "the-key") is True
    assert auth("anyone", "wrong") is False and auth("the-key", "") is False
    assert src.web_app.login_check(None) is None  # no key: no login


class FakeService:
    """Just enough of a ChatService for build_ui (nothing is generated)."""

    model_name = "fake"
    supports_system_prompt = True

    def __init__(self) -> None:
        from src.params import GenerationParams

        self.default_params = GenerationParams()
        self.backend = type("Backend", (), {"kind": "local"})()

    def close(self) -> None:
        pass


# ---- sessions ------------------------------------------------------------------------------


def test_session_ids_are_128_random_bits_from_secrets():
    ids = {new_conversation_id() for _ in range(2000)}
    assert len(ids) == 2000
    for session_id in list(ids)[:50]:
        assert is_session_id(session_id)
        assert len(base64.urlsafe_b64decode(session_id + "==")) == 16  # 128 bits


def test_session_ids_come_from_the_secrets_module(monkeypatch):
    import src.chat.conversation as conversation

    fake = {16: "S" * 22}  # only 16 bytes (128 bits) gives an id
    monkeypatch.setattr(conversation.secrets, "token_urlsafe", lambda n: fake.get(n, ""))
    assert new_conversation_id() == "S" * 22


@pytest.mark.parametrize(
    "value", [None, 42, "", "A" * 21, "A" * 23, "A" * 21 + "=", "A" * 21 + "/", "é" * 22]
)
def test_malformed_session_ids(value):
    assert not is_session_id(value)


# ---- limits --------------------------------------------------------------------------------


def test_limit_defaults():
    settings = load_settings()
    assert settings.max_message_chars == 16_000
    assert settings.max_history_messages == 200
    assert settings.max_length == 512  # the most tokens one reply may have
    assert settings.max_body_bytes == 1_000_000
    assert settings.max_streams_per_client == 16
    assert settings.trust_remote_code is False and settings.allow_pickle is False
    assert settings.api_key is None


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("MAX_HISTORY_MESSAGES", "0", "greater than or equal to 1"),
        ("MAX_HISTORY_MESSAGES", "many", "valid integer"),
        ("MAX_LENGTH", "0", "greater than or equal to 1"),
        ("MAX_LENGTH", "5000", "less than or equal to 1024"),
        ("MAX_STREAMS_PER_CLIENT", "0", "greater than or equal to 1"),
        ("MAX_MESSAGE_CHARS", "0", "greater than or equal to 1"),
        ("MAX_BODY_BYTES", "10", "greater than or equal to 1000"),
        ("ALLOW_PICKLE", "perhaps", "valid boolean"),
    ],
)
def test_limit_settings_are_validated(monkeypatch, variable, value, allowed):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert variable in str(error.value) and value in str(error.value)
    assert allowed in str(error.value)


def test_the_default_max_new_tokens_must_fit_max_length(monkeypatch):
    monkeypatch.setenv("MAX_LENGTH", "64")
    with pytest.raises(ConfigError, match=r"MAX_NEW_TOKENS=128 is over MAX_LENGTH=64") as error:
        load_settings()
    assert error.value.field == "MAX_NEW_TOKENS"
    monkeypatch.setenv("MAX_NEW_TOKENS", "64")
    assert load_settings().max_length == 64


def test_the_renamed_max_new_tokens_limit_is_refused_not_ignored(monkeypatch, tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("MAX_LENGTH=256\nMAX_NEW_TOKENS_LIMIT=1024\n")  # an old .env.example
    with pytest.raises(ConfigError, match="MAX_NEW_TOKENS_LIMIT is now MAX_LENGTH") as error:
        load_settings(_env_file=dotenv)
    assert error.value.field == "MAX_NEW_TOKENS_LIMIT"
    monkeypatch.setenv("MAX_NEW_TOKENS_LIMIT", "2048")
    with pytest.raises(ConfigError, match="MAX_NEW_TOKENS_LIMIT is now MAX_LENGTH"):
        load_settings()


def test_client_slots_count_per_client_and_release_once():
    slots = ClientSlots(2)
    first, second = slots.acquire("a"), slots.acquire("a")
    with pytest.raises(HTTPProblem) as refused:
        slots.acquire("a")
    assert refused.value.status == 429 and "MAX_STREAMS_PER_CLIENT" in refused.value.message
    other = slots.acquire("b")  # another client has its own slots
    first.release()
    first.release()  # a second release changes nothing
    assert slots.active("a") == 1
    with slots.hold("a"):
        assert slots.active("a") == 2
    assert slots.active("a") == 1
    second.release()
    other.release()
    assert slots.active("a") == slots.active("b") == 0


# ---- trust_remote_code and pickle ----------------------------------------------------------


@pytest.fixture()
def from_pretrained_calls(monkeypatch):
    """The keyword arguments every transformers from_pretrained call gets (calls go through)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, real=real, name=cls.__name__, **kwargs):
            calls.append((name, kwargs))
            return real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


def test_trust_remote_code_is_off_unless_the_operator_sets_it(
    tiny_gpt2_path, from_pretrained_calls
):
    load_model(load_settings(model_name=str(tiny_gpt2_path)))
    assert len(from_pretrained_calls) == 2
    for _name, kwargs in from_pretrained_calls:
        assert kwargs["trust_remote_code"] is False
    model_kwargs = dict(from_pretrained_calls)["AutoModelForCausalLM"]
    assert model_kwargs["use_safetensors"] is True  # transformers may not pick a .bin either
    from_pretrained_calls.clear()
    load_model(load_settings(model_name=str(tiny_gpt2_path), trust_remote_code=True))
    assert all(kwargs["trust_remote_code"] is True for _, kwargs in from_pretrained_calls)


@pytest.fixture()
def pickle_only_model(tmp_path, tiny_gpt2_path) -> Path:
    """The tiny GPT-2 with its weights as pytorch_model.bin (a pickle) and no safetensors."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pickle-model"
    shutil.copytree(tiny_gpt2_path, folder)
    state = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).state_dict()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_weights_are_refused_without_the_opt_in(pickle_only_model, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load ran on a pickle without ALLOW_PICKLE")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", no_unpickling)
        with pytest.raises(ModelLoadingError) as error:
            load_model(load_settings(model_name=str(pickle_only_model)))
    message = str(error.value)
    assert "pytorch_model.bin" in message and "ALLOW_PICKLE=true" in message
    assert str(pickle_only_model) in message
    loaded = load_model(load_settings(model_name=str(pickle_only_model), allow_pickle=True))
    assert loaded.source == "local"


def test_the_hub_is_not_asked_for_pickle_weights_without_the_opt_in(
    tmp_path, tiny_gpt2_path, monkeypatch
):
    source = tmp_path / "pickle-repo"
    shutil.copytree(tiny_gpt2_path, source)
    (source / "model.safetensors").unlink()
    (source / "pytorch_model.bin").write_bytes(b"stand-in")
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub_with(source, calls))
    settings = load_settings(model_cache_dir=tmp_path / "cache")
    with pytest.raises(ModelLoadingError, match=r"'someone/pickle-only'.*ALLOW_PICKLE=true"):
        download_from_hub("someone/pickle-only", settings.model_cache_dir, settings)
    assert len(calls) == 1 and not any(p.endswith(".bin") for p in calls[0])


def test_pickle_adapters_are_refused_without_the_opt_in(tiny_gpt2_path, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    adapter = tmp_path / "adapter"
    get_peft_model(base, config).save_pretrained(adapter, safe_serialization=False)
    assert (adapter / "adapter_model.bin").is_file()
    assert not (adapter / "adapter_model.safetensors").exists()
    settings = load_settings(model_name=str(tiny_gpt2_path))
    with pytest.raises(ModelLoadingError, match=r"adapter_model.bin.*ALLOW_PICKLE=true"):
        load_model(settings, adapter_path=adapter)
    allowed = settings.model_copy(update={"allow_pickle": True})
    assert load_model(allowed, adapter_path=adapter).adapter == adapter


def python_files() -> list[Path]:
    return [
        path for folder in ("src", "scripts") for path in sorted((REPO_ROOT / folder).rglob("*.py"))
    ]


def test_no_code_unpickles_without_weights_only():
    """torch.load only with weights_only=True, and no pickle module at all, in src/ and
    scripts/ (a check that fails as soon as someone adds one)."""
    problems = []
    for path in python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [alias.name for alias in node.names]
                module = getattr(node, "module", None) or ""
                if {"pickle", "cPickle", "dill"} & {module, *names}:
                    problems.append(f"{path}:{node.lineno}: imports pickle")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                safe = weights_only and isinstance(weights_only[0].value, ast.Constant)
                if not (safe and weights_only[0].value.value is True):
                    problems.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
    assert problems == []


async def test_a_streams_slot_is_free_as_soon_as_its_client_disconnects():
    """Before its generation has stopped (which takes up to a token), the slot is back."""
    import asyncio

    from src.web.security import ClientSlots, SlotStreamingResponse

    slots = ClientSlots(limit=1)
    seen_in_finally: list[int] = []

    async def events():
        try:
            yield "data: first\n\n"
            await asyncio.Event().wait()  # a reply still being generated
        finally:
            seen_in_finally.append(slots.active("client"))

    response = SlotStreamingResponse(events(), slots.acquire("client"))
    messages = iter([{"type": "http.disconnect"}])

    async def receive():
        await asyncio.sleep(0.01)
        return next(messages)

    async def send(message):
        pass

    # uvicorn speaks ASGI 2.3: Starlette then listens for the disconnect (as in production)
    await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
    assert seen_in_finally == [0] and slots.active("client") == 0


def test_sessions_are_listed_to_the_key_holder_or_on_an_open_server_to_this_machine():
    from pydantic import SecretStr

    from src.web.security import may_list_sessions

    key = SecretStr("k")
    assert may_list_sessions("203.0.113.5", key) and may_list_sessions(None, key)
    for local in ("127.0.0.1", "127.8.0.1", "::1", "localhost"):
        assert may_list_sessions(local, None), local
    for remote in ("203.0.113.5", "10.0.0.2", "::ffff:8.8.8.8", "testclient", None):
        assert not may_list_sessions(remote, None), remote

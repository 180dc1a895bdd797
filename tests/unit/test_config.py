from pathlib import Path

import pytest

from src.config import load_settings
from src.errors import ConfigError

pytestmark = pytest.mark.unit


def test_defaults_follow_the_brief():
    settings = load_settings()
    assert settings.model_name == "microsoft/DialoGPT-medium"
    assert settings.model_cache_dir == Path("./models")
    assert settings.max_length == 512
    assert (settings.api_host, settings.api_port, settings.debug) == ("0.0.0.0", 8000, False)
    # Unset: training takes configs/lora_default.yaml's (tests/unit/test_training_config.py).
    assert (settings.batch_size, settings.learning_rate, settings.lora_rank) == (None,) * 3
    assert settings.huggingface_token is None
    assert settings.model_fallback == "bundled"
    assert settings.trust_remote_code is False


def test_environment_variables_are_read(monkeypatch):
    monkeypatch.setenv("MODEL_NAME", "smollm2-135m-instruct")
    monkeypatch.setenv("MAX_LENGTH", "1024")
    monkeypatch.setenv("TEMPERATURE", "0.2")
    monkeypatch.setenv("DO_SAMPLE", "false")
    monkeypatch.setenv("HUGGINGFACE_TOKEN", "hf_secret")
    settings = load_settings()
    assert settings.model_name == "smollm2-135m-instruct"
    assert settings.max_length == 1024
    params = settings.generation_defaults()
    assert params.temperature == 0.2 and params.do_sample is False
    assert "hf_secret" not in repr(settings)  # the token is a secret, never printed


def test_dotenv_file_is_read_and_empty_values_mean_unset(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("MAX_LENGTH=256\nADAPTER_PATH=\nSEED=\n")
    monkeypatch.chdir(tmp_path)
    settings = load_settings(_env_file=".env")
    assert settings.max_length == 256
    assert settings.adapter_path is None
    assert settings.seed is None


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("MAX_LENGTH", "5000", "less than or equal to 1024"),
        ("MAX_LENGTH", "0", "greater than or equal to 1"),
        ("API_PORT", "http", "valid integer"),
        ("MODEL_FALLBACK", "maybe", "'bundled' or 'none'"),
        ("TEMPERATURE", "-1", "greater than or equal to 0"),
        ("TOP_P", "1.5", "less than or equal to 1"),
        ("LEARNING_RATE", "0", "greater than 0"),
        ("DEBUG", "perhaps", "valid boolean"),
    ],
)
def test_invalid_value_names_variable_value_and_what_is_allowed(
    monkeypatch, variable, value, allowed
):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    message = str(error.value)
    assert variable in message
    assert value in message
    assert allowed in message


def test_the_backend_is_local_unless_told_otherwise():
    settings = load_settings()
    assert settings.backend == "local" and settings.remote_base_url is None
    assert settings.remote_model is None and settings.remote_api_key is None
    assert settings.remote_timeout == 60.0


def test_remote_backend_settings_are_read(monkeypatch):
    monkeypatch.setenv("BACKEND", "remote")
    monkeypatch.setenv("REMOTE_BASE_URL", "https://gpu-box.example:8443/v1/")
    monkeypatch.setenv("REMOTE_MODEL", "meta-llama/Llama-3.1-8B-Instruct")
    monkeypatch.setenv("REMOTE_API_KEY", "sk-remote-secret")
    monkeypatch.setenv("REMOTE_TIMEOUT", "12.5")
    settings = load_settings()
    assert settings.backend == "remote"
    assert settings.remote_base_url == "https://gpu-box.example:8443/v1"  # no trailing slash
    assert settings.remote_model == "meta-llama/Llama-3.1-8B-Instruct"
    assert settings.remote_api_key.get_secret_value() == "sk-remote-secret"
    assert "sk-remote-secret" not in repr(settings)
    assert settings.remote_timeout == 12.5


def test_remote_backend_needs_a_base_url(monkeypatch):
    monkeypatch.setenv("BACKEND", "remote")
    with pytest.raises(ConfigError, match="REMOTE_BASE_URL is required when BACKEND=remote"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("REMOTE_BASE_URL", "gpu-box:8000/v1", "http(s) URL"),
        ("REMOTE_BASE_URL", "ftp://gpu-box/v1", "http(s) URL"),
        ("REMOTE_BASE_URL", "http://gpu-box:port/v1", "http(s) URL"),
        ("REMOTE_BASE_URL", "http:///v1", "http(s) URL"),
        ("REMOTE_TIMEOUT", "0", "greater than 0"),
        ("REMOTE_TIMEOUT", "soon", "valid number"),
        ("BACKEND", "cloud", "'local' or 'remote'"),
    ],
)
def test_invalid_remote_settings_name_variable_value_and_what_is_allowed(
    monkeypatch, variable, value, allowed
):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    message = str(error.value)
    assert variable in message and value in message and allowed in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [("ENGINE", "scratch"), ("PRECISION", "bf16"), ("ADAPTER_PATH", "outputs/adapters/chat")],
)
def test_local_model_settings_are_refused_with_the_remote_backend(monkeypatch, variable, value):
    monkeypatch.setenv("BACKEND", "remote")
    monkeypatch.setenv("REMOTE_BASE_URL", "http://gpu-box:8000/v1")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    message = str(error.value)
    assert f"{variable}={value!r}" in message and "BACKEND=remote loads none" in message
    monkeypatch.setenv("BACKEND", "local")
    assert load_settings().backend == "local"  # fine with a local model

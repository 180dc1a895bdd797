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
    assert (settings.batch_size, settings.learning_rate, settings.lora_rank) == (4, 2e-5, 16)
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

"""One precedence rule for the training configuration: the YAML file < BATCH_SIZE,
LEARNING_RATE, LORA_RANK in .env or the environment (read through Settings) < the command line.
"""

import re

import pytest
import yaml

from src.config import REPO_ROOT, Settings, load_settings
from src.errors import ConfigError
from src.training.config import (
    CONFIG_FILE_NAME,
    SETTINGS_KEYS,
    load_training_config,
    no_settings,
    resolve_training_config,
)
from src.training.train_lora import announce_config

pytestmark = pytest.mark.unit

DEFAULT_YAML = REPO_ROOT / "configs" / "lora_default.yaml"


@pytest.fixture()
def env_file(tmp_path):
    """A .env in tmp_path setting LEARNING_RATE and LORA_RANK (the conftest turns reading a
    .env off, so tests name theirs with _env_file)."""
    path = tmp_path / ".env"
    path.write_text("# training\nLEARNING_RATE=1e-3\nLORA_RANK=16\n", encoding="utf-8")
    return path


def test_without_env_or_environment_the_yaml_values_apply_not_settings_defaults():
    settings = load_settings()
    assert (settings.batch_size, settings.learning_rate, settings.lora_rank) == (None,) * 3
    resolved = resolve_training_config(DEFAULT_YAML, settings=settings)
    config = resolved.config
    assert config.training.batch_size == 4
    assert config.training.learning_rate == 2e-4
    assert config.lora.rank == 8
    assert {resolved.sources[key] for key in SETTINGS_KEYS.values()} == {"yaml"}


def test_dotenv_values_win_over_the_yaml(env_file):
    resolved = resolve_training_config(DEFAULT_YAML, settings=load_settings(_env_file=env_file))
    assert resolved.config.training.learning_rate == 1e-3
    assert resolved.config.lora.rank == 16
    assert resolved.config.training.batch_size == 4  # not in .env: the YAML's
    assert resolved.sources["training.learning_rate"] == ".env/environment"
    assert resolved.sources["lora.rank"] == ".env/environment"
    assert resolved.sources["training.batch_size"] == "yaml"


def test_the_environment_wins_over_dotenv(env_file, monkeypatch):
    monkeypatch.setenv("LEARNING_RATE", "5e-4")
    monkeypatch.setenv("BATCH_SIZE", "2")
    config = load_training_config(DEFAULT_YAML, settings=load_settings(_env_file=env_file))
    assert config.training.learning_rate == 5e-4  # environment over .env
    assert config.training.batch_size == 2
    assert config.lora.rank == 16  # only in .env


def test_the_command_line_wins_over_dotenv_and_environment(env_file, monkeypatch):
    monkeypatch.setenv("LEARNING_RATE", "5e-4")
    resolved = resolve_training_config(
        DEFAULT_YAML,
        ["training.learning_rate=3e-3", "lora.rank=4"],
        settings=load_settings(_env_file=env_file),
    )
    assert resolved.config.training.learning_rate == 3e-3
    assert resolved.config.lora.rank == 4
    assert resolved.sources["training.learning_rate"] == "command line"


def test_without_settings_given_the_dotenv_of_the_current_folder_is_read(
    env_file, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(Settings.model_config, "env_file", ".env")  # the app's own setting
    assert load_training_config(DEFAULT_YAML).lora.rank == 16


def test_no_settings_ignores_dotenv_and_environment(monkeypatch):
    monkeypatch.setenv("LORA_RANK", "32")
    assert load_training_config(DEFAULT_YAML, settings=no_settings()).lora.rank == 8


@pytest.mark.parametrize(
    ("line", "allowed"),
    [("LORA_RANK=0", "greater than or equal to 1"), ("LEARNING_RATE=fast", "valid number")],
)
def test_a_bad_value_in_dotenv_names_the_variable(tmp_path, line, allowed):
    path = tmp_path / ".env"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(line.split("=")[0])) as error:
        load_training_config(DEFAULT_YAML, settings=load_settings(_env_file=path))
    assert allowed in str(error.value)


def test_keys_missing_from_every_layer_are_defaults(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("training:\n  max_steps: 5\n", encoding="utf-8")
    resolved = resolve_training_config(
        path, ['data={"source": "chitchat"}'], settings=no_settings()
    )
    assert resolved.sources["training.max_steps"] == "yaml"
    assert resolved.sources["training.seed"] == "default"
    assert resolved.sources["data.source"] == "command line"
    assert resolved.sources["data.max_length"] == "default"  # its section replaced without it


def test_copying_env_example_changes_no_training_value():
    """.env.example shows the three variables commented out, with the YAML's values."""
    example = REPO_ROOT / ".env.example"
    yaml_config = load_training_config(DEFAULT_YAML, settings=no_settings())
    copied = load_training_config(DEFAULT_YAML, settings=load_settings(_env_file=example))
    assert copied == yaml_config
    text = example.read_text(encoding="utf-8")
    for field, key in SETTINGS_KEYS.items():
        shown = re.search(rf"^# {field.upper()}=(\S+)$", text, flags=re.MULTILINE)
        assert shown, f"{field.upper()} is not shown commented out in .env.example"
        section, name = key.split(".")
        assert float(shown.group(1)) == getattr(getattr(yaml_config, section), name)


def test_the_run_prints_and_saves_the_resolved_config(env_file, tmp_path, capsys):
    output_dir = tmp_path / "adapter"
    resolved = resolve_training_config(
        DEFAULT_YAML,
        ["training.max_steps=7", f"training.output_dir={output_dir}"],
        settings=load_settings(_env_file=env_file),
    )
    saved = announce_config(resolved)

    assert saved == output_dir / CONFIG_FILE_NAME and saved.is_file()
    printed = capsys.readouterr().out
    assert printed.startswith("Training configuration (")
    lines = {line.split()[0]: line.split(maxsplit=2)[1:] for line in printed.splitlines()[1:]}
    assert lines["training.max_steps"] == ["7", "command line"]
    assert lines["training.learning_rate"] == ["0.001", ".env/environment"]
    assert lines["lora.alpha"] == ["16.0", "yaml"]
    text = saved.read_text(encoding="utf-8")
    assert "#   lora.rank: .env/environment" in text
    assert "#   training.max_steps: command line" in text
    # The saved file gives the same run back, whatever .env and the environment say then.
    assert yaml.safe_load(text)["lora"]["rank"] == 16
    assert load_training_config(saved, settings=no_settings()) == resolved.config


@pytest.mark.parametrize(
    ("config_path", "name"),
    [(DEFAULT_YAML, "chitchat-lora"), (REPO_ROOT / "configs" / "dpo_default.yaml", "dpo-demo")],
)
def test_the_adapter_goes_into_adapters_dir_unless_output_dir_says_otherwise(
    tmp_path, config_path, name
):
    from src.training.config import TrainingConfig
    from src.training.dpo_config import DpoConfig

    schema = DpoConfig if "dpo" in config_path.name else TrainingConfig
    settings = Settings.model_construct(adapters_dir=tmp_path / "my-adapters")
    resolved = resolve_training_config(config_path, settings=settings, schema=schema)
    assert resolved.config.training.output_dir == tmp_path / "my-adapters" / name
    assert resolved.sources["training.output_dir"] == "ADAPTERS_DIR"
    chosen = tmp_path / "elsewhere"
    resolved = resolve_training_config(
        config_path, [f"training.output_dir={chosen}"], settings=settings, schema=schema
    )
    assert resolved.config.training.output_dir == chosen
    assert resolved.sources["training.output_dir"] == "command line"

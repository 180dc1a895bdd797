"""The one-time conversion of the bundled GGUF model (slow: about 25 s each)."""

import pytest

from src.models.bundled import BUNDLED_MODEL_NAME, convert_bundled_model
from src.models.folder_check import check_model_folder
from src.models.loader import ensure_bundled_model, load_from_folder

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def test_conversion_writes_a_complete_safetensors_folder_that_loads(tmp_path):
    folder = convert_bundled_model(tmp_path / BUNDLED_MODEL_NAME)
    check_model_folder(folder)
    assert (folder / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    model, tokenizer = load_from_folder(folder)
    assert tokenizer.chat_template and model.config.num_hidden_layers == 30


def test_a_damaged_converted_copy_is_converted_again(tmp_path, caplog):
    folder = convert_bundled_model(tmp_path / BUNDLED_MODEL_NAME)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    assert ensure_bundled_model(tmp_path) == folder
    check_model_folder(folder)
    assert "truncated" in caplog.text and "Converting the bundled model again" in caplog.text

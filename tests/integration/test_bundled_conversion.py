"""The one-time conversion of the bundled GGUF model (slow: about 25 s each)."""

import json
import shutil

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
    # What the file held, and its 4-bit codes for the prepared int4 model.
    source = json.loads((folder / "gguf" / "source.json").read_text())
    assert source["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert source["quantization"] == "int4" and source["four_bit_matrices_kept"] == 210


def test_a_conversion_by_an_older_version_is_converted_again(tmp_path, caplog):
    folder = convert_bundled_model(tmp_path / BUNDLED_MODEL_NAME)
    shutil.rmtree(folder / "gguf")  # as folders converted before GGUF files were kept
    assert ensure_bundled_model(tmp_path) == folder
    assert (folder / "gguf" / "source.json").is_file()
    assert "converted by an older version" in caplog.text


def test_a_damaged_converted_copy_is_converted_again(tmp_path, caplog):
    folder = convert_bundled_model(tmp_path / BUNDLED_MODEL_NAME)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    assert ensure_bundled_model(tmp_path) == folder
    check_model_folder(folder)
    assert "truncated" in caplog.text and "Converting the bundled model again" in caplog.text

import json
import shutil

import pytest

from src.errors import ModelLoadingError
from src.models.folder_check import check_model_folder

pytestmark = pytest.mark.unit


@pytest.fixture()
def model_copy(tmp_path, tiny_gpt2_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_gpt2_path, folder)
    return folder


def test_a_complete_folder_passes(model_copy):
    check_model_folder(model_copy)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadingError, match="does not exist"):
        check_model_folder(tmp_path / "nothing")


@pytest.mark.parametrize(
    ("remove", "expected"),
    [
        ("config.json", "missing config.json"),
        ("model.safetensors", "has no weights"),
    ],
)
def test_missing_files_are_named(model_copy, remove, expected):
    (model_copy / remove).unlink()
    with pytest.raises(ModelLoadingError) as error:
        check_model_folder(model_copy)
    assert str(model_copy) in str(error.value) and expected in str(error.value)


def test_missing_tokenizer_is_named(model_copy):
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (model_copy / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadingError, match="has no tokenizer"):
        check_model_folder(model_copy)


def test_truncated_weights_are_detected(model_copy):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadingError, match="model.safetensors is truncated"):
        check_model_folder(model_copy)


def test_corrupt_weights_header_is_detected(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadingError, match="model.safetensors is corrupt"):
        check_model_folder(model_copy)


def test_corrupt_config_is_named(model_copy):
    (model_copy / "config.json").write_text("{half")
    with pytest.raises(ModelLoadingError, match="config.json is not valid JSON"):
        check_model_folder(model_copy)


def test_missing_shard_of_a_sharded_model_is_named(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "model-00001-of-00002.safetensors")
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadingError, match="model-00002-of-00002.safetensors"):
        check_model_folder(model_copy)


def test_an_index_that_is_not_an_object_is_reported(model_copy):
    (model_copy / "model.safetensors").unlink()
    (model_copy / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadingError, match="should hold a JSON object, not list"):
        check_model_folder(model_copy)

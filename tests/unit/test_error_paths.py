"""The less common error paths: each gives the project's own error with a useful message."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from src.chat.conversation import Conversation, save_conversation_file
from src.chat.prompts import detect_prompt_format
from src.config import load_settings
from src.errors import ConversationFileError, ModelLoadingError
from src.models import bundled
from src.models.loader import load_from_folder, load_model

pytestmark = pytest.mark.unit


def test_a_missing_asset_package_says_how_to_install_it():
    with pytest.raises(ModelLoadingError, match=r"'no_such_package_xyz' is not installed.*make"):
        bundled.package_dir("no_such_package_xyz")


def test_a_missing_bundled_gguf_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(bundled, "package_dir", lambda package: tmp_path)
    with pytest.raises(ModelLoadingError, match=r"bundled model file is missing: .*\.gguf"):
        bundled.bundled_gguf_path()


def test_a_model_transformers_cannot_build_is_reported_with_its_folder(tmp_path, tiny_gpt2_path):
    folder = tmp_path / "odd-model"
    shutil.copytree(tiny_gpt2_path, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ModelLoadingError, match=f"Could not load the model in {folder}"):
        load_from_folder(folder)


def test_a_broken_adapter_is_reported_with_its_folder(tmp_path, tiny_gpt2_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": "many"}')
    settings = load_settings(model_name=str(tiny_gpt2_path))
    with pytest.raises(ModelLoadingError, match=f"Could not load the adapter in {adapter}"):
        load_model(settings, adapter_path=adapter)


def test_a_tokenizer_without_template_or_eos_cannot_chat(gpt2_tokenizer_path):
    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_path)
    tokenizer.eos_token = None
    with pytest.raises(ModelLoadingError, match="neither a chat template nor an EOS token"):
        detect_prompt_format(tokenizer)


def test_saving_where_a_file_blocks_the_folder_is_reported(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(ConversationFileError, match=r"Could not save .*blocker/chat.json"):
        save_conversation_file(blocker / "chat.json", Conversation(), {})

"""Model resolution: local folder, cache, hub (mocked at the network boundary), fallback."""

import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import huggingface_hub
import pytest

from src.config import load_settings
from src.errors import ModelLoadingError
from src.models.bundled import BUNDLED_MODEL_NAME
from src.models.gguf_import import CONVERSION_VERSION
from src.models.loader import converted_once, load_model, resolve_model

pytestmark = [pytest.mark.unit, pytest.mark.timeout(180)]


@pytest.fixture()
def cache_with_bundled(tmp_path, bundled_model_path) -> Path:
    """An empty model cache that already holds the converted bundled model (hard links or
    copies: the loader refuses symbolic links out of the cache)."""
    cache = tmp_path / "cache"
    shutil.copytree(bundled_model_path, cache / BUNDLED_MODEL_NAME, copy_function=link_or_copy)
    return cache


def link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


@pytest.fixture()
def hub_unreachable(monkeypatch):
    calls = []

    def unreachable(repo_id, **kwargs):
        calls.append(repo_id)
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    return calls


def fake_hub_with(source: Path, calls: list):
    """A stand-in for snapshot_download that writes the real hub cache layout."""

    def download(repo_id, cache_dir, token=None, allow_patterns=None):
        calls.append(allow_patterns)
        repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / "0123abcd"
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in source.iterdir():
            if any(file.match(pattern) for pattern in allow_patterns):
                shutil.copy(file, snapshot / file.name)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text("0123abcd")
        return str(snapshot)

    return download


def test_a_local_folder_is_loaded_as_is(tiny_gpt2_path):
    loaded = load_model(load_settings(model_name=str(tiny_gpt2_path)))
    assert loaded.source == "local" and loaded.path == tiny_gpt2_path
    assert loaded.name == str(tiny_gpt2_path)
    assert not loaded.model.training


def test_a_path_that_does_not_exist_is_an_error_not_a_fallback(tmp_path):
    settings = load_settings(model_name=str(tmp_path / "missing"))
    with pytest.raises(ModelLoadingError, match="looks like a path, but no such folder"):
        resolve_model(settings.model_name, settings)


def test_hub_unreachable_falls_back_to_the_bundled_model_with_one_notice(
    cache_with_bundled, hub_unreachable, caplog
):
    settings = load_settings(model_cache_dir=cache_with_bundled)
    with caplog.at_level(logging.WARNING):
        folder, source = resolve_model(settings.model_name, settings)
    assert source == "bundled (fallback)"
    assert folder == cache_with_bundled / BUNDLED_MODEL_NAME
    assert hub_unreachable == ["microsoft/DialoGPT-medium"]
    notices = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(notices) == 1
    assert "microsoft/DialoGPT-medium" in notices[0] and "ConnectError" in notices[0]
    assert "Falling back to the bundled offline model smollm2-135m-instruct" in notices[0]


def test_fallback_none_raises_an_actionable_error(cache_with_bundled, hub_unreachable):
    settings = load_settings(model_cache_dir=cache_with_bundled, model_fallback="none")
    with pytest.raises(ModelLoadingError) as error:
        load_model(settings)
    message = str(error.value)
    assert "Could not get model 'microsoft/DialoGPT-medium'" in message
    assert "MODEL_FALLBACK=none" in message and "MODEL_FALLBACK=bundled" in message


def test_an_invalid_hub_id_is_reported(cache_with_bundled):
    # huggingface_hub validates the id before any network access: the real code path.
    settings = load_settings(
        model_cache_dir=cache_with_bundled, model_name="not a valid id!!", model_fallback="none"
    )
    with pytest.raises(ModelLoadingError, match=r"'not a valid id!!'.*HFValidationError"):
        load_model(settings)


def test_hub_download_goes_to_the_cache_and_the_cache_is_used_next_time(
    tmp_path, tiny_gpt2_path, monkeypatch
):
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub_with(tiny_gpt2_path, calls))
    settings = load_settings(model_name="someone/tiny-gpt2", model_cache_dir=tmp_path / "cache")

    loaded = load_model(settings)
    assert loaded.source == "hub" and loaded.name == "someone/tiny-gpt2"
    assert len(calls) == 1 and "*.safetensors" in calls[0]
    assert not any(pattern.endswith(".bin") for pattern in calls[0])  # safetensors only

    folder, source = resolve_model(settings.model_name, settings)
    assert source == "cache" and folder == loaded.path
    assert len(calls) == 1  # no second download


def test_pickle_weights_are_fetched_only_when_a_repo_has_no_safetensors(
    tmp_path, tiny_gpt2_path, monkeypatch
):
    source = tmp_path / "pickle-repo"
    shutil.copytree(tiny_gpt2_path, source)
    (source / "model.safetensors").unlink()
    (source / "pytorch_model.bin").write_bytes(b"stand-in")
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub_with(source, calls))
    # Only with the operator's opt-in (tests/unit/test_security.py: refused without it).
    settings = load_settings(model_cache_dir=tmp_path / "cache", allow_pickle=True)
    from src.models.loader import download_from_hub

    folder = download_from_hub("someone/pickle-only", settings.model_cache_dir, settings)
    assert len(calls) == 2 and "pytorch_model*.bin" in calls[1]
    assert (folder / "pytorch_model.bin").is_file()


def test_a_broken_local_model_names_the_broken_file(tmp_path, tiny_gpt2_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_gpt2_path, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadingError, match=r"model.safetensors is truncated"):
        load_model(load_settings(model_name=str(broken)))


def test_an_adapter_folder_without_config_is_rejected(tiny_gpt2_path, tmp_path):
    settings = load_settings(model_name=str(tiny_gpt2_path))
    with pytest.raises(ModelLoadingError, match="has no adapter_config.json"):
        load_model(settings, adapter_path=tmp_path)


def test_a_saved_lora_adapter_is_attached(tiny_gpt2_path, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")

    loaded = load_model(
        load_settings(model_name=str(tiny_gpt2_path)), adapter_path=tmp_path / "adapter"
    )
    assert isinstance(loaded.model, PeftModel)
    assert loaded.adapter == tmp_path / "adapter"


def test_a_cached_model_that_links_outside_the_cache_is_refused(tmp_path, bundled_model_path):
    """The server reads only what lies in its own folders: a model folder in MODEL_CACHE_DIR
    that is (or holds) a link elsewhere is refused, naming it, and never converted into."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / BUNDLED_MODEL_NAME).symlink_to(bundled_model_path, target_is_directory=True)
    settings = load_settings(_env_file=None, model_cache_dir=cache)
    with pytest.raises(ModelLoadingError, match="leads outside MODEL_CACHE_DIR") as refused:
        resolve_model(BUNDLED_MODEL_NAME, settings)
    assert str(cache / BUNDLED_MODEL_NAME) in str(refused.value)

    (cache / BUNDLED_MODEL_NAME).unlink()
    shutil.copytree(bundled_model_path, cache / BUNDLED_MODEL_NAME, copy_function=link_or_copy)
    secret = tmp_path / "elsewhere.json"
    secret.write_text("{}")
    (cache / BUNDLED_MODEL_NAME / "config.json").unlink()
    (cache / BUNDLED_MODEL_NAME / "config.json").symlink_to(secret)
    with pytest.raises(ModelLoadingError, match=r"config.json leads outside MODEL_CACHE_DIR"):
        resolve_model(BUNDLED_MODEL_NAME, settings)


def test_processes_starting_together_convert_a_model_once(tmp_path, tiny_gpt2_path):
    """Two starts racing on an empty cache: one converts while the other waits on the lock,
    then uses that copy instead of converting again."""
    cache = tmp_path / "cache"
    folder = cache / "gguf" / "model-0123"
    conversions = []

    def convert(into: Path) -> Path:
        conversions.append(into)
        time.sleep(0.5)  # long enough for the other start to find the lock taken
        shutil.copytree(tiny_gpt2_path, into)
        (into / "gguf").mkdir()
        (into / "gguf" / "source.json").write_text(json.dumps({"version": CONVERSION_VERSION}))
        return into

    with ThreadPoolExecutor(2) as starts:
        results = list(
            starts.map(lambda _: converted_once(folder, cache, "model", convert), [1, 2])
        )
    assert results == [folder, folder] and conversions == [folder]
    assert not any(path.suffix == ".lock" for path in folder.parent.iterdir())

"""Faults of the disk and of files (docs/RELIABILITY.md): a full disk while saving (the
sessions database, a training checkpoint, the CLI's /save, the prepared-model cache), and
unreadable, corrupt or truncated settings, training configs and model files. Each gives a
clear error naming the file, and nothing saved earlier is damaged.

A full disk is simulated: SQLite's own ``max_page_count`` makes the database full exactly as
a full disk does (SQLITE_FULL); elsewhere the write function raises what it raises on a full
disk (``OSError(ENOSPC)``, torch's ``RuntimeError``, safetensors' ``SafetensorError``).
Unreadable files are a folder in the file's place, or ``PermissionError`` raised by the read
(these tests run as root too, which chmod 000 does not stop).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from src import files as files_module
from src.chat.conversation import Conversation
from src.chat.store import SessionStore
from src.cli.commands import ChatSession
from src.config import REPO_ROOT, load_settings
from src.errors import (
    CheckpointError,
    ConfigError,
    ModelLoadingError,
    StorageError,
    TrainingConfigError,
)
from src.models import prepared
from src.models.inference import load_for_inference
from src.models.loader import load_model
from src.training import checkpoint as ckpt
from src.training.config import load_training_config
from tests.conftest import GREEDY
from tests.integration.conftest import clean_env

pytestmark = pytest.mark.unit

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fill_up(store: SessionStore) -> None:
    """The database can grow no more: SQLite answers SQLITE_FULL, as on a full disk."""
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")


def new_session() -> Conversation:
    conversation = Conversation(system_prompt="Be brief.")
    conversation.persistent = True
    return conversation


# ---- a full disk while saving ----------------------------------------------------------------


def test_a_full_sessions_database_raises_storage_error_and_keeps_every_session(tmp_path):
    path = tmp_path / "sessions.sqlite3"
    store = SessionStore(path)
    kept = new_session()
    store.append_exchange(kept, "Hi", "Hello!")
    before = store.get(kept.id).messages
    fill_up(store)
    grown = store.get(kept.id)
    with pytest.raises(StorageError) as error:
        store.append_exchange(grown, "x" * 20_000, "y" * 20_000)
    message = str(error.value)
    assert str(path) in message and "database or disk is full" in message  # not hidden
    new = new_session()
    with pytest.raises(StorageError):
        store.append_exchange(new, "a" * 20_000, "b")
    assert store.get(kept.id).messages == before  # the failed exchange left no trace
    assert store.get(new.id) is None and store.count() == 1
    store._db.execute("PRAGMA max_page_count = 1073741823")  # room again: all works
    assert store.append_exchange(store.get(kept.id), "Again", "Sure.")
    assert len(store.get(kept.id).messages) == 4
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_checkpoint_write_on_a_full_disk_keeps_the_last_good_one(tmp_path, monkeypatch):
    def save_adapter(folder):
        (folder / "adapter_model.safetensors").write_bytes(b"weights")

    first = ckpt.save_checkpoint(tmp_path, 2, save_adapter, {"step": 2}, keep=2)
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        real_save(obj, io.BytesIO())
        Path(path).write_bytes(b"half")
        # What torch.save raises when the disk fills up under it.
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576")

    with monkeypatch.context() as patch, pytest.raises(CheckpointError) as error:
        patch.setattr(ckpt.torch, "save", disk_full)
        ckpt.save_checkpoint(tmp_path, 4, save_adapter, {"step": 4}, keep=1)
    message = str(error.value)
    assert "step-000004" in message and "unexpected pos" in message
    assert f"the last good checkpoint, {first}, is intact" in message
    assert ckpt.list_checkpoints(tmp_path) == [first]  # keep=1 pruned nothing
    assert ckpt.load_trainer_state(first) == {"step": 2}
    assert [p.name for p in ckpt.checkpoint_root(tmp_path).iterdir()] == ["step-000002"]

    def adapter_disk_full(folder):
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    with pytest.raises(CheckpointError, match="No space left on device"):
        ckpt.save_checkpoint(tmp_path, 4, adapter_disk_full, {"step": 4}, keep=1)
    assert ckpt.latest_checkpoint(tmp_path) == first


def test_the_training_cli_reports_a_checkpoint_it_cannot_write(
    tiny_llama_path, tmp_path, monkeypatch, capsys
):
    from src.training.train_lora import main

    data = tmp_path / "qa.jsonl"
    line = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    data.write_text((json.dumps(line) + "\n") * 6)
    output = tmp_path / "out"
    args = [
        f"model={tiny_llama_path}",
        f"data.source={data}",
        "data.max_length=32",
        "training.batch_size=2",
        "training.max_steps=4",
        "training.save_every=2",
        "training.eval_every=4",
        f"training.output_dir={output}",
    ]
    calls = []
    real_save = torch.save

    def full_on_second_checkpoint(obj, path, *rest, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise ENOSPC
        return real_save(obj, path, *rest, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", full_on_second_checkpoint)
    assert main(["--config", str(REPO_ROOT / "configs" / "lora_default.yaml"), *args]) == 2
    error = capsys.readouterr().err
    assert "Error: could not write checkpoint" in error and "step-000004" in error
    assert "No space left on device" in error and "step-000002, is intact" in error
    assert [p.name for p in ckpt.list_checkpoints(output)] == ["step-000002"]


def test_cli_save_on_a_full_disk_leaves_the_existing_file_whole(
    tiny_llama_service, tmp_path, monkeypatch
):
    out, err = io.StringIO(), io.StringIO()
    chat = ChatSession(
        tiny_llama_service,
        params=GREEDY.updated(max_new_tokens=4),
        conversation=tiny_llama_service.new_conversation(),
        out=out,
        err=err,
    )
    chat.handle("Hello")
    path = tmp_path / "chat.json"
    chat.handle(f"/save {path}")
    saved = path.read_bytes()
    chat.handle("A second message")
    real_open = open

    class DiskFullAfterTenCharacters:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.handle.close()

        def write(self, text):
            self.handle.write(text[:10])
            self.handle.flush()
            raise ENOSPC

    def open_then_disk_full(path, mode="r", **kwargs):
        return DiskFullAfterTenCharacters(real_open(path, mode, **kwargs))

    with monkeypatch.context() as patch:
        patch.setattr(files_module, "open", open_then_disk_full, raising=False)
        assert chat.handle(f"/save {path}") is True  # the session goes on
    assert f"Error: Could not save {path}: No space left on device" in err.getvalue()
    assert path.read_bytes() == saved  # the earlier file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]  # no temporary left
    chat.handle(f"/save {path}")
    assert len(json.loads(path.read_text())["messages"]) == 4


def test_the_prepared_model_cache_on_a_full_disk_only_warns(
    tiny_llama_path, tmp_path, monkeypatch, caplog
):
    import safetensors.torch

    def disk_full(state, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half")
        raise ENOSPC

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with caplog.at_level(logging.WARNING):
        model = prepared.load_prepared_transformer(tiny_llama_path, torch.float32, "none", tmp_path)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == 49152  # served all the same
    assert "could not cache the prepared model" in caplog.text
    assert list((tmp_path / "prepared").iterdir()) == []  # no half file to be read later


def test_the_prepared_model_cache_on_a_really_full_disk_only_warns(
    tiny_llama_path, tmp_path, monkeypatch
):
    import safetensors.torch

    def disk_full(state, filename, *args, **kwargs):
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    model = prepared.load_prepared_transformer(tiny_llama_path, torch.float32, "none", tmp_path)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == 49152  # served, uncached


# ---- unreadable settings and training configs --------------------------------------------------


def deny_reading(patch: pytest.MonkeyPatch, target: Path) -> None:
    """Reading ``target`` fails with EACCES, as for a file of mode 000 (root ignores modes)."""
    real_open = open
    real_read_text, real_read_bytes = Path.read_text, Path.read_bytes
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))

    def check(path) -> None:
        if Path(path).resolve() == target.resolve():
            raise denied

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, str | Path):
            check(file)
        return real_open(file, *args, **kwargs)

    def read_text(self, *args, **kwargs):
        check(self)
        return real_read_text(self, *args, **kwargs)

    def read_bytes(self):
        check(self)
        return real_read_bytes(self)

    patch.setattr("builtins.open", guarded_open)
    patch.setattr(Path, "read_text", read_text)
    patch.setattr(Path, "read_bytes", read_bytes)


def test_an_unreadable_env_file_is_named(tmp_path, monkeypatch):
    env = tmp_path / ".env"
    env.mkdir()
    with pytest.raises(ConfigError, match=rf"settings file {env}: it is a folder"):
        load_settings(_env_file=env)
    env.rmdir()
    env.write_bytes(b"MODEL_NAME=caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(ConfigError, match=rf"settings file {env}: not UTF-8 text"):
        load_settings(_env_file=env)
    env.write_text("MAX_LENGTH=256\n")
    assert load_settings(_env_file=env).max_length == 256
    with monkeypatch.context() as patch:
        deny_reading(patch, env)
        with pytest.raises(ConfigError, match=rf"settings file {env}: Permission denied"):
            load_settings(_env_file=env)


def test_the_cli_names_an_unreadable_env_file(tmp_path):
    (tmp_path / ".env").mkdir()
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "src" / "mvp_chatbot.py")],
        input="",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 2
    assert "Error: Cannot read the settings file .env: it is a folder" in result.stderr


def test_an_unreadable_training_config_is_named(tmp_path, monkeypatch):
    config = tmp_path / "lora.yaml"
    config.mkdir()
    with pytest.raises(TrainingConfigError, match=rf"{config}: cannot read it .*Is a directory"):
        load_training_config(config)
    config.rmdir()
    config.write_text("training:\n  max_steps: 5\n")
    assert load_training_config(config).training.max_steps == 5
    with monkeypatch.context() as patch:
        deny_reading(patch, config)
        with pytest.raises(TrainingConfigError, match=rf"{config}: cannot .*Permission denied"):
            load_training_config(config)
    config.write_bytes(b"training: {max_steps: \xff}")
    with pytest.raises(TrainingConfigError, match=rf"{config}: cannot read it"):
        load_training_config(config)


# ---- corrupt, truncated, missing or unreadable model files ----------------------------------


@pytest.fixture()
def model_copy(tmp_path, tiny_llama_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_path, folder)
    return folder


def rewrite_header(weights: Path, change) -> None:
    """Edit the JSON header of a safetensors file (its data stays as it was)."""
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    change(header)
    raw = json.dumps(header).encode()
    weights.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length :])


def first_tensor(header: dict) -> dict:
    return next(entry for name, entry in header.items() if name != "__metadata__")


def load_default(folder: Path, tmp_path: Path, engine: str = "auto") -> None:
    """The way the CLI and the server load a model folder (for this tiny Llama: our scratch
    engine without transformers; ``engine="hf"``: through transformers)."""
    settings = load_settings(
        _env_file=None, model_name=str(folder), model_cache_dir=tmp_path / "cache", engine=engine
    )
    load_for_inference(settings)


@pytest.mark.parametrize("engine", ["auto", "hf"])
@pytest.mark.parametrize(
    ("damage", "named", "problem"),
    [
        (lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors", "corrupt"),
        (
            lambda f: rewrite_header(
                f / "model.safetensors", lambda h: first_tensor(h).update(dtype="Q9")
            ),
            "model.safetensors",
            "unknown dtype 'Q9'",
        ),
        (
            lambda f: rewrite_header(
                f / "model.safetensors", lambda h: first_tensor(h)["shape"].__setitem__(0, 7)
            ),
            "model.safetensors",
            "corrupt",
        ),
        (lambda f: (f / "config.json").write_text(""), "config.json", "not valid JSON"),
        (lambda f: (f / "config.json").unlink(), "", "missing config.json"),
        (lambda f: (f / "tokenizer.json").write_text('{"trunc'), "tokenizer.json", "valid JSON"),
        (
            lambda f: (f / "tokenizer_config.json").write_text("{half"),
            "tokenizer_config.json",
            "valid JSON",
        ),
    ],
    ids=[
        "empty-weights",
        "weights-unknown-dtype",
        "weights-wrong-shape",
        "empty-config",
        "missing-config",
        "truncated-tokenizer",
        "corrupt-tokenizer-config",
    ],
)
def test_damaged_model_files_are_named(model_copy, tmp_path, damage, named, problem, engine):
    damage(model_copy)
    with pytest.raises(ModelLoadingError) as error:
        load_default(model_copy, tmp_path, engine)
    assert str(model_copy / named) in str(error.value) and problem in str(error.value)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_unreadable_model_files_are_named(model_copy, tmp_path, monkeypatch, name):
    target = model_copy / name
    real_open = Path.open

    def guarded_open(self, *args, **kwargs):
        if self.resolve() == target.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_open(self, *args, **kwargs)

    deny_reading(monkeypatch, target)
    monkeypatch.setattr(Path, "open", guarded_open)  # how the weights' header is read
    with pytest.raises(ModelLoadingError, match=rf"{target} cannot be read \(Permission denied\)"):
        load_default(model_copy, tmp_path)


def test_a_folder_in_place_of_the_weights_is_reported(model_copy, tmp_path):
    (model_copy / "model.safetensors").unlink()
    (model_copy / "model.safetensors").mkdir()
    with pytest.raises(ModelLoadingError, match=rf"{model_copy} has no weights"):
        load_default(model_copy, tmp_path)


def test_a_truncated_adapter_is_named(tiny_llama_path, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    settings = load_settings(_env_file=None, model_name=str(tiny_llama_path))
    with pytest.raises(ModelLoadingError, match=rf"{weights} is (truncated|corrupt)"):
        load_model(settings, adapter_path=adapter)

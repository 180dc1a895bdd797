"""Adapters are offered by name from one folder; names never become arbitrary paths."""

import pytest

from src.chat.adapter_pool import AdapterPool
from src.errors import InvalidRequestError, ModelLoadingError, ServerBusyError
from src.models.adapters import list_adapters, resolve_adapter

pytestmark = pytest.mark.unit


@pytest.fixture()
def adapters_dir(tmp_path):
    folder = tmp_path / "adapters"
    for name in ("style-a", "style-b"):
        (folder / name).mkdir(parents=True)
        (folder / name / "adapter_config.json").write_text("{}")
    (folder / "not-an-adapter").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "adapter_config.json").write_text("{}")
    (folder / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    return folder


def test_only_adapter_folders_are_listed(adapters_dir):
    assert list_adapters(adapters_dir) == ["style-a", "style-b"]
    assert list_adapters(adapters_dir / "missing") == []


@pytest.mark.parametrize("name", ["../outside", "/etc", "style-a/..", "linked", "", "nope"])
def test_names_outside_the_list_are_rejected(adapters_dir, name):
    with pytest.raises(
        InvalidRequestError,
        match=r"adapter: no adapter named .*available: "
        r"style-a, style-b",
    ):
        resolve_adapter(adapters_dir, name)


def test_the_pool_loads_each_adapter_once_and_returns_the_base_for_none(adapters_dir):
    loaded = []

    def load(path):
        loaded.append(path.name)
        return f"service for {path.name}"

    pool = AdapterPool("base service", adapters_dir, load)
    assert pool.get(None) == "base service" and pool.get("") == "base service"
    assert pool.get("style-a") == "service for style-a"
    assert pool.get("style-a") == "service for style-a"
    assert loaded == ["style-a"]
    with pytest.raises(InvalidRequestError):
        pool.get("../outside")


def test_an_adapter_whose_files_link_outside_the_folder_is_refused(adapters_dir, tmp_path):
    weights = adapters_dir / "style-a" / "adapter_model.safetensors"
    weights.symlink_to(tmp_path / "outside" / "adapter_config.json")
    with pytest.raises(ModelLoadingError, match="leads outside ADAPTERS_DIR") as refused:
        resolve_adapter(adapters_dir, "style-a")
    assert str(weights) in str(refused.value)
    assert resolve_adapter(adapters_dir, "style-b") == adapters_dir / "style-b"


class FakeService:
    def __init__(self, name: str) -> None:
        self.name, self.running, self.closed = name, 0, False

    def running_replies(self) -> int:
        return self.running

    def close(self) -> None:
        self.closed = True


def test_the_pool_keeps_at_most_max_loaded_adapters_closing_the_least_recently_used_idle(
    tmp_path, monkeypatch
):
    folder = tmp_path / "adapters"
    for name in ("a", "b", "c"):
        (folder / name).mkdir(parents=True)
        (folder / name / "adapter_config.json").write_text("{}")
    made: dict[str, FakeService] = {}

    def load(path):
        made[path.name] = FakeService(path.name)
        return made[path.name]

    monkeypatch.setattr("src.chat.adapter_pool.HANDED_OUT_SECONDS", 0.0)
    pool = AdapterPool("base service", folder, load, max_loaded=2)
    pool.get("a"), pool.get("b"), pool.get("a")  # b is now the least recently used
    pool.get("c")
    assert pool.loaded() == ["a", "c"] and made["b"].closed and not made["a"].closed
    # A busy adapter is never closed: the idle one goes, even if it was used more recently.
    made["a"].running = 1
    pool.get("b")
    assert pool.loaded() == ["a", "b"] and made["c"].closed
    # Every loaded adapter busy: refused, not loaded over the limit.
    made["b"].running = 1
    with pytest.raises(ServerBusyError, match="MAX_LOADED_ADAPTERS is 2") as busy:
        pool.get("c")
    assert busy.value.field == "adapter" and pool.loaded() == ["a", "b"]
    assert pool.evictions == 2


def test_an_adapter_trained_again_is_loaded_again_once_its_replies_end(tmp_path):
    folder = tmp_path / "adapters"
    (folder / "dpo").mkdir(parents=True)
    (folder / "dpo" / "adapter_config.json").write_text("{}")
    (folder / "dpo" / "adapter_model.safetensors").write_bytes(b"first")
    made: list[FakeService] = []

    def load(path):
        made.append(FakeService(path.name))
        return made[-1]

    pool = AdapterPool("base service", folder, load)
    first = pool.get("dpo")
    assert pool.get("dpo") is first  # unchanged: the loaded one
    # A training run's own files beside the adapter (its log grows every step, its plots and
    # report come after the adapter) are not the adapter: no reload for them.
    for name in ("metrics.jsonl", "dpo_curves.png", "preference_report.json"):
        (folder / "dpo" / name).write_text("written after the adapter")
    assert pool.get("dpo") is first and len(made) == 1
    (folder / "dpo" / "adapter_model.safetensors").write_bytes(b"second run")
    first.running = 1
    assert pool.get("dpo") is first  # a reply still runs on the old weights: kept for now
    first.running = 0
    second = pool.get("dpo")
    assert second is not first and first.closed and len(made) == 2
    assert pool.get("dpo") is second

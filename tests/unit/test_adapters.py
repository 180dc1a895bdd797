"""Adapters are offered by name from one folder; names never become arbitrary paths."""

import pytest

from src.chat.adapter_pool import AdapterPool
from src.errors import InvalidRequestError
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

"""The README documents every make target and script there is."""

import re

import pytest

from src.config import REPO_ROOT

pytestmark = pytest.mark.unit

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def make_targets() -> list[str]:
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    return re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.MULTILINE)


def test_every_make_target_is_in_the_readme():
    targets = make_targets()
    assert {"chat", "test", "cov", "download", "clean-cache"} <= set(targets)
    missing = [t for t in targets if not re.search(rf"`make {re.escape(t)}[` ]", README)]
    assert not missing, f"make targets missing from README.md: {missing}"


def test_every_script_is_in_the_readme():
    scripts = [p.name for p in (REPO_ROOT / "scripts").glob("*.py") if not p.name.startswith("_")]
    assert scripts
    missing = [name for name in scripts if f"scripts/{name}" not in README]
    assert not missing, f"scripts missing from README.md: {missing}"


@pytest.mark.parametrize("entry_point", ["app.py", "Dockerfile", ".pre-commit-config.yaml"])
def test_deployment_and_tooling_files_exist_and_are_documented(entry_point):
    assert (REPO_ROOT / entry_point).is_file()
    assert entry_point in README

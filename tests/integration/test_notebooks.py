"""Every notebook in notebooks/ runs top to bottom without error, so none can rot."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from src.config import REPO_ROOT

# The limits leave room for a machine whose cores are shared, where training slows down most:
# 02 trains for 12 steps, about 45 s on 2 quiet cores, 3 to 7 minutes on shared ones.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
# With the slow tests, to keep `make test` short: 02 and 05 train (a minute or more), 03 and
# 04 decode with several engines (30-45 s each).
SLOW = {
    "02_lora_fine_tuning.ipynb",
    "03_decoding.ipynb",
    "04_structured_outputs.ipynb",
    "05_preference_tuning.ipynb",  # trains for 8 steps
}
CASES = [
    pytest.param(path, id=path.name, marks=[pytest.mark.slow] if path.name in SLOW else [])
    for path in NOTEBOOKS
]


def run_notebook(path: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook,
        timeout=600,  # per cell
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    return notebook


@pytest.mark.parametrize("path", CASES)
def test_notebook_runs(path: Path, bundled_model_path, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # what a notebook writes to a temporary folder
    notebook = run_notebook(path)
    errors = [
        o
        for cell in notebook.cells
        for o in cell.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    blank = [
        cell.source.splitlines()[0]
        for cell in notebook.cells
        if "plt.show()" in cell.source
        and not any("image/png" in o.get("data", {}) for o in cell.get("outputs", []))
    ]
    assert not blank, f"cells that draw no figure: {blank}"


def test_the_three_notebooks_are_there_and_listed():
    names = {path.name for path in NOTEBOOKS}
    assert {
        "01_transformer_from_scratch.ipynb",
        "02_lora_fine_tuning.ipynb",
        "03_decoding.ipynb",
        "04_structured_outputs.ipynb",
        "05_preference_tuning.ipynb",
    } <= names
    listing = (REPO_ROOT / "notebooks" / "README.md").read_text(encoding="utf-8")
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for name in names:
        assert name in listing and name in readme, name

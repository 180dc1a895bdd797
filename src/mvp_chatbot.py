"""Mini-Claude in the terminal: a streaming, multi-turn chatbot.

python src/mvp_chatbot.py                      # chat with MODEL_NAME (see .env.example)
python src/mvp_chatbot.py --model smollm2-135m-instruct --verbose
printf 'Hello\\n' | python src/mvp_chatbot.py   # piped: prints the reply and exits
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python src/mvp_chatbot.py`: make `import src...` work from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import logging
import os
from typing import TYPE_CHECKING

from src.errors import MiniClaudeError

if TYPE_CHECKING:
    from src.chat.service import ChatService

BANNER = "Mini-Claude on {model}. Type /help for commands, /quit or Ctrl-D to leave."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chat with a local language model.")
    parser.add_argument(
        "--model", help="hub id, local folder, or smollm2-135m-instruct (default: MODEL_NAME)"
    )
    parser.add_argument("--adapter", type=Path, help="a LoRA adapter folder (peft format)")
    parser.add_argument("--system", help="system prompt (models with a chat template)")
    parser.add_argument(
        "--engine",
        choices=["auto", "hf", "scratch"],
        help="hf: transformers' model; scratch: our own transformer on the same "
        "weights (default: ENGINE)",
    )
    parser.add_argument(
        "--json-schema",
        type=Path,
        metavar="FILE",
        help="every reply is JSON valid against the schema in FILE (enforced by a grammar)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show tokens/s and context-window decisions"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Bytes that are not UTF-8 (a pasted binary, a wrong locale) become U+FFFD, not a crash.
    sys.stdin.reconfigure(errors="replace")
    interactive = sys.stdin.isatty()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        # Through the environment rather than transformers' functions: importing transformers
        # costs a second, and the default engine does not need it (src/models/inference.py).
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the 1-second load needs none

    from src.config import load_settings
    from src.stack import build_chat_stack

    try:
        schema = read_json_schema(args.json_schema) if args.json_schema else None
        settings = load_settings()
        # One consumer: the decode loop runs in this (main) thread, see BatchingEngine.
        stack = build_chat_stack(
            settings, args.model, args.adapter, engine_name=args.engine, background=False
        )
    except MiniClaudeError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    try:
        return chat_loop(stack.service, args, interactive, schema, settings.sessions_db)
    finally:
        stack.close()


def read_json_schema(path: Path) -> dict:
    """The schema of ``--json-schema``, or a ``MiniClaudeError`` naming the file's problem."""
    import json

    from src.errors import InvalidRequestError

    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidRequestError(f"--json-schema {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InvalidRequestError(f"--json-schema {path}: not valid JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"--json-schema {path}: a JSON schema is an object")
    return schema


def chat_loop(
    service: ChatService,
    args: argparse.Namespace,
    interactive: bool,
    json_schema: dict | None = None,
    feedback_db: Path | None = None,
) -> int:
    """Read messages and commands until EOF or /quit; /good, /bad and /edit save to
    ``feedback_db``."""
    from src.cli.commands import ChatSession
    from src.cli.judging import ReplyJudge
    from src.cli.reader import read_message

    params = service.default_params
    if json_schema is not None:
        name = args.json_schema.stem
        schema_format = {"type": "json_schema", "json_schema": json_schema, "name": name}
        params = params.updated(response_format=schema_format)
    judge = ReplyJudge(feedback_db) if feedback_db is not None else None
    session = ChatSession(
        service,
        params=params,
        conversation=service.new_conversation(args.system),
        verbose=args.verbose,
        judge=judge,
    )
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        session.say(BANNER.format(model=service.model_name))
        read_line = input
        prompt, more = "\n> ", "... "
    else:
        read_line = _read_piped_line
        prompt = more = ""

    while True:
        try:
            message = read_message(read_line, prompt, more)
        except EOFError:
            break
        except KeyboardInterrupt:
            session.say("\n(Ctrl-D or /quit to leave)")
            continue
        try:
            if not session.handle(message):
                break
        except KeyboardInterrupt:  # Ctrl-C before the reply began streaming (or in a command)
            session.say("\n(interrupted; the conversation is unchanged)")
        except Exception as exc:  # a bug must not throw away the user's conversation
            session.say(f"Error: {type(exc).__name__}: {exc} (the conversation is kept)")
    if judge is not None:
        judge.close()
    return 0


def _read_piped_line(_prompt: str) -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


if __name__ == "__main__":
    sys.exit(main())

"""The CLI's chat loop and slash commands, on top of ``ChatService``."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from src.chat.conversation import Conversation, load_conversation_file, save_conversation_file
from src.chat.service import ChatService
from src.cli.judging import ReplyJudge
from src.errors import ConversationFileError, InvalidRequestError, MiniClaudeError
from src.params import GenerationParams, make_params

HELP = """Commands:
  /help               this help
  /reset              forget the conversation (keeps the system prompt)
  /undo               remove the last exchange
  /retry              answer the last message again
  /system [TEXT|-]    show, set, or clear (-) the system prompt
  /set NAME VALUE     change a generation parameter, e.g. /set temperature 0.2
  /set json on|off    replies as JSON objects (a grammar guarantees they parse)
  /params             show the generation parameters
  /good [COMMENT]     mark the last reply as good (saved for preference tuning)
  /bad [COMMENT]      mark the last reply as bad
  /edit TEXT          replace the last reply with a better one (kept as preferred to it)
  /save FILE          save the conversation and parameters as JSON
  /load FILE          load a conversation saved with /save
  /quit               exit (Ctrl-D works too)
Multi-line input: end a line with \\ to continue it, or wrap lines in \"\"\".
Ctrl-C stops the reply being written and keeps the conversation."""


def parse_value(text: str) -> object:
    """CLI values: JSON when it parses (numbers, true/false, lists), "none" for None,
    otherwise the raw string (so /set stop ### works without quotes)."""
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class ChatSession:
    """One interactive (or piped) conversation in a terminal."""

    def __init__(
        self,
        service: ChatService,
        params: GenerationParams,
        conversation: Conversation,
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
        verbose: bool = False,
        judge: ReplyJudge | None = None,
    ) -> None:
        self.service = service
        self.judge = judge  # /good, /bad, /edit (None: nowhere to save them)
        self.params = params
        self.conversation = conversation
        self.out = out
        self.err = err
        self.verbose = verbose

    def say(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def handle(self, line: str) -> bool:
        """Handle one input; return False when the user wants to quit."""
        if not line.strip():
            return True
        if line.startswith("/"):
            return self.run_command(line)
        self.send(line)
        return True

    def run_command(self, line: str) -> bool:
        name, _, argument = line.strip().partition(" ")
        argument = argument.strip()
        commands: dict[str, Callable[[str], bool | None]] = {
            "/help": lambda _: self.say(HELP),
            "/reset": self._reset,
            "/undo": self._undo,
            "/retry": self._retry,
            "/system": self._system,
            "/set": self._set,
            "/params": lambda _: self.say(self.params.model_dump_json(indent=2)),
            "/good": lambda comment: self._rate("good", comment),
            "/bad": lambda comment: self._rate("bad", comment),
            "/edit": self._edit,
            "/save": self._save,
            "/load": self._load,
            "/quit": lambda _: False,
            "/exit": lambda _: False,
        }
        command = commands.get(name.lower())
        if command is None:
            self.say(f"Unknown command {name}. Type /help for the list.")
            return True
        try:
            return command(argument) is not False
        except MiniClaudeError as exc:
            self.say(f"Error: {exc}")
            return True

    def send(self, message: str) -> bool:
        """Stream a reply to ``message``; Ctrl-C stops it and keeps what was written.
        Returns whether a reply was added to the conversation."""
        try:
            stream = self.service.start_reply(self.conversation, message, self.params)
        except MiniClaudeError as exc:
            self.say(f"Error: {exc}")
            return False
        previous_handler = signal.signal(signal.SIGINT, lambda *_: stream.cancel())
        try:
            for delta in stream:
                self.out.write(delta)
                self.out.flush()
        except Exception as exc:  # a failure mid-reply must not end the whole session
            self.say(f"\nError while generating: {type(exc).__name__}: {exc}")
            return False
        finally:
            signal.signal(signal.SIGINT, previous_handler)
        self.out.write("\n")
        self.out.flush()
        result = stream.result
        if result is None:
            return False
        if self.judge is not None:
            self.judge.replied(self.conversation, stream.generation)
        if result.finish_reason == "cancelled":
            self.say("(stopped; the partial reply is kept; /undo removes it)")
        if result.dropped_messages:
            self.say(
                f"(context window full: the {result.dropped_messages} oldest messages were "
                "left out of the prompt)"
            )
        if self.verbose:
            first = f"{result.first_token_seconds:.2f}s" if result.first_token_seconds else "-"
            self.say(
                f"[{result.prompt_tokens} prompt + {result.completion_tokens} new tokens, "
                f"{result.tokens_per_second:.1f} tokens/s, first token {first}, "
                f"finish: {result.finish_reason}{', cached' if result.cached else ''}]"
            )
        return True

    def _rate(self, rating: str, comment: str) -> None:
        self._judged(rating=rating, comment=comment or None)

    def _edit(self, text: str) -> None:
        if not text:
            self.say("Usage: /edit TEXT  (the reply you would have wanted)")
            return
        self._judged(edit=text)

    def _judged(self, **judgement: str | None) -> None:
        if self.judge is None:
            self.say("(feedback is not saved in this session)")
            return
        record = self.judge.judge(self.conversation, **judgement)
        if record is None:
            self.say("(no reply to judge yet: feedback is about the last reply the model wrote)")
        elif record.kind == "edit":
            self.say("(reply replaced; your edit is saved as preferred to the model's)")
        else:
            self.say(f"(saved: {record.rating}; `make export-preferences` exports feedback)")

    def _reset(self, _: str) -> None:
        if self.judge is not None:
            self.judge.forget()
        self.conversation.messages.clear()
        self.say("(conversation cleared)")

    def _undo(self, _: str) -> None:
        if self.judge is not None:
            self.judge.forget()
        removed = self.conversation.pop_exchange()
        self.say("(removed the last exchange)" if removed else "(nothing to undo)")

    def _retry(self, _: str) -> None:
        removed = self.conversation.pop_exchange()
        if removed is None:
            self.say("(nothing to retry)")
            return
        answered = False
        try:
            answered = self.send(removed[0])
        finally:  # also on Ctrl-C before streaming began: never lose the exchange
            if not answered:
                self.conversation.add_exchange(*removed)

    def _system(self, text: str) -> None:
        if not text:
            self.say(f"System prompt: {self.conversation.system_prompt or '(none)'}")
            return
        self.conversation.system_prompt = None if text == "-" else text
        if not self.service.supports_system_prompt:
            self.say("(note: this model has no chat template, so it ignores system prompts)")
        self.say("(system prompt cleared)" if text == "-" else "(system prompt set)")

    def _set(self, argument: str) -> None:
        name, _, raw_value = argument.partition(" ")
        if not name or not raw_value.strip():
            self.say("Usage: /set NAME VALUE  (see /params for the names)")
            return
        if name == "json":
            self._set_json(raw_value.strip().lower())
            return
        self.params = self.params.updated(**{name: parse_value(raw_value.strip())})
        self.say(f"({name} = {getattr(self.params, name)!r})")

    def _set_json(self, value: str) -> None:
        if value not in ("on", "off"):
            self.say("Usage: /set json on|off")
            return
        response_format = {"type": "json_object"} if value == "on" else None
        self.params = self.params.updated(response_format=response_format)
        self.say("(replies are JSON objects)" if value == "on" else "(replies are free text)")

    def _save(self, path: str) -> None:
        if not path:
            self.say("Usage: /save FILE")
            return
        save_conversation_file(Path(path), self.conversation, self.params.model_dump())
        self.say(f"(saved {len(self.conversation.messages)} messages to {path})")

    def _load(self, path: str) -> None:
        if not path:
            self.say("Usage: /load FILE")
            return
        conversation, saved_params = load_conversation_file(Path(path))
        try:
            params = make_params({**self.params.model_dump(), **saved_params})
        except InvalidRequestError as exc:
            raise ConversationFileError(f"{path}: saved params are invalid: {exc}") from None
        # Replace the session only once everything has been read and checked.
        self.conversation, self.params = conversation, params
        if self.judge is not None:
            self.judge.forget()
        self.say(f"(loaded {len(conversation.messages)} messages from {path})")

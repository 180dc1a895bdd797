"""A conversation: an id, an optional system prompt and alternating user/assistant messages.

Saved as JSON (``/save``, ``/load``). Loading checks every field, so a hand-edited or
truncated file gives an error naming the file and the problem instead of a broken session.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.chat.prompts import Message
from src.errors import ConversationFileError
from src.files import write_text_atomically

FILE_FORMAT_VERSION = 1


SESSION_ID_BYTES = 16  # 128 random bits
# What new_conversation_id makes: 22 URL-safe base64 characters (16 bytes, no padding).
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{22}")


def new_conversation_id() -> str:
    # 128 random bits from the OS's CSPRNG: unguessable, so one client cannot reach another's
    # session by trying.
    return secrets.token_urlsafe(SESSION_ID_BYTES)


def is_session_id(value: object) -> bool:
    """Whether ``value`` has the form of an id from ``new_conversation_id`` (the API refuses
    anything else before it reaches the store)."""
    return isinstance(value, str) and SESSION_ID_PATTERN.fullmatch(value) is not None


@dataclass
class Conversation:
    system_prompt: str | None = None
    messages: list[Message] = field(default_factory=list)
    id: str = field(default_factory=new_conversation_id)
    # A session kept in the service's store (the API's); the CLI's conversations are not.
    persistent: bool = field(default=False, compare=False)
    saved: bool = field(default=False, compare=False)  # the store holds it already

    def add_exchange(self, user_message: str, reply: str) -> None:
        self.messages += [
            {"role": "user", "content": user_message},
            {"role": "assistant", "content": reply},
        ]

    def pop_exchange(self) -> tuple[str, str] | None:
        """Remove and return the last (user, assistant) pair, or None if there is none."""
        if len(self.messages) < 2:
            return None
        user, assistant = self.messages[-2:]
        del self.messages[-2:]
        return user["content"], assistant["content"]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "system_prompt": self.system_prompt, "messages": self.messages}

    @classmethod
    def from_dict(cls, data: Any, source: str = "conversation") -> Conversation:
        """Build from untrusted data; raise ``ConversationFileError`` naming what is wrong."""
        if not isinstance(data, dict):
            raise ConversationFileError(f"{source}: expected a JSON object")
        system_prompt = data.get("system_prompt")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ConversationFileError(f"{source}: 'system_prompt' must be a string or null")
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise ConversationFileError(f"{source}: 'messages' must be a list")
        for number, message in enumerate(messages):
            expected_role = "user" if number % 2 == 0 else "assistant"
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise ConversationFileError(
                    f"{source}: message {number} must be an object with a string 'content'"
                )
            if message.get("role") != expected_role:
                raise ConversationFileError(
                    f"{source}: message {number} has role {message.get('role')!r}; messages "
                    f"must alternate user/assistant, so it should be {expected_role!r}"
                )
        if len(messages) % 2:
            raise ConversationFileError(f"{source}: the last user message has no reply")
        conversation_id = data.get("id")
        if not isinstance(conversation_id, str) or not conversation_id:
            conversation_id = new_conversation_id()
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        return cls(system_prompt=system_prompt, messages=clean, id=conversation_id)


def save_conversation_file(path: Path, conversation: Conversation, params: dict) -> None:
    """Write atomically (temporary file + rename): a crash never leaves half a file, and a
    failed save leaves the previous file as it was."""
    path = Path(path)
    payload = {"version": FILE_FORMAT_VERSION, **conversation.to_dict(), "params": params}
    try:
        write_text_atomically(path, json.dumps(payload, ensure_ascii=False, indent=2))
    except OSError as exc:
        raise ConversationFileError(f"Could not save {path}: {exc.strerror or exc}") from None
    except UnicodeEncodeError as exc:  # a lone surrogate cannot be written as UTF-8
        raise ConversationFileError(f"Could not save {path}: invalid Unicode ({exc})") from None


def load_conversation_file(path: Path) -> tuple[Conversation, dict]:
    """Read a file written by ``save_conversation_file``: (conversation, saved params)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversationFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConversationFileError(f"{path}: cannot read it ({exc})") from None
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError, an integer of over 4300 digits, or nesting too deep
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ConversationFileError(f"{path}: not valid JSON ({reason})") from None
    conversation = Conversation.from_dict(data, source=str(path))
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise ConversationFileError(f"{path}: 'params' must be an object")
    return conversation, params

"""Tool calling: how tools reach the model, how its calls are held to a valid shape, and how
they are read back out of the reply.

The model calls a tool by writing, after any text, one or more blocks of this form (the
Hermes format, which Qwen2.5/3 and many fine-tunes also use)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The same format is used at inference and in training data (``render_tool_calls``,
``render_tool_results``), so a model fine-tuned here learns the format it is served with.

Tools reach the model through its chat template (``apply_chat_template(..., tools=...)``) when
the template presents tools; otherwise (the bundled SmolLM2's template has no tool support)
through ``tools_system_prompt``, added to the system prompt.

``tool_choice`` is enforced by a grammar (``tool_grammar``): ``required`` and a named function
force a call, to an existing function, with arguments valid against its schema; with ``auto``
the reply is free text until the model writes ``<tool_call>``, and from there the grammar
holds it to a valid call; with ``none`` the tools are not shown and nothing is parsed.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from src.chat.structured import JSON_OPTIONS
from src.errors import InvalidRequestError

MAX_TOOLS = 128  # as in OpenAI's API
MAX_TOOLS_CHARS = 64_000  # all tool definitions, as JSON text: what the prompt and grammar hold
CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
RESULT_OPEN = "<tool_response>"
RESULT_CLOSE = "</tool_response>"


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object"})

    def as_openai(self) -> dict[str, Any]:
        """The OpenAI shape, which chat templates with tool support expect."""
        function = {"name": self.name, "description": self.description}
        return {"type": "function", "function": {**function, "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI sends arguments as a string)
    id: str = field(default_factory=lambda: f"call_{secrets.token_hex(12)}")


@dataclass(frozen=True)
class ToolSet:
    """The tools of one request and how the model may use them."""

    tools: tuple[Tool, ...]
    choice: Literal["none", "auto", "required", "function"] = "auto"
    function: str | None = None  # the function that must be called (choice "function")
    parallel: bool = True  # several calls in one reply

    def __post_init__(self) -> None:
        names = [tool.name for tool in self.tools]
        if len(self.tools) > MAX_TOOLS:
            raise InvalidRequestError(
                f"tools: {len(self.tools)} tools is over the limit of {MAX_TOOLS}", "tools"
            )
        size = len(json.dumps([tool.as_openai() for tool in self.tools]))
        if size > MAX_TOOLS_CHARS:
            raise InvalidRequestError(
                f"tools: the definitions are {size} characters as JSON, over the limit of "
                f"{MAX_TOOLS_CHARS}",
                "tools",
            )
        if self.choice != "none" and not self.tools:
            raise InvalidRequestError(f"tool_choice: {self.choice!r} needs tools", "tool_choice")
        if len(set(names)) != len(names):
            raise InvalidRequestError("tools: two tools have the same name", "tools")
        if self.choice == "function" and self.function not in names:
            raise InvalidRequestError(
                f"tool_choice: no tool named {self.function!r} (tools: {', '.join(names)})",
                "tool_choice",
            )

    @property
    def active(self) -> bool:
        """Whether the model is shown the tools and may call them."""
        return self.choice != "none" and bool(self.tools)

    @property
    def callable(self) -> tuple[Tool, ...]:
        if self.choice == "function":
            return tuple(tool for tool in self.tools if tool.name == self.function)
        return self.tools


def tools_system_prompt(tools: tuple[Tool, ...]) -> str:
    """The default way to show tools, for templates without tool support: a system prompt
    listing them (as JSON) and the format of a call."""
    listing = "\n".join(json.dumps(tool.as_openai(), ensure_ascii=False) for tool in tools)
    return (
        "You can call these tools:\n<tools>\n"
        f"{listing}\n</tools>\n"
        "To call a tool, reply with a JSON object naming it and giving its arguments, inside "
        f'{CALL_OPEN}{CALL_CLOSE} tags:\n{CALL_OPEN}\n{{"name": "tool_name", "arguments": '
        f"{{...}}}}\n{CALL_CLOSE}\nThe result comes back inside {RESULT_OPEN}{RESULT_CLOSE} tags."
    )


def render_tool_calls(calls: list[dict[str, Any]]) -> str:
    """An assistant message's calls (OpenAI's ``tool_calls``) as the model writes them."""
    blocks = []
    for call in calls:
        function = call.get("function", call)
        arguments = parse_arguments(function.get("arguments", {}))
        body = json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)
        blocks.append(f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}")
    return "\n".join(blocks)


def parse_arguments(arguments: Any) -> Any:
    """A call's arguments as a value: OpenAI sends them as JSON text."""
    if not isinstance(arguments, str):
        return arguments
    if not arguments.strip():
        return {}
    try:
        return json.loads(arguments)
    except ValueError:
        raise InvalidRequestError(
            f"messages: the arguments of a tool call are not valid JSON: {arguments[:80]!r}",
            "messages",
        ) from None


def render_tool_results(contents: list[str]) -> str:
    """Consecutive tool results, as one user turn (as Qwen2.5's template does)."""
    return "\n".join(f"{RESULT_OPEN}\n{content}\n{RESULT_CLOSE}" for content in contents)


def call_schema(tool: Tool) -> dict[str, Any]:
    """The JSON of one call to ``tool``: its name, then arguments valid against its schema."""
    return {
        "x-guidance": JSON_OPTIONS,
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_grammar(tool_set: ToolSet) -> str | None:
    """The Lark grammar (llguidance's dialect) a reply must follow, or None (no tools)."""
    if not tool_set.active:
        return None
    alternatives = " | ".join(f"call_{index}" for index in range(len(tool_set.callable)))
    calls = "call (sep call)*" if tool_set.parallel else "call"
    lines = [
        f'call: "{CALL_OPEN}" "\\n" body "\\n" "{CALL_CLOSE}"',
        'sep: "\\n"',
        f"body: {alternatives}",
    ]
    for index, tool in enumerate(tool_set.callable):
        lines.append(f"call_{index}: %json {json.dumps(call_schema(tool))}")
    if tool_set.choice == "auto":
        # Free text; once the model writes the opening tag, the rest must be valid calls.
        start = [
            "start: text | text_then_calls",
            "text: /(?s:.*)/",
            f'text_then_calls: lead body "\\n" "{CALL_CLOSE}" (sep call)*'
            if tool_set.parallel
            else f'text_then_calls: lead body "\\n" "{CALL_CLOSE}"',
            f'lead[stop="{CALL_OPEN}\\n"]: /(?s:.*)/',
        ]
    else:
        start = [f"start: {calls}"]
    return "\n".join(start + lines)


def parse_call(body: str) -> ToolCall:
    """One call's JSON (``{"name": ..., "arguments": {...}}``) as a ``ToolCall``; the
    arguments keep the model's own text (what was streamed)."""
    data = json.loads(body)
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ValueError(f"not a tool call: {body!r}")
    arguments = _arguments_text(body)
    arguments = arguments.rstrip().removesuffix("}").rstrip() if arguments is not None else "{}"
    json.loads(arguments)  # the grammar made it valid; a hand-made reply may not be
    return ToolCall(name=data["name"], arguments=arguments)


@dataclass
class ToolCallDelta:
    """A piece of a call as it streams: its start (``index``, ``id``, ``name``), then pieces
    of its arguments (OpenAI streams tool calls this way)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class ToolCallStream:
    """Splits reply text, as it streams, into content and tool calls.

    Text before ``<tool_call>`` is content (held back while it could be the start of the tag);
    a call is reported when its name is known, then its arguments as they come."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._pending = ""  # text not yet classified
        self._in_call = False
        self._body = ""  # the current call's JSON so far
        self._sent_arguments = 0  # characters of the current call's arguments already sent
        self._current: ToolCallDelta | None = None

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """(content, call deltas) that ``text`` completes."""
        self._pending += text
        content, deltas = "", []
        while self._pending:
            if not self._in_call:
                start = self._pending.find(CALL_OPEN)
                if start < 0:
                    keep = _partial_suffix(self._pending, CALL_OPEN)
                    content += self._pending[: len(self._pending) - keep]
                    self._pending = self._pending[len(self._pending) - keep :]
                    break
                content += self._pending[:start]
                self._pending = self._pending[start + len(CALL_OPEN) :]
                self._in_call, self._body, self._sent_arguments = True, "", 0
                self._current = None
                continue
            end = self._closing_tag()
            if end < 0:
                keep = _partial_suffix(self._pending, CALL_CLOSE)
                self._body += self._pending[: len(self._pending) - keep]
                self._pending = self._pending[len(self._pending) - keep :]
                deltas += self._progress(final=False)
                break
            self._body += self._pending[:end]
            self._pending = self._pending[end + len(CALL_CLOSE) :].lstrip("\n")
            deltas += self._progress(final=True)
            self._in_call = False
        if not self._in_call and self.calls and content.strip() == "":
            content = ""  # only the newline between calls
        return content, deltas

    def _closing_tag(self) -> int:
        """Where in the pending text the current call's closing tag is, or -1. The tag may
        also appear inside a string of the call's JSON (the grammar allows any text there):
        the real one is the first that follows a whole JSON object."""
        start = 0
        while (end := self._pending.find(CALL_CLOSE, start)) >= 0:
            try:
                json.loads(self._body + self._pending[:end])
                return end
            except ValueError:
                start = end + 1
        return -1

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        """At the end: what is left (an unfinished tag is content)."""
        if self._in_call:
            text = CALL_OPEN + self._body + self._pending
            self._in_call, self._pending = False, ""
            return ("" if self._current is not None else text), []
        text, self._pending = self._pending, ""
        return text, []

    def _progress(self, final: bool) -> list[ToolCallDelta]:
        deltas: list[ToolCallDelta] = []
        if self._current is None:
            name = _name_of(self._body)
            if name is None:
                if not final:
                    return deltas
                raise ValueError(f"not a tool call: {self._body!r}")
            self._current = ToolCallDelta(index=len(self.calls), name=name)
            self._current.id = ToolCall(name=name, arguments="").id
            deltas.append(ToolCallDelta(self._current.index, self._current.id, name))
        arguments = _arguments_text(self._body)
        if arguments is not None:
            # Hold back the outer object's closing brace (and spaces) until the call ends.
            ready = arguments if final else arguments.rstrip()
            if final:
                ready = ready.rstrip().removesuffix("}").rstrip()
            elif ready.endswith("}"):
                ready = ready[:-1]
            if len(ready) > self._sent_arguments:
                piece = ready[self._sent_arguments :]
                self._sent_arguments = len(ready)
                deltas.append(ToolCallDelta(self._current.index, arguments=piece))
        if final:
            call = parse_call(self._body.strip())
            self.calls.append(ToolCall(call.name, call.arguments, id=self._current.id))
        return deltas


def _name_of(body: str) -> str | None:
    marker = '"name": "'
    start = body.find(marker)
    if start < 0:
        return None
    end = body.find('"', start + len(marker))
    return None if end < 0 else json.loads(body[start + len(marker) - 1 : end + 1])


def _arguments_text(body: str) -> str | None:
    marker = '"arguments": '
    start = body.find(marker)
    return None if start < 0 else body[start + len(marker) :]


def _partial_suffix(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0

"""BACKEND=remote: generation on an OpenAI-compatible server (vLLM, TGI, another Mini-Claude).

``RemoteBackend`` is the counterpart of ``LocalBackend`` (``src/chat/local.py``) behind
``ChatService``: the same ``build_prompt`` / ``start`` seam, so the CLI, the API and the UI
work unchanged. No model is loaded here. Each reply is one streamed
``POST {REMOTE_BASE_URL}/chat/completions`` over httpx with:

- the messages: the system prompt, the history and the new user message. The server formats
  them with its own chat template and fits them to its own context window (Mini-Claude drops
  the oldest turns; vLLM and TGI refuse prompts that are too long), so ``dropped_messages`` is
  always 0 here;
- ``max_tokens``, ``temperature`` (0 when greedy), ``top_p``, ``stop``, ``seed``,
  ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``logprobs`` / ``top_logprobs``,
  ``response_format``, ``tools`` / ``tool_choice`` / ``parallel_tool_calls``, plus vLLM's
  sampling extras ``top_k`` (-1 = off), ``min_p`` and ``repetition_penalty``, which
  Mini-Claude's server accepts too (TGI ignores them). Tool calls and log-probabilities come
  back from the server's chunks;
- ``stream_options: {"include_usage": true}``: token counts come from the server's ``usage``.
  A server that sends none gets ``prompt_tokens`` 0 and ``completion_tokens`` = the number of
  streamed content chunks (one per token on vLLM, TGI and Mini-Claude).

The request is sent (and its status checked) when the reply starts, so an unreachable server
or a refused request raises before any text streams. Cancelling closes the response between
two chunks, which tells the server to stop. Every failure (no connection, a timeout, a non-2xx
status, a stream that is not OpenAI's format) is a ``RemoteBackendError`` naming the URL and
the problem; the API answers it with 502.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import httpx

from src.chat.deltas import Delta, TokenInfo
from src.chat.prompts import Message
from src.chat.tools import ToolCall, ToolCallDelta, ToolSet
from src.errors import RemoteBackendError
from src.params import GenerationParams


@dataclass
class RemotePrompt:
    messages: list[Message]  # OpenAI's chat messages, system prompt first
    dropped_messages: int = 0  # the server fits its own context window
    tools: ToolSet | None = None


def remote_error(url: str, problem: str) -> RemoteBackendError:
    return RemoteBackendError(f"remote backend {url}: {problem}")


def error_detail(response: httpx.Response) -> str:
    """The server's own error message, in any of the usual shapes, else the body's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or "(empty body)"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):  # OpenAI, Mini-Claude, vLLM
            return str(error["message"])[:300]
        for key in ("error", "message", "detail"):  # TGI, older vLLM, FastAPI
            if body.get(key):
                return str(body[key])[:300]
    return json.dumps(body)[:300]


class RemoteBackend:
    kind = "remote"
    context_window = None  # the remote server's business
    kv_cache_bytes = None
    supports_system_prompt = True  # the server's chat template decides what to do with it

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``model=None`` asks the server for its first model now (GET {base_url}/models)."""
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # One client for every request (shared by the API's worker threads): pooled connections.
        self._http = httpx.Client(
            headers=headers, timeout=httpx.Timeout(timeout), transport=transport
        )
        try:
            self.model = model or self.first_model()
        except RemoteBackendError:
            self._http.close()
            raise

    @classmethod
    def from_settings(cls, settings: Any, model: str | None = None) -> RemoteBackend:
        key = settings.remote_api_key
        return cls(
            settings.remote_base_url,
            model=model or settings.remote_model,
            api_key=key.get_secret_value() if key is not None else None,
            timeout=settings.remote_timeout,
        )

    def close(self) -> None:
        self._http.close()

    # ---- the ChatService seam ----------------------------------------------------------------

    def build_prompt(
        self,
        system_prompt: str | None,
        messages: list[Message],
        params: GenerationParams,
        tools: ToolSet | None = None,
    ) -> RemotePrompt:
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return RemotePrompt(system + [dict(m) for m in messages], tools=tools)

    def together(self, requests: int = 1) -> AbstractContextManager[None]:
        """Several replies at once: the remote server batches (and queues) them as it sees
        fit."""
        return nullcontext()

    def prompt_tokens(self, prompt: RemotePrompt) -> int | None:
        return None  # the remote server counts them, and says so when the reply ends

    def cache_material(self, prompt: RemotePrompt) -> tuple:
        """What identifies the prompt in the response cache: the messages themselves."""
        return tuple(json.dumps(m, sort_keys=True) for m in prompt.messages)

    def start(
        self, prompt: RemotePrompt, params: GenerationParams, should_stop: Callable[[], bool]
    ) -> RemoteGeneration:
        """Send the request now; raise ``RemoteBackendError`` if it fails or is refused."""
        url = f"{self.base_url}/chat/completions"
        request = self._http.build_request("POST", url, json=self.request_body(prompt, params))
        response = self._send(request)
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith("text/event-stream"):
            response.close()
            raise remote_error(
                url, f"expected a stream of server-sent events, got {content_type or 'no type'}"
            )
        return RemoteGeneration(response, url, should_stop)

    def forward(self, route: str, body: dict[str, Any]) -> httpx.Response:
        """A request sent on as it is (legacy completions, vLLM's tokenizer routes), naming
        the remote's model; the response streams back. ``route`` is the path the client used:
        ``/v1/...`` lives under REMOTE_BASE_URL, anything else at the server's root (where vLLM
        serves ``/tokenize``)."""
        if route.startswith("/v1/"):
            url = f"{self.base_url}/{route.removeprefix('/v1/')}"
        else:
            url = f"{self.base_url.removesuffix('/v1')}{route}"
        body = {**body, "model": self.model} if "model" in body else body
        return self._send(self._http.build_request("POST", url, json=body))

    # ---- HTTP ------------------------------------------------------------------------------

    def request_body(self, prompt: RemotePrompt, params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": prompt.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens,
            "temperature": 0.0 if params.is_greedy else params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else -1,  # vLLM's "off"
            "repetition_penalty": params.repetition_penalty,
        }
        for name in ("presence_penalty", "frequency_penalty", "min_p"):
            if getattr(params, name):
                body[name] = getattr(params, name)
        if params.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in params.logit_bias.items()}
        if params.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = params.top_logprobs
        if params.response_format is not None and params.response_format.constrains:
            body["response_format"] = openai_response_format(params.response_format)
        if prompt.tools is not None and prompt.tools.tools:
            body.update(openai_tools(prompt.tools))
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    def first_model(self) -> str:
        url = f"{self.base_url}/models"
        response = self._send(self._http.build_request("GET", url))
        try:
            response.read()
            models = [card["id"] for card in response.json()["data"]]
        except httpx.HTTPError as exc:
            raise remote_error(url, f"the connection failed ({exc})") from None
        except (ValueError, KeyError, TypeError):
            raise remote_error(
                url, 'the model list is not OpenAI\'s {"data": [{"id": ...}]}; set REMOTE_MODEL'
            ) from None
        finally:
            response.close()
        if not models or not isinstance(models[0], str):
            raise remote_error(url, "the server lists no models; set REMOTE_MODEL")
        return models[0]

    def _send(self, request: httpx.Request) -> httpx.Response:
        """Send with a streamed body; a non-2xx status raises with the server's message."""
        url = str(request.url)
        try:
            response = self._http.send(request, stream=True)
        except httpx.TimeoutException:
            raise remote_error(
                url, f"no answer within {self.timeout:g} s (REMOTE_TIMEOUT)"
            ) from None
        except httpx.ConnectError as exc:
            raise remote_error(
                url, f"cannot connect ({exc}); is the server up and REMOTE_BASE_URL right?"
            ) from None
        except httpx.HTTPError as exc:
            raise remote_error(url, f"the request failed ({type(exc).__name__}: {exc})") from None
        if response.is_success:
            return response
        try:
            response.read()
            detail = error_detail(response)
        except httpx.HTTPError as exc:
            detail = f"(the body could not be read: {exc})"
        finally:
            response.close()
        raise remote_error(url, f"HTTP {response.status_code} {response.reason_phrase}: {detail}")


def openai_response_format(response_format: Any) -> dict[str, Any]:
    if response_format.type == "json_object":
        return {"type": "json_object"}
    schema = {"name": response_format.name or "reply", "schema": response_format.json_schema}
    return {"type": "json_schema", "json_schema": {**schema, "strict": True}}


def openai_tools(tool_set: ToolSet) -> dict[str, Any]:
    choice: Any = tool_set.choice
    if tool_set.choice == "function":
        choice = {"type": "function", "function": {"name": tool_set.function}}
    return {
        "tools": [tool.as_openai() for tool in tool_set.tools],
        "tool_choice": choice,
        "parallel_tool_calls": tool_set.parallel,
    }


def token_info(entry: dict[str, Any]) -> TokenInfo:
    """One entry of an OpenAI ``logprobs.content`` list."""
    raw = bytes(entry.get("bytes") or entry.get("token", "").encode())
    top = tuple(
        (alt.get("token", ""), bytes(alt.get("bytes") or b""), float(alt.get("logprob", 0.0)))
        for alt in entry.get("top_logprobs") or []
    )
    return TokenInfo(entry.get("token", ""), raw, entry.get("logprob"), top)


class RemoteGeneration:
    """One streamed reply: iterate for text deltas; then read ``finish_reason`` and counts."""

    def __init__(self, response: httpx.Response, url: str, should_stop: Callable[[], bool]) -> None:
        self.finish_reason = "length"  # until the server says "stop" (also if cut short)
        self.stop_sequence: str | None = None  # OpenAI's stream does not say which one
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.first_token_at: float | None = None  # time.perf_counter() of the first text
        self._response = response
        self._url = url
        self._should_stop = should_stop
        self._chunks = 0  # content chunks: the token count when the server sends no usage
        self._usage_seen = False
        self._complete = False  # a finish_reason or [DONE] arrived
        self.tool_calls: list[ToolCall] = []
        self.prompt_logprobs: list[TokenInfo] = []  # not available remotely
        self._calls: dict[int, dict[str, str]] = {}  # index -> id, name, arguments so far

    def close(self) -> None:
        """Close the response; a server stops generating when its client goes away."""
        self._response.close()

    def abandon(self) -> None:
        self.close()  # closing a response does not wait

    def __iter__(self) -> Iterator[Delta]:
        try:
            for data in self._events():
                if data == "[DONE]":
                    self._complete = True
                    break
                yield from self._handle(data)
        except httpx.TimeoutException:
            raise remote_error(
                self._url, "the reply stalled (no data within REMOTE_TIMEOUT seconds)"
            ) from None
        except httpx.HTTPError as exc:
            raise remote_error(self._url, f"the connection broke mid-reply ({exc})") from None
        finally:
            self.close()
        self.tool_calls = [
            ToolCall(call["name"], call["arguments"] or "{}", id=call["id"])
            for _, call in sorted(self._calls.items())
        ]
        if self.tool_calls and self.finish_reason == "stop":
            self.finish_reason = "tool_calls"
        if not self._usage_seen:
            self.completion_tokens = self._chunks
        if not self._complete and not self._should_stop():
            raise remote_error(self._url, "the stream ended before the reply was complete")

    def _events(self) -> Iterator[str]:
        """The ``data`` of each server-sent event, until ``should_stop()`` says to stop (it is
        checked before reading anything and after every line: cancelling between chunks)."""
        if self._should_stop():
            return
        data: list[str] = []
        for line in self._response.iter_lines():
            if self._should_stop():
                return
            if line == "":
                if data:
                    yield "\n".join(data)
                    data = []
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif not line.startswith((":", "event:", "id:", "retry:")):
                raise remote_error(
                    self._url, f"malformed server-sent events: unexpected line {line[:80]!r}"
                )
        if data:
            yield "\n".join(data)

    def _handle(self, data: str) -> Iterator[Delta]:
        """One chunk (JSON): yield its text; note its finish_reason and usage."""
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            raise remote_error(
                self._url, f"malformed server-sent event (not JSON): {data[:80]!r}"
            ) from None
        if not isinstance(chunk, dict):
            raise remote_error(self._url, f"malformed chunk (not an object): {data[:80]!r}")
        if chunk.get("error"):
            error = chunk["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise remote_error(self._url, f"the server failed mid-reply: {message}")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
            self._usage_seen = True
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise remote_error(self._url, f"malformed chunk (no 'choices' list): {data[:80]!r}")
        for choice in choices[:1]:  # n = 1
            if not isinstance(choice, dict):
                raise remote_error(self._url, f"malformed chunk (a choice): {data[:80]!r}")
            delta = choice.get("delta", {} if choice.get("finish_reason") else None)
            if not isinstance(delta, dict) or not isinstance(delta.get("content"), str | None):
                raise remote_error(self._url, f"malformed chunk (no 'delta'): {data[:80]!r}")
            out = Delta(delta.get("content") or "")
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict):
                out.logprobs = [token_info(e) for e in logprobs.get("content") or []]
            out.tool_calls = [self._call_delta(call) for call in delta.get("tool_calls") or []]
            if out:
                self._chunks += 1
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                yield out
            reason = choice.get("finish_reason")
            if reason:
                # OpenAI: "stop", "length", "content_filter", ...; TGI also "eos_token".
                self.finish_reason = "length" if reason == "length" else "stop"
                self._complete = True

    def _call_delta(self, call: dict[str, Any]) -> ToolCallDelta:
        """One streamed piece of a tool call, remembered until the reply ends."""
        index = int(call.get("index", 0))
        function = call.get("function") or {}
        known = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
        if call.get("id"):
            known["id"] = call["id"]
        if function.get("name"):
            known["name"] = function["name"]
        known["arguments"] += function.get("arguments") or ""
        return ToolCallDelta(
            index, call.get("id"), function.get("name"), function.get("arguments") or ""
        )

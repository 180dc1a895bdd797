"""OpenAI-compatible routes: POST /v1/chat/completions (plain and streamed) and GET /v1/models.

Stateless, as in OpenAI's API: the client sends the whole conversation each time.
"""

import time
import uuid

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from src.chat.conversation import Conversation
from src.config import Settings
from src.params import GenerationParams, check_reply_length, make_params
from src.web.deps import ServiceDep, SettingsDep, SlotsDep, require_api_key
from src.web.errors import HTTPProblem, sse_event, stream_error
from src.web.openai_schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ChoiceMessage,
    CompletionUsage,
    ModelCard,
    ModelList,
)
from src.web.routes.chat import ERRORS
from src.web.security import (
    SlotStreamingResponse,
    check_chars,
    client_id,
)
from src.web.streaming import deltas_of

router = APIRouter(
    prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)], responses=ERRORS
)


def split_messages(body: ChatCompletionRequest, settings: Settings) -> tuple[Conversation, str]:
    """(earlier conversation, last user message). System messages may only come first.
    Each message is within MAX_MESSAGE_CHARS, and there are at most MAX_HISTORY_MESSAGES
    user and assistant messages."""
    for number, message in enumerate(body.messages):
        check_chars(
            f"messages[{number}].content", message.content, settings.max_message_chars, "messages"
        )
    messages = list(body.messages)
    system_prompt = None
    if messages[0].role == "system":
        system_prompt = messages.pop(0).content
    if len(messages) > settings.max_history_messages:
        raise HTTPProblem(
            400,
            f"messages: {len(messages)} user and assistant messages is over the limit of "
            f"{settings.max_history_messages} (MAX_HISTORY_MESSAGES); send fewer earlier turns",
            "invalid_request_error",
            "messages",
        )
    if not messages or messages[-1].role != "user":
        raise HTTPProblem(
            400,
            "messages: the last message must be from the user",
            "invalid_request_error",
            "messages",
        )
    for number, message in enumerate(messages):
        expected = "user" if number % 2 == 0 else "assistant"
        if message.role != expected:
            raise HTTPProblem(
                400,
                f"messages: message {number + (system_prompt is not None)} is "
                f"{message.role!r}; after an optional system message, roles must alternate "
                "user/assistant",
                "invalid_request_error",
                "messages",
            )
    history = [{"role": m.role, "content": m.content} for m in messages[:-1]]
    return Conversation(system_prompt=system_prompt, messages=history), messages[-1].content


def openai_params(
    body: ChatCompletionRequest, defaults: GenerationParams, max_tokens_limit: int | None = None
) -> GenerationParams:
    values = defaults.model_dump()
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens_limit is not None:
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        check_reply_length(max_tokens, field, max_tokens_limit)
    if max_tokens is not None:
        values["max_new_tokens"] = max_tokens
    if body.temperature is not None:
        values["temperature"] = body.temperature
        values["do_sample"] = body.temperature > 0  # OpenAI: temperature 0 is (near) greedy
    if body.top_p is not None:
        values["top_p"] = body.top_p
    if body.stop is not None:
        values["stop"] = body.stop
    if body.seed is not None:
        values["seed"] = body.seed
    if body.top_k is not None:
        values["top_k"] = 0 if body.top_k == -1 else body.top_k  # vLLM: -1 means off
    if body.repetition_penalty is not None:
        values["repetition_penalty"] = body.repetition_penalty
    return make_params(values)


@router.get("/models", response_model=ModelList)
def list_models(service: ServiceDep) -> ModelList:
    return ModelList(data=[ModelCard(id=service.model_name)])


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    slots: SlotsDep,
):
    """``model`` is only echoed: the server answers with the one model it loaded at start-up
    and never loads anything a request names."""
    conversation, message = split_messages(body, settings)
    params = openai_params(body, service.default_params, settings.max_length)
    slot = slots.acquire(client_id(request))
    try:
        stream = await run_in_threadpool(service.start_reply, conversation, message, params)
    except BaseException:
        slot.release()
        raise
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if not body.stream:
        try:
            result = await run_in_threadpool(stream.complete)
        finally:
            slot.release()
        return ChatCompletion(
            id=completion_id,
            created=created,
            model=service.model_name,
            choices=[
                Choice(
                    message=ChoiceMessage(content=result.text),
                    finish_reason=_finish_reason(result.finish_reason),
                )
            ],
            usage=_usage(result),
        )

    def chunk(delta: dict, finish_reason: str | None = None) -> dict:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": service.model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    async def events():
        yield sse_event(chunk({"role": "assistant", "content": ""}))
        try:
            async for delta in deltas_of(stream):
                yield sse_event(chunk({"content": delta}))
        except Exception as exc:
            yield sse_event(stream_error(exc))
            return
        yield sse_event(chunk({}, _finish_reason(stream.result.finish_reason)))
        if body.stream_options is not None and body.stream_options.include_usage:
            usage_chunk = {**chunk({}), "choices": [], "usage": _usage(stream.result).model_dump()}
            yield sse_event(usage_chunk)
        yield sse_event("[DONE]")

    return SlotStreamingResponse(
        events(), slot, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(result) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )

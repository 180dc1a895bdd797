"""OpenAI-compatible routes: POST /v1/chat/completions (plain and streamed) and GET /v1/models.

Stateless, as in OpenAI's API: the client sends the whole conversation each time. The request
is translated into the core's types (``src/web/openai_translate.py``), and the replies back.
"""

import time
import uuid

from fastapi import APIRouter, Depends, Request

from src.chat.service import ChatResult
from src.web.deps import ServiceDep, SettingsDep, SlotsDep, require_api_key
from src.web.errors import sse_event, stream_error
from src.web.openai_schemas import (
    STREAMED,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ChoiceMessage,
    FunctionCallOut,
    ModelCard,
    ModelList,
)
from src.web.openai_translate import (
    check_choices,
    finish_reason,
    logprobs_out,
    openai_conversation,
    openai_params,
    openai_tools,
    stream_chunk,
    token_logprob,
    tool_call_chunks,
    tool_calls_out,
    usage_of,
)
from src.web.routes.chat import ERRORS
from src.web.security import SlotStreamingResponse, start_in_slot
from src.web.streaming import complete_unless_gone, merged_deltas

router = APIRouter(
    prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)], responses=ERRORS
)


@router.get("/models", response_model=ModelList)
def list_models(service: ServiceDep) -> ModelList:
    return ModelList(data=[ModelCard(id=service.model_name)])


@router.post("/chat/completions", response_model=ChatCompletion, responses=STREAMED)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    slots: SlotsDep,
):
    """``model`` is only echoed: the server answers with the one model it loaded at start-up
    and never loads anything a request names."""
    check_choices(body.n, settings)
    conversation = openai_conversation(body.messages, settings)
    tools = openai_tools(body)
    params = openai_params(body, service.default_params, settings.max_length)
    streams, slot = await start_in_slot(
        slots, request, service.start_replies, conversation, None, params, body.n, tools
    )
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    legacy = bool(body.functions)
    top = params.top_logprobs
    if not body.stream:
        try:
            results = await complete_unless_gone(streams, request)
        finally:
            slot.release()
        return ChatCompletion(
            id=completion_id,
            created=created,
            model=service.model_name,
            choices=[_choice(i, r, legacy, top) for i, r in enumerate(results)],
            usage=usage_of(results),
        )

    def chunk(index: int, delta: dict, reason: str | None = None, logprobs=None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return stream_chunk(
            "chat.completion.chunk", completion_id, created, service.model_name, choice
        )

    async def events():
        for index in range(len(streams)):
            yield sse_event(chunk(index, {"role": "assistant", "content": ""}))
        try:
            async for index, delta in merged_deltas(streams):
                if delta is None:  # this choice ended
                    result = streams[index].result
                    yield sse_event(chunk(index, {}, finish_reason(result, legacy)))
                    continue
                body_delta: dict = {}
                if delta.text:
                    body_delta["content"] = delta.text
                if delta.tool_calls and legacy:
                    call = tool_call_chunks(delta.tool_calls)[0]
                    body_delta["function_call"] = call["function"]
                elif delta.tool_calls:
                    body_delta["tool_calls"] = tool_call_chunks(delta.tool_calls)
                logprobs = None
                if params.logprobs and delta.logprobs:
                    logprobs = {
                        "content": [token_logprob(t, top).model_dump() for t in delta.logprobs]
                    }
                if body_delta or logprobs:
                    yield sse_event(chunk(index, body_delta, logprobs=logprobs))
        except Exception as exc:
            yield sse_event(stream_error(exc))
            return
        if body.stream_options is not None and body.stream_options.include_usage:
            usage = usage_of([stream.result for stream in streams]).model_dump()
            yield sse_event({**chunk(0, {}), "choices": [], "usage": usage})
        yield sse_event("[DONE]")

    return SlotStreamingResponse.server_sent(events(), slot, replies=streams)


def _choice(index: int, result: ChatResult, legacy: bool, top: int) -> Choice:
    calls = tool_calls_out(result.tool_calls)
    message = ChoiceMessage(content=result.text or (None if calls else ""))
    if calls and legacy:
        first = calls[0].function
        message.function_call = FunctionCallOut(name=first.name, arguments=first.arguments)
    else:
        message.tool_calls = calls
    return Choice(
        index=index,
        message=message,
        logprobs=logprobs_out(result.logprobs, top),
        finish_reason=finish_reason(result, legacy),
    )

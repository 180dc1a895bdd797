"""Anthropic's Messages API: POST /v1/messages (plain and streamed) and
POST /v1/messages/count_tokens.

Stateless, like the OpenAI routes: the client sends the whole conversation each time. The
request is translated into the core's types (``src/web/anthropic_translate.py``), and the
replies back. Errors come in Anthropic's shape (``src/web/errors.py``). The API key may come
as ``x-api-key``, as Anthropic's clients send it.
"""

import uuid

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from src.web.anthropic_schemas import (
    ERRORS,
    CountTokensRequest,
    Message,
    MessagesRequest,
    TokenCount,
)
from src.web.anthropic_translate import (
    MessageEvents,
    anthropic_conversation,
    anthropic_message,
    anthropic_params,
    anthropic_tools,
)
from src.web.deps import ServiceDep, SettingsDep, SlotsDep, require_api_key
from src.web.errors import sse_event, stream_error
from src.web.openai_schemas import STREAMED
from src.web.security import SlotStreamingResponse, start_in_slot
from src.web.streaming import complete_unless_gone, deltas_of

router = APIRouter(
    prefix="/v1/messages",
    tags=["anthropic"],
    dependencies=[Depends(require_api_key)],
    responses=ERRORS,
)


@router.post("", response_model=Message, responses=STREAMED)
async def create_message(
    body: MessagesRequest,
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    slots: SlotsDep,
):
    """``model`` is only echoed back, as on the OpenAI routes: the server answers with the one
    model it loaded."""
    conversation = anthropic_conversation(body, settings)
    tools = anthropic_tools(body)
    params = anthropic_params(body, service.default_params, settings.max_length)
    (stream,), slot = await start_in_slot(
        slots, request, service.start_replies, conversation, None, params, 1, tools
    )
    message_id = f"msg_{uuid.uuid4().hex}"
    if not body.stream:
        try:
            (result,) = await complete_unless_gone([stream], request)
        finally:
            slot.release()
        return anthropic_message(result, message_id, service.model_name)

    translate = MessageEvents(message_id, service.model_name, stream.prompt_tokens)

    async def events():
        for name, data in translate.start():
            yield sse_event(data, name)
        try:
            async for delta in deltas_of(stream):
                for name, data in translate.delta(delta):
                    yield sse_event(data, name)
        except Exception as exc:
            yield sse_event(stream_error(exc, "anthropic"), "error")
            return
        for name, data in translate.finish(stream.result):
            yield sse_event(data, name)

    return SlotStreamingResponse.server_sent(events(), slot, replies=[stream])


@router.post("/count_tokens", response_model=TokenCount)
async def count_tokens(
    body: CountTokensRequest, service: ServiceDep, settings: SettingsDep
) -> TokenCount:
    """The prompt's length in tokens, as a reply to these messages would see it (the system
    prompt, the tools and the chat template included)."""
    conversation = anthropic_conversation(body, settings)
    tools = anthropic_tools(body)
    ids = await run_in_threadpool(service.render, conversation, True, tools)
    return TokenCount(input_tokens=len(ids))

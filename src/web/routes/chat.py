"""The native chat API: POST /chat and POST /chat/stream (sessions: ``sessions.py``)."""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from src.chat.conversation import Conversation
from src.chat.service import ChatService
from src.config import Settings
from src.params import GenerationParams
from src.web.deps import AdapterPoolDep, SettingsDep, SlotsDep, require_api_key
from src.web.errors import HTTPProblem, sse_event, stream_error
from src.web.openai_translate import token_logprob
from src.web.routes.sessions import check_session_id, no_session
from src.web.schemas import ChatRequest, ChatResponse, ErrorResponse
from src.web.security import SlotStreamingResponse, check_chars, client_id, start_in_slot
from src.web.streaming import complete_unless_gone, deltas_of

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 422, 429, 502, 503)}
router = APIRouter(tags=["chat"], dependencies=[Depends(require_api_key)], responses=ERRORS)


def open_session(service: ChatService, body: ChatRequest, settings: Settings) -> Conversation:
    if body.session_id is None:
        return service.new_session(body.system_prompt)
    check_session_id(body.session_id)
    conversation = service.get_session(body.session_id)
    if conversation is None:
        raise no_session(body.session_id)
    if body.system_prompt is not None:
        raise HTTPProblem(
            400,
            "system_prompt: can only be set when a session starts",
            "invalid_request_error",
            "system_prompt",
        )
    limit = settings.max_history_messages
    if len(conversation.messages) + 1 > limit:
        raise HTTPProblem(
            409,
            f"session_id: this session is full: it holds {len(conversation.messages)} messages "
            f"and a request may send at most {limit} (MAX_HISTORY_MESSAGES); start a new "
            "session (omit session_id)",
            "session_full",
            "session_id",
        )
    return conversation


def prepare(
    body: ChatRequest, service: ChatService, settings: Settings
) -> tuple[GenerationParams, Conversation]:
    """The request's generation parameters and its session; its system prompt within
    MAX_MESSAGE_CHARS (the service checks the message and the reply length itself)."""
    check_chars("system_prompt", body.system_prompt, settings.max_message_chars)
    params = body.apply_to(service.default_params)
    return params, open_session(service, body, settings)


@router.post("/chat", response_model=ChatResponse)
async def chat(
    body: ChatRequest,
    request: Request,
    pool: AdapterPoolDep,
    settings: SettingsDep,
    slots: SlotsDep,
) -> ChatResponse:
    """Answer one message; the exchange is saved to the session when the reply is complete.
    A client that hangs up stops the generation, and nothing is saved."""
    service = await run_in_threadpool(pool.get, body.adapter)
    params, conversation = await run_in_threadpool(prepare, body, service, settings)
    with slots.hold(client_id(request)):
        stream = await run_in_threadpool(service.start_reply, conversation, body.message, params)
        [result] = await complete_unless_gone([stream], request)
    return ChatResponse.from_result(result, conversation.id)


@router.post(
    "/chat/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def chat_stream(
    body: ChatRequest,
    request: Request,
    pool: AdapterPoolDep,
    settings: SettingsDep,
    slots: SlotsDep,
) -> StreamingResponse:
    """The same reply as server-sent events: ``delta`` events with text, then one ``done``
    event with the full ChatResponse. A client that disconnects stops the generation."""
    service = await run_in_threadpool(pool.get, body.adapter)  # may load it the first time
    params, conversation = prepare(body, service, settings)
    stream, slot = await start_in_slot(
        slots, request, service.start_reply, conversation, body.message, params
    )

    async def events():
        try:
            async for delta in deltas_of(stream):
                event = {"text": delta.text}
                if params.logprobs:
                    top = params.top_logprobs
                    event["logprobs"] = [token_logprob(t, top).model_dump() for t in delta.logprobs]
                if delta.text or delta.logprobs:
                    yield sse_event(event, event="delta")
        except Exception as exc:  # headers are sent: report in-band rather than cut the stream
            yield sse_event(stream_error(exc), "error")
            return
        done = ChatResponse.from_result(stream.result, conversation.id)
        yield sse_event(done.model_dump(), event="done")

    return SlotStreamingResponse.server_sent(events(), slot, replies=[stream])

"""The native chat API: POST /chat, POST /chat/stream, and the sessions they keep."""

from fastapi import APIRouter, Depends, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from src.chat.conversation import Conversation
from src.chat.service import ChatService
from src.web.deps import AdapterPoolDep, ServiceDep, require_api_key
from src.web.errors import HTTPProblem, sse_event
from src.web.schemas import ChatRequest, ChatResponse, ErrorResponse, SessionResponse
from src.web.streaming import deltas_of

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 502, 503)}
router = APIRouter(tags=["chat"], dependencies=[Depends(require_api_key)], responses=ERRORS)


def open_session(service: ChatService, body: ChatRequest) -> Conversation:
    if body.session_id is None:
        return service.new_session(body.system_prompt)
    conversation = service.get_session(body.session_id)
    if conversation is None:
        raise HTTPProblem(
            404, f"session_id: no session {body.session_id!r}", "not_found", "session_id"
        )
    if body.system_prompt is not None:
        raise HTTPProblem(
            400,
            "system_prompt: can only be set when a session starts",
            "invalid_request_error",
            "system_prompt",
        )
    return conversation


@router.post("/chat", response_model=ChatResponse)
def chat(body: ChatRequest, pool: AdapterPoolDep) -> ChatResponse:
    """Answer one message; the exchange is saved to the session when the reply is complete."""
    service = pool.get(body.adapter)
    params = body.apply_to(service.default_params)
    conversation = open_session(service, body)
    result = service.reply(conversation, body.message, params)
    return ChatResponse.from_result(result, conversation.id)


@router.post(
    "/chat/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def chat_stream(body: ChatRequest, pool: AdapterPoolDep) -> StreamingResponse:
    """The same reply as server-sent events: ``delta`` events with text, then one ``done``
    event with the full ChatResponse. A client that disconnects stops the generation."""
    service = await run_in_threadpool(pool.get, body.adapter)  # may load it the first time
    params = body.apply_to(service.default_params)
    conversation = open_session(service, body)
    stream = await run_in_threadpool(service.start_reply, conversation, body.message, params)

    async def events():
        try:
            async for delta in deltas_of(stream):
                yield sse_event({"text": delta}, event="delta")
        except Exception as exc:  # headers are sent: report in-band rather than cut the stream
            yield sse_event({"error": {"message": str(exc), "type": "server_error"}}, "error")
            return
        done = ChatResponse.from_result(stream.result, conversation.id)
        yield sse_event(done.model_dump(), event="done")

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


@router.get("/sessions/{session_id}", response_model=SessionResponse, tags=["sessions"])
def get_session(session_id: str, service: ServiceDep) -> SessionResponse:
    conversation = service.get_session(session_id)
    if conversation is None:
        raise HTTPProblem(404, f"session_id: no session {session_id!r}", "not_found", "session_id")
    return SessionResponse(
        session_id=conversation.id,
        system_prompt=conversation.system_prompt,
        messages=conversation.messages,
    )


@router.delete("/sessions/{session_id}", status_code=204, tags=["sessions"])
def delete_session(session_id: str, service: ServiceDep) -> Response:
    if not service.delete_session(session_id):
        raise HTTPProblem(404, f"session_id: no session {session_id!r}", "not_found", "session_id")
    return Response(status_code=204)

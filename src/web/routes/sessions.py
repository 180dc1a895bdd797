"""Stored conversations: list, read, rename, delete; judge their replies and ask for others.

A session is reached by its id (128 random bits). The list of them is shown to the holder of
API_KEY, or, on an open server, to clients on this machine only (``may_list_sessions``).
"""

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from src.chat.conversation import is_session_id
from src.web.deps import AdapterPoolDep, ServiceDep, SettingsDep, SlotsDep, require_api_key
from src.web.errors import HTTPProblem
from src.web.schemas import ErrorResponse, SessionResponse, Usage
from src.web.security import client_id, may_list_sessions
from src.web.session_schemas import (
    CandidateRequest,
    CandidateResponse,
    FeedbackListResponse,
    FeedbackRequest,
    FeedbackResponse,
    RenameRequest,
    SessionListResponse,
    SessionSummaryResponse,
)
from src.web.streaming import complete_unless_gone

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 422, 429, 503)}
router = APIRouter(tags=["sessions"], dependencies=[Depends(require_api_key)], responses=ERRORS)
MAX_LISTED = 1_000
MAX_OFFSET = 10**9  # past any real store; SQLite's integers end at 2**63


def check_session_id(session_id: str) -> None:
    """Ids are 22 URL-safe characters (128 random bits); refuse anything else up front."""
    if not is_session_id(session_id):
        raise HTTPProblem(
            400,
            "session_id: not a session id (session ids are 22 characters: letters, digits, "
            "'-' and '_')",
            "invalid_request_error",
            "session_id",
        )


def no_session(session_id: str) -> HTTPProblem:
    return HTTPProblem(404, f"session_id: no session {session_id!r}", "not_found", "session_id")


@router.get("/sessions", response_model=SessionListResponse)
def list_sessions(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    limit: int = Query(100, ge=1, le=MAX_LISTED),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> SessionListResponse:
    """The stored conversations, most recently updated first. With API_KEY set, for its
    holder; without one, only for clients on this machine (403 for others)."""
    if not may_list_sessions(request.client.host if request.client else None, settings.api_key):
        raise HTTPProblem(
            403,
            "sessions: this server has no API_KEY, so it lists sessions only to clients on its "
            "own machine; set API_KEY to list them from elsewhere (a session id still reaches "
            "its session)",
            "forbidden",
        )
    summaries = service.store.summaries(limit, offset) if service.store is not None else []
    return SessionListResponse(sessions=[SessionSummaryResponse.of(s) for s in summaries])


@router.get("/sessions/{session_id}", response_model=SessionResponse)
def get_session(session_id: str, service: ServiceDep) -> SessionResponse:
    check_session_id(session_id)
    conversation = service.get_session(session_id)
    if conversation is None:
        raise no_session(session_id)
    return SessionResponse(
        session_id=conversation.id,
        system_prompt=conversation.system_prompt,
        messages=conversation.messages,
    )


@router.patch("/sessions/{session_id}", response_model=SessionSummaryResponse)
def rename_session(
    session_id: str, body: RenameRequest, service: ServiceDep
) -> SessionSummaryResponse:
    """Give a session a title (the list shows the start of its first message until then)."""
    check_session_id(session_id)
    if service.store is None or not service.store.rename(session_id, body.title.strip()):
        raise no_session(session_id)
    return SessionSummaryResponse.of(service.store.summary(session_id))


@router.delete("/sessions/{session_id}", status_code=204)
def delete_session(session_id: str, service: ServiceDep) -> Response:
    """Delete a session with its replies' records and the feedback on them."""
    check_session_id(session_id)
    if not service.delete_session(session_id):
        raise no_session(session_id)
    return Response(status_code=204)


@router.post("/sessions/{session_id}/feedback", status_code=201, response_model=FeedbackResponse)
def add_feedback(session_id: str, body: FeedbackRequest, service: ServiceDep) -> FeedbackResponse:
    """Judge one reply: rate it, edit it (the edit is preferred to it and shown from now on),
    or choose one of its candidates instead. ``python scripts/export_preferences.py`` turns
    these into preference pairs for ``make dpo``."""
    check_session_id(session_id)
    record = service.feedback.judge(
        session_id,
        body.message_index,
        "api",
        rating=body.rating,
        comment=body.comment,
        edit=body.edit,
        chosen_candidate=body.chosen_candidate,
        rejected_candidate=body.rejected_candidate,
    )
    return FeedbackResponse.of(record)


@router.get("/sessions/{session_id}/feedback", response_model=FeedbackListResponse)
def list_feedback(session_id: str, service: ServiceDep) -> FeedbackListResponse:
    check_session_id(session_id)
    if service.get_session(session_id) is None:
        raise no_session(session_id)
    records = service.feedback.records(session_id)
    return FeedbackListResponse(feedback=[FeedbackResponse.of(r) for r in records])


@router.post("/sessions/{session_id}/candidates", status_code=201, response_model=CandidateResponse)
async def add_candidate(
    session_id: str,
    body: CandidateRequest,
    request: Request,
    pool: AdapterPoolDep,
    slots: SlotsDep,
) -> CandidateResponse:
    """Generate another reply to the message a reply answers (sample, or use another
    adapter, to get a different one). The session is unchanged until the candidate is chosen
    with feedback (``chosen_candidate``)."""
    check_session_id(session_id)
    service = await run_in_threadpool(pool.get, body.adapter)
    session = await run_in_threadpool(service.get_session, session_id)
    if session is None:
        raise no_session(session_id)
    index = body.message_index
    if index is None:
        index = len(session.messages) - 1
    params = body.apply_to(service.default_params)
    with slots.hold(client_id(request)):
        stream = await run_in_threadpool(service.start_candidate, session_id, index, params)
        [result] = await complete_unless_gone([stream], request)
    return CandidateResponse(
        candidate_id=stream.candidate_id,
        message_index=index,
        content=result.text,
        finish_reason=result.finish_reason,
        usage=Usage.of(result),
    )

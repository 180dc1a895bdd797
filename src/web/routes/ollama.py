"""Ollama's API under /api: chat and generate (streamed as newline-delimited JSON unless
``"stream": false``), the model list (``/api/tags``), a model's facts (``/api/show``), the
models in memory (``/api/ps``) and the version.

Model names are Ollama's ``name:tag``: the served model and each LoRA adapter in ADAPTERS_DIR
(``src/web/ollama_models.py``). Requests are translated into the core's types
(``src/web/ollama_translate.py``); errors come as Ollama's ``{"error": "..."}``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from src.chat.conversation import Conversation
from src.chat.service import ReplyStream
from src.web.deps import AdapterPoolDep, SettingsDep, SlotsDep, require_api_key
from src.web.errors import stream_error
from src.web.ollama_models import (
    details,
    find_model,
    listing,
    offered_models,
    parameter_count,
    size_on_disk,
)
from src.web.ollama_schemas import (
    ERRORS,
    STREAMED_LINES,
    ChatRequest,
    GenerateRequest,
    ShowRequest,
)
from src.web.ollama_translate import (
    chat_message,
    check_generate_fields,
    chunk,
    final_chunk,
    loaded_reply,
    logprobs_out,
    ollama_conversation,
    ollama_params,
    ollama_tools,
    tool_calls_out,
)
from src.web.security import SlotStreamingResponse, start_in_slot
from src.web.streaming import complete_unless_gone, deltas_of

# The Ollama release whose API these routes follow (clients check it for features).
OLLAMA_API_VERSION = "0.13.0"
NDJSON = "application/x-ndjson"

router = APIRouter(
    prefix="/api", tags=["ollama"], dependencies=[Depends(require_api_key)], responses=ERRORS
)


@router.post("/chat", responses=STREAMED_LINES)
async def chat(
    body: ChatRequest,
    request: Request,
    pool: AdapterPoolDep,
    settings: SettingsDep,
    slots: SlotsDep,
):
    model = find_model(body.model, pool)
    if not body.messages:
        return loaded_reply(model.name, chat=True)
    service = await run_in_threadpool(pool.get, model.adapter)  # may load it the first time
    conversation = ollama_conversation(body, settings)
    params = ollama_params(body, service.default_params, settings.max_length)
    tools = ollama_tools(body)
    (stream,), slot = await start_in_slot(
        slots, request, service.start_replies, conversation, None, params, 1, tools
    )

    def scores(tokens) -> dict[str, Any]:
        if not params.logprobs:
            return {}
        return {"logprobs": logprobs_out(tokens or [], params.top_logprobs)}

    def final(result) -> dict[str, Any]:
        if body.stream:  # the text, its scores and the calls went in the chunks before
            return final_chunk(model.name, result, {"message": chat_message("")})
        message = chat_message(result.text, result.tool_calls)
        return final_chunk(model.name, result, {"message": message, **scores(result.logprobs)})

    if not body.stream:
        return await whole(stream, slot, request, final)

    def piece(delta) -> dict[str, Any] | None:
        if not delta.text and not delta.logprobs:
            return None
        return chunk(model.name, {"message": chat_message(delta.text), **scores(delta.logprobs)})

    def calls(result) -> dict[str, Any] | None:
        if not result.tool_calls:
            return None
        message = {**chat_message(""), "tool_calls": tool_calls_out(result.tool_calls)}
        return chunk(model.name, {"message": message})

    return streamed(stream, slot, piece, calls, final)


@router.post("/generate", responses=STREAMED_LINES)
async def generate(
    body: GenerateRequest,
    request: Request,
    pool: AdapterPoolDep,
    settings: SettingsDep,
    slots: SlotsDep,
):
    model = find_model(body.model, pool)
    check_generate_fields(body)
    if not body.prompt:
        return loaded_reply(model.name, chat=False)
    service = await run_in_threadpool(pool.get, model.adapter)
    params = ollama_params(body, service.default_params, settings.max_length)
    if body.raw:  # the prompt as it is, no chat template (as legacy completions)
        start, args = service.start_completions, ([body.prompt], params)
    else:
        conversation = Conversation(
            system_prompt=body.system, messages=[{"role": "user", "content": body.prompt}]
        )
        start, args = service.start_replies, (conversation, None, params, 1, None)
    (stream,), slot = await start_in_slot(slots, request, start, *args)

    def scores(tokens) -> dict[str, Any]:
        if not params.logprobs:
            return {}
        return {"logprobs": logprobs_out(tokens or [], params.top_logprobs)}

    def final(result) -> dict[str, Any]:
        if body.stream:
            return final_chunk(model.name, result, {"response": ""})
        return final_chunk(model.name, result, {"response": result.text, **scores(result.logprobs)})

    if not body.stream:
        return await whole(stream, slot, request, final)

    def piece(delta) -> dict[str, Any] | None:
        if not delta.text and not delta.logprobs:
            return None
        return chunk(model.name, {"response": delta.text, **scores(delta.logprobs)})

    return streamed(stream, slot, piece, lambda _: None, final)


@router.get("/tags")
def tags(pool: AdapterPoolDep) -> dict[str, Any]:
    """Every model a request may name: the served one and each adapter."""
    return {"models": [listing(model, pool) for model in offered_models(pool)]}


@router.post("/show")
def show(body: ShowRequest, pool: AdapterPoolDep, settings: SettingsDep) -> dict[str, Any]:
    """A model's facts: its details, the chat template, the default parameters."""
    model = find_model(body.model or body.name or "", pool)
    base = pool.base
    loaded = getattr(base.backend, "loaded", None)
    facts = details(model, pool)
    family = facts["family"] or "model"
    defaults = base.default_params
    parameters = "\n".join(
        f"{name} {value}"
        for name, value in (
            ("temperature", defaults.temperature),
            ("top_k", defaults.top_k),
            ("top_p", defaults.top_p),
            ("repeat_penalty", defaults.repetition_penalty),
            ("num_predict", defaults.max_new_tokens),
        )
    )
    source = model.folder or getattr(loaded, "folder", None)
    modelfile = f"# Served by Mini-Claude\nFROM {getattr(loaded, 'folder', base.model_name)}\n"
    if model.adapter:
        modelfile += f"ADAPTER {source}\n"
    return {
        "modelfile": modelfile,
        "parameters": parameters,
        "template": getattr(getattr(loaded, "tokenizer", None), "chat_template", None) or "",
        "details": facts,
        "model_info": {
            "general.architecture": family,
            "general.parameter_count": parameter_total(loaded),
            f"{family}.context_length": base.context_window,
        },
        "capabilities": ["completion", "tools"],
        "modified_at": listing(model, pool)["modified_at"],
    }


def parameter_total(loaded: Any) -> int:
    folder = getattr(loaded, "folder", None)
    return parameter_count(folder) if folder else 0


@router.get("/ps")
def running(pool: AdapterPoolDep) -> dict[str, Any]:
    """The models in memory: the served one always, adapters while loaded (the least
    recently used is unloaded when MAX_LOADED_ADAPTERS would be passed)."""
    loaded = set(pool.loaded())
    never = (datetime.now(UTC) + timedelta(days=3650)).isoformat().replace("+00:00", "Z")
    models = []
    for model in offered_models(pool):
        if model.adapter is not None and model.adapter not in loaded:
            continue
        entry = listing(model, pool)
        entry.update(
            expires_at=never,  # keep_alive is not needed: nothing is unloaded on a timer
            size_vram=0,
            size=size_on_disk(model.folder),
            context_length=pool.base.context_window,
        )
        models.append(entry)
    return {"models": models}


@router.get("/version")
def version() -> dict[str, str]:
    return {"version": OLLAMA_API_VERSION}


# ---- one reply, whole or streamed ------------------------------------------------------------


async def whole(stream: ReplyStream, slot, request: Request, final) -> JSONResponse:
    try:
        (result,) = await complete_unless_gone([stream], request)
    finally:
        slot.release()
    return JSONResponse(final(result))


def streamed(stream: ReplyStream, slot, piece, calls, final) -> SlotStreamingResponse:
    async def lines() -> AsyncIterator[str]:
        try:
            async for delta in deltas_of(stream):
                body = piece(delta)
                if body is not None:
                    yield json.dumps(body, ensure_ascii=False) + "\n"
        except Exception as exc:  # headers are sent: Ollama's in-band error line
            yield json.dumps(stream_error(exc, "ollama"), ensure_ascii=False) + "\n"
            return
        for body in (calls(stream.result), final(stream.result)):
            if body is not None:
                yield json.dumps(body, ensure_ascii=False) + "\n"

    return SlotStreamingResponse(lines(), slot, replies=[stream], media_type=NDJSON)

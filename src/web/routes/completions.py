"""OpenAI's legacy completions (POST /v1/completions) and vLLM's POST /tokenize and
POST /detokenize: a raw prompt continued as it is, with no chat template.

Evaluation harnesses score multiple-choice answers here: ``max_tokens: 0`` with ``echo: true``
and ``logprobs`` returns the log-probability of each of the prompt's own tokens (the first is
``null``: nothing predicts it), as OpenAI and vLLM return them.
"""

import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from src.chat.deltas import TokenInfo
from src.chat.service import ChatResult, ChatService
from src.config import Settings
from src.errors import InvalidRequestError
from src.params import make_params
from src.web.deps import ServiceDep, SettingsDep, SlotsDep, require_api_key
from src.web.errors import sse_event, stream_error
from src.web.openai_schemas import (
    STREAMED,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
)
from src.web.openai_translate import (
    check_choices,
    openai_conversation,
    sampling_values,
    stream_chunk,
    usage_of,
)
from src.web.routes.chat import ERRORS
from src.web.security import SlotStreamingResponse, client_id
from src.web.streaming import complete_unless_gone, merged_deltas

router = APIRouter(tags=["openai"], dependencies=[Depends(require_api_key)], responses=ERRORS)


def prompts_of(prompt: str | list) -> list[str | list[int]]:
    """One prompt (text or token ids) per entry: OpenAI's four shapes of ``prompt``."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequestError("prompt: must not be empty", "prompt")
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]
    return list(prompt)


@router.post("/v1/completions", response_model=Completion, responses=STREAMED)
async def completions(
    body: CompletionRequest,
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    slots: SlotsDep,
):
    if service.is_remote:  # BACKEND=remote: the remote server answers, unchanged
        return await forwarded(service, "/v1/completions", body, slots, request)
    if body.suffix is not None:
        raise InvalidRequestError("suffix: inserting text is not supported; omit it", "suffix")
    prompts = prompts_of(body.prompt)
    check_choices(body.n * len(prompts), settings)
    values = {**service.default_params.model_dump(), **sampling_values(body)}
    if body.max_tokens is not None:
        values["max_new_tokens"] = body.max_tokens
    if body.logprobs is not None:
        values.update(logprobs=True, top_logprobs=body.logprobs, prompt_logprobs=body.echo)
    params = make_params(values)
    slot = slots.acquire(client_id(request))
    try:
        streams = await run_in_threadpool(service.start_completions, prompts, params, body.n)
        echoes = [
            _prompt_text(service, p) if body.echo else "" for p in prompts for _ in range(body.n)
        ]
    except BaseException:
        slot.release()
        raise
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if not body.stream:
        try:
            results = await complete_unless_gone(streams, request)
        finally:
            slot.release()
        choices = [
            _choice(index, result, echoes[index], body.logprobs)
            for index, result in enumerate(results)
        ]
        return Completion(
            id=completion_id,
            created=created,
            model=service.model_name,
            choices=choices,
            usage=_usage(results, body.n),
        )

    def chunk(index: int, text: str, logprobs=None, reason: str | None = None) -> dict:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        return stream_chunk("text_completion", completion_id, created, service.model_name, choice)

    async def events():
        offsets = [len(echo) if not body.echo else 0 for echo in echoes]
        echoed = [not body.echo] * len(streams)
        try:
            async for index, delta in merged_deltas(streams):
                result = streams[index].result
                if delta is None:
                    if not echoed[index]:  # nothing streamed: the prompt alone
                        echoed[index] = True
                        yield sse_event(chunk(index, echoes[index]))
                    reason = "length" if result.finish_reason == "length" else "stop"
                    yield sse_event(chunk(index, "", reason=reason))
                    continue
                text, tokens = delta.text, delta.prompt_logprobs + delta.logprobs
                if not echoed[index]:  # the prompt comes first, with its scores
                    text, echoed[index] = echoes[index] + text, True
                logprobs = None
                if body.logprobs is not None and tokens:
                    logprobs = _logprobs(tokens, body.logprobs, offsets[index]).model_dump()
                offsets[index] += len(text)
                if text or logprobs:
                    yield sse_event(chunk(index, text, logprobs))
        except Exception as exc:
            yield sse_event(stream_error(exc))
            return
        if body.stream_options is not None and body.stream_options.include_usage:
            usage = _usage([stream.result for stream in streams], body.n).model_dump()
            yield sse_event({**chunk(0, ""), "choices": [], "usage": usage})
        yield sse_event("[DONE]")

    return SlotStreamingResponse.server_sent(events(), slot, replies=streams)


async def forwarded(
    service: ChatService, route: str, body: BaseModel, slots=None, request: Request | None = None
) -> StreamingResponse:
    """The remote server's response to the same request, passed back as it comes."""
    slot = slots.acquire(client_id(request)) if slots is not None else None
    try:
        payload = body.model_dump(exclude_unset=True)
        response = await run_in_threadpool(service.forward, route, payload)
    except BaseException:
        if slot is not None:
            slot.release()
        raise

    async def relay():
        try:
            async for chunk in iterate_in_threadpool(response.iter_bytes()):
                yield chunk
        finally:
            await run_in_threadpool(response.close)
            if slot is not None:
                slot.release()

    media_type = response.headers.get("content-type", "application/json")
    return StreamingResponse(relay(), status_code=response.status_code, media_type=media_type)


def _prompt_text(service: ChatService, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else service.detokenize(prompt)


def _choice(index: int, result: ChatResult, echo: str, top: int | None) -> CompletionChoice:
    tokens = (result.prompt_logprobs or []) + (result.logprobs or [])
    return CompletionChoice(
        index=index,
        text=echo + result.text,
        logprobs=None if top is None else _logprobs(tokens, top, 0 if echo else None),
        finish_reason="length" if result.finish_reason == "length" else "stop",
    )


def _logprobs(tokens: list[TokenInfo], top: int, start: int | None) -> CompletionLogprobs:
    offsets, position = [], start or 0
    for token in tokens:
        offsets.append(position)
        position += len(token.token)
    return CompletionLogprobs(
        tokens=[token.token for token in tokens],
        token_logprobs=[token.logprob for token in tokens],
        top_logprobs=[
            None if token.logprob is None else {text: lp for text, _, lp in token.top[:top]}
            for token in tokens
        ],
        text_offset=offsets,
    )


def _usage(results: list[ChatResult], n: int):
    """Each prompt counts once, however many choices continue it."""
    usage = usage_of(results)
    prompt = sum(result.prompt_tokens for result in results[::n])
    usage.prompt_tokens, usage.total_tokens = prompt, prompt + usage.completion_tokens
    return usage


# ---- vLLM's tokenizer endpoints ------------------------------------------------------------


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="OpenAI chat messages, rendered by the chat template."
    )
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # true is not token 1

    model: str | None = None
    tokens: list[int] = Field(max_length=100_000)


class DetokenizeResponse(BaseModel):
    prompt: str


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, service: ServiceDep, settings: SettingsDep):
    if service.is_remote:
        return await forwarded(service, "/tokenize", body)
    return await run_in_threadpool(_tokenize, body, service, settings)


def _tokenize(body: TokenizeRequest, service: ChatService, settings: Settings) -> TokenizeResponse:
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("prompt: send either prompt or messages", "prompt")
    if body.prompt is not None:
        ids = service.tokenize(body.prompt, body.add_special_tokens)
    else:
        conversation = openai_conversation(body.messages, settings)
        ids = service.render(conversation, body.add_generation_prompt)
    return TokenizeResponse(count=len(ids), max_model_len=service.context_window, tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, service: ServiceDep):
    if service.is_remote:
        return await forwarded(service, "/detokenize", body)
    return DetokenizeResponse(prompt=await run_in_threadpool(service.detokenize, body.tokens))

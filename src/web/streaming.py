"""Bridge a (blocking) ReplyStream to an async generator of its deltas for streaming responses.

One thread per reply iterates the stream from start to end and hands each text delta to the
event loop. (Calling ``next()`` in a worker thread once per token, as anyio's ``to_thread``
would, costs two thread hand-offs and the thread pool's bookkeeping per token; with 8 clients
that work competes with the model's own threads for the 2 cores.)

If the consumer stops early (the client disconnected and the server cancelled the response),
the reply is abandoned: generation stops after the current token and nothing is saved.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from src.chat.deltas import Delta
from src.chat.service import ChatResult, ReplyStream

DISCONNECT_POLL_SECONDS = 0.1


class ClientGone(Exception):
    """The client of a request that was not streamed went away before its reply was done."""


class _End:
    """The last item on the queue: the stream ended, with ``error`` if it failed."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


async def deltas_of(stream: ReplyStream) -> AsyncIterator[Delta]:
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[Delta | _End] = asyncio.Queue()
    consumer_gone = threading.Event()

    def hand_over(item: Delta | _End) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            consumer_gone.set()

    def produce() -> None:
        iterator = stream.deltas()
        end = _End()
        try:
            for delta in iterator:
                if consumer_gone.is_set():
                    break
                hand_over(delta)
        except BaseException as exc:  # delivered to the consumer, which raises it
            end = _End(exc)
        finally:
            iterator.close()
            hand_over(end)

    # In the request's context, so that the reply's end is counted for its request's log line.
    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(produce,), name="reply-stream", daemon=True).start()
    ended = False
    try:
        while not ended:
            item = await items.get()
            if isinstance(item, _End):
                ended = True
                if item.error is not None:
                    raise item.error
            else:
                yield item
    finally:
        if not ended:  # the client went away: stop after the current token, keep nothing
            consumer_gone.set()
            stream.abandon()
            # Wait for the thread to close the stream, so the request's slot is not given
            # back while its generation still runs.
            with anyio.CancelScope(shield=True):
                while not isinstance(await items.get(), _End):
                    pass


async def merged_deltas(streams: list[ReplyStream]) -> AsyncIterator[tuple[int, Delta | None]]:
    """The deltas of several replies generated at once (OpenAI's ``n``), as (index, delta) in
    the order they come; (index, None) when reply ``index`` ends. An error in one ends all."""
    if len(streams) == 1:  # the usual case: no tasks
        async for delta in deltas_of(streams[0]):
            yield 0, delta
        yield 0, None
        return
    items: asyncio.Queue[tuple[int, Delta | None] | BaseException] = asyncio.Queue()

    async def pump(index: int, stream: ReplyStream) -> None:
        try:
            async for delta in deltas_of(stream):
                items.put_nowait((index, delta))
            items.put_nowait((index, None))
        except BaseException as exc:
            items.put_nowait(exc)

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        ended = 0
        while ended < len(streams):
            item = await items.get()
            if isinstance(item, BaseException):
                raise item
            ended += item[1] is None
            yield item
    finally:
        for task in tasks:  # a client gone: every reply is abandoned by its deltas_of
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def complete_unless_gone(streams: list[ReplyStream], request: Request) -> list[ChatResult]:
    """Generate whole replies (a request that is not streamed), watching the connection: if
    the client goes away, every reply is abandoned (generation stops after the current token,
    nothing is saved) and ``ClientGone`` is raised, so the request's slot is free at once.
    If one reply fails, the others are abandoned and its error is raised."""
    tasks = [asyncio.ensure_future(run_in_threadpool(stream.complete)) for stream in streams]
    try:
        while True:
            done, pending = await asyncio.wait(
                tasks, timeout=DISCONNECT_POLL_SECONDS, return_when=asyncio.FIRST_EXCEPTION
            )
            if not pending or any(task.exception() is not None for task in done):
                return [task.result() for task in tasks]  # raises the first failure
            if await request.is_disconnected():
                raise ClientGone
    finally:
        if not all(task.done() for task in tasks):
            for stream in streams:
                stream.abandon()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*tasks, return_exceptions=True)

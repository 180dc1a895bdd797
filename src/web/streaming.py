"""Bridge a (blocking) ReplyStream to an async generator for streaming responses.

Each ``next()`` runs in a worker thread so the event loop keeps serving other clients. If
the consumer stops early (the client disconnected and the server cancelled the response),
the reply is abandoned: generation stops after the current token and nothing is saved.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio

from src.chat.service import ReplyStream

_END = object()


async def deltas_of(stream: ReplyStream) -> AsyncIterator[str]:
    iterator = iter(stream)
    try:
        while True:
            delta = await anyio.to_thread.run_sync(next, iterator, _END)
            if delta is _END:
                return
            yield delta
    finally:
        if stream.result is None:  # we did not reach the end: the client went away
            stream.abandon()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(iterator.close)

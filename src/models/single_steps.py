"""A pass over several new tokens of one sequence, computed as one-token steps would be.

Speculative decoding (src/engine/batching.py, ``_lookup_step``) runs a reply's last token and
its drafted continuation through the model in one pass, and keeps each drafted token only if
the model would have chosen it one step at a time. For the reply to be the one plain decoding
gives, bit for bit in bf16 too, every position must get exactly the logits a one-token step
would give it. Matrix products that treat rows independently already do; inside
``single_steps()`` the two places that would not change how they work: attention runs
position by position with the one-token kernel (``Attention`` in src/models/transformer.py),
and the int8 output layer keeps its one-row inputs (``Int8DynamicLinear``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state = threading.local()  # the engine's scheduler thread runs the model; others unaffected


@contextmanager
def single_steps() -> Iterator[None]:
    """Inside, in this thread, each new token is computed as in a step of its own."""
    _state.active = True
    try:
        yield
    finally:
        _state.active = False


def in_single_steps() -> bool:
    return getattr(_state, "active", False)

"""Turning pydantic's validation errors into one readable line, for settings, requests and
training configurations alike. A leaf module."""

from __future__ import annotations

import reprlib
from typing import Any

from pydantic import ValidationError


def describe_validation_error(exc: ValidationError, name_of=lambda field: field) -> str:
    """One line per problem: the field, the value given and what is allowed."""
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "value"
        if error["type"] == "extra_forbidden":
            lines.append(f"{name_of(field)}: unknown parameter")
            continue
        lines.append(f"{name_of(field)}={short_repr(error.get('input'))}: {error['msg']}")
    return "; ".join(lines)


def first_field(exc: ValidationError) -> str | None:
    """The dotted name of the first field an error is about (None for the whole value)."""
    for error in exc.errors():
        return ".".join(str(part) for part in error["loc"]) or None
    return None


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 3, 80, 80, 80


def short_repr(value: Any, limit: int = 80) -> str:
    """repr() cut to ``limit`` characters: a message quotes the bad value, not all of it (a
    YAML alias bomb or a huge JSON list would make it megabytes long)."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an integer of over 4300 digits cannot be turned into text
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."

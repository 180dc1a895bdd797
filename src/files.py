"""Writing a file so that it is whole or not there: readers never see half of it."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary file beside ``path``, then rename it over
    ``path``: a crash or a full disk leaves the previous file as it was. Raises ``OSError``
    (or ``UnicodeEncodeError`` for a lone surrogate) with nothing left behind. The file gets
    the usual permissions (the umask's), as a plain write would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise

"""Where conversations live between requests: a SQLite file, so a restarted server still has
every conversation (the API's, the web UI's) and every judgement of a reply
(``src/chat/feedback.py`` keeps its tables in the same file).

Each completed exchange is appended in its own transaction (``BEGIN IMMEDIATE``), so two
requests to one session never overwrite each other, and a crash mid-reply leaves exactly the
exchanges completed before it. WAL mode lets readers proceed while a writer commits. A session
has one reply generated at a time (``claim``), from its latest state.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.chat.conversation import Conversation
from src.errors import InvalidRequestError, SessionBusyError, StorageError

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    system_prompt TEXT,
    messages TEXT NOT NULL DEFAULT '[]',   -- JSON list of {"role", "content"}
    created REAL NOT NULL,
    updated REAL NOT NULL,
    title TEXT                              -- a name given by the user; NULL until renamed
);
"""
SESSION_COLUMNS = {"id", "system_prompt", "messages", "created", "updated"}
# Columns added since the first release, each added to an older file when it is opened.
ADDED_COLUMNS = {"title": "ALTER TABLE sessions ADD COLUMN title TEXT"}
TITLE_CHARS = 60  # an untitled session is listed under the start of its first message


@dataclass(frozen=True)
class SessionSummary:
    """A session as the list of conversations shows it."""

    id: str
    title: str
    messages: int
    created: float
    updated: float


class SessionStore:
    """Thread-safe: one connection, used under a lock (SQLite serialises writes anyway)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path) if str(path) != ":memory:" else path
        if isinstance(self.path, Path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._busy: set[str] = set()  # sessions with a reply being generated (``claim``)
        # Run inside every write that deletes a session (or part of one), in its transaction:
        # the feedback tables remove what belonged to it.
        self.on_delete: list[Callable[[sqlite3.Connection, str, int], None]] = []
        self.feedback: Any = None  # its FeedbackStore (src/chat/feedback.py), once made
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        """Connect, and check the file is a sound sessions database before serving from it:
        a file that is not SQLite, a damaged one, one whose ``sessions`` table is another
        program's, a folder or an unreadable file in its place each raise ``StorageError``
        naming the file, and nothing is written to it."""
        try:
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise StorageError(f"sessions database {self.path}: cannot open it ({exc})") from exc
        try:
            damage = db.execute("PRAGMA quick_check").fetchone()[0]
            if damage != "ok":
                raise sqlite3.DatabaseError(f"damaged: {damage}")
            columns = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
            if columns and not columns >= SESSION_COLUMNS:
                raise sqlite3.DatabaseError(
                    f"its sessions table has the columns {sorted(columns)}, not ours "
                    f"({sorted(SESSION_COLUMNS)})"
                )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # durable across crashes in WAL mode
            db.executescript(SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
            for column, statement in ADDED_COLUMNS.items():
                if column not in columns:
                    db.execute(statement)
        except sqlite3.Error as exc:
            db.close()
            raise StorageError(
                f"sessions database {self.path}: not a usable sessions database ({exc}); "
                "move it aside (the server then starts a new one) or point DATA_DIR elsewhere"
            ) from exc
        return db

    def get(self, session_id: str) -> Conversation | None:
        with self._lock, self._reading(f"read session {session_id!r}"):
            row = self._db.execute(
                "SELECT system_prompt, messages FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
        if row is None:
            return None
        return Conversation(
            system_prompt=row[0],
            messages=self._messages(session_id, row[1]),
            id=session_id,
            persistent=True,
            saved=True,
        )

    def _messages(self, session_id: str, stored: str) -> list[dict]:
        try:
            messages = json.loads(stored)
            if isinstance(messages, list) and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
            ):
                return messages
        except (TypeError, ValueError):
            pass
        raise StorageError(
            f"sessions database {self.path}: session {session_id!r} is damaged (its messages "
            "are not a JSON list of messages); delete the session or restore the file"
        )

    def append_exchange(
        self,
        conversation: Conversation,
        user_message: str,
        reply: str,
        also: Callable[[sqlite3.Connection, list[dict]], None] | None = None,
    ) -> bool:
        """Add one (user, assistant) pair atomically. A session is first written with its
        first completed exchange, so a request that fails leaves no trace. A session deleted
        while a reply was being written stays deleted (returns False). A write that fails (a
        full disk) raises ``StorageError`` and leaves the session as it was. ``also`` runs in
        the same transaction with the session's new messages (the reply's record is written
        with the exchange or not at all)."""
        with self.transaction("save the exchange") as db:
            row = db.execute(
                "SELECT messages FROM sessions WHERE id = ?", (conversation.id,)
            ).fetchone()
            if row is None and conversation.saved:
                return False
            messages = self._messages(conversation.id, row[0]) if row else []
            messages += [
                {"role": "user", "content": user_message},
                {"role": "assistant", "content": reply},
            ]
            now = time.time()
            db.execute(
                "INSERT INTO sessions (id, system_prompt, messages, created, updated) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "messages = excluded.messages, updated = excluded.updated",
                (
                    conversation.id,
                    conversation.system_prompt,
                    json.dumps(messages, ensure_ascii=False),
                    now,
                    now,
                ),
            )
            if also is not None:
                also(db, messages)
        conversation.saved = True
        return True

    def truncate(self, session_id: str, keep: int) -> bool:
        """Keep the first ``keep`` messages (an even number: whole exchanges), removing the
        rest and everything recorded about them; False if the session is gone. Refused with
        ``SessionBusyError`` while a reply to the session is being generated."""
        if keep < 0 or keep % 2:
            raise ValueError(f"keep: {keep} is not a whole number of exchanges")
        with self._lock:
            if session_id in self._busy:
                raise SessionBusyError(
                    f"session_id: a reply to session {session_id!r} is being generated; remove "
                    "exchanges once it has ended",
                    "session_id",
                )
        with self.transaction("remove the last exchange") as db:
            messages = self.messages_in(db, session_id)
            if messages is None:
                return False
            self.write_messages(db, session_id, messages[:keep])
            for forget in self.on_delete:
                forget(db, session_id, keep)
        return True

    def rename(self, session_id: str, title: str) -> bool:
        with self.transaction("rename the session") as db:
            cursor = db.execute("UPDATE sessions SET title = ? WHERE id = ?", (title, session_id))
        return cursor.rowcount > 0

    def summaries(self, limit: int = 100, offset: int = 0) -> list[SessionSummary]:
        """Sessions, most recently updated first."""
        return self._summaries("ORDER BY updated DESC, id LIMIT ? OFFSET ?", (limit, offset))

    def summary(self, session_id: str) -> SessionSummary | None:
        found = self._summaries("WHERE id = ?", (session_id,))
        return found[0] if found else None

    def _summaries(self, where: str, args: tuple) -> list[SessionSummary]:
        with self._lock, self._reading("list the sessions"):
            rows = self._db.execute(
                f"SELECT id, title, messages, created, updated FROM sessions {where}", args
            ).fetchall()
        summaries = []
        for session_id, title, stored, created, updated in rows:
            messages = self._messages(session_id, stored)
            summaries.append(
                SessionSummary(
                    session_id, title or untitled(messages), len(messages), created, updated
                )
            )
        return summaries

    def messages_in(self, db: sqlite3.Connection, session_id: str) -> list[dict] | None:
        """A session's messages read inside a ``transaction`` (None: no such session)."""
        row = db.execute("SELECT messages FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return None if row is None else self._messages(session_id, row[0])

    def write_messages(self, db: sqlite3.Connection, session_id: str, messages: list) -> None:
        """Replace a session's messages inside a ``transaction``."""
        db.execute(
            "UPDATE sessions SET messages = ?, updated = ? WHERE id = ?",
            (json.dumps(messages, ensure_ascii=False), time.time(), session_id),
        )

    @contextmanager
    def transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): committed when the block ends,
        rolled back if it raises; SQLite's errors become ``StorageError`` naming the file and
        ``what`` was being done."""
        with self._lock, self._writing(what):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (SQLITE_FULL does): a second ROLLBACK
                # would raise and hide the real error.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def reading(self, what: str) -> Iterator[sqlite3.Connection]:
        """The connection, for reads; SQLite's errors become ``StorageError``."""
        with self._lock, self._reading(what):
            yield self._db

    def claim(self, conversation: Conversation) -> Callable[[], None]:
        """Reserve a stored session for one reply; returns the function that gives it back
        (safe to call more than once). A session already claimed, or changed since
        ``conversation`` was read from the store (another reply was saved in between), raises
        ``SessionBusyError``: a continuation is generated from the session's latest state, and
        two continuations of one session never run at once."""
        session_id = conversation.id
        with self._lock:
            if session_id in self._busy:
                raise SessionBusyError(
                    f"session_id: a reply to session {session_id!r} is being generated; send "
                    "this message once it has ended",
                    "session_id",
                )
            self._busy.add(session_id)
        try:
            stored = self.get(session_id) if conversation.saved else None
        except BaseException:
            self._release(session_id)
            raise
        if stored is not None and stored.messages != conversation.messages:
            self._release(session_id)
            raise SessionBusyError(
                f"session_id: session {session_id!r} changed while this request was being "
                "prepared (another reply was saved); send it again",
                "session_id",
            )
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._release(session_id)

        return release

    def _release(self, session_id: str) -> None:
        with self._lock:
            self._busy.discard(session_id)

    @contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StorageError(f"sessions database {self.path}: could not {what} ({exc})") from exc

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """SQLite's errors on a write (``database or disk is full``, a read-only or damaged
        file) become ``StorageError`` naming the file."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StorageError(
                f"sessions database {self.path}: could not {what} ({exc}); the sessions saved "
                "before are unchanged"
            ) from exc

    def delete(self, session_id: str) -> bool:
        """Delete a session and everything recorded about it (its replies' records and the
        feedback on them)."""
        with self.transaction("delete the session") as db:
            cursor = db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            for forget in self.on_delete:
                forget(db, session_id, 0)
        return cursor.rowcount > 0

    def count(self) -> int:
        with self._lock, self._reading("count the sessions"):
            return self._db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def untitled(messages: list[dict]) -> str:
    """How a session nobody named is listed: the start of its first message."""
    first = next((m["content"] for m in messages if m.get("role") == "user"), "")
    first = " ".join(first.split())
    if not first:
        return "New conversation"
    return first if len(first) <= TITLE_CHARS else first[: TITLE_CHARS - 1] + "…"


def check_reply_index(messages: list[dict], index: int) -> None:
    """``index`` names an assistant message of ``messages``, or ``InvalidRequestError``."""
    if not 0 <= index < len(messages) or messages[index].get("role") != "assistant":
        replies = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        raise InvalidRequestError(
            f"message_index: {index} is not a reply of this session (its replies are at "
            f"{replies or 'no index: it has none'})",
            "message_index",
        )

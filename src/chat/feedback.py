"""Judgements of replies, kept beside the sessions (the same SQLite file) for preference tuning.

Two tables. ``replies`` records each reply with the exact context it answers (the system
prompt and the messages before it), the model, the adapter and the generation parameters: a
session's replies as they are saved, candidates generated to compare with one, a user's edit
of one, and the CLI's replies when judged. ``feedback`` holds the judgements: a rating (good,
bad, or ``none`` to withdraw one) with an optional comment, or a preference of one reply over
another (an edit, or a candidate picked instead). A preference also makes the preferred reply
the session's. ``src/chat/preferences.py`` turns the records into chosen/rejected pairs.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from typing import Any

from src.chat.feedback_records import (
    FeedbackRecord,
    Generation,
    Origin,
    Rating,
    ReplyRecord,
    Source,
)
from src.chat.store import SessionStore, check_reply_index
from src.errors import InvalidRequestError, SessionNotFoundError

SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT,                -- NULL for a conversation outside the store (the CLI's)
    message_index INTEGER,          -- the assistant message's place in the session
    content TEXT NOT NULL,
    origin TEXT NOT NULL,           -- 'model', 'candidate' or 'edit'
    current INTEGER NOT NULL,       -- 1: the session shows this reply at message_index
    context TEXT NOT NULL,          -- JSON {"system_prompt", "messages"}: what it answers
    model TEXT,                     -- NULL for an edit (a person wrote it)
    adapter TEXT,
    params TEXT,                    -- JSON generation parameters
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS replies_by_turn ON replies (session_id, message_index);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reply_id INTEGER NOT NULL REFERENCES replies(id),  -- judged (in a preference: not chosen)
    rating TEXT,                    -- 'good', 'bad' or 'none' (withdrawn), NULL beside a preference
    preferred_id INTEGER REFERENCES replies(id),       -- preferred to reply_id
    comment TEXT,
    source TEXT NOT NULL,           -- 'api', 'ui' or 'cli'
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_by_reply ON feedback (reply_id);
"""


_made_lock = threading.Lock()
REPLY_COLUMNS = "id, session_id, message_index, content, origin, context, model, adapter, params"


class FeedbackStore:
    """Replies and judgements, in the session store's file and transactions."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store
        with store.transaction("create the feedback tables") as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
        store.on_delete.append(self._forget)

    @classmethod
    def of(cls, store: SessionStore) -> FeedbackStore:
        """The one FeedbackStore of ``store`` (made on first use)."""
        with _made_lock:
            if store.feedback is None:
                store.feedback = cls(store)
            return store.feedback

    # ---- recording replies ---------------------------------------------------------------------

    def recorder(
        self,
        session_id: str,
        system_prompt: str | None,
        context: list[dict],
        generation: Generation,
    ) -> Any:
        """What ``SessionStore.append_exchange`` runs with a new exchange (``also``): the
        reply just appended is recorded as the session's, with ``context``, the messages it was
        generated from (a reply edited meanwhile shows in the session, not in what this reply
        answered)."""

        def record(db: sqlite3.Connection, messages: list[dict]) -> None:
            index = len(messages) - 1
            self._insert(
                db, session_id, index, messages[index]["content"], "model", True,
                system_prompt, context, generation,
            )  # fmt: skip

        return record

    def add_candidate(
        self,
        session_id: str,
        index: int,
        content: str,
        generation: Generation,
        system_prompt: str | None,
        messages: list[dict],
    ) -> ReplyRecord:
        """Another reply to a session's turn ``index``, generated from ``messages`` (the
        session's up to that turn, as they were then), to compare with the one shown."""
        with self.store.transaction("record the candidate") as db:
            self._current(db, session_id, index)  # the turn still exists
            candidate_id = self._insert(
                db, session_id, index, content, "candidate", False,
                system_prompt, messages, generation,
            )  # fmt: skip
            return self._reply(db, candidate_id)

    # ---- judging -------------------------------------------------------------------------------

    def judge(
        self,
        session_id: str,
        index: int,
        source: Source,
        rating: Rating | None = None,
        comment: str | None = None,
        edit: str | None = None,
        chosen_candidate: int | None = None,
        rejected_candidate: int | None = None,
    ) -> FeedbackRecord:
        """Record a judgement of the reply a session shows at ``index``: a rating, an edit
        (kept as the preferred reply and shown from now on), one of its candidates chosen
        instead (shown from now on), or the reply kept over a candidate. Exactly one of the
        four, with an optional comment."""
        check_one_judgement(rating, edit, chosen_candidate, rejected_candidate)
        with self.store.transaction("save the feedback") as db:
            current = self._current(db, session_id, index)
            if rejected_candidate is not None:  # the reply shown is preferred to it
                candidate = self._candidate_of(db, current, rejected_candidate, "rejected")
                feedback_id = self._insert_feedback(
                    db, candidate, None, current.id, comment, source
                )
                return self._feedback(db, feedback_id)
            preferred_id = None
            if edit is not None:
                preferred_id = self._insert(
                    db, session_id, index, edit, "edit", False,
                    current.system_prompt, current.messages, Generation(None),
                )  # fmt: skip
            elif chosen_candidate is not None:
                preferred_id = self._candidate_of(db, current, chosen_candidate, "chosen")
            if preferred_id is not None:
                self._show(db, current, preferred_id)
            feedback_id = self._insert_feedback(
                db, current.id, rating, preferred_id, comment, source
            )
            return self._feedback(db, feedback_id)

    def judge_unsaved(
        self,
        system_prompt: str | None,
        messages: list[dict],
        reply: str,
        generation: Generation,
        source: Source,
        rating: Rating | None = None,
        comment: str | None = None,
        edit: str | None = None,
        reply_id: int | None = None,
    ) -> FeedbackRecord:
        """Judge a reply of a conversation that is not in the store (the CLI's): the reply
        is recorded with its context the first time (``reply_id`` None); later judgements of
        the same reply pass the record's id (``FeedbackRecord.reply.id``), so that, as for a
        session's reply, the latest rating of a reply is the one that counts."""
        check_one_judgement(rating, edit, None, None)
        with self.store.transaction("save the feedback") as db:
            context = (system_prompt, messages)
            if reply_id is None:
                reply_id = self._insert(db, None, None, reply, "model", False, *context, generation)
            preferred_id = None
            if edit is not None:
                by_hand = Generation(None)
                preferred_id = self._insert(db, None, None, edit, "edit", False, *context, by_hand)
            feedback_id = self._insert_feedback(db, reply_id, rating, preferred_id, comment, source)
            return self._feedback(db, feedback_id)

    # ---- reading -------------------------------------------------------------------------------

    def records(self, session_id: str | None = None) -> list[FeedbackRecord]:
        """Every judgement (of one session, if given), oldest first."""
        with self.store.reading("read the feedback") as db:
            if session_id is None:
                rows = db.execute("SELECT id FROM feedback ORDER BY id").fetchall()
            else:
                rows = db.execute(
                    "SELECT feedback.id FROM feedback JOIN replies ON replies.id = reply_id "
                    "WHERE replies.session_id = ? ORDER BY feedback.id",
                    (session_id,),
                ).fetchall()
            return [self._feedback(db, row[0]) for row in rows]

    def candidates(self, session_id: str, index: int) -> list[ReplyRecord]:
        with self.store.reading("read the candidates") as db:
            rows = db.execute(
                "SELECT id FROM replies WHERE session_id = ? AND message_index = ? "
                "AND origin = 'candidate' AND current = 0 ORDER BY id",
                (session_id, index),
            ).fetchall()
            return [self._reply(db, row[0]) for row in rows]

    # ---- inside a transaction ------------------------------------------------------------------

    def _current(self, db: sqlite3.Connection, session_id: str, index: int) -> ReplyRecord:
        """The record of the reply the session shows at ``index``; one made now for a reply
        saved before replies were recorded (its model and parameters are then unknown)."""
        messages = self.store.messages_in(db, session_id)
        if messages is None:
            raise SessionNotFoundError(f"session_id: no session {session_id!r}", "session_id")
        check_reply_index(messages, index)
        row = db.execute(
            "SELECT id FROM replies WHERE session_id = ? AND message_index = ? AND current = 1",
            (session_id, index),
        ).fetchone()
        if row is not None:
            return self._reply(db, row[0])
        system_prompt = db.execute(
            "SELECT system_prompt FROM sessions WHERE id = ?", (session_id,)
        ).fetchone()[0]
        reply_id = self._insert(
            db, session_id, index, messages[index]["content"], "model", True,
            system_prompt, messages[:index], Generation(None),
        )  # fmt: skip
        return self._reply(db, reply_id)

    def _candidate_of(
        self, db: sqlite3.Connection, current: ReplyRecord, candidate: int, role: str
    ) -> int:
        """``candidate``, checked to be a candidate for ``current``'s turn, not yet shown."""
        row = db.execute(
            "SELECT session_id, message_index, origin, current FROM replies WHERE id = ?",
            (candidate,),
        ).fetchone()
        expected = (current.session_id, current.message_index, "candidate", 0)
        if row is None or tuple(row) != expected:
            raise InvalidRequestError(
                f"{role}_candidate: {candidate} is not a candidate for message "
                f"{current.message_index} of this session (make one with POST "
                f"/sessions/{{id}}/candidates)",
                f"{role}_candidate",
            )
        return candidate

    def _show(self, db: sqlite3.Connection, current: ReplyRecord, preferred_id: int) -> None:
        """Make ``preferred_id`` the reply the session shows in place of ``current``."""
        db.execute("UPDATE replies SET current = 0 WHERE id = ?", (current.id,))
        db.execute("UPDATE replies SET current = 1 WHERE id = ?", (preferred_id,))
        content = db.execute("SELECT content FROM replies WHERE id = ?", (preferred_id,))
        messages = self.store.messages_in(db, current.session_id) or []
        messages[current.message_index] = {"role": "assistant", "content": content.fetchone()[0]}
        self.store.write_messages(db, current.session_id, messages)

    def _insert(
        self,
        db: sqlite3.Connection,
        session_id: str | None,
        index: int | None,
        content: str,
        origin: Origin,
        current: bool,
        system_prompt: str | None,
        messages: list[dict],
        generation: Generation,
    ) -> int:
        context = {"system_prompt": system_prompt, "messages": messages}
        cursor = db.execute(
            "INSERT INTO replies (session_id, message_index, content, origin, current, context, "
            "model, adapter, params, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                session_id,
                index,
                content,
                origin,
                int(current),
                json.dumps(context, ensure_ascii=False),
                generation.model,
                generation.adapter,
                None if generation.params is None else json.dumps(generation.params),
                time.time(),
            ),
        )
        return cursor.lastrowid

    @staticmethod
    def _insert_feedback(db, reply_id, rating, preferred_id, comment, source) -> int:
        cursor = db.execute(
            "INSERT INTO feedback (reply_id, rating, preferred_id, comment, source, created) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (reply_id, rating, preferred_id, comment, source, time.time()),
        )
        return cursor.lastrowid

    @staticmethod
    def _reply(db: sqlite3.Connection, reply_id: int) -> ReplyRecord:
        row = db.execute(f"SELECT {REPLY_COLUMNS} FROM replies WHERE id = ?", (reply_id,))
        (id_, session_id, index, content, origin, context, model, adapter, params) = row.fetchone()
        context = json.loads(context)
        return ReplyRecord(
            id_,
            session_id,
            index,
            content,
            origin,
            context["system_prompt"],
            context["messages"],
            Generation(model, adapter, None if params is None else json.loads(params)),
        )

    def _feedback(self, db: sqlite3.Connection, feedback_id: int) -> FeedbackRecord:
        row = db.execute(
            "SELECT reply_id, rating, preferred_id, comment, source, created FROM feedback "
            "WHERE id = ?",
            (feedback_id,),
        ).fetchone()
        reply_id, rating, preferred_id, comment, source, created = row
        preferred = None if preferred_id is None else self._reply(db, preferred_id)
        return FeedbackRecord(
            feedback_id, self._reply(db, reply_id), rating, preferred, comment, source, created
        )

    @staticmethod
    def _forget(db: sqlite3.Connection, session_id: str, from_index: int) -> None:
        """A session, or its messages from ``from_index`` on, were deleted: so are their
        replies' records and the feedback on them."""
        doomed = "SELECT id FROM replies WHERE session_id = ? AND message_index >= ?"
        db.execute(
            f"DELETE FROM feedback WHERE reply_id IN ({doomed}) OR preferred_id IN ({doomed})",
            (session_id, from_index, session_id, from_index),
        )
        db.execute(
            "DELETE FROM replies WHERE session_id = ? AND message_index >= ?",
            (session_id, from_index),
        )


def check_one_judgement(
    rating: str | None, edit: str | None, chosen: int | None, rejected: int | None = None
) -> None:
    named = {
        "rating": rating,
        "edit": edit,
        "chosen_candidate": chosen,
        "rejected_candidate": rejected,
    }
    given = [name for name, value in named.items() if value is not None]
    if len(given) != 1:
        raise InvalidRequestError(
            "feedback: give exactly one of rating, edit, chosen_candidate or rejected_candidate"
            + (f" (got {', '.join(given)})" if given else ""),
            given[-1] if given else "rating",
        )
    if rating is not None and rating not in ("good", "bad", "none"):
        raise InvalidRequestError(
            f"rating: {rating!r} is not one of 'good', 'bad', 'none'", "rating"
        )
    if edit is not None and not edit.strip():
        raise InvalidRequestError("edit: the edited reply must not be empty", "edit")

"""The CLI's /good, /bad and /edit: judgements of the last reply, saved where the server keeps
its feedback (DATA_DIR/sessions.sqlite3), so ``scripts/export_preferences.py`` finds them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from src.chat.conversation import Conversation
from src.chat.feedback import FeedbackStore
from src.chat.feedback_records import FeedbackRecord, Generation
from src.chat.store import SessionStore


@dataclass(frozen=True)
class LastReply:
    """The reply that can be judged: its context, its text and how it was generated."""

    system_prompt: str | None
    messages: list[dict]
    text: str
    generation: Generation
    record_id: int | None = None  # its record in the store, once judged


class ReplyJudge:
    def __init__(self, database: Path) -> None:
        self.database = database
        self.last: LastReply | None = None
        self._store: SessionStore | None = None

    def replied(self, conversation: Conversation, generation: Generation) -> None:
        """A reply was just added to ``conversation``: it is the one to judge now."""
        *context, reply = conversation.messages
        self.last = LastReply(conversation.system_prompt, context, reply["content"], generation)

    def forget(self) -> None:
        """The conversation changed (/undo, /reset, /load): no reply to judge until the next."""
        self.last = None

    def judge(
        self,
        conversation: Conversation,
        rating: str | None = None,
        comment: str | None = None,
        edit: str | None = None,
    ) -> FeedbackRecord | None:
        """Save a judgement of the last reply (None if there is none to judge). An edit also
        replaces the reply in the conversation."""
        last = self.last
        if last is None or not conversation.messages:
            return None
        record = self._feedback().judge_unsaved(
            last.system_prompt, last.messages, last.text, last.generation, "cli",
            rating=rating, comment=comment, edit=edit, reply_id=last.record_id,
        )  # fmt: skip
        self.last = replace(last, record_id=record.reply.id)  # judged again: the same reply
        if edit is not None:
            conversation.messages[-1] = {"role": "assistant", "content": edit}
            self.forget()  # the reply shown is the user's now, not the model's
        return record

    def _feedback(self) -> FeedbackStore:
        if self._store is None:
            self._store = SessionStore(self.database)
        return FeedbackStore.of(self._store)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

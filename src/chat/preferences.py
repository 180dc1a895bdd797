"""Judgements -> preference pairs in TRL's conversational format.

A pair is a prompt (the system prompt and the conversation up to the user's turn, as
messages) with a ``chosen`` and a ``rejected`` reply. Pairs come from:

- an edit: the edited reply is chosen over the model's;
- a choice: the candidate picked is chosen over the reply it replaced;
- ratings: a reply rated good and another rated bad *for the same prompt* (regenerate, rate
  both). A reply's latest rating counts ("none" withdraws it).

What cannot become a pair is counted under the reason why, so an export can say what it left
out (a lone rating has no counterpart to be compared with).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from src.chat.feedback_records import FeedbackRecord, ReplyRecord

NO_BAD_COUNTERPART = "a 'good' rating with no 'bad' reply to the same prompt"
NO_GOOD_COUNTERPART = "a 'bad' rating with no 'good' reply to the same prompt"
IDENTICAL = "chosen and rejected are the same text"
NOT_A_USER_TURN = "its prompt does not end with a user turn"
DUPLICATE = "the same pair again"
REPLACED = "a rating replaced by a later rating of the same reply"
WITHDRAWN = "a rating withdrawn ('none')"
ALREADY_PAIRED = "a rating of a reply already paired by an edit or a choice"


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str

    def to_json(self) -> dict[str, Any]:
        """One line of the JSONL file TRL's DPOTrainer reads (conversational format)."""
        return {
            "prompt": self.prompt,
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
        }


@dataclass
class Preferences:
    pairs: list[PreferencePair] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    _seen: set[str] = field(default_factory=set)

    def add(self, prompt: list[dict[str, str]], chosen: str, rejected: str) -> bool:
        """Add the pair unless it is unusable or already there (then count why)."""
        if not prompt or prompt[-1]["role"] != "user":
            self.skipped[NOT_A_USER_TURN] += 1
            return False
        if chosen.strip() == rejected.strip():
            self.skipped[IDENTICAL] += 1
            return False
        pair = PreferencePair(prompt, chosen, rejected)
        key = json.dumps(pair.to_json(), sort_keys=True)
        if key in self._seen:
            self.skipped[DUPLICATE] += 1
            return False
        self._seen.add(key)
        self.pairs.append(pair)
        return True


def prompt_of(reply: ReplyRecord) -> list[dict[str, str]]:
    """The messages a reply answers, with its system prompt first."""
    system = [{"role": "system", "content": reply.system_prompt}] if reply.system_prompt else []
    return system + [{"role": m["role"], "content": m["content"]} for m in reply.messages]


def preference_pairs(records: list[FeedbackRecord]) -> Preferences:
    """Every pair ``records`` (oldest first) make, and the count of what was left out."""
    found = Preferences()
    paired: set[int] = set()
    latest_rating: dict[int, FeedbackRecord] = {}
    for record in records:
        if record.preferred is not None:
            # The preferred reply's context: the conversation as the user sees it now (an
            # earlier reply edited since the rejected one was generated shows there).
            chosen = record.preferred
            if found.add(prompt_of(chosen), chosen.content, record.reply.content):
                paired.add(record.reply.id)
        elif record.rating is not None:
            if record.reply.id in latest_rating:
                found.skipped[REPLACED] += 1
            latest_rating[record.reply.id] = record

    by_prompt: dict[str, dict[str, list[ReplyRecord]]] = defaultdict(lambda: defaultdict(list))
    for record in latest_rating.values():
        if record.rating == "none":
            found.skipped[WITHDRAWN] += 1
            continue
        key = json.dumps(prompt_of(record.reply), ensure_ascii=False)
        by_prompt[key][record.rating].append(record.reply)
    for ratings in by_prompt.values():
        good, bad = ratings.get("good", []), ratings.get("bad", [])
        for chosen in good:
            for rejected in bad:
                found.add(prompt_of(chosen), chosen.content, rejected.content)
        if not bad:
            found.skipped[NO_BAD_COUNTERPART] += len(good)
        if not good:
            for reply in bad:
                found.skipped[ALREADY_PAIRED if reply.id in paired else NO_GOOD_COUNTERPART] += 1
    return found

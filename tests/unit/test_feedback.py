"""Feedback on replies: what is recorded with each reply, judgements, candidates, and the
preference pairs they make (a real SQLite file, a tiny model with the genuine tokenizer)."""

import io
import sqlite3

import pytest

from src.chat.feedback import FeedbackStore
from src.chat.feedback_records import Generation
from src.chat.preferences import (
    ALREADY_PAIRED,
    DUPLICATE,
    IDENTICAL,
    NO_BAD_COUNTERPART,
    NO_GOOD_COUNTERPART,
    REPLACED,
    WITHDRAWN,
    preference_pairs,
)
from src.chat.store import SessionStore
from src.cli.commands import ChatSession
from src.cli.judging import ReplyJudge
from src.errors import InvalidRequestError, SessionNotFoundError
from tests.conftest import GREEDY, make_service

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


@pytest.fixture()
def store(tmp_path):
    store = SessionStore(tmp_path / "sessions.sqlite3")
    yield store
    store.close()


@pytest.fixture()
def service(tiny_llama_path, store):
    service = make_service(tiny_llama_path, default_params=GREEDY, store=store)
    yield service
    service.close()


def chat(service, session=None, message="Tell me about the sea.", **params):
    session = session or service.new_session("Be brief.")
    service.start_reply(session, message, GREEDY.updated(max_new_tokens=6, **params)).complete()
    return service.get_session(session.id)


def test_a_saved_reply_is_recorded_with_its_context_model_and_parameters(service):
    session = chat(service, message="Hello there")
    session = chat(service, session, message="And then?", temperature=0.7, do_sample=True, seed=3)
    record = service.feedback.judge(session.id, 3, "api", rating="good")
    reply = record.reply
    assert reply.content == session.messages[3]["content"]
    assert reply.system_prompt == "Be brief."
    assert reply.messages == session.messages[:3]  # what it answered, ending with the user
    assert reply.generation.model == service.model_name and reply.generation.adapter is None
    assert reply.generation.params["temperature"] == 0.7
    assert reply.generation.params["seed"] == 3 and reply.generation.params["max_new_tokens"] == 6


def test_a_reply_records_only_the_messages_its_prompt_held(tiny_llama_path, store):
    """Oldest turns left out to fit the context window are not part of what a reply answered:
    a pair exported from it is the prompt the model saw."""
    service = make_service(tiny_llama_path, context_window=90, default_params=GREEDY, store=store)
    session = service.new_session("Be brief.")
    for number in range(4):
        stream = service.start_reply(
            session, f"question number {number} " * 4, GREEDY.updated(max_new_tokens=6)
        )
        result = stream.complete()
    service.close()
    assert result.dropped_messages >= 2
    messages = service.get_session(session.id).messages
    record = service.feedback.judge(session.id, len(messages) - 1, "api", rating="good").reply
    assert record.messages == messages[result.dropped_messages : -1]
    assert record.messages[0]["role"] == "user" and record.system_prompt == "Be brief."


def test_an_edit_is_preferred_to_the_reply_and_shown_from_then_on(service):
    session = chat(service)
    original = session.messages[1]["content"]
    record = service.feedback.judge(session.id, 1, "api", edit="The sea is big and salty.")
    assert record.kind == "edit" and record.reply.content == original
    assert service.get_session(session.id).messages[1]["content"] == "The sea is big and salty."
    [pair] = preference_pairs(service.feedback.records()).pairs
    assert pair.to_json() == {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tell me about the sea."},
        ],
        "chosen": [{"role": "assistant", "content": "The sea is big and salty."}],
        "rejected": [{"role": "assistant", "content": original}],
    }
    # The next reply is generated from the edited conversation.
    chat(service, service.get_session(session.id), message="More?")
    later = service.feedback.judge(session.id, 3, "api", rating="bad").reply
    assert later.messages[1]["content"] == "The sea is big and salty."


def test_a_candidate_leaves_the_session_until_it_is_chosen(service):
    session = chat(service)
    shown = session.messages[1]["content"]
    stream = service.start_candidate(session.id, 1, GREEDY.updated(max_new_tokens=4))
    candidate = stream.complete().text
    assert stream.candidate_id is not None and candidate != shown  # 4 tokens, not 6
    assert service.get_session(session.id).messages == session.messages
    assert [c.content for c in service.feedback.candidates(session.id, 1)] == [candidate]
    record = service.feedback.judge(session.id, 1, "ui", chosen_candidate=stream.candidate_id)
    assert record.kind == "choice" and record.preferred.content == candidate
    assert service.get_session(session.id).messages[1]["content"] == candidate
    assert service.feedback.candidates(session.id, 1) == []  # it is the session's reply now
    [pair] = preference_pairs(service.feedback.records()).pairs
    assert (pair.chosen, pair.rejected) == (candidate, shown)


def test_keeping_the_reply_over_a_candidate_is_a_preference_that_changes_nothing(service):
    session = chat(service)
    stream = service.start_candidate(session.id, 1, GREEDY.updated(max_new_tokens=2))
    stream.complete()
    record = service.feedback.judge(session.id, 1, "ui", rejected_candidate=stream.candidate_id)
    assert record.kind == "choice" and record.reply.content == stream.result.text
    assert service.get_session(session.id).messages == session.messages
    [pair] = preference_pairs(service.feedback.records()).pairs
    assert (pair.chosen, pair.rejected) == (session.messages[1]["content"], stream.result.text)


def test_two_ratings_of_replies_to_one_prompt_make_a_pair_and_a_lone_one_is_counted(service):
    session = chat(service)
    stream = service.start_candidate(session.id, 1, GREEDY.updated(max_new_tokens=3))
    stream.complete()
    service.feedback.judge(session.id, 1, "ui", rating="bad")
    service.feedback.judge(session.id, 1, "ui", chosen_candidate=stream.candidate_id)
    service.feedback.judge(session.id, 1, "ui", rating="good")  # the candidate, shown now
    other = chat(service, message="Something else")
    service.feedback.judge(other.id, 1, "api", rating="good")
    found = preference_pairs(service.feedback.records())
    chosen_pairs = {(p.chosen, p.rejected) for p in found.pairs}
    assert chosen_pairs == {(stream.result.text, session.messages[1]["content"])}
    assert found.skipped == {NO_BAD_COUNTERPART: 1, DUPLICATE: 1}


def test_the_latest_rating_of_a_reply_counts_and_none_withdraws_it(service):
    session = chat(service)
    for rating in ("good", "bad", "none"):
        service.feedback.judge(session.id, 1, "ui", rating=rating)
    found = preference_pairs(service.feedback.records())
    assert found.pairs == [] and found.skipped == {REPLACED: 2, WITHDRAWN: 1}


def test_an_edit_that_changes_nothing_and_a_bad_rating_beside_an_edit_are_counted(service):
    session = chat(service)
    same = session.messages[1]["content"]
    service.feedback.judge(session.id, 1, "api", rating="bad")
    service.feedback.judge(session.id, 1, "api", edit=same + "  ")
    found = preference_pairs(service.feedback.records())
    assert found.pairs == [] and found.skipped == {IDENTICAL: 1, NO_GOOD_COUNTERPART: 1}
    other = chat(service, message="Another")
    service.feedback.judge(other.id, 1, "api", rating="bad")
    service.feedback.judge(other.id, 1, "api", edit="A real fix.")
    found = preference_pairs(service.feedback.records())
    assert len(found.pairs) == 1 and found.skipped[ALREADY_PAIRED] == 1


def test_judgements_that_name_nothing_valid_are_refused_by_name(service):
    session = chat(service)
    cases = [
        ({"rating": "good"}, 0, "message_index"),  # the user's message, not a reply
        ({"rating": "good"}, 2, "message_index"),
        ({"rating": "great"}, 1, "rating"),
        ({"edit": "   "}, 1, "edit"),
        ({}, 1, "rating"),
        ({"rating": "good", "edit": "x"}, 1, "edit"),
        ({"chosen_candidate": 10_000}, 1, "chosen_candidate"),
    ]
    for judgement, index, field in cases:
        with pytest.raises(InvalidRequestError) as caught:
            service.feedback.judge(session.id, index, "api", **judgement)
        assert caught.value.field == field, judgement
    other = chat(service, message="Another")
    stream = service.start_candidate(other.id, 1, GREEDY.updated(max_new_tokens=2))
    stream.complete()
    with pytest.raises(InvalidRequestError, match="not a candidate for message 1 of this"):
        service.feedback.judge(session.id, 1, "api", chosen_candidate=stream.candidate_id)
    with pytest.raises(SessionNotFoundError):
        service.feedback.judge("A" * 22, 1, "api", rating="good")
    with pytest.raises(SessionNotFoundError):
        service.start_candidate("A" * 22, 1)
    assert service.feedback.records() == []  # nothing half-written


def test_deleting_a_session_or_its_last_exchange_deletes_what_was_recorded_about_it(service):
    session = chat(service)
    session = chat(service, session, message="Next")
    service.feedback.judge(session.id, 1, "api", rating="good")
    service.feedback.judge(session.id, 3, "api", edit="Better.")
    assert service.store.truncate(session.id, 2)
    assert [r.reply.message_index for r in service.feedback.records()] == [1]
    assert service.delete_session(session.id)
    assert service.feedback.records() == []
    with service.store.reading("count") as db:
        assert db.execute("SELECT COUNT(*) FROM replies").fetchone()[0] == 0


def test_sessions_are_listed_newest_first_under_a_title_or_their_first_message(service):
    first = chat(service, message="What is   the\nsea?")
    second = chat(service, message="x" * 100)
    [newest, oldest] = service.store.summaries()
    assert (newest.id, oldest.id) == (second.id, first.id)
    assert oldest.title == "What is the sea?" and oldest.messages == 2
    assert len(newest.title) == 60 and newest.title.endswith("…")
    assert service.store.rename(first.id, "The sea")
    assert service.store.summary(first.id).title == "The sea"
    assert not service.store.rename("A" * 22, "nothing")


def test_a_database_from_before_titles_and_feedback_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, system_prompt TEXT, "
        "messages TEXT NOT NULL DEFAULT '[]', created REAL NOT NULL, updated REAL NOT NULL)"
    )
    messages = '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]'
    db.execute("INSERT INTO sessions VALUES ('s' , NULL, ?, 1, 2)", (messages,))
    db.commit()
    db.close()
    store = SessionStore(path)
    feedback = FeedbackStore.of(store)
    assert store.summary("s").title == "hi"
    record = feedback.judge("s", 1, "api", rating="good")  # a reply from before: model unknown
    assert record.reply.content == "yo" and record.reply.generation == Generation(None)
    store.close()


def test_the_cli_saves_good_bad_and_edits_of_its_last_reply(tiny_llama_path, tmp_path):
    service = make_service(tiny_llama_path, default_params=GREEDY)
    database = tmp_path / "sessions.sqlite3"
    judge = ReplyJudge(database)
    out, err = io.StringIO(), io.StringIO()
    session = ChatSession(
        service, GREEDY.updated(max_new_tokens=5), service.new_conversation("Terse."),
        out=out, err=err, judge=judge,
    )  # fmt: skip
    session.handle("/good")
    assert "no reply to judge yet" in err.getvalue()
    session.handle("Hello")
    reply = session.conversation.messages[-1]["content"]
    session.handle("/bad too vague")
    session.handle("/edit Hello! How can I help?")
    assert session.conversation.messages[-1]["content"] == "Hello! How can I help?"
    session.handle("/undo")
    session.handle("/good")
    assert err.getvalue().count("no reply to judge yet") == 2
    judge.close()
    service.close()

    store = SessionStore(database)  # what another process (the export) reads
    rating, edit = FeedbackStore.of(store).records()
    assert (rating.rating, rating.comment, rating.source) == ("bad", "too vague", "cli")
    assert rating.reply.content == reply and rating.reply.session_id is None
    assert rating.reply.messages == [{"role": "user", "content": "Hello"}]
    assert rating.reply.system_prompt == "Terse."
    assert rating.reply.generation.params["max_new_tokens"] == 5
    assert edit.kind == "edit" and edit.preferred.content == "Hello! How can I help?"
    assert edit.reply.id == rating.reply.id  # two judgements of one reply, not two replies
    exported = preference_pairs([rating, edit])
    [pair] = exported.pairs
    assert (pair.chosen, pair.rejected) == ("Hello! How can I help?", reply)
    assert exported.skipped == {ALREADY_PAIRED: 1}  # the rating: the edit made its pair
    store.close()


def test_a_reply_records_the_context_it_was_generated_from_even_if_edited_meanwhile(service):
    session = chat(service)
    original = session.messages[1]["content"]
    stream = service.start_reply(session, "And then?", GREEDY.updated(max_new_tokens=4))
    service.feedback.judge(session.id, 1, "api", edit="Edited while the next reply ran.")
    stream.complete()
    stored = service.get_session(session.id)
    assert stored.messages[1]["content"] == "Edited while the next reply ran."
    assert len(stored.messages) == 4  # the continuation was saved after the edit
    record = service.feedback.judge(session.id, 3, "api", rating="good").reply
    assert record.messages[1]["content"] == original  # what that reply actually answered

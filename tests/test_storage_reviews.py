"""Analyst reviews and the audit log: concurrent reviews never silently overwrite each other, every
change is audited in the same transaction, and the audit log cannot be changed."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, event, select, text, update
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm.exc import StaleDataError
from storage_support import ANSWER_SPOOF, FAST_SPOOF, FFT, ZOOM, astronaut_png, server_only

from core.agent import investigate
from core.policies import ScriptedPolicy
from storage.cases import create_case
from storage.db import make_engine, session_factory
from storage.errors import AuditLogImmutableError, ConcurrentReviewError, InvalidReviewError
from storage.investigations import InvestigationRecorder
from storage.models import AuditEvent, Review, TurnFlag
from storage.reviews import NO_REVIEW, load_review, submit_review


@pytest.fixture
def inv_id(storage, face) -> str:
    """A finished investigation: fast answer, zoom, FFT, answer (turns 0-3)."""
    with storage.sessions.begin() as s:
        case = create_case(s, storage.files, astronaut_png(), filename="suspect.png", user="ana")
    rec = InvestigationRecorder(storage.sessions, storage.files, case.id, user="ana")
    for _ in rec.record(investigate(face, ScriptedPolicy([FAST_SPOOF, ZOOM, FFT, ANSWER_SPOOF]))):
        pass
    return rec.investigation_id


def _audit(storage, entity="review") -> list[AuditEvent]:
    with storage.sessions() as s:
        return s.scalars(select(AuditEvent).where(AuditEvent.entity == entity).order_by(AuditEvent.id)).all()


def test_a_review_overrides_the_verdict_flags_turns_and_corrects_the_answer(storage, inv_id):
    with storage.sessions.begin() as s:
        state = submit_review(
            s,
            inv_id,
            reviewer="ana",
            verdict="Real",
            expected_version=NO_REVIEW,
            notes="Skin pores visible at full size.",
            flags={1: "good_step", 2: ["wrong_tool", "wrong_reasoning"]},
            corrected_answer="<answer><Real></answer>",
        )
    assert state.version == 1 and state.verdict == "real"
    with storage.sessions() as s:
        loaded = load_review(s, inv_id)
    assert loaded == state
    assert {i: set(fs) for i, fs in loaded.flags.items()} == {1: {"good_step"}, 2: {"wrong_tool", "wrong_reasoning"}}


def test_saving_again_replaces_the_state_and_bumps_the_version(storage, inv_id):
    with storage.sessions.begin() as s:
        submit_review(
            s,
            inv_id,
            reviewer="ana",
            verdict="spoof",
            expected_version=NO_REVIEW,
            flags={1: "good_step", 2: "wrong_tool"},
        )
    with storage.sessions.begin() as s:
        state = submit_review(s, inv_id, reviewer="bob", verdict="unsure", expected_version=1, flags={1: "good_step"})
    assert (state.version, state.reviewer, state.flags) == (2, "bob", {1: ["good_step"]})
    with storage.sessions() as s:
        assert len(s.scalars(select(TurnFlag)).all()) == 1
    before, after = _audit(storage)[-1].before, _audit(storage)[-1].after
    assert (before["verdict"], before["version"], after["verdict"], after["version"]) == ("spoof", 1, "unsure", 2)


def test_concurrent_reviews_never_silently_overwrite_each_other(storage, inv_id, tmp_path):
    with storage.sessions.begin() as s:
        submit_review(s, inv_id, reviewer="ana", verdict="spoof", expected_version=NO_REVIEW)
    # Two analysts, two connections, both open version 1.
    ana, bob = storage.sessions(), session_factory(make_engine(storage.engine.url))()
    assert load_review(ana, inv_id).version == load_review(bob, inv_id).version == 1
    submit_review(ana, inv_id, reviewer="ana", verdict="real", expected_version=1, notes="ana's change")
    ana.commit()
    with pytest.raises(ConcurrentReviewError, match=r"changed by ana at .* reload it and apply your change again"):
        submit_review(bob, inv_id, reviewer="bob", verdict="unsure", expected_version=1, notes="bob's change")
    bob.rollback()
    with storage.sessions() as s:
        state = load_review(s, inv_id)
    assert (state.verdict, state.notes, state.version) == ("real", "ana's change", 2)
    assert [e.actor for e in _audit(storage)] == ["ana", "ana"]  # bob's attempt left no trace
    ana.close(), bob.close()


def test_a_save_racing_past_the_version_check_is_still_refused(storage, inv_id, tmp_path):
    with storage.sessions.begin() as s:
        submit_review(s, inv_id, reviewer="ana", verdict="spoof", expected_version=NO_REVIEW)
    # bob read version 1 into his session; ana saves version 2 before bob's UPDATE reaches the database.
    bob = session_factory(make_engine(storage.engine.url))()
    bob_review = bob.scalars(select(Review)).one()
    with storage.sessions.begin() as s:
        submit_review(s, inv_id, reviewer="ana", verdict="real", expected_version=1)
    bob_review.notes = "stale"
    with pytest.raises(StaleDataError, match="expected to update 1 row"):  # UPDATE ... WHERE version = 1
        bob.commit()
    bob.close()


def test_submit_review_turns_a_lost_race_into_a_clear_message(storage, inv_id, tmp_path):
    with storage.sessions.begin() as s:
        submit_review(s, inv_id, reviewer="ana", verdict="spoof", expected_version=NO_REVIEW)
    bob = session_factory(make_engine(storage.engine.url))()

    @event.listens_for(bob, "before_flush", once=True)
    def ana_saves_first(*_):  # after bob's version check passed, before his UPDATE
        with storage.sessions.begin() as s:
            submit_review(s, inv_id, reviewer="ana", verdict="real", expected_version=1)

    with pytest.raises(
        ConcurrentReviewError, match="saved by someone else while you were saving; nothing of yours was written"
    ):
        submit_review(bob, inv_id, reviewer="bob", verdict="unsure", expected_version=1)
    bob.rollback()
    bob.close()
    with storage.sessions() as s:
        assert (load_review(s, inv_id).verdict, load_review(s, inv_id).version) == ("real", 2)


def test_two_first_reviews_of_the_same_investigation_do_not_both_win(storage, inv_id):
    with storage.sessions.begin() as s:
        submit_review(s, inv_id, reviewer="ana", verdict="spoof", expected_version=NO_REVIEW)
    with pytest.raises(ConcurrentReviewError, match="changed by ana"):
        with storage.sessions.begin() as s:
            submit_review(s, inv_id, reviewer="bob", verdict="real", expected_version=NO_REVIEW)


def test_bad_verdicts_flags_and_turns_are_refused_with_the_allowed_values(storage, inv_id):
    with storage.sessions.begin() as s:
        with pytest.raises(InvalidReviewError, match="real, spoof, unsure"):
            submit_review(s, inv_id, reviewer="ana", verdict="fake", expected_version=NO_REVIEW)
        with pytest.raises(InvalidReviewError, match="wrong_tool, wrong_reasoning, good_step"):
            submit_review(s, inv_id, reviewer="ana", verdict="real", expected_version=NO_REVIEW, flags={1: "bad_step"})
        with pytest.raises(
            InvalidReviewError, match=r"turn 9 is not part of this investigation \(turns: \[0, 1, 2, 3\]\)"
        ):
            submit_review(s, inv_id, reviewer="ana", verdict="real", expected_version=NO_REVIEW, flags={9: "good_step"})


def test_the_audit_event_is_written_in_the_same_transaction_as_the_change(storage, inv_id, tmp_path):
    other = session_factory(make_engine(storage.engine.url))
    with pytest.raises(RuntimeError, match="power cut"):
        with storage.sessions.begin() as s:
            submit_review(s, inv_id, reviewer="ana", verdict="real", expected_version=NO_REVIEW)
            assert s.scalars(select(AuditEvent.action).where(AuditEvent.entity == "review")).all() == ["review.create"]
            with other() as o:  # not visible outside before the commit
                assert o.scalars(select(AuditEvent).where(AuditEvent.entity == "review")).all() == []
            raise RuntimeError("power cut after the change")
    with storage.sessions() as s:
        assert load_review(s, inv_id) is None  # neither the change ...
    assert _audit(storage) == []  # ... nor its audit event


def test_the_audit_log_cannot_be_changed_or_deleted(storage, inv_id):
    with storage.sessions.begin() as s:
        submit_review(s, inv_id, reviewer="ana", verdict="spoof", expected_version=NO_REVIEW)
    with storage.sessions() as s:
        ev = s.scalars(select(AuditEvent).where(AuditEvent.entity == "review")).one()
        ev.actor = "mallory"
        with pytest.raises(AuditLogImmutableError, match="append-only"):
            s.flush()
        s.rollback()
        s.delete(ev)
        with pytest.raises(AuditLogImmutableError, match="append-only"):
            s.flush()
        s.rollback()
        with pytest.raises(AuditLogImmutableError):
            s.execute(update(AuditEvent).values(actor="mallory"))
        with pytest.raises(AuditLogImmutableError):
            s.execute(delete(AuditEvent))
    with storage.engine.connect() as conn:  # raw SQL meets the database triggers
        with pytest.raises(DatabaseError, match="append-only"):
            conn.execute(text("UPDATE audit_events SET actor = 'mallory'"))
        conn.rollback()  # PostgreSQL refuses every later statement of a failed transaction
        with pytest.raises(DatabaseError, match="append-only"):
            conn.execute(text("DELETE FROM audit_events"))
    assert [e.actor for e in _audit(storage)] == ["ana"]


@server_only
def test_the_audit_log_cannot_be_truncated_on_postgresql(storage, inv_id):
    # TRUNCATE skips row triggers, so PostgreSQL has a statement trigger of its own.
    with storage.engine.connect() as conn, pytest.raises(DatabaseError, match="append-only"):
        conn.execute(text("TRUNCATE audit_events"))
    assert [e.action for e in _audit(storage, entity="case")] == ["case.create"]

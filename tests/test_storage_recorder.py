"""Recording investigations: every turn is committed as soon as the agent loop completes it, and a
stored investigation loads back as the same Trajectory, images included, ready to be re-run."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select
from storage_support import ANSWER_SPOOF, FAST_SPOOF, FFT, MALFORMED, ZOOM, astronaut_png

from core.agent import investigate
from core.events import InvestigationFinished, InvestigationStarted, TurnCompleted
from core.policies import ScriptedPolicy
from storage.cases import cases_with_image, create_case, record_export
from storage.db import make_engine, session_factory
from storage.errors import InvestigationStateError, NotFoundError
from storage.investigations import InvestigationRecorder, face_of, load_trajectory
from storage.models import AuditEvent, Case, Export, Investigation, ToolResult, Turn


@pytest.fixture
def case(storage):
    with storage.sessions.begin() as s:
        return create_case(s, storage.files, astronaut_png(), filename="suspect.png", user="ana")


def _record(storage, case, face, replies, **kwargs):
    rec = InvestigationRecorder(storage.sessions, storage.files, case.id, user="ana", **kwargs)
    events = list(
        rec.record(investigate(face, ScriptedPolicy(replies), image_sha256=case.image_sha256, source=case.filename))
    )
    return rec, events[-1].trajectory


def test_a_case_keeps_its_image_once_and_shows_its_hash(storage, case):
    data = astronaut_png()
    assert storage.files.read(case.image_sha256) == data
    with storage.sessions.begin() as s:
        again = create_case(s, storage.files, data, filename="copy.png", user="bob")
    # Same bytes: one file, but a second case (a second intake, by someone else, under another name).
    assert again.id != case.id and again.image_sha256 == case.image_sha256
    with storage.sessions() as s:
        assert [c.id for c in cases_with_image(s, case.image_sha256)] == [case.id, again.id]
        assert s.scalars(select(AuditEvent.actor).where(AuditEvent.action == "case.create")).all() == ["ana", "bob"]
    assert len([p for p in storage.files.root.rglob("*") if p.is_file()]) == 1


def test_long_file_names_and_paths_are_kept_whole(storage, face):
    # Longer than a VARCHAR(255) or (1024): PostgreSQL enforces such lengths where SQLite ignores them.
    name = "é" * 300 + ".png"
    source = "/evidence/" + "deep/" * 300 + name
    with storage.sessions.begin() as s:
        case = create_case(s, storage.files, astronaut_png(), filename=name, user="ana")
    rec = InvestigationRecorder(storage.sessions, storage.files, case.id, user="ana")
    list(
        rec.record(
            investigate(face, ScriptedPolicy([FAST_SPOOF, ANSWER_SPOOF]), image_sha256=case.image_sha256, source=source)
        )
    )
    with storage.sessions() as s:
        assert s.get(Case, case.id).filename == name
        assert s.get(Investigation, rec.investigation_id).source == source


def test_every_turn_is_committed_as_soon_as_it_exists(storage, case, face, tmp_path):
    # A second engine on the same file sees only what was committed.
    other = session_factory(make_engine(storage.engine.url))
    rec = InvestigationRecorder(storage.sessions, storage.files, case.id, user="ana")
    seen = []
    for event in rec.record(investigate(face, ScriptedPolicy([FAST_SPOOF, ZOOM, FFT, ANSWER_SPOOF]))):
        with other() as s:
            if isinstance(event, InvestigationStarted):
                assert s.get(Investigation, event.trajectory.id).status == "running"
            if isinstance(event, TurnCompleted):
                turns = s.scalars(
                    select(Turn).where(Turn.investigation_id == rec.investigation_id).order_by(Turn.index)
                ).all()
                assert [t.index for t in turns] == list(range(event.turn.index + 1))
                seen.append(s.scalar(select(func.count()).select_from(ToolResult)))
            if isinstance(event, InvestigationFinished):
                inv = s.get(Investigation, rec.investigation_id)
                assert (inv.status, inv.verdict, inv.finished_at is not None) == ("completed", "spoof", True)
    assert seen == [0, 1, 2, 2]  # tool results arrive with their turns


def test_a_stored_investigation_loads_back_as_the_same_trajectory(storage, case, face):
    rec, traj = _record(storage, case, face, [FAST_SPOOF, ZOOM, FFT, ANSWER_SPOOF])
    with storage.sessions() as s:
        loaded = load_trajectory(s, storage.files, rec.investigation_id)
    assert loaded.to_dict() == traj.to_dict()  # texts, parsed fields, tool stats, verdict, timings
    assert np.array_equal(loaded.crop, traj.crop)
    for a, b in zip(loaded.tool_turns, traj.tool_turns, strict=True):
        assert np.array_equal(a.tool_result.image, b.tool_result.image)
    assert loaded.image_sha256 == case.image_sha256


def test_a_failed_investigation_keeps_its_turns_and_error(storage, case, face):
    rec, traj = _record(storage, case, face, [FAST_SPOOF, ZOOM])  # the script runs out: the policy fails
    assert traj.status == "failed"
    with storage.sessions() as s:
        inv = s.get(Investigation, rec.investigation_id)
        assert inv.status == "failed" and "ran out of replies" in inv.error and inv.error_traceback
        assert len(inv.turns) == 2
        assert load_trajectory(s, storage.files, inv.id).to_dict() == traj.to_dict()


def test_protocol_errors_are_stored_with_their_turn(storage, case, face):
    rec, traj = _record(storage, case, face, [FAST_SPOOF, MALFORMED, ANSWER_SPOOF])
    with storage.sessions() as s:
        turns = s.get(Investigation, rec.investigation_id).turns
        assert turns[1].parse_error == traj.turns[1].parse_error and turns[1].parse_error


def test_a_stored_investigation_can_be_re_run_on_the_same_pixels(storage, case, face):
    first, _ = _record(storage, case, face, [FAST_SPOOF, FFT, ANSWER_SPOOF])
    with storage.sessions() as s:
        old = load_trajectory(s, storage.files, first.investigation_id)
    rerun, traj = _record(storage, case, face_of(old), [FAST_SPOOF, ANSWER_SPOOF], rerun_of=old.id)
    assert traj.status == "completed" and np.array_equal(traj.crop, old.crop)
    with storage.sessions() as s:
        assert s.get(Investigation, rerun.investigation_id).rerun_of == old.id
        assert [i.id for i in s.get(Case, case.id).investigations] == [old.id, rerun.investigation_id]


def test_the_investigation_lifecycle_is_in_the_audit_log(storage, case, face):
    rec, _ = _record(storage, case, face, [FAST_SPOOF, FFT, ANSWER_SPOOF])
    with storage.sessions() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.action != "case.create").order_by(AuditEvent.id)).all()
    assert [r.action for r in rows] == [
        "investigation.start",
        "turn.record",
        "turn.record",
        "turn.record",
        "investigation.finish",
    ]
    assert rows[0].actor == "ana" and rows[0].after["case_id"] == case.id
    assert rows[-1].before["status"] == "running" and rows[-1].after == rows[-1].after | {
        "status": "completed",
        "verdict": "spoof",
    }


def test_events_out_of_order_or_for_a_wrong_case_are_refused(storage, case, face):
    events = list(investigate(face, ScriptedPolicy([FAST_SPOOF, ANSWER_SPOOF])))
    rec = InvestigationRecorder(storage.sessions, storage.files, case.id, user="ana")
    with pytest.raises(InvestigationStateError, match="before InvestigationStarted"):
        rec.on_event(next(e for e in events if isinstance(e, TurnCompleted)))
    with pytest.raises(NotFoundError, match="create the case"):
        InvestigationRecorder(storage.sessions, storage.files, "nope", user="ana").on_event(events[0])
    wrong = list(investigate(face, ScriptedPolicy([FAST_SPOOF]), image_sha256="f" * 64))
    with pytest.raises(InvestigationStateError, match="right case"):
        rec.on_event(wrong[0])


def test_exports_keep_a_copy_of_what_was_handed_out(storage, case, face):
    rec, _ = _record(storage, case, face, [FAST_SPOOF, ANSWER_SPOOF])
    with storage.sessions.begin() as s:
        exp = record_export(
            s,
            storage.files,
            rec.investigation_id,
            b'{"verdict": "spoof"}',
            format="json",
            filename="report.json",
            user="ana",
        )
    with storage.sessions() as s:
        assert storage.files.read(s.get(Export, exp.id).file_sha256) == b'{"verdict": "spoof"}'
        assert s.scalars(select(AuditEvent.action).where(AuditEvent.entity == "export")).all() == ["export.create"]

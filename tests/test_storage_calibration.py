"""Calibration profiles in storage: kept once under their content hash, activated (the latest activation
is the active profile) and rolled back with an audit event in the same transaction, never changed or
deleted, refused when their JSON no longer hashes to their id; every run records the profile it was
calibrated with, and migration 0003 upgrades a database of 0002 keeping every row."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from alembic import command
from sqlalchemy import delete, insert, inspect, select, text, update
from sqlalchemy.exc import DatabaseError
from storage_support import ANSWER_SPOOF, FAST_SPOOF, HEAD, ZOOM, astronaut_png, server_only

from core.agent import investigate
from core.calibration import CalibrationProfile, ScoreModel
from core.policies import ScriptedPolicy
from storage import calibration as cal
from storage.cases import create_case
from storage.db import alembic_config, init_db, make_engine, session_factory
from storage.errors import (
    CalibrationError,
    CalibrationImmutableError,
    InvestigationStateError,
    NotFoundError,
    TamperedProfileError,
)
from storage.investigations import InvestigationRecorder, load_trajectory
from storage.models import AuditEvent, CalibrationActivation, CalibrationProfileRecord, Case, Investigation

WHEN = datetime(2026, 11, 1, 10, 0, tzinfo=timezone.utc)


def profile(name="site-A", b=0.5, threshold=0.6, policy="expert", version="v1") -> CalibrationProfile:
    return CalibrationProfile(
        policy=policy,
        policy_version=version,
        model=ScoreModel(a=1.0, b=b),
        threshold=threshold,
        target="eer",
        prior_strength=1.0,
        n_reviews=10,
        n_real=5,
        n_spoof=5,
        name=name,
        created_by="ana",
        created_at="2026-11-30T10:00:00+00:00",
        metrics={"after": {"n": 10, "auc": 0.9, "apcer": 0.2, "bpcer": 0.0, "hter": 0.1, "threshold": None}},
    )


def saved(storage, *profiles, user="ana") -> list[str]:
    with storage.sessions.begin() as s:
        return [cal.save_profile(s, p, user=user).id for p in profiles]


def events(storage, entity=cal.ENTITY) -> list[AuditEvent]:
    with storage.sessions() as s:
        return s.scalars(select(AuditEvent).where(AuditEvent.entity == entity).order_by(AuditEvent.id)).all()


def test_a_profile_is_kept_once_under_its_content_hash_and_loads_back_equal(storage):
    p = profile()
    assert saved(storage, p) == [p.id] and saved(storage, p, user="rita") == [p.id]  # the same content: one row
    with storage.sessions() as s:
        assert cal.load_profile(s, p.id).to_dict() == p.to_dict()
        (entry,) = cal.list_profiles(s)
        assert (entry.id, entry.name, entry.policy, entry.threshold, entry.created_by, entry.active) == (
            p.id,
            "site-A",
            "expert",
            0.6,
            "ana",
            False,
        )
        assert cal.active_profile(s) is None
        with pytest.raises(NotFoundError, match="no calibration profile 'abc'"):
            cal.load_profile(s, "abc")
    (ev,) = events(storage)
    assert (ev.action, ev.actor, ev.entity_id, ev.after["threshold"], ev.after["policy"]) == (
        "calibration_profile.create",
        "ana",
        p.id,
        0.6,
        "expert",
    )


def test_activating_a_profile_makes_it_active_and_is_audited_in_the_same_transaction(storage):
    a = profile()
    saved(storage, a)
    with pytest.raises(RuntimeError, match="power cut"):
        with storage.sessions.begin() as s:
            cal.activate(s, a.id, user="rita")
            assert cal.active_profile_id(s) == a.id
            raise RuntimeError("power cut after the activation")
    with storage.sessions() as s:
        assert cal.active_profile(s) is None  # neither the activation ...
    assert [e.action for e in events(storage)] == ["calibration_profile.create"]  # ... nor its audit event

    with storage.sessions.begin() as s:
        entry = cal.activate(s, a.id, user="rita")
    assert (entry.profile_id, entry.action, entry.activated_by, entry.threshold) == (a.id, "activate", "rita", 0.6)
    with storage.sessions() as s:
        assert cal.active_profile(s).to_dict() == a.to_dict()
        assert [p.active for p in cal.list_profiles(s)] == [True]
    ev = events(storage)[-1]
    assert (ev.action, ev.actor, ev.entity_id, ev.before, ev.after["active_profile"]) == (
        "calibration.activate",
        "rita",
        a.id,
        {"active_profile": None},
        a.id,
    )


def test_rollback_is_activating_an_earlier_profile_and_every_step_is_in_the_history_and_the_audit_log(storage):
    a, b = profile("site-A"), profile("site-A, new camera", b=1.5, threshold=0.7)
    saved(storage, a, b)
    steps = [(a.id, "ana"), (b.id, "ana"), (a.id, "rita"), (None, "rita")]
    for pid, user in steps:
        with storage.sessions.begin() as s:
            cal.activate(s, pid, user=user)
    with storage.sessions.begin() as s:
        assert cal.active_profile(s) is None  # switched off: new runs use the policy's own threshold
        cal.activate(s, a.id, user="ana")  # and back on
        again = cal.activate(s, a.id, user="ana")  # already active: nothing to record
        assert again.action == "rollback"
    with storage.sessions() as s:
        assert cal.active_profile_id(s) == a.id
        history = cal.activation_history(s)
        assert [(h.profile_id, h.action, h.activated_by) for h in history] == [
            (a.id, "rollback", "ana"),
            (None, "deactivate", "rita"),
            (a.id, "rollback", "rita"),
            (b.id, "activate", "ana"),
            (a.id, "activate", "ana"),
        ]
        counts = {p.id: p.activations for p in cal.list_profiles(s)}
        assert counts == {a.id: 3, b.id: 1}
    audited = [(e.action, e.entity_id, e.before["active_profile"]) for e in events(storage)[2:]]
    assert audited == [
        ("calibration.activate", a.id, None),
        ("calibration.activate", b.id, a.id),
        ("calibration.rollback", a.id, b.id),
        ("calibration.deactivate", a.id, a.id),
        ("calibration.rollback", a.id, None),
    ]


def test_switching_off_with_nothing_active_or_activating_an_unknown_profile_is_refused(storage):
    with storage.sessions() as s:
        with pytest.raises(CalibrationError, match="nothing to deactivate"):
            cal.deactivate(s, user="ana")
        with pytest.raises(NotFoundError, match="no calibration profile 'feedfacecafe'"):
            cal.activate(s, "feedfacecafe", user="ana")
    with storage.sessions() as s:
        assert s.scalars(select(CalibrationActivation)).all() == []


def test_profiles_and_activations_cannot_be_changed_or_deleted(storage):
    a = profile()
    saved(storage, a)
    with storage.sessions.begin() as s:
        cal.activate(s, a.id, user="ana")
    with storage.sessions() as s:
        row = s.get(CalibrationProfileRecord, a.id)
        row.profile = {**row.profile, "threshold": 0.01}
        with pytest.raises(CalibrationImmutableError, match="append-only"):
            s.flush()
        s.rollback()
        act = s.scalars(select(CalibrationActivation)).one()
        act.activated_by = "mallory"
        with pytest.raises(CalibrationImmutableError, match="append-only"):
            s.flush()
        s.rollback()
        s.delete(s.scalars(select(CalibrationActivation)).one())
        with pytest.raises(CalibrationImmutableError, match="append-only"):
            s.flush()
        s.rollback()
        with pytest.raises(CalibrationImmutableError):
            s.execute(update(CalibrationProfileRecord).values(name="mallory"))
        with pytest.raises(CalibrationImmutableError):
            s.execute(delete(CalibrationActivation))
    with storage.engine.connect() as conn:  # raw SQL meets the database triggers
        for sql in (
            "UPDATE calibration_profiles SET name = 'mallory'",
            "DELETE FROM calibration_profiles",
            "UPDATE calibration_activations SET profile_id = NULL",
            "DELETE FROM calibration_activations",
        ):
            with pytest.raises(DatabaseError, match="append-only"):
                conn.execute(text(sql))
            conn.rollback()  # PostgreSQL refuses every later statement of a failed transaction
    with storage.sessions() as s:
        assert cal.active_profile(s).to_dict() == a.to_dict()
        assert [(h.profile_id, h.activated_by) for h in cal.activation_history(s)] == [(a.id, "ana")]


@server_only
def test_profiles_and_activations_cannot_be_truncated_on_postgresql(storage):
    saved(storage, profile())
    for table in ("calibration_activations", "calibration_profiles"):
        with storage.engine.connect() as conn, pytest.raises(DatabaseError, match="append-only"):
            conn.execute(text(f"TRUNCATE {table} CASCADE"))


def _tamper(storage, profile_id: str, threshold: float) -> None:
    """Change a stored profile the way only someone with the database owner's rights can: guards off."""
    with storage.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.execute(text("DROP TRIGGER calibration_profiles_no_update"))
        else:
            conn.execute(text("ALTER TABLE calibration_profiles DISABLE TRIGGER calibration_profiles_no_update"))
        row = conn.execute(select(CalibrationProfileRecord.profile).where(CalibrationProfileRecord.id == profile_id))
        data = dict(row.scalar_one(), threshold=threshold)
        conn.execute(
            CalibrationProfileRecord.__table__.update()
            .where(CalibrationProfileRecord.__table__.c.id == profile_id)
            .values(profile=data)
        )


def test_a_profile_changed_in_the_database_is_refused(storage):
    a, b = profile(), profile("other", b=1.0)
    saved(storage, a, b)
    with storage.sessions.begin() as s:
        cal.activate(s, a.id, user="ana")
    _tamper(storage, a.id, 0.99)
    with storage.sessions() as s:
        with pytest.raises(TamperedProfileError, match=f"{a.id} was changed in the database"):
            cal.active_profile(s)
        with pytest.raises(TamperedProfileError):
            cal.activate(s, a.id, user="ana")
    with storage.sessions.begin() as s:  # an intact profile can still be activated instead
        cal.activate(s, b.id, user="ana")
        assert cal.active_profile(s).id == b.id


def _record(storage, face, meta: dict | None = None) -> str:
    with storage.sessions.begin() as s:
        case = create_case(s, storage.files, astronaut_png(), filename="a.png", user="ana")
    rec = InvestigationRecorder(storage.sessions, storage.files, case.id, user="ana")
    for _ in rec.record(investigate(face, ScriptedPolicy([FAST_SPOOF, ZOOM, ANSWER_SPOOF]), meta=meta)):
        pass
    return rec.investigation_id


def test_a_run_records_the_profile_it_was_calibrated_with_and_loads_back_with_it(storage, face):
    a = profile()
    saved(storage, a)
    inv_id = _record(storage, face, {"calibration_profile": a.summary()})
    plain = _record(storage, face, {"calibration_note": "The active calibration profile x was not applied."})
    with storage.sessions() as s:
        inv = s.get(Investigation, inv_id)
        assert (inv.calibration_profile_id, inv.calibration_note) == (a.id, None)
        assert load_trajectory(s, storage.files, inv_id).meta == {"calibration_profile": a.summary()}
        other = s.get(Investigation, plain)
        assert other.calibration_profile_id is None and "not applied" in other.calibration_note
        assert load_trajectory(s, storage.files, plain).meta == {"calibration_note": other.calibration_note}
        start = s.scalars(
            select(AuditEvent).where(AuditEvent.action == "investigation.start", AuditEvent.entity_id == inv_id)
        ).one()
        assert start.after["calibration_profile"] == a.id


def test_a_run_calibrated_with_a_profile_that_is_not_stored_is_refused(storage, face):
    ghost = profile("never saved")
    with pytest.raises(InvestigationStateError, match=f"profile {ghost.id}, which is not stored here"):
        _record(storage, face, {"calibration_profile": ghost.summary()})
    with storage.sessions() as s:
        assert s.scalars(select(Investigation)).all() == []


def test_the_migration_from_0002_keeps_every_row_adds_the_calibration_tables_and_columns_and_goes_back(
    tmp_path, database_url
):
    engine = make_engine(database_url, data_dir=tmp_path)
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
    assert "calibration_profiles" not in inspect(engine).get_table_names()
    inv_table = Investigation.__table__
    old_columns = {c["name"] for c in inspect(engine).get_columns("investigations")}
    assert "calibration_profile_id" not in old_columns
    with engine.begin() as conn:  # rows as a workbench of 0002 wrote them (only the columns it had)
        conn.execute(
            insert(Case.__table__).values(
                id="c1", image_sha256="ab" * 32, filename="old.png", byte_size=3, created_by="ana", created_at=WHEN
            )
        )
        conn.execute(insert(inv_table).values({k: v for k, v in _old_run().items() if k in old_columns}))
        conn.execute(
            insert(AuditEvent.__table__).values(
                at=WHEN, actor="ana", action="case.create", entity="case", entity_id="c1"
            )
        )
    init_db(engine)  # what open_storage does on the next start
    assert {"calibration_profiles", "calibration_activations"} <= set(inspect(engine).get_table_names())
    with session_factory(engine)() as s:
        inv = s.get(Investigation, "i1")
        assert (inv.case_id, inv.verdict, inv.score_spoof, inv.status, inv.started_by) == (
            "c1",
            "spoof",
            0.9,
            "completed",
            "ana",
        )
        assert (inv.calibration_profile_id, inv.calibration_note) == (None, None)
        assert [e.action for e in s.scalars(select(AuditEvent))] == ["case.create"]
        assert cal.active_profile(s) is None and cal.list_profiles(s) == []
    with engine.connect() as conn:  # init_db goes on to the head
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == HEAD
    with engine.begin() as conn:  # and back down, runs and all
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0002")
    assert "calibration_profiles" not in inspect(engine).get_table_names()
    assert {c["name"] for c in inspect(engine).get_columns("investigations")} == old_columns
    with engine.connect() as conn:
        assert conn.execute(text("SELECT verdict FROM investigations WHERE id = 'i1'")).scalar() == "spoof"
    engine.dispose()


def _old_run() -> dict:
    return {
        "id": "i1",
        "case_id": "c1",
        "policy": "expert",
        "policy_version": "v1",
        "params": {},
        "tools": [],
        "status": "completed",
        "verdict": "spoof",
        "score_spoof": 0.9,
        "timings_ms": {},
        "started_by": "ana",
        "started_at": WHEN,
    }

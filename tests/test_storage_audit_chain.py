"""The append-only tables refuse a row's replacement (SQLite's INSERT OR REPLACE, upserts) through SQL and
through the storage layer, and the audit log is a hash chain that ``tarfas audit verify`` checks: an
edited or removed row (guards dropped, as only the database owner can) is found."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import pytest
from alembic import command
from sqlalchemy import JSON, column, insert, select, table, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DatabaseError
from storage_support import HEAD, sqlite_only

from app.cli import main
from storage import audit
from storage.cases import create_case
from storage.db import alembic_config, init_db, make_engine, session_factory
from storage.models import AuditEvent, CalibrationActivation, CalibrationProfileRecord

WHEN = datetime(2026, 11, 2, 9, 30, 15, 123456, tzinfo=timezone.utc)


def _cases(storage, n: int, user: str = "ana") -> None:
    for i in range(n):
        with storage.sessions.begin() as s:
            create_case(s, storage.files, f"{user}-{i}".encode(), filename=f"{i}.png", user=user)


def _events(storage) -> list[AuditEvent]:
    with storage.sessions() as s:
        return s.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()


def _forged(event_id: int) -> dict:
    return {
        "id": event_id,
        "at": WHEN,
        "actor": "mallory",
        "action": "case.create",
        "entity": "case",
        "entity_id": "x",
        "before": None,
        "after": None,
        "chain_hash": "f" * 64,
    }


def _upsert(dialect_name: str, table, values: dict, **set_):
    dialect_insert = postgresql.insert if dialect_name == "postgresql" else sqlite.insert
    return dialect_insert(table).values(values).on_conflict_do_update(index_elements=["id"], set_=set_)


# --- no replacement --------------------------------------------------------------------------------
@sqlite_only
@pytest.mark.parametrize("recursive_triggers", [False, True])
def test_insert_or_replace_cannot_rewrite_an_audit_row_in_sql(storage, recursive_triggers):
    _cases(storage, 2)
    first = _events(storage)[0]
    with storage.engine.connect() as conn:
        conn.exec_driver_sql(f"PRAGMA recursive_triggers={'ON' if recursive_triggers else 'OFF'}")
        for verb in ("INSERT OR REPLACE", "REPLACE", "INSERT OR IGNORE"):
            with pytest.raises(DatabaseError, match="append-only"):
                conn.execute(
                    text(
                        f"{verb} INTO audit_events (id, at, actor, action, entity, entity_id, chain_hash) "
                        "VALUES (:id, '2026-01-01 00:00:00.000000', 'mallory', 'case.create', 'case', 'x', :h)"
                    ),
                    {"id": first.id, "h": "f" * 64},
                )
            conn.rollback()
    assert [(e.id, e.actor) for e in _events(storage)] == [(first.id, "ana"), (first.id + 1, "ana")]


@sqlite_only
def test_insert_or_replace_cannot_rewrite_an_audit_row_through_the_orm(storage):
    _cases(storage, 1)
    first = _events(storage)[0]
    with storage.sessions() as s, pytest.raises(DatabaseError, match="append-only"):
        s.execute(insert(AuditEvent).prefix_with("OR REPLACE"), _forged(first.id))
        s.commit()
    assert [(e.id, e.actor, e.chain_hash) for e in _events(storage)] == [(first.id, "ana", first.chain_hash)]
    with storage.sessions() as s:  # a new id is still an ordinary append
        assert audit.verify_chain(s).ok


def test_an_upsert_cannot_rewrite_an_audit_row(storage):
    _cases(storage, 1)
    first = _events(storage)[0]
    dialect = storage.engine.dialect.name
    with storage.sessions() as s, pytest.raises(DatabaseError, match="append-only"):
        s.execute(_upsert(dialect, AuditEvent.__table__, _forged(first.id), actor="mallory"))
    with storage.engine.connect() as conn:  # ON CONFLICT DO NOTHING is refused as well: the id exists
        with pytest.raises(DatabaseError, match="append-only"):
            conn.execute(
                text(
                    "INSERT INTO audit_events (id, at, actor, action, entity, entity_id, chain_hash) "
                    "VALUES (:id, :at, 'mallory', 'case.create', 'case', 'x', :h) ON CONFLICT DO NOTHING"
                ),
                {"id": first.id, "at": WHEN, "h": "f" * 64},
            )
    assert [(e.id, e.actor) for e in _events(storage)] == [(first.id, "ana")]


def test_calibration_profiles_and_activations_cannot_be_replaced_either(storage):
    dialect = storage.engine.dialect.name
    profile = {
        "id": "abcdef012345",
        "name": "p",
        "policy": "expert",
        "policy_version": "v1",
        "profile": {"threshold": 0.5},
        "created_by": "ana",
        "created_at": WHEN,
    }
    with storage.engine.begin() as conn:  # raw rows: only the guards are under test here
        conn.execute(insert(CalibrationProfileRecord.__table__).values(profile))
        conn.execute(
            insert(CalibrationActivation.__table__).values(
                id=1, profile_id=profile["id"], activated_by="ana", activated_at=WHEN
            )
        )
    forgeries = [
        _upsert(dialect, CalibrationProfileRecord.__table__, profile | {"name": "forged"}, name="forged"),
        _upsert(
            dialect,
            CalibrationActivation.__table__,
            {"id": 1, "profile_id": None, "activated_by": "mallory", "activated_at": WHEN},
            activated_by="mallory",
        ),
    ]
    if dialect == "sqlite":
        forgeries += [
            insert(CalibrationProfileRecord.__table__).prefix_with("OR REPLACE").values(profile | {"name": "forged"}),
            insert(CalibrationActivation.__table__)
            .prefix_with("OR REPLACE")
            .values(id=1, profile_id=None, activated_by="mallory", activated_at=WHEN),
        ]
    with storage.engine.connect() as conn:
        for stmt in forgeries:
            with pytest.raises(DatabaseError, match="append-only"):
                conn.execute(stmt)
            conn.rollback()
        assert conn.execute(text("SELECT name FROM calibration_profiles")).scalars().all() == ["p"]
        assert conn.execute(text("SELECT profile_id, activated_by FROM calibration_activations")).all() == [
            (profile["id"], "ana")
        ]


# --- the chain -------------------------------------------------------------------------------------
def test_every_event_is_chained_to_the_one_before(storage):
    _cases(storage, 3)
    events = _events(storage)
    prev = audit.GENESIS
    for e in events:
        assert e.chain_hash == audit.row_hash(prev, e)
        prev = e.chain_hash
    with storage.sessions() as s:
        check = audit.verify_chain(s)
    assert (check.ok, check.rows, check.head) == (True, 3, events[-1].chain_hash)


def test_the_chain_stays_whole_with_concurrent_writers(storage):
    errors = []

    def upload(user):
        try:
            _cases(storage, 5, user)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(f"analyst{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with storage.sessions() as s:
        check = audit.verify_chain(s)
    assert (check.ok, check.rows) == (True, 20)


def test_a_rolled_back_change_leaves_the_chain_whole(storage):
    _cases(storage, 1)
    with pytest.raises(RuntimeError):
        with storage.sessions.begin() as s:
            create_case(s, storage.files, b"gone", filename=None, user="bob")
            raise RuntimeError("power cut")
    _cases(storage, 1, "carl")
    with storage.sessions() as s:
        assert (audit.verify_chain(s).ok, audit.verify_chain(s).rows) == (True, 2)


# --- tarfas audit verify -------------------------------------------------------------------------
def _verify(tmp_path, database_url, capsys) -> tuple[int, str]:
    argv = ["audit", "verify", "--data-dir", str(tmp_path)] + (["--db", database_url] if database_url else [])
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def _guards_off(conn, verb: str) -> None:
    """What only the database owner (or whoever holds the SQLite file) can do: drop the guard."""
    if conn.dialect.name == "sqlite":
        conn.execute(text(f"DROP TRIGGER audit_events_no_{verb}"))
    else:
        conn.execute(text(f"ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_{verb}"))


def test_audit_verify_says_ok_on_an_untouched_store(storage, tmp_path, database_url, capsys):
    _cases(storage, 3)
    head = _events(storage)[-1].chain_hash
    assert _verify(tmp_path, database_url, capsys) == (0, f"audit log OK: 3 rows, chain head {head}\n")


def test_audit_verify_names_an_edited_row(storage, tmp_path, database_url, capsys):
    _cases(storage, 4)
    ids = [e.id for e in _events(storage)]
    with storage.engine.begin() as conn:
        _guards_off(conn, "update")
        conn.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE id = :id"), {"id": ids[2]})
    code, out = _verify(tmp_path, database_url, capsys)
    assert code == 1
    assert f"BROKEN at row id {ids[2]} (after 2 good rows)" in out and "changed" in out


def test_audit_verify_finds_an_edited_newest_row_and_a_row_without_a_hash(storage, tmp_path, database_url, capsys):
    _cases(storage, 2)
    ids = [e.id for e in _events(storage)]
    with storage.engine.begin() as conn:
        _guards_off(conn, "update")
        conn.execute(text("UPDATE audit_events SET after = NULL WHERE id = :id"), {"id": ids[-1]})
    code, out = _verify(tmp_path, database_url, capsys)
    assert code == 1 and f"row id {ids[-1]} (after 1 good rows)" in out


def test_audit_verify_finds_a_deleted_row(storage, tmp_path, database_url, capsys):
    _cases(storage, 4)
    ids = [e.id for e in _events(storage)]
    with storage.engine.begin() as conn:
        _guards_off(conn, "delete")
        conn.execute(text("DELETE FROM audit_events WHERE id = :id"), {"id": ids[1]})
    code, out = _verify(tmp_path, database_url, capsys)
    assert code == 1
    assert f"BROKEN at row id {ids[2]} (after 1 good rows)" in out
    assert f"removed; no row between ids {ids[0]} and {ids[2]}" in out


@sqlite_only
def test_audit_verify_refuses_a_folder_without_a_store(tmp_path, capsys):
    assert _verify(tmp_path / "nowhere", None, capsys) == (
        2,
        f"error: no case store at {tmp_path / 'nowhere'} (tarfas.db not found); give --data-dir or --db\n",
    )
    assert not (tmp_path / "nowhere").exists()


# --- the migration -------------------------------------------------------------------------------
def test_the_migration_from_0003_keeps_every_row_chains_them_and_goes_back(tmp_path, database_url, capsys):
    engine = make_engine(database_url, data_dir=tmp_path)
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    rows = [  # as a workbench of 0003 wrote them: no chain_hash
        {"at": WHEN, "actor": "ana", "action": "case.create", "entity": "case", "entity_id": "c1", "after": {"n": 1}},
        {"at": WHEN, "actor": "bob", "action": "review.create", "entity": "review", "entity_id": "1", "before": None},
        {"at": WHEN, "actor": "ana", "action": "x", "entity": "case", "entity_id": "c1", "after": {"s": 0.25, "b": []}},
    ]
    old_table = table(  # the columns audit_events had at 0003
        "audit_events",
        *[column(c, AuditEvent.__table__.c[c].type) for c in ("at", "actor", "action", "entity", "entity_id")],
        column("before", JSON()),
        column("after", JSON()),
    )
    with engine.begin() as conn:
        conn.execute(insert(old_table), [{"before": None, "after": None} | r for r in rows])
    code, out = _verify(tmp_path, database_url, capsys)  # verify reads, never migrates
    assert code == 2 and f"schema revision 0003, not {HEAD}" in out
    init_db(engine)  # what open_storage does on the next start
    with session_factory(engine)() as s:
        events = s.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        assert [(e.actor, e.action, e.after) for e in events] == [
            ("ana", "case.create", {"n": 1}),
            ("bob", "review.create", None),
            ("ana", "x", {"s": 0.25, "b": []}),
        ]
        assert events[0].at == WHEN
        assert (audit.verify_chain(s).ok, audit.verify_chain(s).rows) == (True, 3)
    assert _verify(tmp_path, database_url, capsys)[0] == 0
    with engine.connect() as conn:  # the guards are all there after the table copy (SQLite)
        for sql in ("UPDATE audit_events SET actor = 'mallory'", "DELETE FROM audit_events"):
            with pytest.raises(DatabaseError, match="append-only"):
                conn.execute(text(sql))
            conn.rollback()
    with session_factory(engine).begin() as s:  # new events chain on to the backfilled ones
        audit.record(s, "carl", "case.create", "case", "c2")
    with session_factory(engine)() as s:
        assert audit.verify_chain(s).rows == 4
    with engine.begin() as conn:  # and back down, rows and guards kept
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0003")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT actor FROM audit_events ORDER BY id")).scalars().all() == [
            "ana",
            "bob",
            "ana",
            "carl",
        ]
        with pytest.raises(DatabaseError, match="append-only"):
            conn.execute(text("DELETE FROM audit_events"))
    engine.dispose()


# --- tarfas audit verify --expect-head: a head kept elsewhere ----------------------------------------
def _verify_head(tmp_path, database_url, capsys, head: str) -> tuple[int, str]:
    db = ["--db", database_url] if database_url else []
    code = main(["audit", "verify", "--data-dir", str(tmp_path), *db, "--expect-head", head])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_a_kept_head_is_still_found_after_the_log_grew(storage, tmp_path, database_url, capsys):
    _cases(storage, 2)
    kept = _events(storage)[-1]
    _cases(storage, 2, "bob")
    code, out = _verify_head(tmp_path, database_url, capsys, kept.chain_hash.upper())
    assert code == 0 and "audit log OK: 4 rows" in out and f"the head you kept is row id {kept.id}" in out


def test_removing_the_newest_rows_passes_the_chain_but_not_the_kept_head(storage, tmp_path, database_url, capsys):
    _cases(storage, 4)
    events = _events(storage)
    with storage.engine.begin() as conn:
        _guards_off(conn, "delete")
        conn.execute(text("DELETE FROM audit_events WHERE id >= :id"), {"id": events[2].id})
    assert _verify(tmp_path, database_url, capsys)[0] == 0  # what is left is a whole chain
    code, out = _verify_head(tmp_path, database_url, capsys, events[-1].chain_hash)
    assert code == 1
    assert f"BROKEN: the head you kept, {events[-1].chain_hash}, is not in the chain (2 rows" in out


def test_a_kept_head_that_is_not_a_hash_is_refused(storage, tmp_path, database_url, capsys):
    code, out = _verify_head(tmp_path, database_url, capsys, "abc123")
    assert code == 2 and "--expect-head must be a 64-character SHA-256 hex digest" in out

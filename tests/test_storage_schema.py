"""The database: made by the Alembic migrations (which match the models exactly), on a real SQLite
file with WAL, foreign keys and a busy timeout, or on PostgreSQL (TARFAS_TEST_DATABASE_URL)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError
from storage_support import sqlite_only

from storage.cases import create_case
from storage.db import DB_FILENAME, alembic_config, init_db, make_engine
from storage.models import Base, Case, Turn

TABLES = {
    "cases",
    "investigations",
    "turns",
    "tool_results",
    "reviews",
    "turn_flags",
    "exports",
    "audit_events",
    "dataset_exports",
    "dataset_export_items",
    "calibration_profiles",
    "calibration_activations",
    "queued_runs",
    "analyst_actions",
}
HEAD = "0006"  # the newest migration in storage/migrations/versions
ROOT = Path(__file__).resolve().parents[1]


@sqlite_only
def test_open_storage_creates_a_sqlite_file_in_the_data_directory(storage, tmp_path):
    assert (tmp_path / DB_FILENAME).is_file()
    assert storage.engine.url.database == str(tmp_path / DB_FILENAME)
    assert TABLES <= set(inspect(storage.engine).get_table_names())
    with storage.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == HEAD


def test_the_migrations_match_the_models(storage):
    with storage.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_init_db_is_idempotent_and_migrations_go_down_and_up(storage):
    init_db(storage.engine)  # already at head: nothing to do
    cfg = alembic_config(storage.engine)
    with storage.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert not TABLES & set(inspect(storage.engine).get_table_names())
    init_db(storage.engine)
    assert TABLES <= set(inspect(storage.engine).get_table_names())


@sqlite_only
def test_sqlite_runs_in_wal_mode_with_foreign_keys_and_a_busy_timeout(storage):
    with storage.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL: safe through a process kill
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 5000


def test_a_turn_of_a_missing_investigation_is_refused(storage):
    with pytest.raises(IntegrityError, match="(?i)foreign key"):
        with storage.sessions.begin() as s:
            s.add(Turn(investigation_id="no-such-investigation", index=0, kind="fast", text="<Real><reason>x</reason>"))


def test_times_are_stored_as_utc_and_read_back_as_aware_utc(storage):
    # SQLite keeps no time zone; PostgreSQL answers in the server's (the test server's is +12:45/+13:45).
    local = datetime(2026, 3, 1, 9, 30, tzinfo=timezone(timedelta(hours=-5)))
    with storage.sessions.begin() as s:
        case = create_case(s, storage.files, b"x", filename=None, user="ana")
        case.created_at = local
    with storage.sessions() as s:
        back = s.get(Case, case.id).created_at
        assert back == local and back.utcoffset() == timedelta(0) and back.hour == 14
        assert (
            s.scalar(select(Case.id).where(Case.created_at == datetime(2026, 3, 1, 14, 30))) == case.id
        )  # naive means UTC


@sqlite_only
def test_any_sqlalchemy_url_can_be_given(tmp_path):
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    engine = make_engine(url)
    init_db(engine)
    assert (tmp_path / "elsewhere.db").is_file() and TABLES <= set(inspect(engine).get_table_names())
    engine.dispose()
    with pytest.raises(ValueError, match="URL or a data directory"):
        make_engine()


OPEN_AT_ONCE = """
import sys, time
from pathlib import Path
from storage.db import init_db, make_engine
data_dir, url, n = Path(sys.argv[1]), sys.argv[2] or None, int(sys.argv[3])
engine = make_engine(url, data_dir=data_dir)
engine.connect().close()
(data_dir / f"ready-{sys.argv[4]}").touch()
while len(list(data_dir.glob("ready-*"))) < n:  # start migrating together
    time.sleep(0.01)
init_db(engine)
"""


def test_processes_opening_a_new_database_at_once_all_get_the_schema(tmp_path, database_url):
    # The app and the CLI (or a team's workbenches) started together on an empty database.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AT_ONCE, str(tmp_path), database_url or "", "3", str(k)],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(3)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert results == [(0, "")] * 3
    engine = make_engine(database_url, data_dir=tmp_path)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]
    engine.dispose()


def test_concurrent_writers_wait_for_each_other_instead_of_failing(storage):
    # Several analysts saving at once (the app serves each from its own thread).
    errors = []

    def upload(user):
        try:
            for i in range(5):
                with storage.sessions.begin() as s:
                    create_case(s, storage.files, f"{user}-{i}".encode(), filename=None, user=user)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(f"analyst{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with storage.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Case)) == 20

"""The database: made by the Alembic migrations (which match the models exactly), on a real SQLite
file with WAL, foreign keys and a busy timeout."""

from __future__ import annotations

import threading

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from storage.db import DB_FILENAME, alembic_config, init_db, make_engine, open_storage
from storage.cases import create_case
from storage.models import Base, Case, Turn

TABLES = {"cases", "investigations", "turns", "tool_results", "reviews", "turn_flags", "exports", "audit_events",
          "dataset_exports", "dataset_export_items"}
HEAD = "0002"  # the newest migration in storage/migrations/versions


@pytest.fixture
def storage(tmp_path):
    st = open_storage(tmp_path)
    yield st
    st.close()


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


def test_sqlite_runs_in_wal_mode_with_foreign_keys_and_a_busy_timeout(storage):
    with storage.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL: safe through a process kill
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 5000


def test_a_turn_of_a_missing_investigation_is_refused(storage):
    with pytest.raises(IntegrityError, match="FOREIGN KEY"):
        with storage.sessions.begin() as s:
            s.add(Turn(investigation_id="no-such-investigation", index=0, kind="fast", text="<Real><reason>x</reason>"))


def test_any_sqlalchemy_url_can_be_given(tmp_path):
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    engine = make_engine(url)
    init_db(engine)
    assert (tmp_path / "elsewhere.db").is_file() and TABLES <= set(inspect(engine).get_table_names())
    engine.dispose()
    with pytest.raises(ValueError, match="URL or a data directory"):
        make_engine()


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

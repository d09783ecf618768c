"""Opening the database: SQLite in the data directory by default, any SQLAlchemy URL for a team.

The schema is made by Alembic (``init_db``), never by ``create_all``, so a database created today can
be upgraded by the migrations of tomorrow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import URL, Connection, Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

# Imported for the guards they register: the audit log, calibration profiles and activations are append-only.
from . import audit, calibration  # noqa: F401
from .errors import StorageBusyError, StorageFullError
from .filestore import FileStore

DB_FILENAME = "tarfas.db"
FILES_DIRNAME = "files"
BUSY_TIMEOUT_MS = 5000  # a writer waits this long for another (e.g. the CLI beside the app) to finish
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK = 0x7461_7266  # PostgreSQL advisory lock key ("tarf") held while migrating


def sqlite_url(data_dir: str | Path) -> str:
    return f"sqlite:///{Path(data_dir).resolve() / DB_FILENAME}"


def make_engine(url: str | URL | None = None, *, data_dir: str | Path | None = None) -> Engine:
    """An engine for ``url``, or for ``<data_dir>/tarfas.db`` when no URL is given.

    SQLite connections get WAL with synchronous=NORMAL (readers do not block the writer, and a killed
    process loses at most the transaction in flight), foreign keys (off by default in SQLite) and a busy timeout.
    """
    if url is None:
        if data_dir is None:
            raise ValueError("give a database URL or a data directory")
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        url = sqlite_url(data_dir)
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    event.listen(engine, "handle_error", _storage_error)
    return engine


# SQLite's primary result codes (the low byte of sqlite3.Error.sqlite_errorcode).
SQLITE_BUSY, SQLITE_IOERR, SQLITE_FULL = 5, 10, 13
PG_DISK_FULL = "53100"  # PostgreSQL's SQLSTATE disk_full


def _storage_error(ctx) -> Exception | None:
    """A full disk or a database held by another writer, as an error that says so (StorageFullError,
    StorageBusyError) instead of the driver's "disk I/O error" / "database is locked"; the transaction it
    hit is rolled back as before. Anything else passes through unchanged."""
    orig = ctx.original_exception
    code = getattr(orig, "sqlite_errorcode", None)
    where = ctx.engine.url.database if ctx.engine is not None else None
    where = f" {where}" if where else ""
    if (
        code is not None
        and code & 0xFF in (SQLITE_FULL, SQLITE_IOERR)
        or getattr(orig, "sqlstate", None) == PG_DISK_FULL
    ):
        return StorageFullError(
            f"cannot write to the database{where}: its disk is full or failing ({orig}); nothing of this change "
            "was saved. Free some space and try again."
        )
    if code is not None and code & 0xFF == SQLITE_BUSY:
        return StorageBusyError(
            f"the database{where} is busy: another process held its write lock for more than "
            f"{BUSY_TIMEOUT_MS / 1000:.0f} s; nothing of this change was saved. Try again in a moment."
        )
    return None


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL keeps every committed transaction through a crash or kill of the process (what
    # the per-turn commits are for); only a power loss can drop the last few. FULL syncs every commit.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.close()


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def init_db(engine: Engine) -> None:
    """Create or upgrade the schema to the newest migration (idempotent)."""
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        _lock_for_migration(conn)
        # Hand Alembic our connection so that it runs with the PRAGMAs above.
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def _lock_for_migration(conn: Connection) -> None:
    # Processes may open a new database at the same moment (the app and the CLI, a team's workbenches):
    # one migrates while the others wait, then find the schema at head. Without the lock they all read
    # "no schema yet" and all but one fail on CREATE TABLE.
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})  # released at commit
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock now, before Alembic reads; waits busy_timeout


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: rows stay readable after commit (the UI shows what it just saved).
    return sessionmaker(engine, expire_on_commit=False)


@dataclass
class Storage:
    """Everything the app and the CLI need to persist: the engine, sessions and the file store."""

    engine: Engine
    sessions: sessionmaker[Session]
    files: FileStore

    def close(self) -> None:
        self.engine.dispose()


def open_storage(data_dir: str | Path, url: str | None = None) -> Storage:
    """Open (and migrate) the database and the file store under ``data_dir``.

    ``url`` replaces the default SQLite file (e.g. ``postgresql+psycopg://...`` for a team); the files
    stay under ``<data_dir>/files``.
    """
    engine = make_engine(url, data_dir=data_dir)
    init_db(engine)
    return Storage(engine, session_factory(engine), FileStore(Path(data_dir) / FILES_DIRNAME))

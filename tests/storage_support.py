"""Helpers shared by the storage tests (and the crash worker): the database the tests run on (a real
SQLite file in the data directory, or a fresh schema on the PostgreSQL server that
``TARFAS_TEST_DATABASE_URL`` names), the astronaut photo as uploaded bytes, and scripted assistant replies."""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import skimage.data
from alembic.script import ScriptDirectory
from PIL import Image
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

from core import protocol
from core.protocol import ToolCall
from storage.db import MIGRATIONS

# The newest migration (what init_db upgrades to), read from the migration scripts.
HEAD = ScriptDirectory(str(MIGRATIONS)).get_current_head()

FAST_SPOOF = protocol.format_fast_answer("spoof", "Looks flat, maybe a print.")
ZOOM = protocol.format_tool_call_turn("Zoom on the eyes.", ToolCall("ZoomInTool", {"bbox": [40, 60, 180, 130]}))
FFT = protocol.format_tool_call_turn("Look for moire peaks.", ToolCall("FFTTool", {}))
ANSWER_SPOOF = protocol.format_answer_turn("Clear periodic peaks.", "spoof")
ANSWER_REAL = protocol.format_answer_turn("No spoof traces in any tool.", "real")
MALFORMED = "I think it is real."


# e.g. postgresql+psycopg://tarfas:tarfas@127.0.0.1:PORT/tarfas (scripts/pg-test-server.sh starts one);
# unset: every test gets its own SQLite file, as the workbench does by default.
TEST_DATABASE_URL = os.environ.get("TARFAS_TEST_DATABASE_URL") or None
sqlite_only = pytest.mark.skipif(
    TEST_DATABASE_URL is not None, reason="checks SQLite itself (TARFAS_TEST_DATABASE_URL is set)"
)
server_only = pytest.mark.skipif(
    TEST_DATABASE_URL is None, reason="needs a database server: set TARFAS_TEST_DATABASE_URL"
)


@contextmanager
def fresh_database() -> Iterator[str | None]:
    """The URL to hand to ``open_storage`` for one test: None (SQLite in the data directory) or, on a
    server, a new empty schema that is dropped afterwards, connections and all.

    The schema is both the connections' search_path (so the migrations, the tables and the audit
    trigger function all land in it) and their application_name (so the connections a test leaves
    open can be found and ended before the drop)."""
    if TEST_DATABASE_URL is None:
        yield None
        return
    schema = f"t_{uuid.uuid4().hex}"
    url = make_url(TEST_DATABASE_URL).update_query_dict(
        {"options": f"-csearch_path={schema}", "application_name": schema}
    )
    admin = create_engine(TEST_DATABASE_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :s"),
                {"s": schema},
            )
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def astronaut_png() -> bytes:
    """The bytes an analyst would upload: the astronaut photograph as a PNG file."""
    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, format="PNG")
    return buf.getvalue()


def noise_image(seed: int = 0, shape=(32, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)

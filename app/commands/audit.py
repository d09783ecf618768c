"""``tarfas audit verify``: check the audit log's hash chain (storage.audit)."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import EXIT_FAILED
from .flags import add_config_args, config_from_args

HELP = "check the audit log"


@dataclass
class VerifyOptions:
    data_dir: str = field(
        default="tarfas-data", metadata={"help": "case store folder: tarfas.db and the evidence files"}
    )
    db: str | None = field(default=None, metadata={"help": "SQLAlchemy database URL instead of <data-dir>/tarfas.db"})
    expect_head: str | None = field(
        default=None,
        metadata={
            "help": "a chain head printed by an earlier verify (kept elsewhere): it must still be a row of the "
            "chain, else the newest rows were removed or the chain rewritten (exit 1)"
        },
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True)
    verify = sub.add_parser(
        "verify",
        help="recompute the audit log's hash chain: OK with the number of rows, or the first row that was changed",
        description="Every audit row holds the SHA-256 of the previous row's hash and its own fields. A row edited "
        "or removed outside the workbench breaks the chain from there; exits 1 then. Keep the printed head hash "
        "elsewhere and give it back with --expect-head to detect a removal of the newest rows or a rewritten "
        "chain later.",
    )
    add_config_args(verify, VerifyOptions)


def run(args) -> int:
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from storage.audit import verify_chain
    from storage.db import DB_FILENAME, alembic_config, make_engine, session_factory

    opts = config_from_args(VerifyOptions, args)
    expect = (opts.expect_head or "").strip().lower() or None
    if expect is not None and not re.fullmatch(r"[0-9a-f]{64}", expect):
        raise ValueError(
            f"--expect-head must be a 64-character SHA-256 hex digest (a head verify printed), not {opts.expect_head!r}"
        )
    if opts.db is None and not (Path(opts.data_dir) / DB_FILENAME).is_file():
        raise ValueError(f"no case store at {opts.data_dir} ({DB_FILENAME} not found); give --data-dir or --db")
    engine = make_engine(opts.db, data_dir=opts.data_dir)
    try:
        # Read only: an older schema is reported, not migrated (opening the workbench migrates it).
        head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
        if current != head:
            raise ValueError(
                f"the database is at schema revision {current}, not {head}: "
                "open it once with this version (tarfas app) to upgrade it, then verify"
            )
        with session_factory(engine)() as session:
            check = verify_chain(session, expect_head=expect)
    finally:
        engine.dispose()
    if check.ok and expect is not None and check.expected_id is None:
        print(
            f"audit log BROKEN: the head you kept, {expect}, is not in the chain ({check.rows} rows, chain head "
            f"{check.head}): its newest rows were removed, or the chain was rewritten"
        )
        return EXIT_FAILED
    if check.ok:
        print(f"audit log OK: {check.rows} rows, chain head {check.head}")
        if expect is not None:
            print(f"the head you kept is row id {check.expected_id}; every row since it is chained to it")
        return 0
    print(f"audit log BROKEN at row id {check.broken_id} (after {check.rows} good rows): {check.reason}")
    return EXIT_FAILED

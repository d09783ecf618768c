"""The append-only audit log: who did what, when, with the state before and after.

Every change adds its :class:`AuditEvent` to the session that makes the change, so both are committed
(or rolled back) together. Audit rows are refused any update or delete: by the ORM here, and by
database triggers in the migrations (against raw SQL). An INSERT that would replace a row (SQLite's
``INSERT OR REPLACE``, an upsert's ``ON CONFLICT``) is refused by a BEFORE INSERT trigger (migration 0004).

Tamper evidence: each row's ``chain_hash`` is the SHA-256 of the previous row's ``chain_hash`` (``GENESIS``
for the first row) and the row's own fields in a canonical form (:func:`chain_hash`). Editing or removing
a row (possible only with the guards dropped, i.e. with the database owner's rights or the SQLite file) no
longer matches; :func:`verify_chain` (``tarfas audit verify``) finds the first row that does not.

Concurrent writers: the chain follows the ids. :func:`record` takes a lock that is held until the
transaction ends before it reads the previous row (PostgreSQL: a transaction-level advisory lock; SQLite:
the database write lock, taken by a no-op write), so the previous row it links to is the row with the
highest id when its own row is inserted, and no other writer can insert between them. Ids are assigned by
the INSERT made under that lock, so they increase in chain order; gaps left by rolled-back transactions do
not matter. Audit writers wait for each other from their event to their commit, so an event belongs at
the end of a short transaction (as every caller has it); on PostgreSQL a transaction that took the lock and
then waits for a row another audit writer holds is ended by the deadlock detector.

What the chain cannot show alone: removing the newest rows, or rewriting a row together with every hash
after it. Keep the head hash that ``audit verify`` prints somewhere else (a ticket, a signed e-mail) and
give it back later (``tarfas audit verify --expect-head HASH``, :func:`verify_chain`'s ``expect_head``) to
detect those: the kept head must still be a row of the chain.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
from sqlalchemy import event, insert, select, text
from sqlalchemy.orm import ORMExecuteState, Session

from .errors import AuditLogImmutableError
from .models import AuditEvent, utcnow

GENESIS = "0" * 64  # the "previous hash" of the first row
CHAIN_LOCK = 0x7461_7261  # PostgreSQL advisory lock key ("tara") held by a writer of the audit log until commit


def record(
    session: Session,
    actor: str,
    action: str,
    entity: str,
    entity_id: Any,
    before: dict | None = None,
    after: dict | None = None,
) -> None:
    """Add an audit event to ``session`` (committed with the change it describes).

    A Core INSERT, not ``session.add``: an event is never edited, and the ORM unit of work per event cost
    more than the database write (several events per investigation, profiled in benchmarks/bench_app.py).
    Pending changes are flushed first, so the event follows the change it describes. The event is linked
    to the previous one (``chain_hash``) under a lock held until the transaction ends (module docstring)."""
    session.flush()
    _lock_chain(session)
    prev = session.execute(select(AuditEvent.chain_hash).order_by(AuditEvent.id.desc()).limit(1)).scalar()
    row = {
        "at": utcnow(),
        "actor": actor,
        "action": action,
        "entity": entity,
        "entity_id": str(entity_id),
        "before": plain(before),
        "after": plain(after),
    }
    session.execute(insert(AuditEvent), row | {"chain_hash": chain_hash(prev or GENESIS, **row)})


def _lock_chain(session: Session) -> None:
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK})  # released at commit/rollback
    elif conn.dialect.name == "sqlite":
        # A write that changes nothing (and fires no trigger) still takes SQLite's write lock (waiting
        # busy_timeout for another writer), and a transaction holds it until it ends.
        conn.exec_driver_sql("UPDATE audit_events SET id = id WHERE 0")


def chain_hash(
    prev: str,
    at: datetime,
    actor: str,
    action: str,
    entity: str,
    entity_id: str,
    before: Any,
    after: Any,
) -> str:
    """The SHA-256 (hex) that links a row to the previous row's hash ``prev``: over compact JSON of
    ``[prev, at (UTC, ISO 8601, microseconds), actor, action, entity, entity_id, before, after]`` with
    sorted keys, ASCII only. The values are those the row reads back with (``before``/``after`` as plain JSON)."""
    at = at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)
    fields = [prev, at.isoformat(timespec="microseconds"), actor, action, entity, entity_id, before, after]
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def row_hash(prev: str, row: Any) -> str:
    """:func:`chain_hash` of a stored row (an :class:`AuditEvent` or a row of its table)."""
    return chain_hash(prev, row.at, row.actor, row.action, row.entity, row.entity_id, row.before, row.after)


@dataclass
class ChainCheck:
    """What :func:`verify_chain` found: ``rows`` checked in id order, the last good hash (``head``), and
    the first row that breaks the chain (None: the chain is whole). ``expected_id``: the id of the good row
    whose hash is the ``expect_head`` asked for (None: not asked, or no such row)."""

    rows: int
    head: str
    broken_id: int | None = None
    reason: str = ""
    expected_id: int | None = None

    @property
    def ok(self) -> bool:
        return self.broken_id is None


def verify_chain(session: Session, *, batch: int = 1000, expect_head: str | None = None) -> ChainCheck:
    """Recompute the chain over every audit row in id order; stop at the first row that does not match.

    ``expect_head``: a head hash kept from an earlier check; the chain must still hold a good row with that
    hash (the log only grows), else its newest rows were removed or the chain rewritten from there."""
    table = AuditEvent.__table__
    prev, prev_id, n, expected_id = GENESIS, None, 0, None
    result = session.execute(select(table).order_by(table.c.id), execution_options={"yield_per": batch})
    for row in result:
        if not row.chain_hash:
            return ChainCheck(n, prev, row.id, "it has no chain hash (inserted outside the workbench)", expected_id)
        if row_hash(prev, row) != row.chain_hash:
            gap = f"; no row between ids {prev_id} and {row.id}" if prev_id is not None and row.id > prev_id + 1 else ""
            return ChainCheck(
                n,
                prev,
                row.id,
                f"its chain hash does not match: the row was changed, or a row before it removed{gap}",
                expected_id,
            )
        prev, prev_id, n = row.chain_hash, row.id, n + 1
        if expect_head is not None and row.chain_hash == expect_head:
            expected_id = row.id
    return ChainCheck(n, prev, expected_id=expected_id)


def plain(obj: Any) -> Any:
    """``obj`` as plain JSON values: numpy scalars and arrays become numbers and lists, non-finite floats
    become None (JSON has no NaN; PostgreSQL refuses it)."""
    if obj is None:
        return None
    return json.loads(json.dumps(obj, default=_default), parse_constant=lambda _: None)


def _default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "isoformat"):
        return o.isoformat()
    raise TypeError(f"cannot store {type(o).__name__} as JSON")


@event.listens_for(Session, "before_flush")
def _refuse_changes(session: Session, _ctx, _instances) -> None:
    for obj in session.deleted:
        if isinstance(obj, AuditEvent):
            raise AuditLogImmutableError(f"audit event {obj.id} cannot be deleted: the audit log is append-only")
    for obj in session.dirty:
        if isinstance(obj, AuditEvent) and session.is_modified(obj):
            raise AuditLogImmutableError(
                f"audit event {obj.id} cannot be changed: the audit log is append-only; record a new event instead"
            )


@event.listens_for(Session, "do_orm_execute")
def _refuse_bulk_changes(state: ORMExecuteState) -> None:
    if (state.is_update or state.is_delete) and any(m.class_ is AuditEvent for m in state.all_mappers):
        raise AuditLogImmutableError("audit events cannot be updated or deleted: the audit log is append-only")

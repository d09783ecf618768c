"""The append-only audit log: who did what, when, with the state before and after.

Every change adds its :class:`AuditEvent` to the session that makes the change, so both are committed
(or rolled back) together. Audit rows are refused any update or delete: by the ORM here, and by
database triggers in the migrations (against raw SQL).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from sqlalchemy import event, insert
from sqlalchemy.orm import ORMExecuteState, Session

from .errors import AuditLogImmutableError
from .models import AuditEvent


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
    Pending changes are flushed first, so the event follows the change it describes."""
    session.execute(
        insert(AuditEvent),
        {
            "actor": actor,
            "action": action,
            "entity": entity,
            "entity_id": str(entity_id),
            "before": plain(before),
            "after": plain(after),
        },
    )


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

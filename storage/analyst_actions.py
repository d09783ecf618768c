"""Tools an analyst ran by hand on a case: stored beside the agent's runs (never in a trajectory, never in a
training export), shown in the case timeline and in the case report, and audited."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import audit
from .errors import NotFoundError
from .models import AnalystAction, Investigation, utcnow


@dataclass
class ActionRecord:
    id: int
    investigation_id: str
    actor: str
    tool: str
    arguments: dict
    stats: dict[str, float]
    expert_p_spoof: float | None
    image_sha256: str | None
    elapsed_ms: float
    created_at: datetime


def record_action(
    session: Session,
    investigation_id: str,
    *,
    actor: str,
    tool: str,
    arguments: dict,
    stats: dict[str, float],
    expert_p_spoof: float | None,
    image_sha256: str | None,
    elapsed_ms: float,
) -> ActionRecord:
    """Store one hand-run tool on the run ``investigation_id`` was looked at beside (audited as
    ``tool.manual_run``). The caller commits."""
    if session.get(Investigation, investigation_id) is None:
        raise NotFoundError(f"no investigation {investigation_id!r} in this database")
    row = AnalystAction(
        investigation_id=investigation_id,
        actor=actor,
        tool=tool,
        arguments=dict(arguments),
        stats={k: float(v) for k, v in stats.items()},
        expert_p_spoof=expert_p_spoof,
        image_sha256=image_sha256,
        elapsed_ms=float(elapsed_ms),
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    audit.record(
        session,
        actor,
        "tool.manual_run",
        "investigation",
        investigation_id,
        None,
        {
            "action_id": row.id,
            "tool": tool,
            "arguments": row.arguments,
            "stats": row.stats,
            "image_sha256": image_sha256,
        },
    )
    return _record(row)


def list_actions(session: Session, investigation_id: str) -> list[ActionRecord]:
    """The hand-run tools of a run, oldest first."""
    rows = session.scalars(
        select(AnalystAction)
        .where(AnalystAction.investigation_id == investigation_id)
        .order_by(AnalystAction.created_at, AnalystAction.id)
    )
    return [_record(r) for r in rows]


def _record(r: AnalystAction) -> ActionRecord:
    return ActionRecord(
        r.id,
        r.investigation_id,
        r.actor,
        r.tool,
        dict(r.arguments or {}),
        dict(r.stats or {}),
        r.expert_p_spoof,
        r.image_sha256,
        r.elapsed_ms,
        r.created_at,
    )

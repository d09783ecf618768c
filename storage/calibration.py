"""Calibration profiles (:mod:`core.calibration`) in the workbench: each stored once under its content
hash, activated for new investigations, rolled back by activating an earlier one.

- :func:`save_profile` keeps a profile (its JSON; the id is the hash of that JSON).
- :func:`activate` makes a profile (or None: no calibration) the one new investigations use; the active
  profile is the latest activation. Activating a profile that was active before is a rollback.
- :func:`active_profile`, :func:`list_profiles`, :func:`activation_history` read them back;
  :func:`load_profile` checks that a stored profile still hashes to its id.

Every save and activation adds its audit event to the session that makes it, so both are committed or
rolled back together. Profiles and activations are append-only, like the audit log: the ORM refuses any
update or delete here, and database triggers (migration 0003) refuse them to raw SQL. The caller commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import event, select
from sqlalchemy.orm import ORMExecuteState, Session

from . import audit
from .errors import CalibrationError, CalibrationImmutableError, NotFoundError, TamperedProfileError
from .models import CalibrationActivation, CalibrationProfileRecord

if TYPE_CHECKING:  # core.calibration pulls in scipy and scikit-learn: imported where a profile is read
    from core.calibration import CalibrationProfile

ENTITY = "calibration_profile"  # the audit log's entity for saves and activations (entity_id: the profile id)
NONE = "none"  # the entity id of a deactivation when no profile was active


@dataclass
class ProfileEntry:
    """One stored profile as the workbench lists it."""

    id: str
    name: str
    policy: str
    policy_version: str
    threshold: float
    target: str
    n_reviews: int
    n_real: int
    n_spoof: int
    features: str | None
    metrics: dict
    created_by: str
    created_at: datetime
    active: bool
    activations: int  # how many times it was activated


@dataclass
class ActivationEntry:
    """One activation: which profile (None: calibration switched off), who, when, and how."""

    id: int
    profile_id: str | None
    name: str | None
    threshold: float | None
    activated_by: str
    activated_at: datetime
    action: str  # "activate", "rollback" (activated before) or "deactivate"


# --- profiles ------------------------------------------------------------------------------------
def save_profile(session: Session, profile: CalibrationProfile, *, user: str) -> CalibrationProfileRecord:
    """Keep ``profile`` (with its audit event); a profile with the same content is kept once, and saving
    it again returns the stored one."""
    pid = profile.id
    found = session.get(CalibrationProfileRecord, pid)
    if found is not None:
        return found
    data = audit.plain(profile.to_dict())
    row = CalibrationProfileRecord(
        id=pid,
        name=profile.name or "",
        policy=profile.policy,
        policy_version=profile.policy_version,
        profile=data,
        created_by=user,
    )
    session.add(row)
    session.flush()
    audit.record(session, user, "calibration_profile.create", ENTITY, pid, None, _summary(row))
    return row


def load_profile(session: Session, profile_id: str) -> CalibrationProfile:
    """The stored profile, after checking that its JSON still hashes to its id."""
    from core.calibration import CalibrationProfile, ProfileError

    profile_id = (profile_id or "").strip()
    row = session.get(CalibrationProfileRecord, profile_id)
    if row is None:
        raise NotFoundError(f"no calibration profile {profile_id!r} in this database")
    try:
        profile = CalibrationProfile.from_dict(row.profile)
    except ProfileError as exc:
        raise TamperedProfileError(f"stored calibration profile {profile_id} cannot be read: {exc}") from exc
    if profile.id != row.id:
        raise TamperedProfileError(
            f"stored calibration profile {row.id} was changed in the database: its content now hashes to "
            f"{profile.id}. Do not use it; activate another profile or fit a new one."
        )
    return profile


def list_profiles(session: Session) -> list[ProfileEntry]:
    """Every stored profile, newest first, with whether it is the active one."""
    active = active_profile_id(session)
    counts: dict[str, int] = {}
    for (pid,) in session.execute(select(CalibrationActivation.profile_id)):
        if pid is not None:
            counts[pid] = counts.get(pid, 0) + 1
    rows = session.scalars(
        select(CalibrationProfileRecord).order_by(
            CalibrationProfileRecord.created_at.desc(), CalibrationProfileRecord.id
        )
    )
    out = []
    for r in rows:
        p = r.profile or {}
        out.append(
            ProfileEntry(
                id=r.id,
                name=r.name,
                policy=r.policy,
                policy_version=r.policy_version,
                threshold=float(p.get("threshold", float("nan"))),
                target=str(p.get("target", "")),
                n_reviews=int(p.get("n_reviews", 0)),
                n_real=int(p.get("n_real", 0)),
                n_spoof=int(p.get("n_spoof", 0)),
                features=p.get("features"),
                metrics=dict(p.get("metrics") or {}),
                created_by=r.created_by,
                created_at=r.created_at,
                active=r.id == active,
                activations=counts.get(r.id, 0),
            )
        )
    return out


# --- activations ---------------------------------------------------------------------------------
def _latest(session: Session) -> CalibrationActivation | None:
    return session.scalars(select(CalibrationActivation).order_by(CalibrationActivation.id.desc()).limit(1)).first()


def active_profile_id(session: Session) -> str | None:
    """The id of the profile new investigations use (None: none is active)."""
    latest = _latest(session)
    return latest.profile_id if latest is not None else None


def active_profile(session: Session) -> CalibrationProfile | None:
    """The profile new investigations use (None: none is active), hash-checked."""
    pid = active_profile_id(session)
    return load_profile(session, pid) if pid is not None else None


def activate(session: Session, profile_id: str | None, *, user: str) -> ActivationEntry:
    """Make the stored profile ``profile_id`` the one new investigations use (None: switch calibration
    off), with its audit event: ``calibration.activate``, ``calibration.rollback`` when the profile was
    active before, or ``calibration.deactivate``. Activating the profile that is already active changes
    nothing and returns its activation."""
    profile_id = (profile_id or "").strip() or None
    row = None
    if profile_id is not None:
        load_profile(session, profile_id)  # exists and is intact: never activate a tampered profile
        row = session.get(CalibrationProfileRecord, profile_id)
    latest = _latest(session)
    current = latest.profile_id if latest is not None else None
    if latest is not None and current == profile_id:
        return _entry(session, latest)
    if profile_id is None and latest is None:
        raise CalibrationError("no calibration profile is active: there is nothing to deactivate")
    was_active = profile_id is not None and (
        session.scalar(select(CalibrationActivation.id).where(CalibrationActivation.profile_id == profile_id).limit(1))
        is not None
    )
    act = CalibrationActivation(profile_id=profile_id, activated_by=user)
    session.add(act)
    session.flush()
    action = (
        "calibration.deactivate"
        if profile_id is None
        else ("calibration.rollback" if was_active else "calibration.activate")
    )
    before = {"active_profile": current}
    after = {"active_profile": profile_id, "activation_id": act.id} | (_summary(row) if row is not None else {})
    audit.record(session, user, action, ENTITY, profile_id or current or NONE, before, after)
    return _entry(session, act, action.split(".")[1])


def deactivate(session: Session, *, user: str) -> ActivationEntry:
    """Switch calibration off for new investigations (audited); the profiles stay stored."""
    return activate(session, None, user=user)


def activation_history(session: Session, limit: int | None = None) -> list[ActivationEntry]:
    """Every activation, newest first (the first one is the active state)."""
    rows = list(session.scalars(select(CalibrationActivation).order_by(CalibrationActivation.id)))
    seen: set[str] = set()
    out = []
    for a in rows:  # oldest first: a profile activated again after another one is a rollback
        action = "deactivate" if a.profile_id is None else ("rollback" if a.profile_id in seen else "activate")
        if a.profile_id is not None:
            seen.add(a.profile_id)
        out.append(_entry(session, a, action))
    out.reverse()
    return out[:limit] if limit is not None else out


def _entry(session: Session, a: CalibrationActivation, action: str | None = None) -> ActivationEntry:
    row = session.get(CalibrationProfileRecord, a.profile_id) if a.profile_id is not None else None
    if action is None:
        action = next((e.action for e in activation_history(session) if e.id == a.id), "activate")
    return ActivationEntry(
        id=a.id,
        profile_id=a.profile_id,
        name=row.name if row is not None else None,
        threshold=float(row.profile["threshold"]) if row is not None else None,
        activated_by=a.activated_by,
        activated_at=a.activated_at,
        action=action,
    )


def _summary(row: CalibrationProfileRecord) -> dict:
    p = row.profile
    return {
        "name": row.name,
        "policy": row.policy,
        "policy_version": row.policy_version,
        "threshold": p.get("threshold"),
        "target": p.get("target"),
        "n_reviews": p.get("n_reviews"),
        "features": p.get("features"),
    }


# --- append-only ---------------------------------------------------------------------------------
_IMMUTABLE = (CalibrationProfileRecord, CalibrationActivation)


@event.listens_for(Session, "before_flush")
def _refuse_changes(session: Session, _ctx, _instances) -> None:
    for obj in session.deleted:
        if isinstance(obj, _IMMUTABLE):
            raise CalibrationImmutableError(
                f"{type(obj).__tablename__} row {obj.id} cannot be deleted: profiles and activations are "
                "append-only; deactivate or activate another profile instead"
            )
    for obj in session.dirty:
        if isinstance(obj, _IMMUTABLE) and session.is_modified(obj):
            raise CalibrationImmutableError(
                f"{type(obj).__tablename__} row {obj.id} cannot be changed: profiles and activations are "
                "append-only; save a new profile or activate another one instead"
            )


@event.listens_for(Session, "do_orm_execute")
def _refuse_bulk_changes(state: ORMExecuteState) -> None:
    if (state.is_update or state.is_delete) and any(m.class_ in _IMMUTABLE for m in state.all_mappers):
        raise CalibrationImmutableError(
            "calibration profiles and activations cannot be updated or deleted: they are append-only"
        )

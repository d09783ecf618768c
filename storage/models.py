"""Database tables (SQLAlchemy 2.x). The schema itself is created and changed only by the Alembic
migrations in ``storage/migrations``; a test checks that they and these models agree.

Images are never stored in the database: rows hold the SHA-256 of a file in the :class:`FileStore`.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Named constraints: SQLite can only change them in Alembic batch mode, which needs their names.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

INVESTIGATION_STATUSES = ("running", "completed", "failed", "interrupted")
REVIEW_VERDICTS = ("real", "spoof", "unsure")
TURN_FLAGS = ("wrong_tool", "wrong_reasoning", "good_step")
ATTACK_TYPES = ("print", "replay", "mask", "other", "unknown")  # a case's presentation attack type (None: not set)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator):
    """A timestamp stored as UTC that always reads back as an aware UTC datetime. SQLite keeps no time
    zone (values come back naive) and PostgreSQL gives ``timestamptz`` back in the server's time zone."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return None if value is None else self.process_bind_param(value, dialect)


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Case(Base):
    """One uploaded image. The bytes live once in the file store; uploading them again makes a new case
    (a new intake: who, when, under what name) that points to the same file."""

    __tablename__ = "cases"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    filename: Mapped[str | None] = mapped_column(
        Text
    )  # as uploaded: Text, so PostgreSQL takes any length, as SQLite does
    byte_size: Mapped[int] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)  # the queue's order
    # Set by the analyst (storage.cases.set_attack_type, audited); the queue filters on it and exports carry it.
    attack_type: Mapped[str | None] = mapped_column(String(32), index=True)

    investigations: Mapped[list[Investigation]] = relationship(
        back_populates="case", order_by="Investigation.started_at"
    )


class Investigation(Base):
    """One run of a policy on a case; its id is the trajectory id."""

    __tablename__ = "investigations"
    __table_args__ = (CheckConstraint(f"status IN ({_in(INVESTIGATION_STATUSES)})", name="status"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), index=True)
    rerun_of: Mapped[str | None] = mapped_column(ForeignKey("investigations.id"))
    policy: Mapped[str] = mapped_column(String(64))
    policy_version: Mapped[str] = mapped_column(String(128), default="")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    tools: Mapped[list[str]] = mapped_column(JSON, default=list)
    source: Mapped[str | None] = mapped_column(Text)  # the file name or path the analyst gave
    face: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # core.trajectory.FaceInfo as a dict
    crop_sha256: Mapped[str | None] = mapped_column(String(64))
    label: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="running", index=True)
    verdict: Mapped[str | None] = mapped_column(String(16))
    score_spoof: Mapped[float | None] = mapped_column(Float)
    final_source: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    error_traceback: Mapped[str | None] = mapped_column(Text)
    timings_ms: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    started_by: Mapped[str] = mapped_column(String(128))
    runner: Mapped[str | None] = mapped_column(String(255))  # "host:pid" that records it; used to spot dead runs
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The deployment's calibration profile the verdict's score and threshold came from (None: the policy's
    # own), and why an active profile was not applied, in words (storage.calibration, app.runner).
    calibration_profile_id: Mapped[str | None] = mapped_column(ForeignKey("calibration_profiles.id"), index=True)
    calibration_note: Mapped[str | None] = mapped_column(Text)

    case: Mapped[Case] = relationship(back_populates="investigations")
    turns: Mapped[list[Turn]] = relationship(back_populates="investigation", order_by="Turn.index")
    review: Mapped[Review | None] = relationship(back_populates="investigation")


class QueuedRun(Base):
    """A run recorded before its upload is acknowledged, waiting for a worker: what it needs to run after
    a restart (the case holds the image, ``settings`` the analyst's choices). Its id becomes the
    investigation's when the run starts; until an investigation has that id, the run is still queued
    (storage.investigations.queue_run, claim_queued, end_queued). Rows are kept: they say when each run
    was asked for."""

    __tablename__ = "queued_runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id"), index=True)
    rerun_of: Mapped[str | None] = mapped_column(ForeignKey("investigations.id"))
    policy: Mapped[str] = mapped_column(String(64))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # app.runner.RunSettings, as a dict
    source: Mapped[str | None] = mapped_column(Text)
    queued_by: Mapped[str] = mapped_column(String(128))
    runner: Mapped[str | None] = mapped_column(String(255))  # "host:pid" that will run it; used to spot dead ones
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class Turn(Base):
    """One assistant turn, committed as soon as the agent loop completes it."""

    __tablename__ = "turns"
    __table_args__ = (UniqueConstraint("investigation_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    investigation_id: Mapped[str] = mapped_column(ForeignKey("investigations.id"))
    index: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)
    fast: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # core.protocol.FastAnswer as a dict
    think: Mapped[str | None] = mapped_column(Text)
    tool_call: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # core.protocol.ToolCall as a dict
    answer: Mapped[str | None] = mapped_column(String(16))
    parse_error: Mapped[str | None] = mapped_column(Text)
    tool_error: Mapped[str | None] = mapped_column(Text)
    score_spoof: Mapped[float | None] = mapped_column(Float)
    elapsed_ms: Mapped[float] = mapped_column(Float, default=0.0)
    notes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    investigation: Mapped[Investigation] = relationship(back_populates="turns")
    tool_result: Mapped[ToolResult | None] = relationship(back_populates="turn")


class ToolResult(Base):
    """What a tool returned in a turn; its image is a file in the store."""

    __tablename__ = "tool_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    turn_id: Mapped[int] = mapped_column(ForeignKey("turns.id"), unique=True)
    name: Mapped[str] = mapped_column(String(64))
    arguments: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    stats: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    expert_p_spoof: Mapped[float | None] = mapped_column(Float)
    elapsed_ms: Mapped[float] = mapped_column(Float, default=0.0)
    image_sha256: Mapped[str | None] = mapped_column(String(64))

    turn: Mapped[Turn] = relationship(back_populates="tool_result")


class Review(Base):
    """The analyst review of an investigation: one current state, guarded by ``version`` so two analysts
    cannot overwrite each other; every saved state is in the audit log."""

    __tablename__ = "reviews"
    __table_args__ = (CheckConstraint(f"verdict IN ({_in(REVIEW_VERDICTS)})", name="verdict"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    investigation_id: Mapped[str] = mapped_column(ForeignKey("investigations.id"), unique=True)
    verdict: Mapped[str] = mapped_column(String(16))
    notes: Mapped[str] = mapped_column(Text, default="")
    corrected_answer: Mapped[str | None] = mapped_column(Text)
    reviewer: Mapped[str] = mapped_column(String(128))  # who saved the current state
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    version: Mapped[int] = mapped_column(Integer)

    investigation: Mapped[Investigation] = relationship(back_populates="review")
    flags: Mapped[list[TurnFlag]] = relationship(
        back_populates="review", cascade="all, delete-orphan", order_by="TurnFlag.id"
    )

    # Optimistic locking: UPDATE ... WHERE version = <the version this session loaded>.
    __mapper_args__ = {"version_id_col": version}


class TurnFlag(Base):
    """A reviewer's mark on one turn: wrong tool, wrong reasoning or a good step."""

    __tablename__ = "turn_flags"
    __table_args__ = (
        UniqueConstraint("review_id", "turn_id", "flag"),
        CheckConstraint(f"flag IN ({_in(TURN_FLAGS)})", name="flag"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    review_id: Mapped[int] = mapped_column(ForeignKey("reviews.id"), index=True)
    turn_id: Mapped[int] = mapped_column(ForeignKey("turns.id"))
    flag: Mapped[str] = mapped_column(String(32))

    review: Mapped[Review] = relationship(back_populates="flags")
    turn: Mapped[Turn] = relationship()


class Export(Base):
    """A report or bundle handed out of the workbench; the exported bytes are kept in the file store."""

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    investigation_id: Mapped[str] = mapped_column(ForeignKey("investigations.id"), index=True)
    format: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str | None] = mapped_column(Text)
    file_sha256: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DatasetExport(Base):
    """A training dataset folder written from reviewed investigations (app.export): who, when, where,
    and the SHA-256 of its manifest (kept in the file store) and of every file the manifest lists."""

    __tablename__ = "dataset_exports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    folder: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(64))  # core.dataset.FORMAT + version, e.g. "tarfas-trajectories/1"
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    files: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)  # file name -> SHA-256, from the manifest
    counts: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)  # records written and skipped
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    items: Mapped[list[DatasetExportItem]] = relationship(
        back_populates="export", cascade="all, delete-orphan", order_by="DatasetExportItem.id"
    )


class DatasetExportItem(Base):
    """One investigation in a dataset export, with the review version that was exported (a later review
    change shows as a newer version than the one exported)."""

    __tablename__ = "dataset_export_items"
    __table_args__ = (UniqueConstraint("dataset_export_id", "investigation_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_export_id: Mapped[int] = mapped_column(ForeignKey("dataset_exports.id"))
    investigation_id: Mapped[str] = mapped_column(ForeignKey("investigations.id"), index=True)
    review_version: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(16))

    export: Mapped[DatasetExport] = relationship(back_populates="items")


class CalibrationProfileRecord(Base):
    """A calibration profile (:class:`core.calibration.CalibrationProfile`) kept in the workbench. Its id
    is the hash of its content, so a stored profile cannot change: rows are never updated or deleted
    (:mod:`storage.calibration`; database triggers refuse it to raw SQL too)."""

    __tablename__ = "calibration_profiles"

    id: Mapped[str] = mapped_column(String(12), primary_key=True)  # CalibrationProfile.id
    name: Mapped[str] = mapped_column(Text, default="")
    policy: Mapped[str] = mapped_column(String(64))
    policy_version: Mapped[str] = mapped_column(String(128))
    profile: Mapped[dict[str, Any]] = mapped_column(JSON)  # CalibrationProfile.to_dict()
    created_by: Mapped[str] = mapped_column(String(128))  # who saved it in the workbench
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class CalibrationActivation(Base):
    """One activation of a profile for new investigations (``profile_id`` None: calibration switched
    off). The active profile is the latest activation; the rows are its history and are never changed."""

    __tablename__ = "calibration_activations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    profile_id: Mapped[str | None] = mapped_column(ForeignKey("calibration_profiles.id"), index=True)
    activated_by: Mapped[str] = mapped_column(String(128))
    activated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    profile: Mapped[CalibrationProfileRecord | None] = relationship()


class AuditEvent(Base):
    """Who did what, when, with the state before and after. Append-only (see :mod:`storage.audit`)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_entity", "entity", "entity_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    entity: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[str] = mapped_column(String(64))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # SHA-256 of the previous row's chain_hash and this row's fields (storage.audit.chain_hash): tamper evidence.
    chain_hash: Mapped[str] = mapped_column(String(64))


class AnalystAction(Base):
    """A tool an analyst ran by hand on a case's crop (the Investigate / Review tabs): kept beside the
    agent's run, never in its trajectory, so training exports hold only what the agent did."""

    __tablename__ = "analyst_actions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    investigation_id: Mapped[str] = mapped_column(ForeignKey("investigations.id"), index=True)
    actor: Mapped[str] = mapped_column(String(128))
    tool: Mapped[str] = mapped_column(String(64))
    arguments: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # as validated and clamped
    stats: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    expert_p_spoof: Mapped[float | None] = mapped_column(Float)
    image_sha256: Mapped[str | None] = mapped_column(String(64))
    elapsed_ms: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

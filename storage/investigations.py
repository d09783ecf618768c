"""Investigations as they happen: the recorder commits every event of :func:`core.agent.investigate`
as soon as it arrives, so a killed process loses at most the turn in progress.

After a crash, :func:`mark_interrupted` (run at startup) marks the runs whose process is gone;
:func:`load_trajectory` rebuilds any investigation as a :class:`core.trajectory.Trajectory`, images
included, and :func:`face_of` turns it back into the input of a re-run.

A run keeps the calibration profile its score and threshold came from (``meta["calibration_profile"]``
of the trajectory, set by the agent loop) and the note of an active profile that was not applied
(``meta["calibration_note"]``, set by the runner); :func:`load_trajectory` gives both back in ``meta``.

Storage persists events; it never calls the model.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from datetime import datetime, timezone

from sqlalchemy import insert, select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from core.events import Event, InvestigationFinished, InvestigationStarted, TurnCompleted
from core.faces import FaceCrop
from core.protocol import FastAnswer, ToolCall
from core.trajectory import FaceInfo, Final, Trajectory
from core.trajectory import ToolResult as TrajToolResult
from core.trajectory import Turn as TrajTurn

from . import audit
from .errors import InvestigationStateError, NotFoundError
from .filestore import FileStore
from .models import CalibrationProfileRecord, Case, Investigation, ToolResult, Turn, utcnow

SYSTEM = "system"  # the actor of changes no person made (e.g. marking crashed runs)


def this_runner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class InvestigationRecorder:
    """Persists the events of one investigation of a case, one committed transaction per event.

    Use it around the event stream so the UI can render while storage records::

        recorder = InvestigationRecorder(storage.sessions, storage.files, case.id, user="ana")
        for event in recorder.record(investigate(face, policy)):
            render(event)
    """

    def __init__(
        self, sessions: sessionmaker[Session], files: FileStore, case_id: str, *, user: str, rerun_of: str | None = None
    ):
        self.sessions = sessions
        self.files = files
        self.case_id = case_id
        self.user = user
        self.rerun_of = rerun_of
        self.investigation_id: str | None = None

    def record(self, events: Iterable[Event]) -> Iterator[Event]:
        """Store each event, then pass it on."""
        for event in events:
            self.on_event(event)
            yield event

    def on_event(self, event: Event) -> None:
        if isinstance(event, InvestigationStarted):
            self._started(event.trajectory)
        elif isinstance(event, TurnCompleted):
            self._turn(event.turn)
        elif isinstance(event, InvestigationFinished):
            self._finished(event.trajectory)
        # TurnStarted / ToolCalled / ToolResultReady / VerdictReached are progress for the UI; the
        # turn that carries them is stored whole at TurnCompleted, the verdict at InvestigationFinished.

    def _started(self, traj: Trajectory) -> None:
        if self.investigation_id is not None:
            raise InvestigationStateError(
                f"this recorder already holds investigation {self.investigation_id}; use one recorder per run"
            )
        crop_sha = self.files.put_png(traj.crop) if traj.crop is not None else None
        with self.sessions.begin() as s:
            case = s.get(Case, self.case_id)
            if case is None:
                raise NotFoundError(f"no case {self.case_id!r}: create the case before investigating it")
            if traj.image_sha256 and traj.image_sha256 != case.image_sha256:
                raise InvestigationStateError(
                    f"the investigation is of image {traj.image_sha256}, but case {case.id} holds image {case.image_sha256}; record it under the right case"
                )
            profile_id = (traj.meta.get("calibration_profile") or {}).get("id")
            if profile_id is not None and s.get(CalibrationProfileRecord, profile_id) is None:
                raise InvestigationStateError(
                    f"the investigation was calibrated with profile {profile_id}, which is not stored here; "
                    "save the profile (storage.calibration.save_profile) before recording runs that use it"
                )
            inv = Investigation(
                id=traj.id,
                case_id=case.id,
                rerun_of=self.rerun_of,
                policy=traj.policy,
                policy_version=traj.policy_version or "",
                params=audit.plain(traj.params),
                tools=list(traj.tools),
                source=traj.source,
                face=audit.plain(asdict(traj.face)) if traj.face else None,
                crop_sha256=crop_sha,
                label=traj.label,
                status="running",
                timings_ms={},
                started_by=self.user,
                runner=this_runner(),
                started_at=_parse_time(traj.created_at),
                calibration_profile_id=profile_id,
                calibration_note=traj.meta.get("calibration_note"),
            )
            s.add(inv)
            audit.record(
                s,
                self.user,
                "investigation.start",
                "investigation",
                inv.id,
                None,
                {
                    "case_id": case.id,
                    "policy": inv.policy,
                    "policy_version": inv.policy_version,
                    "params": inv.params,
                    "rerun_of": self.rerun_of,
                    "calibration_profile": inv.calibration_profile_id,
                    "calibration_note": inv.calibration_note,
                },
            )
        self.investigation_id = traj.id

    def _turn(self, turn: TrajTurn) -> None:
        inv_id = self._require_started()
        r = turn.tool_result
        image_sha = self.files.put_png(r.image) if r is not None and r.image is not None else None
        # Core INSERTs: a turn row is written once and never edited through a session, and the ORM unit of
        # work cost several times the SQLite work per turn (profiled in benchmarks/bench_app.py's batch).
        with self.sessions.begin() as s:
            turn_id = s.scalar(
                insert(Turn).returning(Turn.id),
                {
                    "investigation_id": inv_id,
                    "index": turn.index,
                    "kind": turn.kind,
                    "text": turn.text,
                    "fast": asdict(turn.fast) if turn.fast else None,
                    "think": turn.think,
                    "tool_call": audit.plain(asdict(turn.tool_call)) if turn.tool_call else None,
                    "answer": turn.answer,
                    "parse_error": turn.parse_error,
                    "tool_error": turn.tool_error,
                    "score_spoof": _num(turn.score_spoof),
                    "elapsed_ms": float(turn.elapsed_ms),
                    "notes": audit.plain(turn.notes) or {},
                },
            )
            if r is not None:
                s.execute(
                    insert(ToolResult),
                    {
                        "turn_id": turn_id,
                        "name": r.name,
                        "arguments": audit.plain(r.arguments) or {},
                        "stats": audit.plain(r.stats) or {},
                        "expert_p_spoof": _num(r.expert_p_spoof),
                        "elapsed_ms": float(r.elapsed_ms),
                        "image_sha256": image_sha,
                    },
                )
            audit.record(
                s,
                self.user,
                "turn.record",
                "turn",
                turn_id,
                None,
                {
                    "investigation_id": inv_id,
                    "index": turn.index,
                    "kind": turn.kind,
                    "tool": r.name if r else None,
                    "error": turn.error,
                },
            )

    def _finished(self, traj: Trajectory) -> None:
        inv_id = self._require_started()
        with self.sessions.begin() as s:
            inv = s.get(Investigation, inv_id)
            before = _outcome(inv)
            inv.status = traj.status
            inv.verdict = traj.final.verdict if traj.final else None
            inv.score_spoof = _num(traj.final.score_spoof) if traj.final else None
            inv.final_source = traj.final.source if traj.final else None
            inv.error = traj.error
            inv.error_traceback = traj.error_traceback
            inv.timings_ms = audit.plain(traj.timings_ms) or {}
            inv.finished_at = utcnow()
            audit.record(s, self.user, "investigation.finish", "investigation", inv.id, before, _outcome(inv))

    def record_finished(self, traj: Trajectory) -> None:
        """Record an investigation that already ran elsewhere (e.g. an annotation) as its event stream."""
        self.on_event(InvestigationStarted(traj))
        for turn in traj.turns:
            self.on_event(TurnCompleted(turn))
        self.on_event(InvestigationFinished(traj))

    def _require_started(self) -> str:
        if self.investigation_id is None:
            raise InvestigationStateError(
                "a turn or the end of an investigation arrived before InvestigationStarted; record the whole event stream"
            )
        return self.investigation_id


def mark_interrupted(session: Session, *, all_running: bool = False) -> list[str]:
    """Mark investigations left 'running' by a process that no longer exists as 'interrupted'.

    Run at startup. A run is left alone while its recording process is alive on this host (an app and
    a CLI may share one database); runs recorded on other hosts are only marked with ``all_running``
    (when you know no other worker is running). Returns the ids marked; the caller commits.
    """
    marked = []
    for inv in session.scalars(select(Investigation).where(Investigation.status == "running")):
        if not all_running and _runner_alive(inv.runner):
            continue
        before = _outcome(inv)
        inv.status = "interrupted"
        inv.error = (
            inv.error or "the process recording this investigation stopped before it finished (crash, kill or shutdown)"
        )
        inv.finished_at = utcnow()
        audit.record(session, SYSTEM, "investigation.interrupt", "investigation", inv.id, before, _outcome(inv))
        marked.append(inv.id)
    session.flush()
    return marked


def _runner_alive(runner: str | None) -> bool:
    """True when ``runner`` ("host:pid") is a live process on this host, or on another host (unknown)."""
    if not runner or ":" not in runner:
        return False
    host, _, pid_text = runner.rpartition(":")
    if host != socket.gethostname():
        return True  # cannot tell from here; see all_running
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # this process is starting up: whatever it recorded before is gone
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def has_investigation(session: Session, investigation_id: str) -> bool:
    return session.get(Investigation, investigation_id) is not None


def get_investigation(session: Session, investigation_id: str) -> Investigation:
    inv = session.get(Investigation, investigation_id)
    if inv is None:
        raise NotFoundError(f"no investigation {investigation_id!r} in this database")
    return inv


def load_trajectory(session: Session, files: FileStore, investigation_id: str) -> Trajectory:
    """The investigation as a Trajectory, with the crop and tool images read (and hash-checked) from the store."""
    inv = session.scalars(
        select(Investigation)
        .where(Investigation.id == investigation_id)
        .options(selectinload(Investigation.case), selectinload(Investigation.turns).selectinload(Turn.tool_result))
    ).one_or_none()
    if inv is None:
        raise NotFoundError(f"no investigation {investigation_id!r} in this database")
    turns = []
    for t in inv.turns:
        r = t.tool_result
        result = None
        if r is not None:
            image = files.read_png(r.image_sha256) if r.image_sha256 else None
            result = TrajToolResult(r.name, dict(r.arguments), dict(r.stats), r.expert_p_spoof, r.elapsed_ms, image)
        turns.append(
            TrajTurn(
                index=t.index,
                kind=t.kind,
                text=t.text,
                fast=FastAnswer(**t.fast) if t.fast else None,
                think=t.think,
                tool_call=ToolCall(**t.tool_call) if t.tool_call else None,
                tool_result=result,
                answer=t.answer,
                parse_error=t.parse_error,
                tool_error=t.tool_error,
                score_spoof=t.score_spoof,
                elapsed_ms=t.elapsed_ms,
                notes=dict(t.notes or {}),
            )
        )
    final = (
        Final(inv.verdict, inv.score_spoof, inv.final_source)
        if inv.verdict is not None and inv.score_spoof is not None
        else None
    )
    return Trajectory(
        policy=inv.policy,
        policy_version=inv.policy_version,
        params=dict(inv.params or {}),
        id=inv.id,
        created_at=_format_time(inv.started_at),
        source=inv.source,
        image_sha256=inv.case.image_sha256,
        face=FaceInfo(**inv.face) if inv.face else None,
        crop=files.read_png(inv.crop_sha256) if inv.crop_sha256 else None,
        tools=list(inv.tools or []),
        turns=turns,
        final=final,
        status=inv.status,
        error=inv.error,
        error_traceback=inv.error_traceback,
        label=inv.label,
        timings_ms=dict(inv.timings_ms or {}),
        meta=calibration_meta(session, inv),
    )


def calibration_meta(session: Session, inv: Investigation) -> dict:
    """What the trajectory's ``meta`` said of calibration when the run was recorded: the profile's summary
    (:meth:`core.calibration.CalibrationProfile.summary`) and the note of a profile that was not applied."""
    meta = {}
    if inv.calibration_profile_id is not None:
        row = session.get(CalibrationProfileRecord, inv.calibration_profile_id)
        p = row.profile if row is not None else {}
        meta["calibration_profile"] = {
            "id": inv.calibration_profile_id,
            "name": p.get("name", ""),
            "threshold": p.get("threshold"),
            "target": p.get("target"),
            "n_reviews": p.get("n_reviews"),
        }
    if inv.calibration_note:
        meta["calibration_note"] = inv.calibration_note
    return meta


def face_of(traj: Trajectory) -> FaceCrop:
    """The FaceCrop a stored trajectory investigated: re-run it on exactly the same pixels."""
    if traj.crop is None or traj.face is None:
        raise InvestigationStateError(
            f"investigation {traj.id} has no stored crop; open its case and prepare the face again"
        )
    f = traj.face
    return FaceCrop(
        traj.crop,
        tuple(f.bbox) if f.bbox else None,
        tuple(f.crop_box),
        tuple(f.source_size),
        f.face_detected,
        list(f.notes),
    )


def _outcome(inv: Investigation) -> dict:
    return {"status": inv.status, "verdict": inv.verdict, "score_spoof": inv.score_spoof, "error": inv.error}


def _num(x) -> float | None:
    return None if x is None else audit.plain(float(x))


def _parse_time(iso: str | None) -> datetime:
    if not iso:
        return utcnow()
    dt = datetime.fromisoformat(iso)
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _format_time(dt: datetime) -> str:
    # SQLite gives back naive datetimes; everything stored is UTC.
    dt = dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat(timespec="seconds")

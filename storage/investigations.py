"""Investigations as they happen: the recorder commits every event of :func:`core.agent.investigate`
as soon as it arrives, so a killed process loses at most the turn in progress.

A run can be recorded before it starts (:func:`queue_run`: an upload is acknowledged only once its
case and queued run are committed); its investigation takes the queued run's id. After a crash,
:func:`claim_queued` hands the runs still queued to the new process (to run them, or to
:func:`end_queued` them with a reason: an investigation 'interrupted' or 'failed' with no turns), and
:func:`mark_interrupted` (run at startup) marks the runs whose process is gone;
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
from .models import CalibrationProfileRecord, Case, Investigation, QueuedRun, ToolResult, Turn, utcnow

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
        self,
        sessions: sessionmaker[Session],
        files: FileStore,
        case_id: str,
        *,
        user: str,
        rerun_of: str | None = None,
        queued_id: str | None = None,
    ):
        self.sessions = sessions
        self.files = files
        self.case_id = case_id
        self.user = user
        self.rerun_of = rerun_of
        # A run recorded by queue_run: the trajectory must carry its id (checked at the start).
        self.queued_id = queued_id
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
            if self.queued_id is not None:
                _check_queued(s, self.queued_id, traj.id, case.id)
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


def queue_run(
    session: Session,
    case_id: str,
    *,
    policy: str,
    settings: dict,
    user: str,
    source: str | None = None,
    rerun_of: str | None = None,
) -> QueuedRun:
    """Record a run of ``case_id`` that waits for a worker, with what it needs to run after a restart
    (``settings``; the case holds the image). Its id is the investigation's when it starts
    (``InvestigationRecorder(queued_id=...)``). The caller commits."""
    if session.get(Case, case_id) is None:
        raise NotFoundError(f"no case {case_id!r}: create the case before queueing a run of it")
    run = QueuedRun(
        case_id=case_id,
        rerun_of=rerun_of,
        policy=policy,
        settings=audit.plain(settings) or {},
        source=source,
        queued_by=user,
        runner=this_runner(),
        queued_at=utcnow(),
    )
    session.add(run)
    session.flush()
    audit.record(
        session,
        user,
        "investigation.queue",
        "queued_run",
        run.id,
        None,
        {"case_id": case_id, "policy": policy, "settings": run.settings, "rerun_of": rerun_of},
    )
    return run


def pending_runs(session: Session) -> list[QueuedRun]:
    """Queued runs that have neither started nor ended (no investigation has their id), oldest first."""
    started = select(Investigation.id).where(Investigation.id == QueuedRun.id).exists()
    return list(session.scalars(select(QueuedRun).where(~started).order_by(QueuedRun.queued_at)))


def claim_queued(session: Session, *, all_queued: bool = False) -> list[QueuedRun]:
    """The queued runs left behind by a process that no longer exists (see :func:`mark_interrupted` for
    ``all_queued``), oldest first, now this process's (``runner``): run each, or end it with
    :func:`end_queued`. The caller commits."""
    claimed = []
    for run in pending_runs(session):
        if not all_queued and _runner_alive(run.runner):
            continue
        before = {"runner": run.runner}
        run.runner = this_runner()
        audit.record(session, SYSTEM, "investigation.requeue", "queued_run", run.id, before, {"runner": run.runner})
        claimed.append(run)
    session.flush()
    return claimed


def end_queued(session: Session, run_id: str, *, status: str, error: str) -> Investigation | None:
    """End a queued run that will not go on: its investigation is recorded ``status`` 'failed' (it was
    refused, or its recording failed) or 'interrupted' (it cannot run any more), with ``error`` saying why.
    A run that never started gets an investigation with no turns; one that started in this process and is
    still 'running' (its recorder gave up, e.g. on a full disk) keeps the turns it committed. None (nothing
    changed) when the run already ended, or runs in another process. The caller commits."""
    if status not in ("failed", "interrupted"):
        raise ValueError(f"a queued run ends 'failed' or 'interrupted', not {status!r}")
    run = session.get(QueuedRun, run_id)
    if run is None:
        raise NotFoundError(f"no queued run {run_id!r} in this database")
    started = session.get(Investigation, run_id)
    if started is not None:
        if started.status != "running" or started.runner != this_runner():
            return None
        before = _outcome(started)
        started.status, started.error, started.finished_at = status, error, utcnow()
        action = "investigation.interrupt" if status == "interrupted" else "investigation.finish"
        audit.record(session, SYSTEM, action, "investigation", started.id, before, _outcome(started))
        return started
    s = dict(run.settings or {})
    now = utcnow()
    inv = Investigation(
        id=run.id,
        case_id=run.case_id,
        rerun_of=run.rerun_of,
        policy=run.policy,
        policy_version="",
        params={k: s[k] for k in ("max_tool_calls", "allowed_tools", "on_no_face") if k in s},
        tools=[],
        source=run.source,
        status=status,
        error=error,
        timings_ms={},
        started_by=run.queued_by,
        runner=this_runner(),
        started_at=now,
        finished_at=now,
    )
    session.add(inv)
    session.flush()
    action = "investigation.interrupt" if status == "interrupted" else "investigation.finish"
    audit.record(session, SYSTEM, action, "investigation", inv.id, {"status": "queued"}, _outcome(inv))
    return inv


def _check_queued(session: Session, run_id: str, traj_id: str, case_id: str) -> None:
    if traj_id != run_id:
        raise InvestigationStateError(
            f"the investigation {traj_id} is not the queued run {run_id}; start it with its id"
        )
    run = session.get(QueuedRun, run_id)
    if run is None or run.case_id != case_id:
        raise InvestigationStateError(f"no run {run_id} is queued for case {case_id}")
    if session.get(Investigation, run_id) is not None:
        raise InvestigationStateError(f"the queued run {run_id} already started or ended")


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

"""Crash recovery with a real process: kill it (SIGKILL) in the middle of an investigation, start
again, and the case with its finished turns is still there, marked interrupted, and can be re-run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from storage_support import ANSWER_SPOOF, FAST_SPOOF, astronaut_png

from core.agent import investigate
from core.policies import ScriptedPolicy
from storage.cases import create_case
from storage.db import make_engine, open_storage, session_factory
from storage.investigations import InvestigationRecorder, face_of, load_trajectory, mark_interrupted
from storage.models import AuditEvent, Case, Investigation, Turn

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _wait_for_turns(data_dir: Path, url: str | None, proc: subprocess.Popen, n: int, timeout: float = 60.0) -> None:
    sessions = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the worker exited early:\n{proc.stderr.read().decode()}")
        if sessions is None and (url is not None or (data_dir / "tarfas.db").exists()):
            sessions = session_factory(make_engine(url, data_dir=data_dir))
        if sessions is not None:
            try:
                with sessions() as s:
                    if (s.scalar(select(func.count()).select_from(Turn)) or 0) >= n:
                        return
            except Exception:  # schema not migrated yet
                pass
        time.sleep(0.1)
    pytest.fail(f"the worker did not commit {n} turns within {timeout:.0f} s")


@pytest.mark.skipif(not hasattr(os, "kill") or sys.platform == "win32", reason="needs SIGKILL")
def test_a_killed_investigation_keeps_its_case_and_turns_and_can_be_re_run(tmp_path, database_url):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    args = [str(tmp_path)] + ([database_url] if database_url else [])
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "storage_crash_worker.py"), *args], cwd=ROOT, env=env, stderr=subprocess.PIPE
    )
    try:
        _wait_for_turns(tmp_path, database_url, proc, 2)
    finally:
        proc.kill()  # SIGKILL: no cleanup, no finally blocks, no commit of anything in flight
        proc.wait(timeout=30)
        proc.stderr.close()

    # "Restart": a fresh process opens the same data directory.
    storage = open_storage(tmp_path, url=database_url)
    with storage.sessions() as s:
        inv = s.scalars(select(Investigation)).one()
        assert inv.status == "running"  # nobody had a chance to say otherwise
    with storage.sessions.begin() as s:
        assert mark_interrupted(s) == [inv.id]
    with storage.sessions() as s:
        inv = s.get(Investigation, inv.id)
        assert inv.status == "interrupted" and "stopped before it finished" in inv.error
        assert [t.index for t in inv.turns] == [0, 1] and inv.turns[1].tool_result.name == "ZoomInTool"
        case = s.scalars(select(Case)).one()
        assert storage.files.read(case.image_sha256)  # the uploaded image, hash-checked
        trail = s.scalars(select(AuditEvent).where(AuditEvent.action == "investigation.interrupt")).one()
        assert (trail.actor, trail.before["status"], trail.after["status"]) == ("system", "running", "interrupted")
        old = load_trajectory(s, storage.files, inv.id)
    assert old.status == "interrupted" and len(old.turns) == 2 and old.crop.shape == (224, 224, 3)
    assert old.turns[1].tool_result.image is not None

    # Re-run the case on the same crop; the new investigation completes and points back to the old one.
    rec = InvestigationRecorder(storage.sessions, storage.files, case.id, user="ana", rerun_of=old.id)
    traj = list(
        rec.record(
            investigate(face_of(old), ScriptedPolicy([FAST_SPOOF, ANSWER_SPOOF]), image_sha256=case.image_sha256)
        )
    )[-1].trajectory
    assert traj.status == "completed" and np.array_equal(traj.crop, old.crop)
    with storage.sessions.begin() as s:
        assert s.get(Investigation, rec.investigation_id).status == "completed"
        assert mark_interrupted(s) == []  # nothing else is left running
    storage.close()


def test_a_run_of_a_live_process_is_not_marked_interrupted(tmp_path, database_url, face):
    storage = open_storage(tmp_path, url=database_url)
    with storage.sessions.begin() as s:
        case = create_case(s, storage.files, astronaut_png(), filename=None, user="ana")
    rec = InvestigationRecorder(storage.sessions, storage.files, case.id, user="ana")
    events = investigate(face, ScriptedPolicy([FAST_SPOOF, ANSWER_SPOOF]))
    rec.on_event(next(events))  # started, still running
    with storage.sessions.begin() as s:
        # Pretend the run belongs to another live process on this host (our parent, e.g. the app).
        s.get(Investigation, rec.investigation_id).runner = f"{socket.gethostname()}:{os.getppid()}"
    with storage.sessions.begin() as s:
        assert mark_interrupted(s) == []
        assert mark_interrupted(s, all_running=True) == [rec.investigation_id]
    storage.close()

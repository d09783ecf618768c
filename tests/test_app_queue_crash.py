"""The queue survives crashes: an upload is recorded (case, bytes, queued run) before it is acknowledged,
a restarted workbench runs what a dead one left queued (or records it interrupted, with the reason), and
the debris of a kill (``.tmp-*`` files, the UI's rendered copies) is cleaned at start. Kills of real
processes, at random points and with 200 uploads queued, are in the fault-injection suite (tests/faults)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from storage_support import ANSWER_SPOOF, FAST_SPOOF, astronaut_png

from app.runner import Runner, RunSettings
from app.server import UI_CACHE, ui_cache_dir
from core.policies import ScriptedPolicy
from storage.cases import create_case
from storage.investigations import pending_runs, queue_run
from storage.models import AuditEvent, Case, Investigation, QueuedRun

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


class Replay(ScriptedPolicy):
    """The same scripted turns for every investigation (the runner shares one policy between runs)."""

    def next_turn(self, conversation):
        return self._replies[len(conversation.trajectory.turns)]


def scripted(name, **kw):
    return Replay([FAST_SPOOF, ANSWER_SPOOF])


class BlockedPolicy(Replay):
    gate = threading.Event()

    def next_turn(self, conversation):
        type(self).gate.wait(60)
        return super().next_turn(conversation)


def dead_runner() -> str:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return f"{socket.gethostname()}:{p.pid}"


def wait_for(predicate, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"{what} within {timeout:.0f} s")


def ended(storage, ids) -> bool:
    with storage.sessions() as s:
        rows = s.scalars(select(Investigation).where(Investigation.id.in_(list(ids)))).all()
        return len(rows) == len(ids) and all(r.status != "running" for r in rows)


def left_queued(storage, *, runner: str, data: bytes | None = None, settings: RunSettings | None = None) -> str:
    """A case and a queued run, as a process that died (``runner``) left them."""
    with storage.sessions.begin() as s:
        case = create_case(s, storage.files, data or astronaut_png(), filename="left.png", user="ana")
        st = settings or RunSettings.make("scripted", max_tool_calls=2)
        run = queue_run(s, case.id, policy=st.policy, settings=st.to_stored(), user="ana", source="left.png")
        s.flush()
        s.execute(update(QueuedRun).where(QueuedRun.id == run.id).values(runner=runner))
        return run.id


def test_an_upload_is_recorded_before_submit_returns(storage):
    BlockedPolicy.gate.clear()
    r = Runner(storage, concurrency=1, policy_loader=lambda name, **kw: BlockedPolicy([FAST_SPOOF, ANSWER_SPOOF]))
    try:
        jobs = [r.submit(astronaut_png(), filename=f"{i}.png", user="ana") for i in range(3)]
        with storage.sessions() as s:  # nothing has run yet, and everything is recorded
            assert s.scalar(select(func.count()).select_from(Case)) == 3
            runs = s.scalars(select(QueuedRun)).all()
            assert sorted((q.id, q.case_id) for q in runs) == sorted((j.investigation_id, j.case_id) for j in jobs)
            assert len(pending_runs(s)) >= 2  # one worker: the first may have started, the others wait
            assert all(storage.files.read(s.get(Case, j.case_id).image_sha256) == astronaut_png() for j in jobs)
        BlockedPolicy.gate.set()
        for j in jobs:
            j.wait(60)
    finally:
        BlockedPolicy.gate.set()
        r.shutdown()
    assert [j.state for j in jobs] == ["done"] * 3
    with storage.sessions() as s:  # the investigation took the queued run's id
        assert pending_runs(s) == []
        assert [s.get(Investigation, j.investigation_id).status for j in jobs] == ["completed"] * 3


def test_a_run_left_queued_by_a_dead_process_runs_at_start(storage):
    run_id = left_queued(storage, runner=dead_runner())
    r = Runner(storage, concurrency=1, policy_loader=scripted)
    try:
        assert r.requeued == [run_id]
        wait_for(lambda: ended(storage, [run_id]), "the queued run did not run")
    finally:
        r.shutdown()
    with storage.sessions() as s:
        inv = s.get(Investigation, run_id)
        assert (inv.status, inv.case.filename, inv.started_by, inv.params["max_tool_calls"]) == (
            "completed",
            "left.png",
            "ana",
            2,
        )
        actions = [e.action for e in s.scalars(select(AuditEvent).where(AuditEvent.entity_id == run_id))]
        assert actions == [
            "investigation.queue",
            "investigation.requeue",
            "investigation.start",
            "investigation.finish",
        ]


def test_a_run_left_queued_whose_image_is_gone_is_interrupted_with_the_reason(storage):
    run_id = left_queued(storage, runner=dead_runner())
    with storage.sessions() as s:
        storage.files.path(s.get(Case, s.get(QueuedRun, run_id).case_id).image_sha256).unlink()
    r = Runner(storage, concurrency=1, policy_loader=scripted)
    try:
        wait_for(lambda: ended(storage, [run_id]), "the queued run was not ended")
    finally:
        r.shutdown()
    with storage.sessions() as s:
        inv = s.get(Investigation, run_id)
        assert inv.status == "interrupted" and inv.turns == []
        assert "restarted before this queued run started" in inv.error and "not in the file store" in inv.error


def test_a_run_queued_by_a_live_process_is_left_to_it(storage):
    run_id = left_queued(storage, runner=f"{socket.gethostname()}:{os.getppid()}")
    r = Runner(storage, concurrency=1, policy_loader=scripted)
    try:
        assert r.requeued == []
        with storage.sessions() as s:
            assert [q.id for q in pending_runs(s)] == [run_id]
    finally:
        r.shutdown()


def test_temporary_files_of_a_killed_write_are_swept_at_start(storage):
    shard = storage.files.root / "ab" / "cd"
    shard.mkdir(parents=True)
    old, fresh = shard / ".tmp-killed", shard / ".tmp-writing"
    old.write_bytes(b"half a file")
    fresh.write_bytes(b"being written by another process")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    r = Runner(storage, concurrency=1, policy_loader=scripted)
    r.shutdown()
    assert r.swept == [old] and not old.exists() and fresh.exists()


def test_the_ui_cache_lives_under_the_data_dir_and_dead_processes_folders_are_cleaned(tmp_path):
    host = socket.gethostname()
    dead_pid = dead_runner().rpartition(":")[2]
    stale = tmp_path / UI_CACHE / f"{host}+{dead_pid}+abcdefgh"
    other_host = tmp_path / UI_CACHE / f"elsewhere+{dead_pid}+abcdefgh"
    for d in (stale, other_host):
        d.mkdir(parents=True)
        (d / "x.png").write_bytes(b"png")
    first = ui_cache_dir(tmp_path)
    second = ui_cache_dir(tmp_path)  # this process is alive: its folders stay
    assert first.parent == second.parent == tmp_path / UI_CACHE and first.is_dir() and second.is_dir()
    assert not stale.exists() and other_host.exists()


# 200 uploads acknowledged and still queued when the process is killed (SIGKILL), all investigated after a
# restart: tests/faults/test_kill.py::test_200_queued_uploads_survive_a_kill (the fault-injection suite).

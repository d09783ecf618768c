"""Another process holds the database's write lock (BEGIN EXCLUSIVE) for longer than a writer waits
(``storage.db.BUSY_TIMEOUT_MS``, 5 s). Writes that began early wait, then fail cleanly with a message that
says so (StorageBusyError: nothing half-written); writes that began later wait and succeed; readers are not
blocked; once the lock is released nothing acknowledged is lost and a retried write goes through."""

from __future__ import annotations

import threading
import time

from sqlalchemy import func, select
from storage_support import astronaut_png

from app.runner import Runner, RunSettings
from faults.support import TOOL_TURNS, Replay, Worker, all_ended, check_store, figures, wait_for
from storage.db import BUSY_TIMEOUT_MS, DB_FILENAME
from storage.models import Case, Investigation, Turn
from storage.reviews import NO_REVIEW, submit_review

# The lock is held longer than a writer waits; a write that starts LATE_S after it was taken waits less.
# (The early write starts its wait after reading the image and finding the face: it must do so within
# HOLD_S - BUSY_TIMEOUT_MS, 2.5 s, to time out before the release; the margins allow for a loaded machine.)
HOLD_S = BUSY_TIMEOUT_MS / 1000 + 2.5
LATE_S = 3.5


def test_a_database_locked_by_another_writer_delays_or_cleanly_refuses_writes_and_loses_nothing(storage, tmp_path):
    settings = RunSettings.make("scripted", max_tool_calls=2)
    policy = Replay(TOOL_TURNS, delay_s=0.3)
    runner = Runner(storage, concurrency=2, policy_loader=lambda name, **kw: policy)
    data = astronaut_png()
    try:
        done = runner.submit(data, filename="before.png", user="ana", settings=settings).wait(60)
        running = runner.submit(data, filename="running.png", user="ana", settings=settings)  # mid-run at the lock
        wait_for(lambda: _turns(storage, running.investigation_id) >= 1, "the run did not start")

        holder = Worker("lock_holder.py", tmp_path / DB_FILENAME, HOLD_S)
        try:
            holder.wait_lines(1, timeout=30)
            t0 = time.monotonic()
            results = {}

            def submit(name):
                results[name] = runner.submit(data, filename=name, user="ana", settings=settings)

            def review():
                try:
                    with storage.sessions.begin() as s:
                        submit_review(
                            s, done.investigation_id, reviewer="rita", verdict="spoof", expected_version=NO_REVIEW
                        )
                    results["review"] = "saved"
                except Exception as exc:  # noqa: BLE001 (reported below)
                    results["review"] = exc

            early = threading.Thread(target=submit, args=("early.png",))
            early.start()
            with storage.sessions() as s:  # a reader is not blocked by the writer
                assert s.scalar(select(func.count()).select_from(Case)) == 2
            time.sleep(max(0.0, LATE_S - (time.monotonic() - t0)))
            late = [threading.Thread(target=submit, args=("late.png",)), threading.Thread(target=review)]
            for t in late:
                t.start()
            for t in [early, *late]:
                t.join(60)
            assert holder.finish(30) == 0 and holder.lines[-1] == "released"
        finally:
            holder.close()

        early_job, late_job = results["early.png"], results["late.png"]
        assert early_job.state == "error" and early_job.case_id is None  # refused: nothing was recorded
        assert "is busy" in early_job.error and "nothing of this change was saved" in early_job.error
        assert late_job.case_id is not None and results["review"] == "saved"  # waited, then written
        retry = runner.submit(data, filename="early.png", user="ana", settings=settings)  # after the release
        for job in (late_job, retry, running):
            job.wait(60)
        assert (late_job.state, retry.state) == ("done", "done")
    finally:
        runner.shutdown()

    wait_for(lambda: all_ended(storage), "a run was left running")
    check = check_store(storage)
    with storage.sessions() as s:
        names = sorted(s.scalars(select(Case.filename)))
        inv = s.get(Investigation, running.investigation_id)
        # The run whose turn commit timed out: its committed turns are kept; it ended with the reason.
        ended = (inv.status == "completed") or (inv.status == "failed" and "busy" in inv.error and inv.turns)
    lost = [] if names == ["before.png", "early.png", "late.png", "running.png"] else [names]
    fig = figures("database locked by another writer")
    fig.rounds += 1
    fig.acknowledged += 4
    fig.cases_lost += len(lost)
    fig.wrong_rows += len(check.wrong) + (not ended)
    fig.note = f"held {HOLD_S:.1f} s; the run in progress ended {inv.status}"
    assert lost == [] and check.wrong == [] and ended, (lost, check.wrong, inv.status, inv.error)


def _turns(storage, inv_id) -> int:
    with storage.sessions() as s:
        return s.scalar(select(func.count()).select_from(Turn).where(Turn.investigation_id == inv_id))

"""The disk fills up while the workbench writes: the file store refuses an upload, then the database
refuses a commit in the middle of investigations. (A real full disk needs a small file system: a tmpfs or a
loop device needs privileges; a file size limit, RLIMIT_FSIZE, makes every write past it fail the same way,
with EFBIG.) Every failure is a clear message, nothing half-written is referenced, and once space is freed
(and after a restart) nothing acknowledged is lost."""

from __future__ import annotations

from sqlalchemy import select

from app.runner import Runner
from faults.support import TOOL_TURNS, Replay, Worker, all_ended, check_store, figures, wait_for
from storage.db import open_storage
from storage.models import Case, Investigation

PHASES = ["300000:2", "+150000:4", "0:2"]  # uploads refused by the file store; commits refused; space freed


def test_a_full_disk_refuses_writes_clearly_and_loses_nothing(tmp_path, batch_folder):
    worker = Worker("disk_worker.py", tmp_path, batch_folder, *PHASES)
    try:
        rc = worker.finish(timeout=180)
        assert rc == 0, worker.stderr()
    finally:
        worker.close()
    refused = [line.split(" ", 2)[1:] for line in worker.lines if line.startswith("refused")]
    acked = [line.split(" ", 5)[1:] for line in worker.lines if line.startswith("ack")]
    assert len(refused) + len(acked) == 1 + 2 + 4 + 2, worker.lines

    errors = [msg for _, msg in refused] + [a[4] for a in acked if a[3] == "error"]
    assert [name for name, _ in refused[:2]] == ["upload-00.png", "upload-01.png"]  # the file store was full
    assert all("file store" in msg for _, msg in refused[:2])
    assert any("database" in msg for msg in errors), errors  # and then the database
    for msg in errors:  # clear: what happened, that nothing was saved, what to do; not a driver's dump
        assert "full" in msg and "Free some space" in msg and "sqlalche.me" not in msg and "Traceback" not in msg
    assert [a[3] for a in acked[-2:]] == ["done", "done"]  # space freed: uploads go through again

    storage = open_storage(tmp_path)
    try:
        runner = Runner(storage, concurrency=1, policy_loader=lambda name, **kw: Replay(TOOL_TURNS))
        try:
            wait_for(lambda: all_ended(storage), "the restarted runner did not end every run")
        finally:
            runner.shutdown()
        check = check_store(storage)
        lost, wrong = [], list(check.wrong)
        with storage.sessions() as s:
            for case_id, run_id, name, state, msg in acked:
                inv = s.get(Investigation, run_id)
                if inv is None or inv.case_id != case_id or inv.case.filename != name:
                    lost.append((name, run_id))
                elif state == "done" and inv.status != "completed":
                    lost.append((name, "was done, now", inv.status))
                elif state == "error" and not (inv.status in ("failed", "interrupted") and inv.error):
                    wrong.append(f"{name}: its job failed ({msg}) but the run is {inv.status}")
            stored_names = set(s.scalars(select(Case.filename)))
            wrong += [f"refused {name} has a case" for name, _ in refused if name in stored_names]
    finally:
        storage.close()
    fig = figures("disk full (RLIMIT_FSIZE)")
    fig.rounds += 2
    fig.acknowledged += len(acked)
    fig.cases_lost += len(lost)
    fig.wrong_rows += len(wrong)
    fig.note = f"{len(errors)} writes refused; {len(check.unreferenced)} unreferenced file(s)"
    assert lost == [] and wrong == [], (lost, wrong)

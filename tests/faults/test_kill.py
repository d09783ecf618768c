"""kill -9 of a workbench's runner: at seeded random points of a 40-file batch (10 rounds), with 200
uploads acknowledged and most still queued, twice in a row (the restarted runner killed while it recovers
the queue), and in the middle of a file-store write. After a restart every acknowledged upload has its case
and a run that completed (before the kill, or re-queued after the restart) or is recorded interrupted with
the reason; no committed turn disappears or changes; nothing is left running or queued; no row or file is
wrongly written and no temporary file is left (:func:`faults.support.check_store`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from app.runner import Runner
from faults.support import (
    BATCH,
    FAST_TURNS,
    ROOT,
    TOOL_TURNS,
    Replay,
    Worker,
    all_ended,
    check_store,
    committed_turns,
    figures,
    wait_for,
    worker_env,
)
from storage.db import open_storage
from storage.investigations import pending_runs
from storage.models import Case, Investigation

ROUNDS = 10
LINES_PER_UPLOAD = 5  # ack, "turns" after the 1st, 2nd and 3rd turn, done


def parse(lines: list[str]) -> tuple[dict, dict, dict]:
    """What the worker reported before it died: acknowledged uploads (run -> (case, file)), committed turns
    (run -> how many) and ended jobs (run -> state)."""
    acked, turns, done = {}, {}, {}
    for line in lines:
        word, *rest = line.split()
        if word == "ack":
            acked[rest[1]] = (rest[0], rest[2])
        elif word == "turns":
            turns[rest[0]] = max(turns.get(rest[0], 0), int(rest[1]))
        elif word == "done":
            done[rest[0]] = rest[1]
    return acked, turns, done


def restart_and_check(data_dir, lines: list[str], restart_policy, family: str) -> tuple[Runner, dict]:
    """Restart on ``data_dir`` (a new runner in this process: the killed one's runs are not alive any more),
    let it finish what it re-queued, and count what was lost or wrongly written; fails when any count is not 0."""
    acked, turns, done = parse(lines)
    storage = open_storage(data_dir)
    try:
        before = committed_turns(storage)
        runner = Runner(storage, concurrency=2, policy_loader=lambda name, **kw: restart_policy)
        try:
            wait_for(lambda: all_ended(storage), "the restarted runner did not end every run")
        finally:
            runner.shutdown()
        after = committed_turns(storage)
        check = check_store(storage)
        lost_cases, lost_turns = [], []
        with storage.sessions() as s:
            for run_id, (case_id, filename) in acked.items():
                inv, case = s.get(Investigation, run_id), s.get(Case, case_id)
                ended = inv is not None and (inv.status == "completed" or (inv.status == "interrupted" and inv.error))
                if case is None or case.filename != filename or not ended or inv.case_id != case_id:
                    lost_cases.append((run_id, filename, inv and (inv.status, inv.error)))
                elif done.get(run_id) == "done" and inv.status != "completed":
                    lost_cases.append((run_id, "reported done, now", inv.status))
            assert pending_runs(s) == []
        lost_turns += [k for k, v in before.items() if after.get(k) != v]  # committed, then gone or changed
        lost_turns += [(run, i) for run, n in turns.items() for i in range(n) if (run, i) not in after]
    finally:
        storage.close()
    fig = figures(family)
    fig.rounds += 1
    fig.acknowledged += len(acked)
    fig.cases_lost += len(lost_cases)
    fig.turns_lost += len(lost_turns)
    fig.wrong_rows += len(check.wrong)
    fig.unreferenced += len(check.unreferenced)
    if fig.unreferenced:
        fig.note = f"{fig.unreferenced} stored file(s) no row names (written, row not yet committed at the kill)"
    stats = {
        "acked": len(acked),
        "requeued": len(runner.requeued),
        "interrupted": len(runner.recovered),
        "unreferenced files": len(check.unreferenced),
        "swept": len(runner.swept),
    }
    assert lost_cases == [] and lost_turns == [] and check.wrong == [], (lost_cases, lost_turns, check.wrong)
    assert len(check.unreferenced) <= 3, check.unreferenced  # at most the writes in flight at the kill
    return runner, stats


class ForkedWorker:
    """One run of kill_worker.py forked by its server (module fixture ``fork_server``): a real process,
    started without paying for the imports again, killed by its pid."""

    def __init__(self, server: Worker, *args):
        self.server, self.base = server, len(server.lines)
        server.send(" ".join(map(str, args)))
        lines = server.wait_until(lambda ls: any(x.startswith("child ") for x in ls[self.base :]), 60)
        self.pid = int(next(x for x in lines[self.base :] if x.startswith("child ")).split()[1])
        server.forked.append(self)

    @property
    def lines(self) -> list[str]:
        """What the worker reported (the server's own lines left out)."""
        return [x for x in self.server.lines[self.base :] if not x.startswith(("child ", "exit "))]

    def exited(self, lines=None) -> bool:
        return any(x.startswith(f"exit {self.pid} ") for x in (lines or self.server.lines)[self.base :])

    def wait_lines(self, n: int, timeout: float = 120.0) -> None:
        self.server.wait_until(lambda ls: len(self.lines) >= n or self.exited(ls), timeout)

    def kill(self) -> None:
        """SIGKILL, then wait until the server reaped it: every line it printed before it died is read by then."""
        os.kill(self.pid, signal.SIGKILL)
        self.server.wait_until(self.exited, 60)
        assert self.exited(), self.server.stderr()


@pytest.fixture(scope="module")
def fork_server():
    server = Worker("kill_worker.py", "serve")
    server.forked = []
    try:
        assert server.wait_lines(1, timeout=120)[:1] == ["ready"], server.stderr()
        yield server
    finally:
        for worker in server.forked:  # one a failed test left running
            if not worker.exited():
                worker.kill()
        server.close()


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_a_batch_killed_at_a_random_point_loses_no_upload_and_no_turn(round_, tmp_path, batch_folder, fork_server):
    rng = np.random.default_rng(1500 + round_)
    kill_after = int(rng.integers(1, BATCH * LINES_PER_UPLOAD))  # a line of the worker's report...
    extra_s = float(rng.uniform(0.0, 0.03))  # ...and then a little later: anywhere in a write
    worker = ForkedWorker(fork_server, tmp_path, batch_folder, BATCH, 2, 0.0)
    worker.wait_lines(kill_after)
    assert not worker.exited(), fork_server.stderr()
    time.sleep(extra_s)
    worker.kill()
    assert worker.lines, "the worker died before acknowledging anything"
    _, stats = restart_and_check(tmp_path, worker.lines, Replay(TOOL_TURNS), "kill -9, 40-file batch")
    print(f"round {round_}: killed after line {kill_after} + {extra_s * 1e3:.0f} ms: {stats}")


def test_200_queued_uploads_survive_a_kill(tmp_path, batch_folder, fork_server):
    n = 200
    # One worker and a slow model: at the kill, almost every acknowledged upload is still queued.
    worker = ForkedWorker(fork_server, tmp_path, batch_folder, n, 1, 0.5)
    fork_server.wait_until(lambda ls: sum(x.startswith("ack") for x in worker.lines) >= n or worker.exited(ls), 180)
    assert sum(x.startswith("ack") for x in worker.lines) == n, fork_server.stderr()
    worker.kill()
    runner, stats = restart_and_check(tmp_path, worker.lines, Replay(FAST_TURNS), "kill -9, 200 queued uploads")
    assert stats["acked"] == n and stats["requeued"] >= n - 10, stats  # nearly all were waiting, and all ran
    assert stats["interrupted"] <= 1  # at most the one investigation in progress at the kill
    fig = figures("kill -9, 200 queued uploads")
    fig.note = f"{stats['requeued']} re-queued and run after the restart; {fig.unreferenced} unreferenced file(s)"


def test_a_restart_killed_while_it_recovers_the_queue_loses_nothing(tmp_path, batch_folder, fork_server):
    """Two faults in a row: kill a worker with its uploads queued, then kill the restarted one while it runs
    them (at a seeded random turn); the third start still finds every upload."""
    rng = np.random.default_rng(1515)
    first = ForkedWorker(fork_server, tmp_path, batch_folder, BATCH, 1, 0.2)
    fork_server.wait_until(lambda ls: sum(x.startswith("ack") for x in first.lines) >= BATCH or first.exited(ls), 120)
    first.kill()
    second = ForkedWorker(fork_server, tmp_path, batch_folder, 0, 2, 0.02)  # uploads nothing: recovers only
    second.wait_lines(int(rng.integers(5, 60)))
    assert not second.exited(), fork_server.stderr()
    second.kill()
    _, stats = restart_and_check(
        tmp_path, first.lines + second.lines, Replay(TOOL_TURNS), "kill -9 twice (restart killed)"
    )
    assert stats["acked"] == BATCH, stats


def test_a_file_store_write_killed_halfway_leaves_no_temporary_file_after_a_restart(tmp_path):
    """Deterministic where the batch rounds are lucky: kill a process while it is writing a 256 MiB file
    into the store (its ``.tmp-*`` file exists, not yet renamed), then restart at once."""
    storage = open_storage(tmp_path)
    storage.close()
    script = (
        "import os, sys; from storage.filestore import FileStore; "
        "FileStore(sys.argv[1]).put(os.urandom(1 << 20) * 256); print('stored', flush=True)"
    )
    files = tmp_path / "files"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(files)], cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE
    )
    try:
        wait_for(lambda: any(files.glob("*/*/.tmp-*")) or proc.poll() is not None, "no write started", 60, 0.002)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.stdout.close()
    debris = list(files.glob("*/*/.tmp-*"))
    assert len(debris) == 1 and proc.returncode == -signal.SIGKILL  # killed in the middle of the write
    runner, stats = restart_and_check(tmp_path, [], Replay(FAST_TURNS), "kill -9 during a file write")
    assert runner.swept == debris and stats["unreferenced files"] == 0

"""What the fault-injection tests share: the scripted policy their workbenches run, a launcher of worker
processes, the ledger of figures printed at the end of the session, and :func:`check_store`, the audit of
a data directory after a fault (nothing lost, nothing wrongly written)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select, text
from storage_support import ANSWER_SPOOF, FAST_SPOOF, FFT, ZOOM

from core.policies import PolicyOutput, ScriptedPolicy
from storage.audit import verify_chain
from storage.errors import StorageError
from storage.models import AuditEvent, Case, Export, Investigation, QueuedRun, ToolResult, Turn

FAULTS = Path(__file__).resolve().parent
TESTS = FAULTS.parent
ROOT = TESTS.parent

BATCH = 40  # files in the batch a worker uploads (conftest.py's batch_folder)
# An investigation with two tool calls (each writes a tool image to the file store) and a final answer.
TOOL_TURNS = [FAST_SPOOF, ZOOM, FFT, ANSWER_SPOOF]
FAST_TURNS = [FAST_SPOOF, ANSWER_SPOOF]


class Replay(ScriptedPolicy):
    """The same scripted turns for every investigation (a runner shares one policy between runs).
    ``on_turn(trajectory_id, n)`` is told, before each reply, that the run's first ``n`` turns are
    committed (the recorder commits a turn before the loop asks for the next one); ``delay_s`` is the
    model's thinking time."""

    def __init__(self, replies, *, delay_s: float = 0.0, on_turn: Callable[[str, int], None] | None = None):
        super().__init__(replies)
        self.delay_s, self.on_turn = delay_s, on_turn

    def next_turn(self, conversation) -> PolicyOutput:
        n = len(conversation.trajectory.turns)
        if self.on_turn is not None and n:
            self.on_turn(conversation.trajectory.id, n)
        if self.delay_s:
            time.sleep(self.delay_s)
        return self._replies[n]


def worker_env() -> dict:
    return dict(
        os.environ,
        GRADIO_ANALYTICS_ENABLED="False",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]),
    )


class Worker:
    """A worker script in its own process; threads collect its stdout lines and its stderr as they come."""

    def __init__(self, script: str, *args, preexec_fn=None):
        self.proc = subprocess.Popen(
            [sys.executable, str(FAULTS / script), *map(str, args)],
            cwd=ROOT,
            env=worker_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec_fn,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._err: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=lambda: self._err.extend(self.proc.stderr), daemon=True)
        self._err_reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_lines(self, n: int, timeout: float = 120.0) -> list[str]:
        """Block until the worker printed ``n`` lines (or exited); returns what it printed so far."""
        return self.wait_until(lambda lines: len(lines) >= n, timeout)

    def wait_until(self, predicate, timeout: float = 120.0) -> list[str]:
        """Block until ``predicate(lines so far)`` holds (or the worker exited); returns the lines."""
        with self._cond:
            self._cond.wait_for(lambda: predicate(self.lines) or self.proc.poll() is not None, timeout)
            return list(self.lines)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL: no cleanup, no finally blocks; then every line it printed before it died is read."""
        self.proc.kill()
        self.finish()

    def finish(self, timeout: float = 120.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return rc

    def stderr(self) -> str:
        """The end of what the worker wrote to stderr so far (for failure messages; never blocks)."""
        return "".join(self._err)[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for t in (self._reader, self._err_reader):  # both reach the end of their pipe once it is gone
            t.join(timeout=30)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:  # stdin of a process that is gone
                pass


def wait_for(predicate, what: str, timeout: float = 120.0, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s")
        time.sleep(step)


def all_ended(storage) -> bool:
    """No run is queued or running any more."""
    with storage.sessions() as s:
        running = s.scalar(select(func.count()).select_from(Investigation).where(Investigation.status == "running"))
        runs = s.scalar(select(func.count()).select_from(QueuedRun))
        investigations = s.scalar(select(func.count()).select_from(Investigation))
        return running == 0 and investigations >= runs


def committed_turns(storage) -> dict[tuple[str, int], tuple[str, str]]:
    """Every stored turn: (investigation id, index) -> (kind, text)."""
    with storage.sessions() as s:
        rows = s.execute(select(Turn.investigation_id, Turn.index, Turn.kind, Turn.text))
        return {(r[0], r[1]): (r[2], r[3]) for r in rows}


@dataclass
class StoreCheck:
    """What :func:`check_store` found. ``wrong``: rows or files that must not exist (each a sentence);
    ``unreferenced``: stored files no row names (a kill between writing a file and committing its row;
    harmless: the same bytes keep the same name, nothing points at them)."""

    cases: int = 0
    investigations: int = 0
    turns: int = 0
    wrong: list[str] = field(default_factory=list)
    unreferenced: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)


def check_store(storage) -> StoreCheck:
    """Audit a data directory once nothing runs in it: the database is sound (integrity, foreign keys, audit
    chain); no run is left running or queued; every run's turns are whole (indices 0..n-1), its end says why;
    every case belongs to a run; every file a row names is in the store and hashes to its name; no ``.tmp-*``
    debris is left in the store."""
    out = StoreCheck()
    wrong = out.wrong
    files = storage.files
    with storage.sessions() as s:
        if storage.engine.dialect.name == "sqlite":
            integrity = s.execute(text("PRAGMA integrity_check")).scalars().all()
            if integrity != ["ok"]:
                wrong.append(f"SQLite integrity check: {integrity[:3]}")
            fk = s.execute(text("PRAGMA foreign_key_check")).all()
            if fk:
                wrong.append(f"rows whose foreign key points nowhere: {fk[:3]}")
        chain = verify_chain(s)
        if not chain.ok:
            wrong.append(f"audit chain broken at row {chain.broken_id}: {chain.reason}")

        cases = {c.id: c for c in s.scalars(select(Case))}
        runs = {q.id: q for q in s.scalars(select(QueuedRun))}
        invs = {i.id: i for i in s.scalars(select(Investigation))}
        out.cases, out.investigations = len(cases), len(invs)
        turns: dict[str, list[int]] = {}
        for inv_id, index in s.execute(select(Turn.investigation_id, Turn.index)):
            turns.setdefault(inv_id, []).append(index)
        out.turns = sum(map(len, turns.values()))
        audited = {(e.action, e.entity_id) for e in s.scalars(select(AuditEvent))}

        for inv in invs.values():
            out.statuses[inv.status] = out.statuses.get(inv.status, 0) + 1
            idx = sorted(turns.get(inv.id, []))
            if idx != list(range(len(idx))):
                wrong.append(f"investigation {inv.id}: turns {idx} are not 0..n-1")
            if inv.status == "running":
                wrong.append(f"investigation {inv.id} is still 'running' with nothing running it")
            elif inv.status == "completed" and (inv.verdict is None or not idx):
                wrong.append(f"investigation {inv.id} is 'completed' without a verdict or turns")
            elif inv.status in ("failed", "interrupted") and not inv.error:
                wrong.append(f"investigation {inv.id} is '{inv.status}' without saying why")
            if ("investigation.start", inv.id) not in audited and inv.crop_sha256 is not None:
                wrong.append(f"investigation {inv.id} has no audit event for its start")
        for run in runs.values():
            if run.id not in invs:
                wrong.append(f"queued run {run.id} never started nor ended")
            if ("investigation.queue", run.id) not in audited:
                wrong.append(f"queued run {run.id} has no audit event")
        used_cases = {q.case_id for q in runs.values()} | {i.case_id for i in invs.values()}
        for case in cases.values():
            if case.id not in used_cases:
                wrong.append(f"case {case.id} ({case.filename}) has no run: an upload written but not queued")
            if ("case.create", case.id) not in audited:
                wrong.append(f"case {case.id} has no audit event")

        referenced = {c.image_sha256 for c in cases.values()}
        referenced |= {i.crop_sha256 for i in invs.values() if i.crop_sha256}
        referenced |= set(s.scalars(select(ToolResult.image_sha256).where(ToolResult.image_sha256.is_not(None))))
        referenced |= set(s.scalars(select(Export.file_sha256)))
    for sha in sorted(referenced):
        try:
            files.read(sha)
        except StorageError as exc:
            wrong.append(f"a row names file {sha[:12]}, but {exc}")
    stored = {p.name for p in files.root.glob("*/*/*") if not p.name.startswith(".tmp-")}
    out.unreferenced = sorted(stored - referenced)
    debris = sorted(str(p.relative_to(files.root)) for g in (".tmp-*", "*/*/.tmp-*") for p in files.root.glob(g))
    if debris:
        wrong.append(f"temporary files left in the file store: {debris}")
    return out


# --- the figures printed at the end of the session (conftest.py) --------------------------------------
@dataclass
class Figures:
    """One fault family's figures: how many rounds (faults injected), what was acknowledged, and what was
    lost or wrongly written (each must be 0)."""

    family: str
    rounds: int = 0
    acknowledged: int = 0
    cases_lost: int = 0
    turns_lost: int = 0
    wrong_rows: int = 0
    unreferenced: int = 0  # stored files no row names: harmless, counted (StoreCheck.unreferenced)
    note: str = ""


LEDGER: dict[str, Figures] = {}


def figures(family: str) -> Figures:
    return LEDGER.setdefault(family, Figures(family))

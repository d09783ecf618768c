"""Twenty analysts save their review of the same case at the same moment (2 processes x 10 threads). Every
review is stored exactly once: each save either lands on the version its reviewer loaded or is refused as a
conflict and retried, so the versions are 1..20 with no gap and no repeat, every saved state is in the audit
log once, and the audit chain still verifies (``tarfas audit verify``, a real process)."""

from __future__ import annotations

import subprocess
import sys

from sqlalchemy import select
from storage_support import ANSWER_SPOOF, FAST_SPOOF, ZOOM, astronaut_png

from core.agent import run
from core.policies import ScriptedPolicy
from faults.support import Worker, figures, worker_env
from storage.audit import verify_chain
from storage.cases import create_case
from storage.investigations import InvestigationRecorder
from storage.models import AuditEvent, Review, TurnFlag
from storage.reviews import load_review

PROCESSES, THREADS = 2, 10


def test_20_concurrent_reviewers_each_store_their_review_exactly_once(storage, tmp_path, face):
    with storage.sessions.begin() as s:
        case = create_case(s, storage.files, astronaut_png(), filename="suspect.png", user="ana")
    rec = InvestigationRecorder(storage.sessions, storage.files, case.id, user="ana")
    rec.record_finished(run(face, ScriptedPolicy([FAST_SPOOF, ZOOM, ANSWER_SPOOF]), image_sha256=case.image_sha256))
    inv_id = rec.investigation_id

    go = tmp_path / "go"
    workers = [Worker("reviewer_worker.py", tmp_path, inv_id, p, THREADS, go) for p in range(PROCESSES)]
    try:
        for w in workers:
            assert w.wait_lines(1, timeout=60)[:1] == ["ready"], w.stderr()
        go.touch()  # every reviewer saves now
        for w in workers:
            assert w.finish(120) == 0, w.stderr()
    finally:
        for w in workers:
            w.close()
    lines = [line.split(" ", 3) for w in workers for line in w.lines[1:]]
    saved = {words[1]: int(words[2]) for words in lines if words[0] == "saved"}
    errors = [words for words in lines if words[0] != "saved"]
    retries = sum(int(words[3]) - 1 for words in lines if words[0] == "saved")

    with storage.sessions() as s:
        events = s.scalars(
            select(AuditEvent).where(
                AuditEvent.entity == "review", AuditEvent.action.in_(["review.create", "review.update"])
            )
        ).all()
        final = load_review(s, inv_id)
        rows = s.scalars(select(Review)).all()
        flags = s.scalars(select(TurnFlag)).all()
        chain = verify_chain(s)
    by_reviewer = sorted(e.after["reviewer"] for e in events)
    versions = [(e.before or {}).get("version", 0) for e in events], [e.after["version"] for e in events]
    cli = subprocess.run(
        [sys.executable, "-m", "app.cli", "audit", "verify", "--data-dir", str(tmp_path)],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )

    n = PROCESSES * THREADS
    wrong = []
    if sorted(saved.values()) != list(range(1, n + 1)):
        wrong.append(f"versions saved: {sorted(saved.values())}")
    if by_reviewer != sorted(saved) or len(events) != n:
        wrong.append(f"{len(events)} audit events for {len(saved)} saves")
    if sorted(versions[1]) != list(range(1, n + 1)) or any(a != b - 1 for a, b in zip(*versions)):
        wrong.append(f"audit versions before/after: {versions}")
    if len(rows) != 1 or final.version != n or final.reviewer != max(saved, key=saved.get):
        wrong.append(f"{len(rows)} review rows, final {final}")
    if len(flags) != (1 if final.flags else 0) or final.notes != f"reviewed by {final.reviewer}":
        wrong.append(f"flags {[(f.turn_id, f.flag) for f in flags]} with final state {final}")
    if not chain.ok or cli.returncode != 0 or "audit log OK" not in cli.stdout:
        wrong.append(f"audit chain: {chain}, CLI: {cli.stdout} {cli.stderr[-500:]}")
    fig = figures("20 concurrent reviewers")
    fig.rounds += 1
    fig.acknowledged += len(saved)
    fig.cases_lost += n - len(saved)
    fig.wrong_rows += len(wrong) + len(errors)
    fig.note = f"{retries} conflicts retried"
    assert errors == [] and wrong == [], (errors, wrong)

"""The case queue: every case with its latest investigation and review, in one query, filtered by
unreviewed, disagreement, uncertain score, attack type, status and text; cases carry an attack type set
by the analyst (audited), added to existing databases by a migration."""

from __future__ import annotations

import pytest
import torch
from alembic import command
from sqlalchemy import event, inspect, select, text
from storage_support import astronaut_png
from workbench_support import answer, fast, review, run_case, tool

from storage.cases import create_case, set_attack_type
from storage.db import alembic_config, init_db
from storage.errors import InvalidCaseError
from storage.models import AuditEvent, Case
from storage.queries import CaseFilter, count_cases, list_cases

torch.set_num_threads(1)


@pytest.fixture
def queue(storage, face):
    """Five cases: reviewed agreeing, reviewed disagreeing, unreviewed uncertain, failed, never investigated."""
    ids = {}
    ids["agree"] = run_case(
        storage,
        face,
        [fast("spoof", 0.9), tool("FFTTool"), answer("spoof", 0.95)],
        filename="agree_print.png",
        attack_type="print",
    )
    ids["disagree"] = run_case(
        storage, face, [fast("spoof", 0.7), answer("spoof", 0.8)], filename="Disagree.JPG", attack_type="replay"
    )
    ids["uncertain"] = run_case(storage, face, [fast("real", 0.4), answer("real", 0.45)], filename="uncertain_100%.png")
    ids["failed"] = run_case(
        storage, face, [fast("real", 0.2)], filename="failed.png"
    )  # the policy runs out of replies
    with storage.sessions.begin() as s:
        ids["empty"] = (create_case(s, storage.files, b"not investigated yet", filename="new.png", user="bob").id, None)
    review(storage, ids["agree"][1], "spoof")
    review(storage, ids["disagree"][1], "real", notes="A live face.")
    return ids


def _cases(storage, **kw) -> list[str]:
    with storage.sessions() as s:
        return [r.case_id for r in list_cases(s, filters=CaseFilter(**kw) if kw else None)]


def test_the_queue_shows_every_case_newest_first_with_its_latest_run_and_review(storage, queue):
    with storage.sessions() as s:
        rows = {r.case_id: r for r in list_cases(s)}
        order = [r.case_id for r in list_cases(s)]
    assert order == [queue[k][0] for k in ("empty", "failed", "uncertain", "disagree", "agree")]
    agree = rows[queue["agree"][0]]
    assert (agree.filename, agree.investigation_id, agree.status, agree.verdict, agree.score_spoof) == (
        "agree_print.png",
        queue["agree"][1],
        "completed",
        "spoof",
        0.95,
    )
    assert (
        agree.policy,
        agree.analyst_verdict,
        agree.reviewer,
        agree.review_version,
        agree.attack_type,
        agree.disagreement,
    ) == ("scripted", "spoof", "rita", 1, "print", False)
    assert agree.image_sha256 == storage.files.put(astronaut_png()) and agree.created_at.tzinfo is not None
    disagree = rows[queue["disagree"][0]]
    assert (disagree.verdict, disagree.analyst_verdict, disagree.disagreement) == ("spoof", "real", True)
    assert rows[queue["failed"][0]].status == "failed"
    empty = rows[queue["empty"][0]]
    assert (empty.investigation_id, empty.status, empty.analyst_verdict, empty.investigations, empty.disagreement) == (
        None,
        None,
        None,
        0,
        False,
    )


def test_the_queue_is_one_sql_statement_however_many_cases(storage, queue, face):
    for _ in range(3):
        run_case(storage, face, [fast("real", 0.1), answer("real", 0.1)])
    statements = []
    listener = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(storage.engine, "before_cursor_execute", listener)
    try:
        with storage.sessions() as s:
            rows = list_cases(s)
    finally:
        event.remove(storage.engine, "before_cursor_execute", listener)
    assert len(rows) == 8 and len(statements) == 1


def test_a_rerun_shows_the_new_run_and_keeps_the_case_review_of_the_run_it_judged(storage, queue, face):
    case_id, first = queue["disagree"]
    _, second = run_case(storage, face, [fast("real", 0.3), answer("real", 0.2)], case_id=case_id)
    with storage.sessions() as s:
        row = next(r for r in list_cases(s) if r.case_id == case_id)
    assert (row.investigation_id, row.investigations, row.verdict) == (second, 2, "real")
    # The review stays with the case and names the run it judged; the disagreement is with that run.
    assert (row.analyst_verdict, row.reviewed_investigation_id, row.disagreement) == ("real", first, True)
    assert case_id not in _cases(storage, unreviewed_only=True) and case_id in _cases(storage, disagreement_only=True)
    assert first != second


def test_filters_unreviewed_disagreement_and_uncertain_score(storage, queue):
    # unreviewed: investigated, latest run without a review (a never-investigated case has nothing to review)
    assert set(_cases(storage, unreviewed_only=True)) == {queue["uncertain"][0], queue["failed"][0]}
    assert _cases(storage, disagreement_only=True) == [queue["disagree"][0]]
    # P(spoof): agree 0.95, disagree 0.8, uncertain 0.45; the failed run has no final score
    assert _cases(storage, uncertain_only=True) == [queue["uncertain"][0]]  # 0.5 +- 0.1
    assert _cases(storage, uncertain_only=True, threshold=0.75, band=0.1) == [queue["disagree"][0]]
    assert set(_cases(storage, uncertain_only=True, threshold=0.6, band=0.4)) == {
        queue[k][0] for k in ("agree", "disagree", "uncertain")
    }
    assert _cases(storage, uncertain_only=True, unreviewed_only=True, threshold=0.75, band=0.1) == []


def test_filters_attack_type_status_and_text(storage, queue):
    assert _cases(storage, attack_type="print") == [queue["agree"][0]]
    assert _cases(storage, status="failed") == [queue["failed"][0]]
    assert _cases(storage, text="disagree") == [queue["disagree"][0]]  # case-insensitive part of the file name
    assert _cases(storage, text="100%") == [queue["uncertain"][0]]  # % is a character, not a wildcard
    assert _cases(storage, text="_print") == [queue["agree"][0]]
    sha = storage.files.put(astronaut_png())
    assert set(_cases(storage, text=sha[:10])) == {queue[k][0] for k in ("agree", "disagree", "uncertain", "failed")}
    assert _cases(storage, text=queue["empty"][0][:8]) == [queue["empty"][0]]
    assert _cases(storage, text="nothing-like-this") == []


def test_limit_offset_and_count_page_through_the_queue(storage, queue):
    everything = _cases(storage)
    assert _cases(storage, limit=2) == everything[:2]
    assert _cases(storage, limit=2, offset=2) == everything[2:4]
    with storage.sessions() as s:
        assert count_cases(s) == 5
        assert count_cases(s, filters=CaseFilter(unreviewed_only=True, limit=1)) == 2


def test_bad_filters_are_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match="print, replay"):
        CaseFilter(attack_type="deepfake")
    with pytest.raises(ValueError, match="running, completed, failed, interrupted"):
        CaseFilter(status="done")
    with pytest.raises(ValueError, match="band"):
        CaseFilter(band=-0.1)
    with pytest.raises(ValueError, match="threshold"):
        CaseFilter(threshold=1.5)


def test_setting_the_attack_type_is_audited_and_checked(storage):
    with storage.sessions.begin() as s:
        case_id = create_case(s, storage.files, astronaut_png(), filename="x.png", user="ana").id
    with storage.sessions.begin() as s:
        set_attack_type(s, case_id, " Replay ", user="rita")
    with storage.sessions.begin() as s:
        with pytest.raises(InvalidCaseError, match="print, replay, mask, other, unknown"):
            set_attack_type(s, case_id, "deepfake", user="rita")
    with storage.sessions.begin() as s:
        set_attack_type(s, case_id, "replay", user="rita")  # unchanged: no audit event
        set_attack_type(s, case_id, "", user="bob")  # cleared
    with storage.sessions() as s:
        assert s.get(Case, case_id).attack_type is None
        events = s.scalars(
            select(AuditEvent).where(AuditEvent.action == "case.set_attack_type").order_by(AuditEvent.id)
        ).all()
    assert [(e.actor, e.before, e.after) for e in events] == [
        ("rita", {"attack_type": None}, {"attack_type": "replay"}),
        ("bob", {"attack_type": "replay"}, {"attack_type": None}),
    ]


def test_the_migration_adds_attack_types_to_an_existing_database(storage):
    cfg = alembic_config(storage.engine)
    with storage.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    with storage.engine.begin() as conn:
        assert "attack_type" not in [c["name"] for c in inspect(conn).get_columns("cases")]
        conn.execute(
            text(
                "INSERT INTO cases (id, image_sha256, filename, byte_size, created_by, created_at) "
                "VALUES ('old', :sha, 'old.png', 3, 'ana', '2026-01-01 00:00:00')"
            ),
            {"sha": "a" * 64},
        )
    init_db(storage.engine)
    with storage.sessions() as s:
        assert s.get(Case, "old").attack_type is None
        assert [r.case_id for r in list_cases(s)] == ["old"]


def test_queue_and_metrics_count_the_same_case_reviews_across_re_runs(storage, queue, face):
    """A re-run keeps the case's review: the Queue shows it (naming the run it judged), Metrics counts it
    once; a review of the re-run then replaces it for both."""
    from app.review_metrics import review_metrics

    case_id, first = queue["disagree"]
    _, second = run_case(storage, face, [fast("real", 0.3), answer("real", 0.2)], case_id=case_id)

    def both():
        with storage.sessions() as s:
            rows = [r for r in list_cases(s) if r.analyst_verdict is not None]
            m = review_metrics(s)
        return rows, m

    rows, m = both()
    assert m.reviewed == len(rows) == 2  # agree + disagree, each case once
    assert m.compared - m.agreed == sum(r.disagreement for r in rows) == 1
    review(storage, second, "real", notes="Still a live face.")  # the analyst says it still holds
    rows, m = both()
    row = next(r for r in rows if r.case_id == case_id)
    assert (row.reviewed_investigation_id, row.disagreement) == (second, False)
    assert m.reviewed == len(rows) == 2 and m.compared - m.agreed == sum(r.disagreement for r in rows) == 0


def test_a_queued_upload_shows_as_queued_in_the_queue(storage, face):
    from storage.investigations import queue_run

    with storage.sessions.begin() as s:
        case = create_case(s, storage.files, astronaut_png(), filename="waiting.png", user="ana")
        run = queue_run(s, case.id, policy="expert", settings={}, user="ana", source="waiting.png")
        ids = (case.id, run.id)
    with storage.sessions() as s:
        row = next(r for r in list_cases(s) if r.case_id == ids[0])
    assert (row.status, row.investigation_id) == ("queued", ids[1])
    assert _cases(storage, status="queued") == [ids[0]]
    from storage.errors import NotFoundError
    from storage.queries import resolve_investigation

    with storage.sessions() as s, pytest.raises(NotFoundError, match="still queued"):
        resolve_investigation(s, ids[1][:12])  # the short id the Queue shows

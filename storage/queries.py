"""The case queue: every case with its latest investigation and that investigation's review, filtered
and paged in ONE query (a correlated subquery picks each case's latest investigation; no N+1).

A case's row shows its latest investigation (a re-run replaces the one shown), or "queued" while a run
asked for (an upload, a re-run) has not started. The analyst verdict is the case's latest review, whichever
run it judged (a re-run keeps it; the row names the run it judged): Metrics counts the same review.
"Disagreement" means the analyst said real or spoof and the run they judged said the other; "uncertain" means the model's P(spoof) lies within ``band`` of the decision
``threshold`` (pass the policy's own threshold, e.g. ``ExpertPolicy.threshold``).

:func:`list_runs` lists finished runs with their cases and reviews, filtered by upload date, uploader and
source, with each run's score before any calibration: what a calibration profile is fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone

from sqlalchemy import Select, and_, case, exists, func, or_, select
from sqlalchemy.orm import Session, aliased

from .models import (
    ATTACK_TYPES,
    INVESTIGATION_STATUSES,
    REVIEW_VERDICTS,
    AuditEvent,
    Case,
    DatasetExportItem,
    Export,
    Investigation,
    QueuedRun,
    Review,
    Turn,
)

DEFAULT_THRESHOLD = 0.5  # P(spoof) decision threshold when the caller does not give the policy's own
DEFAULT_BAND = 0.1
QUEUE_STATUSES = ("queued", *INVESTIGATION_STATUSES)  # what the queue's status column shows


@dataclass
class CaseFilter:
    """What the queue shows. Every condition given must hold (AND)."""

    unreviewed_only: bool = False  # no run of the case has a review yet
    disagreement_only: bool = False  # analyst real/spoof differs from the verdict of the run they judged
    verdict: str | None = None  # the latest run's model verdict: "real" or "spoof"
    analyst_verdict: str | None = None  # the case review's verdict: real / spoof / unsure
    uncertain_only: bool = False  # |P(spoof) - threshold| <= band
    threshold: float = DEFAULT_THRESHOLD
    band: float = DEFAULT_BAND
    attack_type: str | None = None  # one of storage.models.ATTACK_TYPES
    status: str | None = None  # status of the latest investigation (storage.models.INVESTIGATION_STATUSES)
    text: str | None = None  # case-insensitive part of the file name, or a prefix of the image SHA-256 / case id
    limit: int | None = 200
    offset: int = 0

    def __post_init__(self):
        if self.band < 0:
            raise ValueError(f"band must be >= 0, got {self.band}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a P(spoof) in [0, 1], got {self.threshold}")
        if self.attack_type is not None and self.attack_type not in ATTACK_TYPES:
            raise ValueError(f"attack_type must be one of {', '.join(ATTACK_TYPES)}, not {self.attack_type!r}")
        if self.status is not None and self.status not in QUEUE_STATUSES:
            raise ValueError(f"status must be one of {', '.join(QUEUE_STATUSES)}, not {self.status!r}")
        if self.verdict is not None and self.verdict not in ("real", "spoof"):
            raise ValueError(f"verdict must be real or spoof, not {self.verdict!r}")
        if self.analyst_verdict is not None and self.analyst_verdict not in REVIEW_VERDICTS:
            raise ValueError(
                f"analyst verdict must be one of {', '.join(REVIEW_VERDICTS)}, not {self.analyst_verdict!r}"
            )
        if self.limit is not None and self.limit < 0 or self.offset < 0:
            raise ValueError("limit and offset must be >= 0")


@dataclass
class CaseRow:
    """One line of the queue."""

    case_id: str
    filename: str | None
    image_sha256: str
    created_at: datetime
    created_by: str
    attack_type: str | None
    investigation_id: str | None  # the latest run (or the queued one); None: never investigated
    status: str | None  # one of QUEUE_STATUSES
    verdict: str | None  # the model's final verdict
    score_spoof: float | None
    policy: str | None
    policy_version: str | None
    started_at: datetime | None
    investigations: int  # how many runs the case has (re-runs included)
    analyst_verdict: str | None  # real / spoof / unsure; None: not reviewed
    reviewer: str | None
    review_version: int | None
    disagreement: bool
    calibration_profile_id: str | None = None  # the profile the latest run was calibrated with
    reviewed_investigation_id: str | None = None  # the run the case's review judged (maybe an earlier one)


def case_review_id(case_id, outer):
    """The id of a case's review, as a scalar subquery correlated to ``outer``: the latest saved review of
    any of the case's runs (``case_id`` is the outer query's case id column). The Queue and the review
    metrics both count a case by it, so that they agree."""
    rv, rinv = aliased(Review), aliased(Investigation)
    return (
        select(rv.id)
        .join(rinv, rv.investigation_id == rinv.id)
        .where(rinv.case_id == case_id)
        .order_by(rv.updated_at.desc(), rv.id.desc())
        .limit(1)
        .correlate(outer)
        .scalar_subquery()
    )


def list_cases(session: Session, *, filters: CaseFilter | None = None) -> list[CaseRow]:
    """The queue, newest case first."""
    f = filters or CaseFilter()
    stmt = _filtered(_queue_select(), f).order_by(Case.created_at.desc(), Case.id.desc()).offset(f.offset)
    if f.limit is not None:
        stmt = stmt.limit(f.limit)
    return [_row(r) for r in session.execute(stmt)]


def count_cases(session: Session, *, filters: CaseFilter | None = None) -> int:
    """How many cases match (ignoring limit/offset), for paging."""
    f = filters or CaseFilter()
    return session.scalar(select(func.count()).select_from(_filtered(_queue_select(), f).subquery()))


# --- the query ------------------------------------------------------------------------------------
def _queue_select() -> Select:
    # The latest run of each case, found by a correlated subquery on ix_investigations_case_id. Within
    # one second (started_at has whole seconds: it is the trajectory's created_at) the run still going,
    # then the one that finished last, is the latest.
    inner = aliased(Investigation)
    latest_id = (
        select(inner.id)
        .where(inner.case_id == Case.id)
        .order_by(inner.started_at.desc(), inner.finished_at.desc().nulls_first(), inner.id.desc())
        .limit(1)
        .correlate(Case)
        .scalar_subquery()
    )
    runs = select(func.count(inner.id)).where(inner.case_id == Case.id).correlate(Case).scalar_subquery()
    # A run asked for that has not started: no investigation has its id yet.
    started = aliased(Investigation)
    pending = (
        select(QueuedRun.id)
        .where(QueuedRun.case_id == Case.id, ~exists().where(started.id == QueuedRun.id))
        .order_by(QueuedRun.queued_at.desc())
        .limit(1)
        .correlate(Case)
        .scalar_subquery()
    )
    review_id = case_review_id(Case.id, Case)
    latest, judged = Investigation, aliased(Investigation)
    disagree = and_(
        Review.verdict.in_(("real", "spoof")), judged.verdict.is_not(None), Review.verdict != judged.verdict
    )
    return (
        select(
            Case.id,
            Case.filename,
            Case.image_sha256,
            Case.created_at,
            Case.created_by,
            Case.attack_type,
            func.coalesce(pending, latest.id).label("investigation_id"),
            case((pending.is_not(None), "queued"), else_=latest.status).label("status"),
            latest.verdict,
            latest.score_spoof,
            latest.policy,
            latest.policy_version,
            latest.started_at,
            runs.label("runs"),
            Review.verdict.label("analyst_verdict"),
            Review.reviewer,
            Review.version.label("review_version"),
            func.coalesce(disagree, False).label("disagreement"),
            latest.calibration_profile_id,
            Review.investigation_id.label("reviewed_investigation_id"),
        )
        .select_from(Case)
        .outerjoin(latest, latest.id == latest_id)
        .outerjoin(Review, Review.id == review_id)
        .outerjoin(judged, judged.id == Review.investigation_id)
    )


def _filtered(stmt: Select, f: CaseFilter) -> Select:
    cols = stmt.selected_columns
    if f.unreviewed_only:
        stmt = stmt.where(cols.investigation_id.is_not(None), cols.analyst_verdict.is_(None))
    if f.disagreement_only:
        stmt = stmt.where(cols.disagreement)
    if f.verdict is not None:
        stmt = stmt.where(cols.verdict == f.verdict)
    if f.analyst_verdict is not None:
        stmt = stmt.where(cols.analyst_verdict == f.analyst_verdict)
    if f.uncertain_only:
        stmt = stmt.where(cols.score_spoof.between(f.threshold - f.band, f.threshold + f.band))
    if f.attack_type is not None:
        stmt = stmt.where(Case.attack_type == f.attack_type)
    if f.status is not None:
        stmt = stmt.where(cols.status == f.status)
    text = (f.text or "").strip()
    if text:
        like = "%" + _escape_like(text.lower()) + "%"
        prefix = _escape_like(text.lower()) + "%"
        stmt = stmt.where(
            or_(
                func.lower(Case.filename).like(like, escape="\\"),
                Case.image_sha256.like(prefix, escape="\\"),
                Case.id.like(prefix, escape="\\"),
            )
        )
    return stmt


def _escape_like(text: str) -> str:
    # A "%" or "_" typed by the analyst is a character to find, not a wildcard.
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _row(r) -> CaseRow:
    return CaseRow(
        case_id=r.id,
        filename=r.filename,
        image_sha256=r.image_sha256,
        created_at=r.created_at,
        created_by=r.created_by,
        attack_type=r.attack_type,
        investigation_id=r.investigation_id,
        status=r.status,
        verdict=r.verdict,
        score_spoof=r.score_spoof,
        policy=r.policy,
        policy_version=r.policy_version,
        started_at=r.started_at,
        investigations=int(r.runs or 0),
        analyst_verdict=r.analyst_verdict,
        reviewer=r.reviewer,
        review_version=r.review_version,
        disagreement=bool(r.disagreement),
        calibration_profile_id=r.calibration_profile_id,
        reviewed_investigation_id=r.reviewed_investigation_id,
    )


# --- runs for calibration ---------------------------------------------------------------------------
@dataclass
class RunFilter:
    """Which finished investigations to take (e.g. to fit a calibration profile on). Every condition
    given must hold (AND); dates are of the case's upload, in UTC, both days included."""

    since: date | None = None
    until: date | None = None
    uploader: str | None = None  # the case's created_by, exactly
    source: str | None = None  # case-insensitive part of the file name or the source path
    reviewed_only: bool = True  # only runs an analyst reviewed
    limit: int | None = None

    def __post_init__(self):
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError(f"the date range is empty: from {self.since} is after until {self.until}")


@dataclass
class RunRow:
    """A completed investigation with its case and review, as calibration reads it."""

    investigation_id: str
    case_id: str
    filename: str | None
    source: str | None
    uploader: str
    uploaded_at: datetime
    image_sha256: str
    crop_sha256: str | None
    policy: str
    policy_version: str
    verdict: str | None  # the model's, as stored
    score_spoof: float | None  # the stated P(spoof), as stored (calibrated when the run was)
    calibration_profile_id: str | None
    policy_score: float | None  # the policy's own P(spoof) before any calibration; None: not recorded
    analyst_verdict: str | None
    reviewer: str | None


def list_runs(session: Session, *, filters: RunFilter | None = None) -> list[RunRow]:
    """Completed investigations (with a verdict), oldest upload first. A calibrated run's own score is the
    one its final turn noted as ``p_spoof_uncalibrated`` (the expert policy notes it), else None."""
    f = filters or RunFilter()
    stmt = (
        select(Investigation, Case, Review.verdict, Review.reviewer)
        .join(Case, Investigation.case_id == Case.id)
        .where(Investigation.status == "completed", Investigation.verdict.is_not(None))
        .order_by(Case.created_at, Investigation.started_at, Investigation.id)
    )
    stmt = (
        stmt.join(Review, Review.investigation_id == Investigation.id)
        if f.reviewed_only
        else stmt.outerjoin(Review, Review.investigation_id == Investigation.id)
    )
    if f.since is not None:
        stmt = stmt.where(Case.created_at >= datetime.combine(f.since, time(0), tzinfo=timezone.utc))
    if f.until is not None:
        stmt = stmt.where(Case.created_at < datetime.combine(f.until + timedelta(days=1), time(0), tzinfo=timezone.utc))
    if (f.uploader or "").strip():
        stmt = stmt.where(Case.created_by == f.uploader.strip())
    text = (f.source or "").strip()
    if text:
        like = "%" + _escape_like(text.lower()) + "%"
        stmt = stmt.where(
            or_(
                func.lower(Case.filename).like(like, escape="\\"),
                func.lower(Investigation.source).like(like, escape="\\"),
            )
        )
    if f.limit is not None:
        stmt = stmt.limit(f.limit)
    rows = session.execute(stmt).all()
    own = _uncalibrated_scores(session, [inv.id for inv, *_ in rows if inv.calibration_profile_id is not None])
    return [
        RunRow(
            investigation_id=inv.id,
            case_id=case.id,
            filename=case.filename,
            source=inv.source,
            uploader=case.created_by,
            uploaded_at=case.created_at,
            image_sha256=case.image_sha256,
            crop_sha256=inv.crop_sha256,
            policy=inv.policy,
            policy_version=inv.policy_version,
            verdict=inv.verdict,
            score_spoof=inv.score_spoof,
            calibration_profile_id=inv.calibration_profile_id,
            policy_score=inv.score_spoof if inv.calibration_profile_id is None else own.get(inv.id),
            analyst_verdict=analyst,
            reviewer=reviewer,
        )
        for inv, case, analyst, reviewer in rows
    ]


def uploaders(session: Session) -> list[str]:
    """Everyone who uploaded a case, sorted."""
    return sorted(session.scalars(select(Case.created_by).distinct()))


def _uncalibrated_scores(session: Session, ids: list[str]) -> dict[str, float]:
    if not ids:
        return {}
    out: dict[str, float] = {}
    stmt = (
        select(Turn.investigation_id, Turn.notes)
        .where(Turn.investigation_id.in_(ids), Turn.answer.is_not(None))
        .order_by(Turn.investigation_id, Turn.index)
    )
    for inv_id, notes in session.execute(stmt):  # the last answer turn of each run is its final answer
        p = (notes or {}).get("p_spoof_uncalibrated")
        if isinstance(p, (int, float)):
            out[inv_id] = float(p)
        else:
            out.pop(inv_id, None)
    return out


# --- one case across its runs -----------------------------------------------------------------------
@dataclass
class CaseReview:
    """The latest review of any run of a case, and the run it judged."""

    investigation_id: str  # the run the review judged
    verdict: str
    notes: str
    corrected_answer: str | None
    reviewer: str
    version: int
    updated_at: datetime
    model_verdict: str | None  # that run's verdict


def latest_case_review(session: Session, case_id: str, *, exclude: str | None = None) -> CaseReview | None:
    """The case's review that the Queue and Metrics count: the latest saved review of any of its runs
    (``exclude``: leave out the review of this run)."""
    stmt = (
        select(Review, Investigation.verdict)
        .join(Investigation, Review.investigation_id == Investigation.id)
        .where(Investigation.case_id == case_id)
        .order_by(Review.updated_at.desc(), Review.id.desc())
        .limit(1)
    )
    if exclude is not None:
        stmt = stmt.where(Investigation.id != exclude)
    row = session.execute(stmt).first()
    if row is None:
        return None
    r, model = row
    return CaseReview(
        r.investigation_id, r.verdict, r.notes, r.corrected_answer, r.reviewer, r.version, r.updated_at, model
    )


def resolve_investigation(session: Session, text: str) -> str:
    """An investigation id, or a case id (its latest run), as typed by the analyst; NotFoundError if neither."""
    from .errors import NotFoundError

    key = (text or "").strip().lower()
    if not key:
        raise NotFoundError("give an investigation or case id")
    if len(key) < 32:  # a shown prefix (the Queue shows 12 characters): it must name one record
        key = _unique_prefix(session, key, text)
    if session.get(Investigation, key) is not None:
        return key
    if session.get(Case, key) is not None:
        latest = session.scalar(
            select(Investigation.id)
            .where(Investigation.case_id == key)
            .order_by(Investigation.started_at.desc(), Investigation.finished_at.desc().nulls_first())
            .limit(1)
        )
        if latest is None:
            raise NotFoundError(f"case {key} has no investigation yet (it may still be queued)")
        return latest
    if session.get(QueuedRun, key) is not None:
        raise NotFoundError(f"run {key} is still queued: it can be opened once it has started")
    raise NotFoundError(f"no investigation or case {text.strip()!r} in this database")


def _unique_prefix(session: Session, key: str, text: str) -> str:
    from .errors import NotFoundError

    if len(key) < 6 or not all(c in "0123456789abcdef" for c in key):
        raise NotFoundError(
            f"{text.strip()!r} is not an investigation or case id (32 hex digits, or at least 6 of its first)"
        )
    like = _escape_like(key) + "%"
    found = set(session.scalars(select(Investigation.id).where(Investigation.id.like(like, escape="\\")).limit(2)))
    found |= set(session.scalars(select(Case.id).where(Case.id.like(like, escape="\\")).limit(2)))
    if not found:  # a run asked for that has not started has no investigation to open yet
        found |= set(session.scalars(select(QueuedRun.id).where(QueuedRun.id.like(like, escape="\\")).limit(2)))
    if len(found) > 1:
        raise NotFoundError(f"{text.strip()!r} starts more than one id; give more of it")
    if not found:
        raise NotFoundError(f"no investigation or case {text.strip()!r} in this database")
    return found.pop()


@dataclass
class HistoryRow:
    at: datetime
    actor: str
    action: str
    about: str  # "case", "run <id>", "review of run <id>", "report of run <id>", "dataset export #n"
    after: dict | None


def case_history(session: Session, case_id: str) -> list[HistoryRow]:
    """Everything the audit log says about a case: its upload, every run, review, hand-run tool, report and
    dataset export of its runs, oldest first."""
    runs = list(session.scalars(select(Investigation.id).where(Investigation.case_id == case_id)))
    reviews = {
        i: r
        for i, r in session.execute(select(Review.id, Review.investigation_id).where(Review.investigation_id.in_(runs)))
    }
    reports = {
        i: r
        for i, r in session.execute(select(Export.id, Export.investigation_id).where(Export.investigation_id.in_(runs)))
    }
    datasets = set(
        session.scalars(select(DatasetExportItem.dataset_export_id).where(DatasetExportItem.investigation_id.in_(runs)))
    )
    about = [
        and_(AuditEvent.entity == "case", AuditEvent.entity_id == case_id),
        and_(AuditEvent.entity == "investigation", AuditEvent.entity_id.in_(runs)),
        and_(AuditEvent.entity == "review", AuditEvent.entity_id.in_([str(i) for i in reviews])),
        and_(AuditEvent.entity == "export", AuditEvent.entity_id.in_([str(i) for i in reports])),
        and_(AuditEvent.entity == "dataset_export", AuditEvent.entity_id.in_([str(i) for i in datasets])),
    ]
    out = []
    for e in session.scalars(select(AuditEvent).where(or_(*about)).order_by(AuditEvent.at, AuditEvent.id)):
        if e.entity == "investigation":
            what = f"run {e.entity_id}"
        elif e.entity == "review":
            what = f"review of run {reviews.get(int(e.entity_id), '?')}"
        elif e.entity == "export":
            what = f"report of run {reports.get(int(e.entity_id), '?')}"
        elif e.entity == "dataset_export":
            what = f"dataset export #{e.entity_id}"
        else:
            what = "case"
        out.append(HistoryRow(e.at, e.actor, e.action, what, e.after))
    return out

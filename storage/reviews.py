"""Analyst reviews: verdict override, notes, per-turn flags and a corrected final answer.

Each investigation has one current review, saved with optimistic locking: the analyst submits the
``version`` they loaded, and if someone saved in between nothing is overwritten and
:class:`ConcurrentReviewError` says who and when. Every saved state goes to the audit log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.exc import StaleDataError

from . import audit
from .errors import ConcurrentReviewError, InvalidReviewError, NotFoundError
from .models import REVIEW_VERDICTS, TURN_FLAGS, Investigation, Review, Turn, TurnFlag, utcnow

NO_REVIEW = 0  # the version to submit when no review existed when the analyst opened the case


@dataclass
class ReviewState:
    """What the UI shows and edits. ``flags`` maps turn index -> flags on that turn."""

    verdict: str
    notes: str
    flags: dict[int, list[str]]
    corrected_answer: str | None
    reviewer: str
    version: int


def load_review(session: Session, investigation_id: str) -> ReviewState | None:
    review = _current(session, investigation_id)
    return _state(review) if review else None


def submit_review(
    session: Session,
    investigation_id: str,
    *,
    reviewer: str,
    verdict: str,
    expected_version: int,
    notes: str = "",
    flags: Mapping[int, str | list[str]] | None = None,
    corrected_answer: str | None = None,
) -> ReviewState:
    """Save the review of an investigation as ``reviewer``; ``expected_version`` is the version the
    reviewer loaded (:data:`NO_REVIEW` when there was none). The state given replaces the previous one.

    Raises :class:`ConcurrentReviewError` when the review changed since it was loaded, and
    :class:`InvalidReviewError` for an unknown verdict, flag or turn. The caller commits.
    """
    verdict = verdict.lower()
    if verdict not in REVIEW_VERDICTS:
        raise InvalidReviewError(f"verdict must be one of {', '.join(REVIEW_VERDICTS)}, not {verdict!r}")
    inv = session.get(Investigation, investigation_id)
    if inv is None:
        raise NotFoundError(f"no investigation {investigation_id!r} to review")
    turn_ids = {
        i: tid
        for i, tid in session.execute(select(Turn.index, Turn.id).where(Turn.investigation_id == investigation_id))
    }
    wanted = _check_flags(flags or {}, turn_ids)

    review = _current(session, investigation_id)
    found = review.version if review else NO_REVIEW
    if found != expected_version:
        raise _conflict(investigation_id, review, expected_version)
    before = _snapshot(_state(review)) if review else None
    keep = {(turn_ids[i], f) for i, fs in wanted.items() for f in fs}
    turns = {tid: session.get(Turn, tid) for tid, _ in keep}  # read before anything is changed
    if review is None:
        review = Review(investigation_id=investigation_id, created_at=utcnow())
        session.add(review)
    # No autoflush while the state is set: the one flush below is where a racing save must show up.
    with session.no_autoflush:
        review.verdict = verdict
        review.notes = notes
        review.corrected_answer = corrected_answer
        review.reviewer = reviewer
        review.updated_at = utcnow()
        # Keep the flags that stay (re-inserting one before its old row is deleted would hit the unique key).
        old = {(f.turn_id, f.flag): f for f in review.flags}
        review.flags = [old.get(k) or TurnFlag(turn_id=k[0], flag=k[1], turn=turns[k[0]]) for k in sorted(keep)]
    try:
        # Flush now: the UPDATE ... WHERE version = expected_version (or the INSERT against the unique
        # investigation_id) is where a save racing ours shows up.
        session.flush()
    except (StaleDataError, IntegrityError) as exc:
        raise ConcurrentReviewError(
            f"the review of investigation {investigation_id} was saved by someone else while you were saving; "
            "nothing of yours was written: reload it and apply your change again"
        ) from exc
    state = _state(review)
    action = "review.create" if before is None else "review.update"
    audit.record(
        session,
        reviewer,
        action,
        "review",
        review.id,
        before,
        _snapshot(state) | {"investigation_id": investigation_id},
    )
    return state


def _current(session: Session, investigation_id: str) -> Review | None:
    # populate_existing: read the row as it is now, not as this session first saw it.
    return session.scalars(
        select(Review)
        .where(Review.investigation_id == investigation_id)
        .options(selectinload(Review.flags).selectinload(TurnFlag.turn))
        .execution_options(populate_existing=True)
    ).one_or_none()


def _check_flags(flags: Mapping[int, str | list[str]], turn_ids: dict[int, int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for index, fs in flags.items():
        fs = [fs] if isinstance(fs, str) else list(fs)
        if index not in turn_ids:
            raise InvalidReviewError(f"turn {index} is not part of this investigation (turns: {sorted(turn_ids)})")
        bad = [f for f in fs if f not in TURN_FLAGS]
        if bad:
            raise InvalidReviewError(f"unknown turn flag {bad[0]!r}; use one of {', '.join(TURN_FLAGS)}")
        if fs:
            out[int(index)] = sorted(set(fs), key=fs.index)
    return out


def _state(review: Review) -> ReviewState:
    flags: dict[int, list[str]] = {}
    for f in review.flags:
        flags.setdefault(f.turn.index, []).append(f.flag)
    return ReviewState(review.verdict, review.notes, flags, review.corrected_answer, review.reviewer, review.version)


def _snapshot(state: ReviewState) -> dict:
    return {
        "verdict": state.verdict,
        "notes": state.notes,
        "flags": {str(i): fs for i, fs in sorted(state.flags.items())},
        "corrected_answer": state.corrected_answer,
        "reviewer": state.reviewer,
        "version": state.version,
    }


def _conflict(investigation_id: str, review: Review | None, expected: int) -> ConcurrentReviewError:
    if review is None:
        return ConcurrentReviewError(
            f"the review of investigation {investigation_id} you loaded (version {expected}) no longer exists; reload the case"
        )
    when = review.updated_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    return ConcurrentReviewError(
        f"the review of investigation {investigation_id} was changed by {review.reviewer} at {when} "
        f"(now version {review.version}, you loaded version {expected}); nothing of yours was saved: "
        "reload it and apply your change again"
    )

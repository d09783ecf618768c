"""Reviewed investigations -> a training dataset folder (:mod:`core.dataset`), recorded in the database.

For each reviewed investigation whose analyst verdict is real or spoof (unsure ones are skipped and
counted), the stored trajectory is loaded and the review applied:

- the record's label is the analyst's verdict;
- a corrected final answer replaces the final answer turn (or ends a run that never answered). It must
  be a final-answer turn of the protocol (``<think>..</think><answer><Real></answer>``); a bare verdict
  ("Real", "<Spoof>", "<answer><Real></answer>") is written with :func:`core.protocol.format_answer_turn`,
  keeping the model's thought when the verdict is the model's, else using the analyst's notes as the
  thought. Its verdict must be the analyst's verdict;
- per-turn flags, notes, reviewer and review version go into ``record.meta``.

The folder gets one trajectory record per investigation and one GRPO query (face crop + label) per case.
The export (who, when, which investigations at which review version, the manifest's file hashes) is
recorded in ``dataset_exports`` / ``dataset_export_items`` in the same transaction as its audit event.
Every problem with the selection is found before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timezone
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from core import dataset, protocol
from core.errors import ProtocolParseError, TarfasError
from core.trajectory import Turn
from storage.cases import record_dataset_export
from storage.db import Storage
from storage.errors import NotFoundError
from storage.investigations import load_trajectory
from storage.models import Investigation, Review, TurnFlag

SOURCE = "app-export"
SKIP_UNSURE = "unsure"  # the analyst could not decide: no label to train on
SKIP_UNREVIEWED = "unreviewed"  # asked for by id, but nobody reviewed it
SKIP_NO_ANSWER = "no_final_answer"  # the run never gave a final answer and the review did not supply one
SKIP_NO_CROP = "no_crop"  # no stored face crop (nothing to train on)


class ExportError(TarfasError):
    """The selection cannot be exported as it is (e.g. a corrected answer that breaks the protocol).
    Nothing was written."""


@dataclass
class ExportResult:
    folder: Path
    export_id: int  # row of dataset_exports
    manifest: dict
    manifest_sha256: str  # the manifest.json bytes, also kept in the file store
    investigation_ids: list[str]  # exported, in order
    case_ids: list[str]  # one GRPO query each
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> investigation ids

    @property
    def exported(self) -> int:
        return len(self.investigation_ids)

    @property
    def skipped_unsure(self) -> int:
        return len(self.skipped.get(SKIP_UNSURE, []))


@dataclass
class _Plan:
    """What to write for one investigation, decided from the database rows alone (no images)."""

    investigation_id: str
    case_id: str
    label: str
    attack_type: str | None
    review_version: int
    meta: dict
    corrected_text: str | None = None  # the final-answer turn to write instead of / after the model's
    replace_index: int | None = None  # the model's answer turn it replaces (None: appended)


def export_dataset(
    storage: Storage, out_dir: str | Path, *, user: str, investigation_ids: list[str] | None = None
) -> ExportResult:
    """Write the reviewed investigations (all of them, or those of ``investigation_ids``) to the new or
    empty folder ``out_dir`` and record the export. Raises :class:`ExportError` before writing anything
    when there is nothing to export or a review cannot be applied; :class:`storage.errors.NotFoundError`
    for unknown ids; :class:`core.dataset.DatasetError` when ``out_dir`` is not empty."""
    out_dir = Path(out_dir)
    with storage.sessions() as s:
        plans, skipped = _plan(s, investigation_ids)
    if not plans:
        counts = ", ".join(f"{len(v)} {k}" for k, v in skipped.items()) or "no reviewed investigations"
        raise ExportError(f"nothing to export: {counts}; review investigations as real or spoof first")
    extra = {"app_export": {"investigations": len(plans), "skipped": {k: len(v) for k, v in skipped.items()}}}
    writer = dataset.DatasetWriter(out_dir, source=SOURCE, created_by=user, extra=extra)
    cases: dict[str, str] = {}
    # A failure here (e.g. a tampered file in the store) leaves the folder without manifest.json, so
    # read_dataset refuses it and no half export is ever used or recorded.
    for plan in plans:
        with storage.sessions() as s:
            traj = load_trajectory(s, storage.files, plan.investigation_id)
        traj.label = plan.label
        if plan.corrected_text is not None:
            _apply_correction(traj, plan)
        writer.add_trajectory(
            traj, id=plan.investigation_id, label=plan.label, attack_type=plan.attack_type, meta=plan.meta
        )
        if plan.case_id not in cases:
            writer.add_query(
                traj.crop,
                plan.label,
                id=plan.case_id,
                attack_type=plan.attack_type,
                meta={
                    "case_id": plan.case_id,
                    "investigation_id": plan.investigation_id,
                    "image_sha256": traj.image_sha256,
                },
            )
            cases[plan.case_id] = plan.investigation_id
    manifest = writer.close()
    manifest_bytes = (out_dir / dataset.MANIFEST).read_bytes()
    counts = {"trajectories": len(plans), "queries": len(cases), "images": manifest["counts"]["images"]} | {
        f"skipped_{k}": len(v) for k, v in skipped.items()
    }
    with storage.sessions.begin() as s:
        exp = record_dataset_export(
            s,
            storage.files,
            folder=str(out_dir.resolve()),
            format=f"{dataset.FORMAT}/{dataset.VERSION}",
            manifest_bytes=manifest_bytes,
            file_hashes=manifest["files"],
            counts=counts,
            items=[(p.investigation_id, p.review_version, p.label) for p in plans],
            user=user,
        )
        export_id, manifest_sha = exp.id, exp.manifest_sha256
    return ExportResult(
        out_dir, export_id, manifest, manifest_sha, [p.investigation_id for p in plans], list(cases), skipped
    )


# --- planning -------------------------------------------------------------------------------------
def _plan(session: Session, ids: list[str] | None) -> tuple[list[_Plan], dict[str, list[str]]]:
    stmt = select(Investigation).options(
        selectinload(Investigation.case),
        selectinload(Investigation.turns),
        selectinload(Investigation.review).selectinload(Review.flags).selectinload(TurnFlag.turn),
    )
    if ids is None:
        stmt = stmt.join(Review, Review.investigation_id == Investigation.id).order_by(
            Investigation.started_at, Investigation.finished_at, Investigation.id
        )  # oldest first
        invs = list(session.scalars(stmt))
    else:
        wanted = list(dict.fromkeys(ids))
        found = {inv.id: inv for inv in session.scalars(stmt.where(Investigation.id.in_(wanted)))}
        missing = [i for i in wanted if i not in found]
        if missing:
            raise NotFoundError(f"no investigation {', '.join(map(repr, missing))} in this database")
        invs = [found[i] for i in wanted]

    plans, skipped, problems = [], {}, []
    labels_by_case: dict[str, set[str]] = {}
    for inv in invs:
        review = inv.review
        reason = None
        if review is None:
            reason = SKIP_UNREVIEWED
        elif review.verdict not in dataset.LABELS:
            reason = SKIP_UNSURE
        elif inv.crop_sha256 is None:
            reason = SKIP_NO_CROP
        elif review.corrected_answer is None and not any(t.answer is not None for t in inv.turns):
            reason = SKIP_NO_ANSWER
        if reason:
            skipped.setdefault(reason, []).append(inv.id)
            continue
        try:
            plans.append(_plan_one(inv, review))
        except ExportError as exc:
            problems.append(str(exc))
            continue
        labels_by_case.setdefault(inv.case_id, set()).add(review.verdict)
    for case_id, labels in labels_by_case.items():
        if len(labels) > 1:
            problems.append(
                f"case {case_id} has investigations reviewed as {' and '.join(sorted(labels))}; review them alike or export them separately"
            )
    if problems:
        raise ExportError("cannot export; nothing was written:\n- " + "\n- ".join(problems))
    return plans, skipped


def _plan_one(inv: Investigation, review: Review) -> _Plan:
    label = review.verdict
    flags: dict[str, list[str]] = {}
    for f in review.flags:
        flags.setdefault(str(f.turn.index), []).append(f.flag)
    answer_turn = next((t for t in reversed(inv.turns) if t.answer is not None), None)
    plan = _Plan(
        investigation_id=inv.id,
        case_id=inv.case_id,
        label=label,
        attack_type=inv.case.attack_type if label == "spoof" else None,
        review_version=review.version,
        meta={
            "case_id": inv.case_id,
            "investigation_id": inv.id,
            "image_sha256": inv.case.image_sha256,
            "case_attack_type": inv.case.attack_type,
            "policy": inv.policy,
            "policy_version": inv.policy_version,
            "status": inv.status,
            "model_verdict": inv.verdict,
            "model_score_spoof": inv.score_spoof,
            "review": {
                "verdict": label,
                "notes": review.notes,
                "flags": dict(sorted(flags.items(), key=lambda kv: int(kv[0]))),
                "corrected_answer": review.corrected_answer,
                "reviewer": review.reviewer,
                "version": review.version,
                "updated_at": _utc_iso(review.updated_at),
            },
        },
    )
    final_answer = answer_turn.answer if answer_turn else None
    if review.corrected_answer is not None:
        plan.corrected_text, source = _corrected_turn(inv.id, review.corrected_answer, label, answer_turn, review.notes)
        plan.replace_index = answer_turn.index if answer_turn else None
        plan.meta["corrected"] = {"replaced_turn": plan.replace_index, "thought_from": source}
        final_answer = label
    plan.meta["answer_matches_label"] = final_answer == label
    return plan


def _corrected_turn(inv_id: str, text: str, label: str, original, notes: str) -> tuple[str, str]:
    """The corrected answer as a protocol final-answer turn, and where its thought came from."""
    text = text.strip()
    try:
        parsed = protocol.parse_reasoning_turn(text)
        source = "analyst"
    except ProtocolParseError as exc:
        verdict = protocol.parse_bare_verdict(text)
        if verdict is None:
            raise ExportError(
                f"investigation {inv_id}: the corrected answer does not follow the protocol ({exc}); write "
                "'<think>...</think><answer><Real></answer>' (or <Spoof>), or just the verdict"
            ) from None
        if original is not None and original.answer == verdict and (original.think or "").strip():
            think, source = original.think, "model"
        elif notes.strip():
            think, source = notes, "notes"
        else:
            raise ExportError(
                f"investigation {inv_id}: the corrected answer is a bare verdict that differs from the model's answer; "
                "write the reasoning too ('<think>...</think><answer>...</answer>') or explain it in the review notes"
            )
        text = protocol.format_answer_turn(think, verdict)
        try:
            parsed = protocol.parse_reasoning_turn(text)
        except ProtocolParseError as exc2:
            raise ExportError(
                f"investigation {inv_id}: the review notes cannot serve as the thought of the corrected answer ({exc2})"
            ) from None
    if parsed.answer is None:
        raise ExportError(f"investigation {inv_id}: the corrected answer must be a final <answer>, not a tool call")
    if parsed.answer != label:
        raise ExportError(
            f"investigation {inv_id}: the corrected answer says {parsed.answer} but the analyst's verdict is {label}"
        )
    return text, source


def _apply_correction(traj, plan: _Plan) -> None:
    parsed = protocol.parse_reasoning_turn(plan.corrected_text)
    if plan.replace_index is not None:
        pos = next(i for i, t in enumerate(traj.turns) if t.index == plan.replace_index)
        del traj.turns[pos:]
    index = plan.replace_index if plan.replace_index is not None else len(traj.turns)
    traj.turns.append(
        Turn(
            index,
            "reasoning",
            plan.corrected_text,
            think=parsed.think,
            answer=parsed.answer,
            notes={"corrected_by": plan.meta["review"]["reviewer"]},
        )
    )


def _utc_iso(dt) -> str:
    # SQLite gives back naive datetimes; everything stored is UTC.
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).isoformat(timespec="seconds")

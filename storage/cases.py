"""Cases (uploaded images) and exports: the records that hold evidence files.

The same bytes uploaded twice are stored once (same SHA-256, same file) but make two cases: each upload
is its own intake (who submitted what, under which name, when) and chain of custody needs all of them.
:func:`cases_with_image` lets the UI say "this exact image was already examined in case ...".
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import audit
from .errors import InvalidCaseError, NotFoundError
from .filestore import FileStore
from .models import ATTACK_TYPES, Case, DatasetExport, DatasetExportItem, Export, Investigation


def create_case(session: Session, files: FileStore, data: bytes, *, filename: str | None, user: str) -> Case:
    """Store the image bytes (once) and open a new case for them, with its audit event.

    The file is written before the row, so a committed case always has its file; a rolled-back case
    leaves at most an unreferenced file, which is harmless (same bytes, same name).
    """
    sha = files.put(data)
    case = Case(image_sha256=sha, filename=filename, byte_size=len(data), created_by=user)
    session.add(case)
    session.flush()
    audit.record(
        session,
        user,
        "case.create",
        "case",
        case.id,
        None,
        {"image_sha256": sha, "filename": filename, "byte_size": len(data)},
    )
    return case


def get_case(session: Session, case_id: str) -> Case:
    case = session.get(Case, case_id)
    if case is None:
        raise NotFoundError(f"no case {case_id!r} in this database")
    return case


def set_attack_type(session: Session, case_id: str, attack_type: str | None, *, user: str) -> Case:
    """Set (or clear, with None or "") the presentation attack type of a case, with its audit event.

    The value is one of :data:`storage.models.ATTACK_TYPES`; anything else raises
    :class:`InvalidCaseError` and changes nothing. The caller commits.
    """
    value = (attack_type or "").strip().lower() or None
    if value is not None and value not in ATTACK_TYPES:
        raise InvalidCaseError(
            f"attack type must be one of {', '.join(ATTACK_TYPES)} (or empty to clear it), not {attack_type!r}"
        )
    case = get_case(session, case_id)
    before = case.attack_type
    if value != before:
        case.attack_type = value
        session.flush()
        audit.record(
            session, user, "case.set_attack_type", "case", case.id, {"attack_type": before}, {"attack_type": value}
        )
    return case


def cases_with_image(session: Session, sha256: str) -> list[Case]:
    """Every case opened for these exact bytes, oldest first."""
    return list(session.scalars(select(Case).where(Case.image_sha256 == sha256).order_by(Case.created_at)))


def record_export(
    session: Session,
    files: FileStore,
    investigation_id: str,
    data: bytes,
    *,
    format: str,
    filename: str | None,
    user: str,
) -> Export:
    """Keep a copy of what was handed out (report, bundle) and who took it."""
    if session.get(Investigation, investigation_id) is None:
        raise NotFoundError(f"no investigation {investigation_id!r} to export")
    sha = files.put(data)
    exp = Export(investigation_id=investigation_id, format=format, filename=filename, file_sha256=sha, created_by=user)
    session.add(exp)
    session.flush()
    audit.record(
        session,
        user,
        "export.create",
        "export",
        exp.id,
        None,
        {"investigation_id": investigation_id, "format": format, "filename": filename, "file_sha256": sha},
    )
    return exp


def record_dataset_export(
    session: Session,
    files: FileStore,
    *,
    folder: str,
    format: str,
    manifest_bytes: bytes,
    file_hashes: dict[str, str],
    counts: dict[str, int],
    items: list[tuple[str, int, str]],
    user: str,
) -> DatasetExport:
    """Record a training dataset written from reviewed investigations: the manifest's bytes go to the
    file store, ``items`` are (investigation id, review version, label). Its audit event is added to the
    same session (the caller commits both)."""
    wanted = [inv_id for inv_id, _, _ in items]
    found = set(session.scalars(select(Investigation.id).where(Investigation.id.in_(wanted))))
    missing = [inv_id for inv_id in wanted if inv_id not in found]
    if missing:
        raise NotFoundError(f"no investigation {missing[0]!r} to record in a dataset export")
    sha = files.put(manifest_bytes)
    exp = DatasetExport(
        folder=folder, format=format, manifest_sha256=sha, files=dict(file_hashes), counts=dict(counts), created_by=user
    )
    exp.items = [DatasetExportItem(investigation_id=i, review_version=v, label=label) for i, v, label in items]
    session.add(exp)
    session.flush()
    audit.record(
        session,
        user,
        "dataset_export.create",
        "dataset_export",
        exp.id,
        None,
        {
            "folder": folder,
            "format": format,
            "manifest_sha256": sha,
            "files": dict(file_hashes),
            "counts": dict(counts),
            "investigations": {i: {"review_version": v, "label": label} for i, v, label in items},
        },
    )
    return exp

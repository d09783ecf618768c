"""Cases (uploaded images) and exports: the records that hold evidence files.

The same bytes uploaded twice are stored once (same SHA-256, same file) but make two cases: each upload
is its own intake (who submitted what, under which name, when) and chain of custody needs all of them.
:func:`cases_with_image` lets the UI say "this exact image was already examined in case ...".
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import audit
from .errors import NotFoundError
from .filestore import FileStore
from .models import Case, Export, Investigation


def create_case(session: Session, files: FileStore, data: bytes, *, filename: str | None, user: str) -> Case:
    """Store the image bytes (once) and open a new case for them, with its audit event.

    The file is written before the row, so a committed case always has its file; a rolled-back case
    leaves at most an unreferenced file, which is harmless (same bytes, same name).
    """
    sha = files.put(data)
    case = Case(image_sha256=sha, filename=filename, byte_size=len(data), created_by=user)
    session.add(case)
    session.flush()
    audit.record(session, user, "case.create", "case", case.id, None, {"image_sha256": sha, "filename": filename, "byte_size": len(data)})
    return case


def get_case(session: Session, case_id: str) -> Case:
    case = session.get(Case, case_id)
    if case is None:
        raise NotFoundError(f"no case {case_id!r} in this database")
    return case


def cases_with_image(session: Session, sha256: str) -> list[Case]:
    """Every case opened for these exact bytes, oldest first."""
    return list(session.scalars(select(Case).where(Case.image_sha256 == sha256).order_by(Case.created_at)))


def record_export(
    session: Session, files: FileStore, investigation_id: str, data: bytes, *, format: str, filename: str | None, user: str
) -> Export:
    """Keep a copy of what was handed out (report, bundle) and who took it."""
    if session.get(Investigation, investigation_id) is None:
        raise NotFoundError(f"no investigation {investigation_id!r} to export")
    sha = files.put(data)
    exp = Export(investigation_id=investigation_id, format=format, filename=filename, file_sha256=sha, created_by=user)
    session.add(exp)
    session.flush()
    audit.record(session, user, "export.create", "export", exp.id, None, {"investigation_id": investigation_id, "format": format, "filename": filename, "file_sha256": sha})
    return exp

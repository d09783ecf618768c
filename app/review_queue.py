"""The annotation pipeline's review queue -> the workbench (the counterpart of :mod:`app.export`).

:func:`import_review_queue` puts the samples an annotation run queued for manual verification
(``review_queue.jsonl``, :mod:`training.annotate`) into the workbench's storage as cases with their
investigations, so they appear in the app's Queue, where analysts review them like any investigation.
"""

from __future__ import annotations

from pathlib import Path

from core import faces
from core.dataset import png_bytes
from storage.cases import create_case, set_attack_type
from storage.db import Storage
from storage.investigations import InvestigationRecorder, has_investigation
from storage.models import ATTACK_TYPES
from training.annotate import queued_trajectories


def import_review_queue(folder: str | Path, storage: Storage, *, user: str = "annotation") -> list[str]:
    """Put the queued samples of the annotation dataset ``folder`` into ``storage`` as cases with their
    investigations (policy "annotation:<annotator>"). Returns the new investigation ids.

    The case holds the original image when it is still at its source path with the same bytes, else the
    face crop (PNG). Idempotent: samples imported before are skipped.
    """
    imported = []
    for q, traj in queued_trajectories(folder):
        with storage.sessions() as s:
            if has_investigation(s, traj.id):
                continue
        data = None
        if traj.source and Path(traj.source).is_file():
            data = Path(traj.source).read_bytes()
            if faces.sha256_bytes(data) != traj.image_sha256:
                data = None  # the file changed since annotation: keep the crop that was annotated
        if data is None:
            data = png_bytes(traj.crop)
            traj.image_sha256 = faces.sha256_bytes(data)
        with storage.sessions.begin() as s:
            case = create_case(
                s, storage.files, data, filename=q.get("rel_path") or Path(traj.source or "crop.png").name, user=user
            )
            if q.get("label") == "spoof":  # the queue filters on it; fas-style types map onto the store's
                set_attack_type(
                    s, case.id, q.get("attack_type") if q.get("attack_type") in ATTACK_TYPES else "unknown", user=user
                )
            case_id = case.id
        traj.params = {**traj.params, "review_reasons": q["reasons"], "dataset_id": q["id"]}
        InvestigationRecorder(storage.sessions, storage.files, case_id, user=user).record_finished(traj)
        imported.append(traj.id)
    return imported

"""Export tab: reviewed / corrected cases -> a training dataset folder (JSONL trajectories with the
images beside them, query-label pairs for GRPO, a manifest), recorded in storage by
:func:`app.export.export_dataset`. A zip of the folder is offered for download."""

from __future__ import annotations

import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import gradio as gr

from app.export import export_dataset
from core.errors import TarfasError

from .context import AppContext
from .errors import UserError

_ID_RE = re.compile(r"[0-9a-f]{32}")


def parse_ids(text: str) -> list[str] | None:
    """The investigation ids typed (separated by spaces, commas or new lines); None when empty. Anything
    that is not a 32-hex-digit id is refused with its text: a typo never silently widens the export."""
    tokens = [t for t in re.split(r"[\s,;]+", (text or "").strip().lower()) if t]
    bad = [t for t in tokens if not _ID_RE.fullmatch(t)]
    if bad:
        shown = ", ".join(repr(t) for t in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UserError(f"not an investigation id (32 hex digits): {shown}; nothing was exported")
    return list(dict.fromkeys(tokens)) or None


def export(ctx: AppContext, ids_text: str, user: str):
    ids = parse_ids(ids_text)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    out_dir = ctx.exports_dir / f"dataset-{stamp}"
    try:
        result = export_dataset(ctx.storage, out_dir, user=user, investigation_ids=ids)
    except (TarfasError, LookupError) as exc:  # nothing reviewed, a bad correction, unknown ids: nothing written
        raise UserError(str(exc)) from None
    folder = Path(result.folder)
    archive = shutil.make_archive(str(folder), "zip", root_dir=folder)
    skipped = ", ".join(f"{len(v)} {k}" for k, v in result.skipped.items()) or "none"
    info = (
        f"Exported **{result.exported}** reviewed investigations ({len(result.case_ids)} GRPO queries) to `{folder}` "
        f"as {user}; export #{result.export_id}, manifest SHA-256 `{result.manifest_sha256}`. Skipped: {skipped}."
    )
    gr.Info(f"exported {result.exported} investigations")
    return info, archive


def build(ctx: AppContext):
    gr.Markdown(
        "Writes every reviewed investigation (or only the ids below) as a training dataset folder under "
        f"`{ctx.exports_dir}`; the export is recorded with its file hashes."
    )
    ids = gr.Textbox(label="Investigation ids (optional; default: all reviewed cases)", lines=2, elem_id="export-ids")
    go = gr.Button("Export dataset", variant="primary", elem_id="export")
    info = gr.Markdown(elem_id="export-info")
    archive = gr.File(label="Dataset (zip)", interactive=False, elem_id="export-file")

    def run(ids_text, request: gr.Request):
        return export(ctx, ids_text, ctx.user(request))

    go.click(run, ids, [info, archive], api_name="export_dataset")

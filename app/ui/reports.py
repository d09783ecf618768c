"""The one-click case report: a self-contained HTML file from :func:`app.case_report.export_case_report`,
which keeps a copy in the file store and records who took which report (audited)."""

from __future__ import annotations

import gradio as gr

from app.case_report import export_case_report
from storage.errors import NotFoundError

from .context import AppContext
from .errors import UserError


def write_case_report(ctx: AppContext, inv_id: str, user: str) -> str:
    if not inv_id:
        raise UserError("open a case first")
    try:
        report = export_case_report(ctx.storage, inv_id, user, out_dir=ctx.data_dir / "reports")
    except NotFoundError as exc:
        raise UserError(str(exc)) from None
    gr.Info(f"case report {report.filename} saved (SHA-256 {report.file_sha256[:12]}…)")
    return str(report.path)

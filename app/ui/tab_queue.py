"""Queue / history tab: every case with its status, model verdict vs analyst verdict and score,
filtered by unreviewed, disagreement, uncertain score or attack type; pick a row to open it."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from storage import queries
from storage.models import ATTACK_TYPES, INVESTIGATION_STATUSES

from .context import AppContext
from .errors import UserError

FILTERS = ["unreviewed", "disagreement", "uncertain score"]
ANY = "any"


def attack_types() -> list[str]:
    return [ANY, *ATTACK_TYPES]


def make_filter(checked: list[str], attack_type: str | None, status: str | None, threshold: float | None = None):
    """A ``CaseFilter`` from the tab's controls; "uncertain" is measured around ``threshold``."""
    checked = checked or []
    kw = {}
    if threshold is not None:
        kw["threshold"] = float(threshold)
    return queries.CaseFilter(
        unreviewed_only="unreviewed" in checked,
        disagreement_only="disagreement" in checked,
        uncertain_only="uncertain score" in checked,
        attack_type=None if attack_type in (None, "", ANY) else attack_type,
        status=None if status in (None, "", ANY) else status,
        **kw,
    )


# (CaseRow field, column title): the investigation id goes first, a click on a row opens it.
COLUMNS = [
    ("investigation_id", "investigation"),
    ("filename", "file"),
    ("status", "status"),
    ("verdict", "model"),
    ("score_spoof", "P(spoof)"),
    ("calibration_profile_id", "calibration"),
    ("analyst_verdict", "analyst"),
    ("reviewer", "reviewer"),
    ("disagreement", "disagree"),
    ("attack_type", "attack"),
    ("investigations", "runs"),
    ("created_at", "uploaded (UTC)"),
    ("created_by", "by"),
]


def _cell(v):
    if hasattr(v, "strftime"):
        return v.strftime("%Y-%m-%d %H:%M")
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, bool):
        return "yes" if v else ""
    return "" if v is None else v


def case_table(ctx: AppContext, checked, attack_type, status) -> tuple[list[str], list[list]]:
    with ctx.storage.sessions() as s:
        rows = queries.list_cases(s, filters=make_filter(checked, attack_type, status, ctx.threshold()))
    return [title for _, title in COLUMNS], [[_cell(getattr(r, name)) for name, _ in COLUMNS] for r in rows]


def build(ctx: AppContext):
    with gr.Row():
        checked = gr.CheckboxGroup(FILTERS, label="Show only", elem_id="queue-filters")
        attack = gr.Dropdown(attack_types(), value=ANY, label="Attack type")
        status = gr.Dropdown([ANY, *INVESTIGATION_STATUSES], value=ANY, label="Status")
        refresh = gr.Button("Refresh", elem_id="queue-refresh")
    table = gr.Dataframe(
        headers=[title for _, title in COLUMNS],
        label="Cases (click a row to open it in Review)",
        interactive=False,
        elem_id="queue-table",
    )
    count = gr.Markdown(elem_id="queue-count")

    def load(checked, attack, status):
        headers, rows = case_table(ctx, checked, attack, status)
        return pd.DataFrame(rows, columns=headers), f"{len(rows)} cases"

    refresh.click(load, [checked, attack, status], [table, count], api_name="list_cases")
    for c in (checked, attack, status):
        c.change(load, [checked, attack, status], [table, count], api_name=False)
    return table, (load, [checked, attack, status], [table, count])


def picked_investigation(evt: gr.SelectData) -> str:
    """The investigation id of the clicked row (its first column)."""
    row = evt.row_value or []
    if not row or not row[0]:
        raise UserError("this row has no investigation to open")
    return str(row[0])

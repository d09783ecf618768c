"""Queue / history tab: every case with its latest run (or "queued" while a run waits), the model's
verdict and score beside the case's review (and whether it judged this run or an earlier one), filtered
by model verdict, review, disagreement, uncertain score, attack type and status, searched by file name,
image SHA-256 or case id; click a row, or type a case or investigation id, to open it in Review."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from storage import queries
from storage.models import ATTACK_TYPES

from .context import AppContext
from .errors import UserError

FILTERS = ["unreviewed", "disagreement", "uncertain score"]
ANY = "any"
MODEL_VERDICTS = [ANY, "real", "spoof"]
REVIEWS = [ANY, "real", "spoof", "unsure"]
SHORT_ID = 12  # characters of an id shown; Review opens a case or run by them


def attack_types() -> list[str]:
    return [ANY, *ATTACK_TYPES]


def make_filter(
    checked: list[str],
    attack_type: str | None,
    status: str | None,
    threshold: float | None = None,
    *,
    verdict: str | None = None,
    analyst: str | None = None,
    text: str | None = None,
):
    """A ``CaseFilter`` from the tab's controls; "uncertain" is measured around ``threshold``."""
    checked = checked or []
    kw = {}
    if threshold is not None:
        kw["threshold"] = float(threshold)
    try:
        return queries.CaseFilter(
            unreviewed_only="unreviewed" in checked,
            disagreement_only="disagreement" in checked,
            uncertain_only="uncertain score" in checked,
            attack_type=None if attack_type in (None, "", ANY) else attack_type,
            status=None if status in (None, "", ANY) else status,
            verdict=None if verdict in (None, "", ANY) else verdict,
            analyst_verdict=None if analyst in (None, "", ANY) else analyst,
            text=(text or "").strip() or None,
            **kw,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None


# (CaseRow field, column title): the run id goes first, a click on a row opens it.
COLUMNS = [
    ("investigation_id", "run"),
    ("filename", "file"),
    ("status", "status"),
    ("verdict", "model"),
    ("score_spoof", "P(spoof)"),
    ("analyst_verdict", "analyst"),
    ("review_of", "review of"),
    ("disagreement", "disagree"),
    ("reviewer", "reviewer"),
    ("attack_type", "attack"),
    ("investigations", "runs"),
    ("created_at", "uploaded (UTC)"),
    ("created_by", "by"),
    ("case_id", "case"),
]
WIDTHS = [130, 190, 100, 70, 80, 70, 110, 70, 90, 70, 50, 140, 90, 110]  # px: every title and value readable
_COLOURS = {
    "spoof": "background-color: #fde0dc",
    "real": "background-color: #dcf5e0",
    "unsure": "background-color: #eee",
}
_STATUS = {
    "queued": "color: #666; font-style: italic",
    "running": "color: #1565c0; font-style: italic",
    "interrupted": "color: #e65100",
    "failed": "color: #c62828",
}


def _cell(name: str, r: queries.CaseRow):
    if name == "review_of":
        if r.reviewed_investigation_id is None:
            return ""
        return "this run" if r.reviewed_investigation_id == r.investigation_id else "an earlier run"
    v = getattr(r, name)
    if name in ("investigation_id", "case_id") and v:
        return v[:SHORT_ID]
    if hasattr(v, "strftime"):
        return v.strftime("%Y-%m-%d %H:%M")
    if isinstance(v, float):
        return round(v, 3)
    if isinstance(v, bool):
        return "yes" if v else ""
    return "" if v is None else v


def case_table(ctx: AppContext, checked, attack_type, status, verdict=ANY, analyst=ANY, text="") -> tuple[list, list]:
    f = make_filter(checked, attack_type, status, ctx.threshold(), verdict=verdict, analyst=analyst, text=text)
    with ctx.storage.sessions() as s:
        rows = queries.list_cases(s, filters=f)
    return [title for _, title in COLUMNS], [[_cell(name, r) for name, _ in COLUMNS] for r in rows]


def styled(headers: list[str], rows: list[list]):
    """The table coloured: verdict cells by verdict, the status by state, a disagreement in bold."""
    df = pd.DataFrame(rows, columns=headers)

    def colour(row):
        out = []
        for h, v in zip(headers, row):
            style = ""
            if h in ("model", "analyst"):
                style = _COLOURS.get(v, "")
            elif h == "status":
                style = _STATUS.get(v, "")
            if row["disagree"] == "yes":
                style = (style + "; " if style else "") + "font-weight: bold"
            out.append(style)
        return out

    score = lambda v: f"{v:.3f}" if isinstance(v, float) and v == v else ("" if v is None or v != v else v)  # noqa: E731
    return df.style.apply(colour, axis=1).format(score, subset=["P(spoof)"])


def build(ctx: AppContext):
    with gr.Row():
        text = gr.Textbox(label="Search: file name, image SHA-256 or case id", scale=3, elem_id="queue-search")
        open_id = gr.Textbox(label="Open a case or run by id", scale=2, elem_id="queue-open-id")
        open_btn = gr.Button("Open", scale=1, elem_id="queue-open")
    with gr.Row():
        checked = gr.CheckboxGroup(FILTERS, label="Show only", elem_id="queue-filters")
        verdict = gr.Dropdown(MODEL_VERDICTS, value=ANY, label="Model verdict", elem_id="queue-verdict")
        analyst = gr.Dropdown(REVIEWS, value=ANY, label="Analyst verdict", elem_id="queue-analyst")
        attack = gr.Dropdown(attack_types(), value=ANY, label="Attack type")
        status = gr.Dropdown([ANY, *queries.QUEUE_STATUSES], value=ANY, label="Status", elem_id="queue-status")
        refresh = gr.Button("Refresh", elem_id="queue-refresh")
    table = gr.Dataframe(
        headers=[title for _, title in COLUMNS],
        label="Cases (click a row to open it in Review)",
        interactive=False,
        wrap=True,
        column_widths=WIDTHS,
        max_height=640,
        elem_id="queue-table",
    )
    count = gr.Markdown(elem_id="queue-count")
    inputs = [checked, attack, status, verdict, analyst, text]

    def load(checked, attack, status, verdict=ANY, analyst=ANY, text=""):
        headers, rows = case_table(ctx, checked, attack, status, verdict, analyst, text)
        return styled(headers, rows), f"{len(rows)} cases" + (" (the newest 200)" if len(rows) == 200 else "")

    refresh.click(load, inputs, [table, count], api_name="list_cases")
    for c in (checked, attack, status, verdict, analyst):
        c.change(load, inputs, [table, count], api_name=False)
    text.submit(load, inputs, [table, count], api_name=False)
    return table, (load, inputs, [table, count]), (open_id, open_btn)


def picked_investigation(evt: gr.SelectData) -> str:
    """The run id (prefix) of the clicked row (its first column)."""
    row = evt.row_value or []
    if not row or not row[0]:
        raise UserError("this row has no investigation to open")
    return str(row[0])

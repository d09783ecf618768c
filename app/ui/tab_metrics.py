"""Metrics tab: model vs analyst agreement, confusion matrix and ROC curve over reviewed cases
(computed by :mod:`app.review_metrics`)."""

from __future__ import annotations

import gradio as gr

from app.review_metrics import confusion_figure, review_metrics, roc_figure

from .context import AppContext
from .errors import UserError


def parse_threshold(text: str | float | None) -> float | None:
    """The threshold box: empty = the stored verdicts, else a number in [0, 1]."""
    if text is None or str(text).strip() == "":
        return None
    try:
        return float(str(text).strip())
    except ValueError:
        raise UserError(f"threshold must be a number between 0 and 1, or empty; got {text!r}") from None


def compute(ctx: AppContext, threshold: str | float | None):
    try:
        with ctx.storage.sessions() as s:
            m = review_metrics(s, threshold=parse_threshold(threshold))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    lines = [
        f"**{m.reviewed}** reviewed cases (each with its latest review): {m.labelled} labelled real/spoof, {m.unsure} unsure.",
        "**Agreement** model vs analyst: "
        + (f"{m.agreement:.1%} ({m.agreed} of {m.compared})" if m.agreement is not None else "nothing to compare yet"),
    ]
    if m.no_model_verdict:
        lines.append(f"{m.no_model_verdict} labelled runs have no model verdict (failed or interrupted).")
    if m.roc is not None:
        lines.append(
            f"**ROC AUC** of the model's P(spoof) against analyst labels: {m.roc.auc:.3f} ({m.roc.n_real} real, {m.roc.n_spoof} spoof)"
        )
    if m.threshold is not None:
        lines.append(f"Model verdicts recomputed at threshold {m.threshold:.3f}.")
    (rr, rs), (sr, ss) = m.confusion
    lines.append(
        f"\n| analyst \\ model | Real | Spoof |\n|---|---|---|\n| **Real** | {rr} | {rs} |\n| **Spoof** | {sr} | {ss} |"
    )
    return "\n\n".join(lines), roc_figure(m), confusion_figure(m)


def build(ctx: AppContext):
    with gr.Row():
        # A Textbox, not gr.Number: Number shows an empty value as 0, which would silently mean "all spoof".
        threshold = gr.Textbox(
            value="",
            placeholder="e.g. 0.589",
            label="Recompute model verdicts at this P(spoof) threshold (empty: the stored verdicts)",
        )
        go = gr.Button("Compute", elem_id="metrics-refresh")
    text = gr.Markdown(elem_id="metrics-text")
    with gr.Row():
        roc = gr.Plot(label="ROC over reviewed cases")
        confusion = gr.Plot(label="Confusion matrix")
    go.click(lambda t: compute(ctx, t), threshold, [text, roc, confusion], api_name="review_metrics")
    return lambda t: compute(ctx, t), threshold, [text, roc, confusion]

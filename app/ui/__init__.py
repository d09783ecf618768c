"""The analyst workbench (Gradio 6): one module per tab, plus rendering, auth and shortcuts.

:func:`build_app` lays out the Blocks; :mod:`app.server` opens storage, starts the runner and
launches it.
"""

from __future__ import annotations

import gradio as gr

from . import tab_calibration, tab_export, tab_investigate, tab_metrics, tab_queue, tab_review
from .context import AppContext
from .errors import UserError

TITLE = "tarfas — face anti-spoofing workbench"


def build_app(ctx: AppContext) -> gr.Blocks:
    # delete_cache: Gradio's copies of served files older than a day are removed hourly (a server runs for weeks).
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(
            f"## {TITLE}\nAn agent investigates each face with forensic tools, turn by turn; you review, correct and export. "
            "Demo samples: the *SIMULATED* images are made by this project from a public-domain portrait. "
            "Press **?** for keyboard shortcuts."
        )
        current = gr.Textbox(label="Current investigation", interactive=False, elem_id="current-investigation")
        with gr.Tabs() as tabs:
            with gr.Tab("Investigate", id="investigate"):
                tab_investigate.build(ctx, current)
            with gr.Tab("Review", id="review") as review_tab:
                review_box, review_outputs, do_open = tab_review.build(ctx, current)
            with gr.Tab("Queue", id="queue") as queue_tab:
                table, (load, load_in, load_out), (open_id, open_btn) = tab_queue.build(ctx)
            with gr.Tab("Export", id="export"):
                tab_export.build(ctx)
            with gr.Tab("Metrics", id="metrics") as metrics_tab:
                metrics = tab_metrics.build(ctx)
            with gr.Tab("Calibration", id="calibration") as calibration_tab:
                calibration, calibration_out = tab_calibration.build(ctx)

        def pick(evt: gr.SelectData):
            return tab_queue.picked_investigation(evt), gr.Tabs(selected="review")

        table.select(pick, None, [review_box, tabs], api_name=False).then(
            do_open, review_box, review_outputs, api_name=False
        )

        def open_typed(text):
            if not (text or "").strip():
                raise UserError("type a case or investigation id (or its first 12 characters)")
            return text.strip(), gr.Tabs(selected="review")

        for trigger in (open_btn.click, open_id.submit):
            trigger(open_typed, open_id, [review_box, tabs], api_name=False).then(
                do_open, review_box, review_outputs, api_name=False
            )

        # Opening a tab shows its content at once (Queue and Metrics as they are now). Review opens the current investigation only when another
        # one (or none) is open: switching tabs and back must never discard notes the analyst has typed.
        def review_selected(box, cur):
            if not cur or cur == box:
                return [gr.skip()] * len(review_outputs)
            return list(do_open(cur))

        review_tab.select(review_selected, [review_box, current], review_outputs, api_name=False)
        metrics_tab.select(metrics[0], metrics[1], metrics[2], api_name=False)
        queue_tab.select(load, load_in, load_out, api_name=False)  # the queue as it is now, without a Refresh click
        calibration_tab.select(calibration, None, calibration_out, api_name=False)  # active profile, list, history
    return demo

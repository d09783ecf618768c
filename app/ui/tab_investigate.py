"""Investigate tab: upload one or many images (or pick a demo sample) and watch the agent work turn by
turn; every panel (transcript, verdict card, original, crop and tool images, timeline) shows one case,
the one being investigated, or the batch row the analyst opened.

Live runs are shown turn by turn: when a fast policy makes several turns between two screen updates,
each is still shown on its own, ``TURN_GAP_S`` apart, so the audience sees the agent think. In a batch, a
file that finished while earlier ones were shown is shown at once.
"""

from __future__ import annotations

import re
import time

import gradio as gr

from app.runner import Job, RunSettings
from core.events import InvestigationStarted, ToolResultReady, TurnCompleted, VerdictReached
from core.registry import SPECS, ToolRegistry
from storage.cases import cases_with_image

from .case_view import CaseView, live_snapshot, load_snapshot, transcript, view_values
from .context import AppContext, samples
from .errors import UserError
from .render import Transcript, trajectory_messages, verdict_label
from .safe import md_text

BATCH_COLUMNS = ["file", "status", "verdict", "P(spoof)", "investigation", "message"]
INV_COLUMN = BATCH_COLUMNS.index("investigation")
TOOLS = ToolRegistry().names
BOX_TOOLS = [s for s in SPECS if "bbox" in s.parameters["properties"]]  # tools that take a box (ZoomIn)
JOB_IDLE_TIMEOUT_S = 600  # a policy that says nothing for this long is reported, not waited on forever
TURN_GAP_S = 0.3  # live view: at least this long between two turns shown, so each one is seen
# A hint at a command-line flag (e.g. "(--on-no-face whole in the CLI)") means nothing in the browser.
_CLI_HINT = re.compile(r"\s*\([^()]*--[a-z][a-z-]*[^()]*\)")


def refusal_text(job: Job) -> str:
    """Why a file was not investigated, in the browser's words (no command-line flags)."""
    return _CLI_HINT.sub("", job.error or "").strip()


def _row(name: str, job: Job, turns: int = 0) -> list:
    traj = job.trajectory
    if not job.finished:
        status = "queued" if job.state == "queued" else f"running · turn {turns}" if turns else "running"
        return [name, status, "", None, job.investigation_id or "", ""]
    verdict = traj.final.verdict if traj is not None and traj.final else ""
    score = round(traj.final.score_spoof, 4) if traj is not None and traj.final else None
    status = traj.status if traj is not None else ("refused" if job.state == "error" else job.state)
    message = refusal_text(job) if job.error else (traj.error if traj is not None and traj.error else "")
    return [name, status, verdict, score, job.investigation_id or "", message]


class _Outputs:
    """The tab's outputs as last sent; an unchanged one is sent as ``gr.skip()`` (Gradio then neither
    re-processes nor re-sends it, which keeps each streamed update small)."""

    def __init__(self, n: int):
        self.last: list = [None] * n

    def __call__(self, *values, final: bool = False):
        # The final update carries everything: API clients keep only the last one.
        out = [
            gr.skip() if not final and i != 0 and v is not None and _same(v, old) else v
            for i, (v, old) in enumerate(zip(values, self.last))
        ]
        self.last = list(values)
        return tuple(out)


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 (values that do not compare: send them)
        return False


def _seen_before(ctx: AppContext, job: Job) -> list[gr.ChatMessage]:
    """A note when these exact bytes were uploaded before (same SHA-256, earlier cases), with the case ids
    that the Review tab opens."""
    traj = job.trajectory
    if traj is None or not traj.image_sha256:
        return []
    with ctx.storage.sessions() as s:
        earlier = [c for c in cases_with_image(s, traj.image_sha256) if c.id != job.case_id]
        if not earlier:
            return []
        listing = ", ".join(f"case {c.id} ({md_text(c.created_by)}, {c.created_at:%Y-%m-%d})" for c in earlier[-5:])
    return [
        gr.ChatMessage(
            role="assistant",
            content=f"This exact image (same SHA-256) was already examined in {len(earlier)} earlier case(s): "
            f"{listing}. Paste a case id in the Review tab to open it.",
            metadata={"title": "ℹ️ seen before", "status": "done"},
        )
    ]


class _Live:
    """The turns of one live job seen so far, as a case snapshot for the view."""

    def __init__(self, name: str, job: Job):
        self.name, self.job = name, job
        self.traj = None
        self.turns: list = []
        self.final = None

    def on(self, event) -> None:
        if isinstance(event, InvestigationStarted):
            self.traj = event.trajectory
        elif isinstance(event, TurnCompleted):
            self.turns.append(event.turn)
        elif isinstance(event, VerdictReached):
            self.final = event.final

    def snapshot(self):
        if self.traj is None:
            return None
        status = self.traj.status if self.job.finished and self.traj.status != "running" else "running"
        return live_snapshot(
            self.job.investigation_id or self.traj.id,
            self.traj,
            self.turns,
            self.final,
            status,
            sha=self.traj.image_sha256,
            filename=self.name,
        )


def stream_jobs(ctx: AppContext, jobs: list[tuple[str, Job]]):
    """Yield (chat, status, investigation id, batch table, *case view) as events arrive. The chat and
    the case view follow one job at a time, in upload order; the table shows the whole batch."""
    view = None
    send = _Outputs(4 + 10)
    rows = {j.id: _row(name, j) for name, j in jobs}
    last_inv = ""
    empty = view_values(ctx, None)
    # Acknowledge at once: the analyst sees the upload taken before the first turn exists.
    names = ", ".join(md_text(name) for name, _ in jobs[:3]) + (f" and {len(jobs) - 3} more" if len(jobs) > 3 else "")
    yield send(
        [gr.ChatMessage(role="user", content=f"Queued for investigation: **{names}**")],
        f"Queued {len(jobs)} image(s)…",
        last_inv,
        list(rows.values()),
        *empty,
    )
    for k, (name, job) in enumerate(jobs):
        header = (
            [gr.ChatMessage(role="user", content=f"**Image {k + 1} of {len(jobs)}**: {md_text(name)}")]
            if len(jobs) > 1
            else []
        )
        transcript, live = Transcript(ctx.png, header), _Live(name, job)
        view = empty  # never the previous file's panels
        shown_at = 0.0
        # The first file streams at a watchable pace; a later one that finished while the analyst watched the
        # earlier ones is shown at once (pacing 50 finished files would keep the batch table waiting a minute).
        paced = k == 0 or not job.finished
        try:
            for batch in job.stream_batches(timeout=JOB_IDLE_TIMEOUT_S):
                for i, event in enumerate(batch):
                    transcript.on(event)
                    live.on(event)
                    turn_done = isinstance(event, (TurnCompleted, ToolResultReady))
                    if not turn_done and i != len(batch) - 1:
                        continue
                    if paced and turn_done and shown_at:  # each turn stays on screen a moment before the next
                        time.sleep(max(0.0, TURN_GAP_S - (time.perf_counter() - shown_at)))
                    rows[job.id] = _row(name, job, len(live.turns))
                    head = (
                        transcript.messages(),
                        f"Investigating **{md_text(name)}** ({k + 1}/{len(jobs)})…",
                        job.investigation_id or last_inv,
                        list(rows.values()),
                    )
                    # The turn's text first (the view as it was: sent as "unchanged"), then its images: the
                    # analyst reads the turn while the case view is drawn (the upload's boxes take longest).
                    yield send(*head, *view)
                    if turn_done:  # the panels change with a turn (the crop is in the chat's opening)
                        shown_at = time.perf_counter()  # the next turn waits from here, not from a placeholder
                        snap = live.snapshot()
                        view = view_values(ctx, snap) if snap is not None else empty
                        yield send(*head, *view)
        except TimeoutError as exc:
            job.error = str(exc)
        try:
            job.wait(timeout=JOB_IDLE_TIMEOUT_S)
        except TimeoutError as exc:
            job.error = str(exc)
        rows[job.id] = _row(name, job, len(live.turns))
        if job.error:
            msgs = transcript.messages() + [
                gr.ChatMessage(
                    role="assistant",
                    content=f"**{md_text(name)}: not investigated.** {md_text(refusal_text(job))}",
                    metadata={"title": "❌ refused", "status": "done"},
                )
            ]
            gr.Warning(f"{name}: {refusal_text(job)}")
        else:
            msgs = transcript.messages() + _seen_before(ctx, job)
            last_inv = job.investigation_id or last_inv
            snap = live.snapshot()
            view = view_values(ctx, snap) if snap is not None else empty
        # A refused job (job.error: bad input, nothing recorded) finished without being investigated.
        done = sum(1 for _, j in jobs if j.finished and not j.error)
        refused = sum(1 for _, j in jobs if j.finished and j.error)
        status = (
            f"{done} of {len(jobs)} investigated"
            + (f", {refused} refused" if refused else "")
            + (
                f" · last: {rows[job.id][1]} {rows[job.id][2]}"
                if not job.error
                else f" · **{md_text(name)}**: {md_text(refusal_text(job))}"
            )
        )
        yield send(
            msgs,
            status,
            job.investigation_id if not job.error else last_inv,
            list(rows.values()),
            *view,
            final=k == len(jobs) - 1,
        )


def open_case(ctx: AppContext, inv_id: str, focus: str | None = None) -> tuple:
    """(chat, status, investigation id, *case view) of a stored run."""
    snap = load_snapshot(ctx, inv_id)
    name = snap.filename or snap.traj.source or "upload"
    verdict = verdict_label(snap.final.verdict) if snap.final else snap.status
    return (
        trajectory_messages(snap.traj, ctx.png),
        f"Showing **{md_text(name)}**: {verdict}",
        snap.investigation_id,
        *view_values(ctx, snap, focus),
    )


def build(ctx: AppContext, current: gr.Textbox):
    """Lay out the tab; ``current`` is the shared investigation id box (set here, read by Review)."""
    policies = ctx.catalog.names()
    demo = samples()
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            files = gr.File(
                label="Face images (one or many)",
                file_count="multiple",
                file_types=["image"],
                type="filepath",
                elem_id="upload",
            )
            go = gr.Button("Investigate", variant="primary", elem_id="investigate")
            with gr.Row():
                sample = gr.Dropdown(
                    list(demo), value=next(iter(demo), None), label="Demo sample (no upload needed)", scale=3
                )
                go_sample = gr.Button("Investigate sample", scale=1, elem_id="investigate-sample")
            with gr.Accordion("Settings", open=False):
                policy = gr.Dropdown(policies, value=policies[0] if policies else "expert", label="Policy")
                policy_args = gr.Textbox(
                    label="Policy arguments (key=value, comma separated)",
                    placeholder="model=/path, adapter=/path, base_url=http://127.0.0.1:8000/v1",
                    # Only a server that allows custom policies takes arguments from the browser.
                    visible=bool(getattr(getattr(ctx, "catalog", None), "allow_custom", False)),
                )
                max_calls = gr.Slider(0, 6, value=3, step=1, label="Max tool calls (paper: 3)")
                tools = gr.CheckboxGroup(TOOLS, value=TOOLS, label="Tools offered")
                whole = gr.Checkbox(False, label="Analyse the whole image when no face is found")
            status = gr.Markdown("Upload face images or pick a demo sample.", elem_id="investigate-status")
        with gr.Column(scale=2):
            view = CaseView(ctx, "investigate")
            view.build_card()
            chat = transcript("Investigation (the agent's turns)", "transcript")
    batch = gr.Dataframe(
        headers=BATCH_COLUMNS,
        label="Batch: one row per file, with its progress (click a row to open its case)",
        interactive=False,
        wrap=True,
        column_widths=["18%", "10%", "7%", "7%", "24%", "34%"],
        elem_id="batch",
    )
    view.build_panels()
    view.wire(current, chat, api=True)

    outputs = [chat, status, current, batch, *view.outputs]
    settings_in = [policy, policy_args, max_calls, tools, whole]

    def investigate_files(paths, policy, policy_args, max_calls, tools, whole, request: gr.Request):
        if not paths:
            raise UserError("upload at least one image first")
        settings = ctx.settings_for(policy, policy_args, max_tool_calls=max_calls, tools=tools, on_no_face=whole)
        jobs = ctx.submit_files(paths, user=ctx.user(request), settings=settings)  # limits; files streamed to the store
        yield from stream_jobs(ctx, jobs)

    def investigate_sample(name, policy, policy_args, max_calls, tools, whole, request: gr.Request):
        if name not in demo:
            raise UserError(f"unknown demo sample {name!r}")
        settings = ctx.settings_for(policy, policy_args, max_tool_calls=max_calls, tools=tools, on_no_face=whole)
        path = demo[name]
        yield from stream_jobs(
            ctx,
            [
                (
                    path.name,
                    ctx.runner.submit(path, filename=path.name, user=ctx.user(request), settings=settings),
                )
            ],
        )

    def open_row(evt: gr.SelectData):
        row = evt.row_value or []
        inv_id = str(row[INV_COLUMN]) if len(row) > INV_COLUMN and row[INV_COLUMN] else ""
        if not inv_id:
            why = row[BATCH_COLUMNS.index("message")] if len(row) == len(BATCH_COLUMNS) else ""
            raise UserError(f"{row[0] if row else 'this file'} was not investigated" + (f": {why}" if why else ""))
        return open_case(ctx, inv_id)

    go.click(investigate_files, [files, *settings_in], outputs, api_name="investigate", concurrency_limit=None)
    go_sample.click(
        investigate_sample, [sample, *settings_in], outputs, api_name="investigate_sample", concurrency_limit=None
    )
    batch.select(open_row, None, [chat, status, current, *view.outputs], api_name=False)


__all__ = ["BATCH_COLUMNS", "TOOLS", "RunSettings", "open_case", "stream_jobs"]

"""Investigate tab: upload one or many images (or pick a demo sample), watch the agent's turns stream,
compare the crop with tool outputs side by side, and run any tool by hand on the case."""

from __future__ import annotations

import json
import time
from pathlib import Path

import gradio as gr

from app.runner import Job, RunSettings
from core.registry import SPECS, ToolRegistry
from core.trajectory import Trajectory
from storage import audit
from storage.cases import cases_with_image
from storage.investigations import get_investigation

from .context import AppContext, samples
from .errors import UserError
from .render import Transcript

BATCH_COLUMNS = ["file", "status", "verdict", "P(spoof)", "investigation", "message"]
TOOLS = ToolRegistry().names
BOX_TOOLS = [s for s in SPECS if "bbox" in s.parameters["properties"]]  # tools that take a box (ZoomIn)
JOB_IDLE_TIMEOUT_S = 600  # a policy that says nothing for this long is reported, not waited on forever


def parse_policy_kwargs(text: str) -> dict:
    """``key=value, key=value`` (e.g. ``model=/models/qwen, base_url=http://127.0.0.1:8000/v1``)."""
    out = {}
    for part in (text or "").replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise UserError(f"policy arguments: expected key=value, got {part!r}")
        out[key.strip()] = _scalar(value.strip())
    return out


def _scalar(text: str):
    """``512`` -> 512, ``0.7`` -> 0.7, ``true`` -> True; anything else (paths, URLs) stays text."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (int, float, bool)) else text


def settings_from(policy, policy_args, max_tool_calls, tools, whole) -> RunSettings:
    tools = list(tools or [])
    if not tools:
        raise UserError("choose at least one tool")
    return RunSettings.make(
        policy or "expert",
        parse_policy_kwargs(policy_args),
        max_tool_calls=int(max_tool_calls),
        tools=None if set(tools) == set(TOOLS) else tools,
        on_no_face="whole" if whole else "error",
    )


def _row(name: str, job: Job) -> list:
    traj = job.trajectory
    verdict = traj.final.verdict if traj is not None and traj.final else ""
    score = round(traj.final.score_spoof, 4) if traj is not None and traj.final else None
    status = traj.status if traj is not None else ("refused" if job.state == "error" else job.state)
    return [
        name,
        status,
        verdict,
        score,
        job.investigation_id or "",
        job.error or (traj.error if traj is not None and traj.error else ""),
    ]


def _tool_images(ctx: AppContext, traj: Trajectory | None) -> list[tuple[str, str]]:
    if traj is None:
        return []
    return [
        (ctx.png.path(t.tool_result.image), f"turn {t.index}: {t.tool_result.name}")
        for t in traj.turns
        if t.tool_result is not None and t.tool_result.image is not None
    ]


class _Outputs:
    """The tab's outputs as last sent; an unchanged one is sent as ``gr.skip()`` (Gradio then neither
    re-processes nor re-sends it, which keeps each streamed update small)."""

    def __init__(self):
        self.last: list = [None] * 7

    def __call__(self, *values, final: bool = False):
        # The final update carries everything: API clients keep only the last one.
        out = [
            gr.skip() if not final and i != 0 and v is not None and v == old else v
            for i, (v, old) in enumerate(zip(values, self.last))
        ]
        self.last = list(values)
        return tuple(out)


def _seen_before(ctx: AppContext, job: Job) -> list[gr.ChatMessage]:
    """A note when these exact bytes were uploaded before (same SHA-256, earlier cases)."""
    traj = job.trajectory
    if traj is None or not traj.image_sha256:
        return []
    with ctx.storage.sessions() as s:
        earlier = [c for c in cases_with_image(s, traj.image_sha256) if c.id != job.case_id]
        if not earlier:
            return []
        listing = ", ".join(f"`{c.id[:12]}` ({c.created_by}, {c.created_at:%Y-%m-%d})" for c in earlier[-5:])
    return [
        gr.ChatMessage(
            role="assistant",
            content=f"This exact image (same SHA-256) was already examined in {len(earlier)} earlier case(s): {listing}.",
            metadata={"title": "ℹ️ seen before", "status": "done"},
        )
    ]


def stream_jobs(ctx: AppContext, jobs: list[tuple[str, Job]]):
    """Yield (chat, status, investigation id, crop, tool image, gallery, batch table) as events arrive.
    The chat follows one job at a time, in upload order; the table shows the whole batch."""
    send = _Outputs()
    rows = {j.id: [name, "queued", "", None, "", ""] for name, j in jobs}
    last_inv, crop, tool_image, gallery = "", None, None, []
    # Acknowledge at once: the analyst sees the upload taken before the first turn exists.
    names = ", ".join(name for name, _ in jobs[:3]) + (f" and {len(jobs) - 3} more" if len(jobs) > 3 else "")
    yield send(
        [gr.ChatMessage(role="user", content=f"Queued for investigation: **{names}**")],
        f"Queued {len(jobs)} image(s)…",
        last_inv,
        crop,
        tool_image,
        gallery,
        list(rows.values()),
    )
    for k, (name, job) in enumerate(jobs):
        header = (
            [gr.ChatMessage(role="user", content=f"**Image {k + 1} of {len(jobs)}**: {name}")] if len(jobs) > 1 else []
        )
        transcript = Transcript(ctx.png, header)
        try:
            for batch in job.stream_batches(timeout=JOB_IDLE_TIMEOUT_S):
                for event in batch:
                    transcript.on(event)
                traj = transcript.trajectory
                if traj is not None:
                    crop = ctx.png.path(traj.crop) if traj.crop is not None else None
                    images = _tool_images(ctx, traj)
                    if images:
                        gallery, tool_image = images, images[-1][0]
                rows[job.id] = (
                    _row(name, job) if job.finished else [name, "running", "", None, job.investigation_id or "", ""]
                )
                yield send(
                    transcript.messages(),
                    f"Investigating **{name}** ({k + 1}/{len(jobs)})…",
                    job.investigation_id or last_inv,
                    crop,
                    tool_image,
                    gallery,
                    list(rows.values()),
                )
        except TimeoutError as exc:
            job.error = str(exc)
        job.wait(timeout=JOB_IDLE_TIMEOUT_S)
        rows[job.id] = _row(name, job)
        if job.error:
            msgs = transcript.messages() + [
                gr.ChatMessage(
                    role="assistant",
                    content=f"**{name}: not investigated.** {job.error}",
                    metadata={"title": "❌ refused", "status": "done"},
                )
            ]
            gr.Warning(f"{name}: {job.error}")
        else:
            msgs = transcript.messages() + _seen_before(ctx, job)
            last_inv = job.investigation_id or last_inv
        # A refused job (job.error: bad input, nothing recorded) finished without being investigated.
        done = sum(1 for _, j in jobs if j.finished and not j.error)
        refused = sum(1 for _, j in jobs if j.finished and j.error)
        status = (
            f"{done} of {len(jobs)} investigated"
            + (f", {refused} refused" if refused else "")
            + (f" · last: {rows[job.id][1]} {rows[job.id][2]}" if not job.error else f" · **{name}**: {job.error}")
        )
        yield send(msgs, status, last_inv, crop, tool_image, gallery, list(rows.values()), final=k == len(jobs) - 1)


def build(ctx: AppContext, current: gr.Textbox):
    """Lay out the tab; ``current`` is the shared investigation id box (set here, read by Review)."""
    policies = ["expert"] + [p for p in ctx.policy_names if p != "expert"]
    demo = samples()
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
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
                policy = gr.Dropdown(policies, value="expert", label="Policy")
                policy_args = gr.Textbox(
                    label="Policy arguments (key=value, comma separated)",
                    placeholder="model=/path, adapter=/path, base_url=http://127.0.0.1:8000/v1",
                )
                max_calls = gr.Slider(0, 6, value=3, step=1, label="Max tool calls (paper: 3)")
                tools = gr.CheckboxGroup(TOOLS, value=TOOLS, label="Tools offered")
                whole = gr.Checkbox(False, label="Analyse the whole image when no face is found")
            status = gr.Markdown("Upload face images or pick a demo sample.", elem_id="investigate-status")
        with gr.Column(scale=2):
            chat = gr.Chatbot(label="Investigation", height=560, elem_id="transcript", buttons=["copy_all"])
    with gr.Row():
        crop = gr.Image(
            label="Face crop investigated (original pixels)",
            format="png",
            interactive=False,
            buttons=["fullscreen", "download"],
            elem_id="crop",
        )
        tool_image = gr.Image(
            label="Tool output",
            format="png",
            interactive=False,
            buttons=["fullscreen", "download"],
            elem_id="tool-image",
        )
    gallery = gr.Gallery(
        label="All tool outputs of this case (click to compare)",
        format="png",
        columns=6,
        height=180,
        allow_preview=False,
        object_fit="contain",
    )
    with gr.Accordion("Run a tool by hand on this case", open=False):
        with gr.Row():
            manual_tool = gr.Dropdown(TOOLS, value=BOX_TOOLS[0].name, label="Tool")
            bbox = gr.Textbox(
                value=", ".join(map(str, BOX_TOOLS[0].default_args["bbox"])),
                label=f"{'/'.join(t.name for t in BOX_TOOLS)} box x1, y1, x2, y2 (pixels of the 224x224 crop)",
            )
            run_tool = gr.Button("Run tool")
        manual_info = gr.Markdown()
    batch = gr.Dataframe(headers=BATCH_COLUMNS, label="Batch", interactive=False, wrap=True)

    outputs = [chat, status, current, crop, tool_image, gallery, batch]
    settings_in = [policy, policy_args, max_calls, tools, whole]

    def investigate_files(paths, policy, policy_args, max_calls, tools, whole, request: gr.Request):
        if not paths:
            raise UserError("upload at least one image first")
        settings = settings_from(policy, policy_args, max_calls, tools, whole)
        user = ctx.user(request)
        jobs = []
        for p in paths:
            p = Path(p)
            name = p.name
            size = p.stat().st_size
            if size > ctx.max_file_bytes:
                gr.Warning(
                    f"{name} is {size / 2**20:.1f} MiB; the upload limit is {ctx.max_file_bytes / 2**20:.0f} MiB: skipped"
                )
                continue
            jobs.append((name, ctx.runner.submit(p.read_bytes(), filename=name, user=user, settings=settings)))
        if not jobs:
            raise UserError("no image within the upload limit")
        yield from stream_jobs(ctx, jobs)

    def investigate_sample(name, policy, policy_args, max_calls, tools, whole, request: gr.Request):
        if name not in demo:
            raise UserError(f"unknown demo sample {name!r}")
        settings = settings_from(policy, policy_args, max_calls, tools, whole)
        path = demo[name]
        yield from stream_jobs(
            ctx,
            [
                (
                    path.name,
                    ctx.runner.submit(path.read_bytes(), filename=path.name, user=ctx.user(request), settings=settings),
                )
            ],
        )

    def show_tool(evt: gr.SelectData, images):
        return images[evt.index][0] if images and evt.index is not None else None

    def manual(inv_id, tool, box, request: gr.Request):
        if not inv_id:
            raise UserError("investigate or open a case first")
        args = {}
        if tool in {t.name for t in BOX_TOOLS}:
            try:
                args = {"bbox": [float(v) for v in box.replace(";", ",").split(",")]}
            except ValueError:
                raise UserError(f"box must be four numbers x1, y1, x2, y2, got {box!r}") from None
        return run_manual_tool(ctx, inv_id, tool, args, ctx.user(request))

    go.click(investigate_files, [files, *settings_in], outputs, api_name="investigate", concurrency_limit=None)
    go_sample.click(
        investigate_sample, [sample, *settings_in], outputs, api_name="investigate_sample", concurrency_limit=None
    )
    gallery.select(show_tool, gallery, tool_image, api_name=False)
    run_tool.click(manual, [current, manual_tool, bbox], [tool_image, manual_info], api_name="run_tool")


def run_manual_tool(ctx: AppContext, inv_id: str, tool: str, arguments: dict, user: str):
    """Run one tool on the case's stored crop without the agent; the output image is kept in the file
    store and the run is in the audit log (what the analyst looked at is part of the record)."""
    from core.errors import ToolCallError

    with ctx.storage.sessions() as s:
        try:
            inv = get_investigation(s, inv_id.strip())
        except LookupError as exc:
            raise UserError(str(exc)) from None
        crop_sha = inv.crop_sha256
    if not crop_sha:
        raise UserError(f"investigation {inv_id} has no stored face crop")
    crop = ctx.storage.files.read_png(crop_sha)
    t0 = time.perf_counter()
    try:  # the default policy's registry: its expert bank reads the output too
        ex = ctx.runner.registry(ctx.runner.policy(RunSettings())).execute(tool, arguments, crop)
    except ToolCallError as exc:
        raise UserError(str(exc)) from None
    image_sha = ctx.storage.files.put_png(ex.output.image)
    with ctx.storage.sessions.begin() as s:
        audit.record(
            s,
            user,
            "tool.manual_run",
            "investigation",
            inv.id,
            None,
            {"tool": ex.name, "arguments": ex.arguments, "stats": ex.output.stats, "image_sha256": image_sha},
        )
    p = ex.expert_p_spoof
    stats = ", ".join(f"{k} = {v:.4g}" for k, v in ex.output.stats.items())
    info = f"**{ex.name}** `{ex.arguments}` in {(time.perf_counter() - t0) * 1e3:.0f} ms · {stats}" + (
        f" · expert P(spoof trace) = {p:.2f}" if p is not None else ""
    )
    return ctx.png.path(ex.output.image), info

"""The case view that Investigate and Review share: a verdict card, the original upload with its face box,
the crop and every tool image large with its caption, a timeline of turns that picks what the large panel
shows, a side-by-side compare of any two images, and the tools an analyst ran by hand.

One :class:`CaseSnapshot` (one run of one case) feeds every panel, so the panels never mix cases. It is
built from a stored run (:func:`load_snapshot`) or from the turns a live run has made so far
(:func:`live_snapshot`); :func:`view_values` turns it into the components' values. Every untrusted text
(model text, file names, analyst names) is escaped (:mod:`app.ui.safe`). Images zoom with the mouse
wheel and pan by dragging, up to the original pixels (``ZOOM_CLASS``, script in :mod:`app.ui.shortcuts`).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw

from core.errors import InputImageError
from core.faces import load_image
from core.registry import SPECS, ToolRegistry
from core.trajectory import Final, Trajectory, Turn
from storage.analyst_actions import ActionRecord, list_actions, record_action
from storage.errors import NotFoundError
from storage.investigations import get_investigation, load_trajectory

from .context import AppContext
from .errors import UserError
from .render import verdict_label
from .safe import html_text, md_text

ZOOM_CLASS = "tarfas-zoom"  # images the page script lets the analyst zoom and pan
ORIGINAL = "Original upload"
CROP = "Face crop"
IMAGE_HEIGHT = 420
TOOLS = ToolRegistry().names
BOX_TOOLS = [s for s in SPECS if "bbox" in s.parameters["properties"]]  # tools that take a box (ZoomIn)


@dataclass
class CaseSnapshot:
    """What the view shows of one run: its trajectory header, the turns made so far, the verdict (None
    while running), the case's uploaded image and the analyst's hand-run tools."""

    investigation_id: str
    traj: Trajectory
    turns: list[Turn]
    final: Final | None
    status: str
    image_sha256: str | None = None
    filename: str | None = None
    actions: list[ActionRecord] = field(default_factory=list)
    action_images: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass
class Entry:
    """One line of the timeline: what the large panel shows when it is picked."""

    label: str
    path: str | None
    caption: str  # Markdown, every untrusted part escaped


# --- building snapshots -----------------------------------------------------------------------------
def load_snapshot(ctx: AppContext, inv_id: str) -> CaseSnapshot:
    """A stored run as a snapshot (its images read and hash-checked from the file store)."""
    inv_id = (inv_id or "").strip()
    try:
        with ctx.storage.sessions() as s:
            traj = load_trajectory(s, ctx.storage.files, inv_id)
            inv = get_investigation(s, inv_id)
            sha, filename, status = inv.case.image_sha256, inv.case.filename, inv.status
            actions = list_actions(s, inv_id)
    except NotFoundError as exc:
        raise UserError(str(exc)) from None
    images = {a.id: ctx.storage.files.read_png(a.image_sha256) for a in actions if a.image_sha256}
    return CaseSnapshot(inv_id, traj, list(traj.turns), traj.final, status, sha, filename, actions, images)


def live_snapshot(inv_id: str, traj: Trajectory, turns: list[Turn], final: Final | None, status: str, *, sha, filename):
    return CaseSnapshot(inv_id, traj, list(turns), final, status, sha, filename)


# --- what each panel shows --------------------------------------------------------------------------
# (PNG cache folder, sha, boxes) -> PNG path, the latest 64. Keyed by the folder too: a process may serve
# several workbenches (tests do), and a path under another's cache is not served by this one.
_ORIGINALS: OrderedDict[tuple, str | None] = OrderedDict()


def original_with_boxes(ctx: AppContext, sha: str | None, traj: Trajectory) -> str | None:
    """The uploaded image at its own size with the detected face box (red) and the region analysed (blue)."""
    if not sha:
        return None
    face = traj.face
    key = (str(ctx.png.root), sha, tuple(face.bbox or ()) if face else (), tuple(face.crop_box) if face else ())
    if key in _ORIGINALS and Path(_ORIGINALS[key]).is_file():
        _ORIGINALS.move_to_end(key)
        return _ORIGINALS[key]
    try:
        rgb = load_image(ctx.storage.files.read(sha), name="the case image")
    except (InputImageError, OSError, NotFoundError):
        return None
    im = Image.fromarray(rgb)
    draw, line = ImageDraw.Draw(im), max(2, round(max(im.size) / 250))
    if face is not None and face.crop_box:
        draw.rectangle(list(face.crop_box), outline=(40, 90, 255), width=line)
    if face is not None and face.bbox:
        draw.rectangle(list(face.bbox), outline=(255, 0, 0), width=line)
    path = ctx.png.path(np.asarray(im))
    _ORIGINALS[key] = path
    while len(_ORIGINALS) > 64:
        _ORIGINALS.popitem(last=False)
    return path


def _threshold(ctx: AppContext, snap: CaseSnapshot) -> tuple[float | None, str]:
    """The threshold the verdict was decided with, and where it comes from."""
    profile = snap.traj.meta.get("calibration_profile") or {}
    if profile.get("threshold") is not None:
        name = f" '{profile['name']}'" if profile.get("name") else ""
        return float(profile["threshold"]), f"calibration profile {profile.get('id', '')}{name}"
    if snap.traj.policy == "expert":
        try:
            from app.runner import RunSettings

            t = getattr(ctx.runner.policy(RunSettings()), "threshold", None)
            return (float(t), "the policy's own") if t is not None else (None, "")
        except Exception:  # noqa: BLE001 (no weights installed: no threshold to draw)
            return None, ""
    return None, ""


def card_html(ctx: AppContext, snap: CaseSnapshot) -> str:
    """The verdict card: REAL / SPOOF in colour, P(spoof) on a bar with the threshold marked, the policy,
    its version and the time taken."""
    final, traj = snap.final, snap.traj
    verdict = final.verdict if final else None
    colour = {"spoof": "#c62828", "real": "#2e7d32"}.get(verdict or "", "#616161")
    word = verdict_label(verdict).upper() if verdict else snap.status.upper()
    p = final.score_spoof if final else None
    threshold, source = _threshold(ctx, snap)
    bar = ""
    if p is not None:
        marker = (
            f'<div class="tf-thr" title="threshold {threshold:.3f}" style="left:{100 * threshold:.1f}%"></div>'
            if threshold is not None
            else ""
        )
        bar = (
            f'<div class="tf-bar"><div class="tf-fill" style="width:{100 * p:.1f}%;background:{colour}"></div>'
            f"{marker}</div>"
        )
    seconds = (traj.timings_ms or {}).get("total")
    if seconds is None:
        seconds = sum(t.elapsed_ms for t in snap.turns) or None
    facts = [
        f"P(spoof) <b>{p:.3f}</b>" if p is not None else "P(spoof) —",
        f"threshold <b>{threshold:.3f}</b> ({html_text(source)})" if threshold is not None else "no threshold recorded",
        f"policy <b>{html_text(traj.policy)}</b>"
        + (f" v{html_text(traj.policy_version)}" if traj.policy_version else ""),
        f"{seconds / 1e3:.2f} s" if seconds else "",
        f"{len(snap.turns)} turn(s)",
        "verdict from the fast answer (the reasoning did not conclude)"
        if final is not None and final.source != "answer"
        else "",
    ]
    name = html_text(snap.filename or traj.source or "upload")
    return (
        f'<div class="tf-card" data-investigation="{html_text(snap.investigation_id)}" data-verdict="{html_text(verdict or "")}">'
        f'<div class="tf-head"><span class="tf-verdict" style="background:{colour}">{html_text(word)}</span>'
        f'<span class="tf-name">{name}</span> <code>{html_text(snap.investigation_id[:12])}</code></div>'
        f'{bar}<div class="tf-facts">{" · ".join(f for f in facts if f)}</div></div>'
    )


def zoomable_image(label: str, elem_id: str) -> gr.Image:
    """A large evidence image the page script lets the analyst zoom and pan (PNG, never re-encoded)."""
    return gr.Image(
        label=label,
        format="png",
        interactive=False,
        height=IMAGE_HEIGHT,
        buttons=["fullscreen", "download"],
        elem_id=elem_id,
        elem_classes=[ZOOM_CLASS],
    )


def transcript(label: str, elem_id: str) -> gr.Chatbot:
    """The agent's turns as a chat, copyable but never shareable: forensic evidence stays on this server."""
    return gr.Chatbot(label=label, height=520, elem_id=elem_id, buttons=["copy_all"], sanitize_html=True)


def _turn_label(t: Turn) -> str:
    if t.kind == "fast" and t.fast is not None:
        return f"Turn {t.index} · fast answer: {verdict_label(t.fast.verdict)}"
    if t.tool_result is not None:
        return f"Turn {t.index} · {t.tool_result.name}"
    if t.tool_call is not None:
        return f"Turn {t.index} · {t.tool_call.name} (refused)"
    if t.answer is not None:
        return f"Turn {t.index} · answer: {verdict_label(t.answer)}"
    return f"Turn {t.index} · {'format error' if t.parse_error else 'error'}"


def _turn_caption(t: Turn) -> str:
    lines = [f"**{md_text(_turn_label(t))}**" + (f" · {t.elapsed_ms / 1e3:.2f} s" if t.elapsed_ms else "")]
    if t.fast is not None:
        lines.append(f"Fast answer **{verdict_label(t.fast.verdict)}**: {md_text(t.fast.reason)}")
    if t.think:
        lines.append(f"Thought: {md_text(t.think)}")
    r = t.tool_result
    if r is not None:
        lines.append(f"Tool **{md_text(r.name)}**, arguments {md_text(json.dumps(r.arguments))}")
        if r.stats:
            lines.append("Measurements: " + ", ".join(f"{md_text(k)} = {v:.4g}" for k, v in r.stats.items()))
        if r.expert_p_spoof is not None:
            lines.append(f"Expert reading: P(spoof trace) = **{r.expert_p_spoof:.2f}**")
    if t.answer is not None:
        lines.append(
            f"Answer **{verdict_label(t.answer)}**" + (f", P(spoof) = {t.score_spoof:.3f}" if t.score_spoof else "")
        )
    if t.error:
        lines.append(f"Error fed back to the model: {md_text(t.error)}")
    return "\n\n".join(lines)


def entries(ctx: AppContext, snap: CaseSnapshot) -> list[Entry]:
    """The timeline: the upload, the crop, every turn, every hand-run tool (in that order)."""
    traj = snap.traj
    crop = ctx.png.path(traj.crop) if traj.crop is not None else None
    face = traj.face
    out = [
        Entry(
            ORIGINAL,
            original_with_boxes(ctx, snap.image_sha256, traj),
            f"**{ORIGINAL}**: {md_text(snap.filename or traj.source or 'upload')}"
            + (f", {face.source_size[0]}x{face.source_size[1]} px" if face else "")
            + " · red: the face found, blue: the region analysed"
            + (f" · SHA-256 {md_text(snap.image_sha256)}" if snap.image_sha256 else ""),
        ),
        Entry(CROP, crop, f"**{CROP}**: the 224x224 pixels the agent investigated (the blue region of the upload)"),
    ]
    for t in snap.turns:
        r = t.tool_result
        path = ctx.png.path(r.image) if r is not None and r.image is not None else crop
        out.append(Entry(_turn_label(t), path, _turn_caption(t)))
    for a in snap.actions:
        image = snap.action_images.get(a.id)
        label = action_label(a)
        caption = (
            f"**{md_text(label)}**: run by hand at {a.created_at:%Y-%m-%d %H:%M} UTC, not part of the agent's run · "
            f"arguments {md_text(json.dumps(a.arguments))}"
            + (f" · expert reading P(spoof trace) = {a.expert_p_spoof:.2f}" if a.expert_p_spoof is not None else "")
        )
        out.append(Entry(label, ctx.png.path(image) if image is not None else crop, caption))
    return out


def _images(items: list[Entry]) -> list[Entry]:
    """The entries that have an image of their own (a turn without a tool shows the crop: listed once)."""
    seen, out = set(), []
    for e in items:
        if e.path and e.path not in seen:
            seen.add(e.path)
            out.append(e)
    return out


class CaseView:
    """The components of one case view, laid out in two parts inside the caller's layout: the verdict
    card (:meth:`build_card`) and the evidence panels (:meth:`build_panels`); :meth:`wire` connects them."""

    def __init__(self, ctx: AppContext, prefix: str):
        self.ctx, self.prefix = ctx, prefix

    def build_card(self) -> None:
        self.card = gr.HTML(elem_id=f"{self.prefix}-card")

    def build_panels(self) -> None:
        p = self.prefix
        self.timeline = gr.Radio([], label="Timeline (pick a turn to show it large)", elem_id=f"{p}-timeline")
        with gr.Row(equal_height=True):
            self.original = zoomable_image(ORIGINAL + " (wheel: zoom, drag: pan, double-click: fit)", f"{p}-original")
            self.focus = zoomable_image("Selected image (wheel: zoom to the original pixels, drag: pan)", f"{p}-focus")
        self.caption = gr.Markdown(elem_id=f"{p}-caption")
        self.gallery = gr.Gallery(
            label="Every image of this case (click one to show it large)",
            format="png",
            columns=6,
            height="auto",
            allow_preview=False,
            object_fit="contain",
            interactive=False,  # an output: never "Drop Media Here"
            buttons=[],
            elem_id=f"{p}-gallery",
        )
        with gr.Accordion("Compare two images side by side", open=False, elem_id=f"{p}-compare-box"):
            with gr.Row():
                self.left = gr.Dropdown([], label="Left", elem_id=f"{p}-compare-left")
                self.right = gr.Dropdown([], label="Right", elem_id=f"{p}-compare-right")
            self.slider = gr.ImageSlider(
                label="Drag the handle to compare",
                format="png",
                type="filepath",
                interactive=False,
                height=IMAGE_HEIGHT,
                buttons=["fullscreen"],
                elem_id=f"{p}-compare",
            )
        with gr.Accordion("Run a tool by hand on this case (kept as an analyst action)", open=False):
            with gr.Row():
                self.tool = gr.Dropdown(TOOLS, value=BOX_TOOLS[0].name, label="Tool", elem_id=f"{p}-tool")
                self.box = gr.Textbox(
                    value=", ".join(map(str, BOX_TOOLS[0].default_args["bbox"])),
                    label=f"{'/'.join(t.name for t in BOX_TOOLS)} box x1, y1, x2, y2 (pixels of the 224x224 crop)",
                    elem_id=f"{p}-tool-box",
                )
                self.run_tool = gr.Button("Run tool", elem_id=f"{p}-run-tool")
            self.tool_info = gr.Markdown(elem_id=f"{p}-tool-info")
        with gr.Accordion("Replay step by step", open=False, elem_id=f"{p}-replay-box"):
            with gr.Row():
                self.pace = gr.Slider(0.2, 5.0, value=1.5, step=0.1, label="Seconds per turn", elem_id=f"{p}-pace")
                self.replay = gr.Button("Replay this case", elem_id=f"{p}-replay")
        # Timeline label -> [image path, caption] of the case shown. A hidden JSON, not gr.State: State makes
        # every page hold a heartbeat connection open to the server.
        self.state = gr.JSON({}, visible=False)

    @property
    def outputs(self) -> list:
        return [
            self.card,
            self.original,
            self.focus,
            self.caption,
            self.timeline,
            self.gallery,
            self.left,
            self.right,
            self.slider,
            self.state,
        ]

    def wire(self, inv_id: gr.components.Component, chat: gr.Chatbot, *, api: bool = False) -> None:
        """The view's own events: timeline, gallery and compare picks, a tool run by hand on the case in
        ``inv_id`` and the step-through replay into ``chat``. ``api``: expose the last two by name."""
        ctx = self.ctx

        def pick(label, state):
            path, caption = (state or {}).get(label, [None, ""])
            return path, caption

        def picked_image(evt: gr.SelectData, state):
            labels = (state or {}).get("__images__", [])
            if evt.index is None or evt.index >= len(labels):
                return gr.skip(), gr.skip(), gr.skip()
            label = labels[evt.index]
            path, caption = state[label]
            return label, path, caption

        def compare(left, right, state):
            state = state or {}
            a, b = state.get(left, [None])[0], state.get(right, [None])[0]
            return (a, b) if a and b else None

        def manual(inv, tool, box, request: gr.Request):
            return run_manual_tool(ctx, inv, tool, box, ctx.user(request))

        def replay(inv, pace):
            yield from replay_case(ctx, inv, pace)

        self.timeline.input(pick, [self.timeline, self.state], [self.focus, self.caption], api_name=False)
        self.gallery.select(picked_image, self.state, [self.timeline, self.focus, self.caption], api_name=False)
        for d in (self.left, self.right):
            d.input(compare, [self.left, self.right, self.state], self.slider, api_name=False)
        self.run_tool.click(
            manual,
            [inv_id, self.tool, self.box],
            [self.tool_info, *self.outputs],
            api_name="run_tool" if api else False,
        )
        self.replay.click(
            replay,
            [inv_id, self.pace],
            [chat, *self.outputs],
            api_name="replay" if api else False,
            concurrency_limit=None,
        )


def run_manual_tool(ctx: AppContext, inv_id: str, tool: str, box: str, user: str) -> list:
    """Run one tool on the case's stored crop without the agent. The run is stored as an analyst action
    (its output image in the file store, audited), never in the agent's trajectory; the view then shows it."""
    from app.runner import RunSettings
    from core.errors import ToolCallError

    inv_id = (inv_id or "").strip()
    if not inv_id:
        raise UserError("investigate or open a case first")
    args = {}
    if tool in {t.name for t in BOX_TOOLS}:
        try:
            args = {"bbox": [float(v) for v in (box or "").replace(";", ",").split(",")]}
        except ValueError:
            raise UserError(f"box must be four numbers x1, y1, x2, y2, got {box!r}") from None
    with ctx.storage.sessions() as s:
        try:
            crop_sha = get_investigation(s, inv_id).crop_sha256
        except LookupError as exc:
            raise UserError(str(exc)) from None
    if not crop_sha:
        raise UserError(f"investigation {inv_id} has no stored face crop")
    crop = ctx.storage.files.read_png(crop_sha)
    t0 = time.perf_counter()
    try:  # the default policy's registry: its expert bank reads the output too
        ex = ctx.runner.registry(ctx.runner.policy(RunSettings())).execute(tool, args, crop)
    except ToolCallError as exc:
        raise UserError(str(exc)) from None
    ms = (time.perf_counter() - t0) * 1e3
    image_sha = ctx.storage.files.put_png(ex.output.image)
    with ctx.storage.sessions.begin() as s:
        action = record_action(
            s,
            inv_id,
            actor=user,
            tool=ex.name,
            arguments=ex.arguments,
            stats=ex.output.stats,
            expert_p_spoof=ex.expert_p_spoof,
            image_sha256=image_sha,
            elapsed_ms=ms,
        )
    p = ex.expert_p_spoof
    stats = ", ".join(f"{md_text(k)} = {v:.4g}" for k, v in ex.output.stats.items())
    info = f"**{md_text(ex.name)}** {md_text(json.dumps(ex.arguments))} in {ms:.0f} ms · {stats}" + (
        f" · expert P(spoof trace) = {p:.2f}" if p is not None else ""
    )
    snap = load_snapshot(ctx, inv_id)
    return [info, *view_values(ctx, snap, action_label(action))]


def action_label(a: ActionRecord) -> str:
    """The timeline label of a hand-run tool (plain text: Radio and Gallery show labels as text)."""
    return f"Analyst #{a.id} · {a.tool} ({a.actor})"


def replay_case(ctx: AppContext, inv_id: str, pace: float):
    """A stored run shown again turn by turn, ``pace`` seconds apart: each tool image appears with the
    thought that asked for it. Yields (chat, *case view)."""
    from .render import closing_messages, opening_messages, turn_messages, verdict_message

    snap = load_snapshot(ctx, inv_id)
    pace = min(max(float(pace or 1.0), 0.05), 10.0)
    chat = opening_messages(snap.traj, ctx.png)
    partial = CaseSnapshot(snap.investigation_id, snap.traj, [], None, "replaying", snap.image_sha256, snap.filename)
    yield [chat, *view_values(ctx, partial, CROP)]
    for t in snap.turns:
        time.sleep(pace)
        chat = chat + turn_messages(t, ctx.png)
        partial.turns.append(t)
        yield [chat, *view_values(ctx, partial, _turn_label(t))]
    time.sleep(pace)
    if snap.final is not None:
        chat = chat + [verdict_message(snap.final, snap.traj.meta)]
    yield [chat + closing_messages(snap.traj), *view_values(ctx, snap)]


def view_values(ctx: AppContext, snap: CaseSnapshot | None, focus: str | None = None) -> list:
    """The values of :attr:`CaseView.outputs` for ``snap`` (None: an empty view). ``focus``: the timeline
    label to show large (default: the latest turn with a tool image, else the crop)."""
    if snap is None:
        empty = gr.update(choices=[], value=None)
        return ["", None, None, "", empty, [], empty, empty, None, {}]
    items = entries(ctx, snap)
    images = _images(items)
    by_label = {e.label: e for e in items}
    if focus not in by_label:
        tools = [e for e in items[2:] if e.path and e.path != items[1].path]
        focus = tools[-1].label if tools else (CROP if items[1].path else ORIGINAL)
    shown = by_label[focus]
    labels = [e.label for e in images]
    left = CROP if CROP in labels else (labels[0] if labels else None)
    right = focus if focus in labels and focus != left else (labels[-1] if labels else None)
    state = {e.label: [e.path, e.caption] for e in items} | {"__images__": labels}
    compare = (by_label[left].path, by_label[right].path) if left and right and left != right else None
    return [
        card_html(ctx, snap),
        items[0].path,
        shown.path,
        shown.caption,
        gr.update(choices=[e.label for e in items], value=focus),
        [(e.path, e.label) for e in images],
        gr.update(choices=labels, value=left),
        gr.update(choices=labels, value=right),
        compare,
        state,
    ]


CSS = """
.tf-card {border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 10px 14px;}
.tf-head {display: flex; align-items: center; gap: 12px; font-size: 1.05em;}
.tf-verdict {color: #fff; font-weight: 700; font-size: 1.4em; padding: 2px 14px; border-radius: 6px; letter-spacing: .05em;}
.tf-bar {position: relative; height: 14px; margin: 10px 0 6px; background: var(--neutral-200); border-radius: 7px;}
.tf-fill {position: absolute; left: 0; top: 0; bottom: 0; border-radius: 7px;}
.tf-thr {position: absolute; top: -4px; bottom: -4px; width: 3px; background: #111; border-radius: 1px;}
.tf-facts {font-size: .92em; color: var(--body-text-color-subdued);}
.tarfas-zoom img {image-rendering: pixelated; cursor: zoom-in;}
/* No "share" anywhere: Chatbot image messages bring their own Share button, which no option turns off. */
button[aria-label="Share"] {display: none !important;}
"""

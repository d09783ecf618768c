"""Events and stored trajectories as chat messages for ``gr.Chatbot``.

Everything shown comes from the parsed fields of :mod:`core.events` / :class:`core.trajectory.Turn`
(fast answer, thought, tool call, tool result, answer, errors); no model text is parsed here. Every
untrusted string (model text, file names, profile names) goes through :func:`app.ui.safe.md_text`, so it
shows as text and loads nothing. Thoughts are open steps, tool calls collapsible ones
(``metadata.title``); every image is a PNG file (lossless), never WebP.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from core.events import (
    InvestigationFinished,
    InvestigationStarted,
    ToolCalled,
    ToolResultReady,
    TurnCompleted,
    TurnStarted,
    VerdictReached,
)
from core.trajectory import Final, Trajectory, Turn

from .safe import md_text


class PngCache:
    """Writes images as PNG files named by their content hash, for the UI to serve as they are.

    Handlers return these paths, never arrays: Gradio re-encodes an array output on every yield of a
    streaming handler and rewrites its cached file in place, which breaks downloads in flight."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, image: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
        data = buf.getvalue()
        dest = self.root / f"{hashlib.sha256(data).hexdigest()}.png"
        if not dest.exists():
            # A private temp name, then rename: a file being served is never rewritten in place.
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".png-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
        return str(dest)


def verdict_label(verdict: str | None) -> str:
    return {"real": "Real", "spoof": "Spoof", "unsure": "Unsure"}.get(verdict or "", "—")


def _score(p: float | None) -> str:
    return "" if p is None else f" · P(spoof) = {p:.3f}"


def _image_message(cache: PngCache, image: np.ndarray, caption: str) -> gr.ChatMessage:
    return gr.ChatMessage(role="assistant", content={"path": cache.path(image), "alt_text": caption})


def turn_messages(turn: Turn, cache: PngCache) -> list[gr.ChatMessage]:
    """A finished turn: fast answer; or thought, tool call (collapsible, with its arguments and
    result) and tool image; or thought and answer; plus any error fed back to the model."""
    out: list[gr.ChatMessage] = []
    n = turn.index
    if turn.kind == "fast" and turn.fast is not None:
        out.append(
            gr.ChatMessage(
                role="assistant",
                content=f"**Fast answer: {verdict_label(turn.fast.verdict)}**{_score(turn.score_spoof)}\n\n{md_text(turn.fast.reason)}",
                # No "status": the step is shown open (the analyst reads the reasoning without clicking).
                metadata={"title": f"⚡ Fast answer (turn {n})", "duration": turn.elapsed_ms / 1e3},
            )
        )
    if turn.think:
        out.append(
            gr.ChatMessage(role="assistant", content=md_text(turn.think), metadata={"title": f"💭 Thought (turn {n})"})
        )
    if turn.tool_call is not None:
        lines = [f"**Arguments**: {md_text(json.dumps(turn.tool_call.arguments))}"]
        r = turn.tool_result
        if r is not None:
            if r.arguments != turn.tool_call.arguments:
                lines.append(f"Arguments used (validated, clamped): {md_text(json.dumps(r.arguments))}")
            if r.stats:
                lines.append("**Measurements**: " + ", ".join(f"{k} = {v:.4g}" for k, v in r.stats.items()))
            if r.expert_p_spoof is not None:
                lines.append(f"**Expert reading**: P(spoof trace) = {r.expert_p_spoof:.2f}")
        meta = {"title": f"🛠 Tool call (turn {n}): {md_text(turn.tool_call.name)}", "status": "done"}
        if r is not None:
            meta["duration"] = r.elapsed_ms / 1e3
        out.append(gr.ChatMessage(role="assistant", content="\n\n".join(lines), metadata=meta))
        if r is not None and r.image is not None:
            out.append(_image_message(cache, r.image, f"{md_text(r.name)} output, turn {n}"))
    if turn.error:
        which = "Format error" if turn.parse_error else "Tool error"
        out.append(
            gr.ChatMessage(
                role="assistant",
                content=f"{md_text(turn.error)}\n\n(This message was fed back to the model.)",
                metadata={"title": f"⚠️ {which} (turn {n})", "status": "done"},
            )
        )
    if turn.answer is not None:
        out.append(
            gr.ChatMessage(
                role="assistant", content=f"Answer: **{verdict_label(turn.answer)}**{_score(turn.score_spoof)}"
            )
        )
    return out


def calibration_line(meta: dict | None) -> str:
    """What a verdict was decided with, from the trajectory's ``meta``: the calibration profile (id, name,
    threshold) when there was one, the note of an active profile that was not applied, else ""."""
    meta = meta or {}
    p = meta.get("calibration_profile")
    if p:
        name = f" '{md_text(p['name'])}'" if p.get("name") else ""
        threshold = f"threshold **{p['threshold']:.3f}**" if p.get("threshold") is not None else "its threshold"
        how = ", ".join(x for x in (p.get("target"), f"{p['n_reviews']} reviews" if p.get("n_reviews") else None) if x)
        return f"Calibration profile `{p['id']}`{name}: {threshold}" + (f" ({how})" if how else "")
    if meta.get("calibration_note"):
        return f"Not calibrated: {md_text(meta['calibration_note'])}"
    return ""


def verdict_message(final: Final, meta: dict | None = None) -> gr.ChatMessage:
    """The final verdict, naming the calibration profile it was decided with (``meta``: the trajectory's)."""
    how = "" if final.source == "answer" else " (the reasoning did not conclude: this is the fast answer)"
    line = calibration_line(meta)
    return gr.ChatMessage(
        role="assistant",
        content=f"## Final verdict: {verdict_label(final.verdict).upper()}\nP(spoof) = **{final.score_spoof:.3f}**{how}"
        + (f"\n\n{line}" if line else ""),
    )


def opening_messages(traj: Trajectory, cache: PngCache) -> list[gr.ChatMessage]:
    name = traj.source or "upload"
    profile = traj.meta.get("calibration_profile")
    lines = [
        f"Investigate **{md_text(name)}** with policy {md_text(traj.policy)}"
        + (f" under calibration profile `{profile['id']}`" if profile else "")
    ]
    if traj.image_sha256:
        lines.append(f"SHA-256 `{traj.image_sha256}`")
    if traj.face is not None:
        lines += [md_text(note) for note in traj.face.notes]
    out = [gr.ChatMessage(role="user", content="\n\n".join(lines))]
    if traj.crop is not None:
        out.append(
            gr.ChatMessage(
                role="user", content={"path": cache.path(traj.crop), "alt_text": "the 224x224 face crop investigated"}
            )
        )
    if traj.meta.get("calibration_note"):  # an active profile that was not applied: said, never silent
        out.append(
            gr.ChatMessage(
                role="assistant",
                content=md_text(traj.meta["calibration_note"]),
                metadata={"title": "⚠️ not calibrated", "status": "done"},
            )
        )
    return out


def closing_messages(traj: Trajectory) -> list[gr.ChatMessage]:
    out = []
    if traj.status in ("failed", "interrupted") or traj.error:
        out.append(
            gr.ChatMessage(
                role="assistant",
                content=f"Investigation {traj.status}: {md_text(traj.error or 'no error recorded')}",
                metadata={"title": f"❌ {traj.status}" if traj.status != "completed" else "⚠️ note", "status": "done"},
            )
        )
    return out


def trajectory_messages(traj: Trajectory, cache: PngCache) -> list[gr.ChatMessage]:
    """A stored investigation, replayed turn by turn."""
    out = opening_messages(traj, cache)
    for turn in traj.turns:
        out += turn_messages(turn, cache)
    if traj.final is not None:
        out.append(verdict_message(traj.final, traj.meta))
    return out + closing_messages(traj)


class Transcript:
    """The chat of one live investigation, updated event by event (pending steps show a spinner)."""

    def __init__(self, cache: PngCache, header: list[gr.ChatMessage] | None = None):
        self.cache = cache
        self.header = list(header or [])
        self.opening: list[gr.ChatMessage] = []
        self.turns: dict[int, list[gr.ChatMessage]] = {}
        self.closing: list[gr.ChatMessage] = []
        self.trajectory: Trajectory | None = None

    def on(self, event) -> None:
        if isinstance(event, InvestigationStarted):
            self.trajectory = event.trajectory
            self.opening = opening_messages(event.trajectory, self.cache)
        elif isinstance(event, TurnStarted):
            title = "⚡ Fast answer" if event.kind == "fast" else f"💭 Turn {event.index}"
            self.turns[event.index] = [
                gr.ChatMessage(role="assistant", content="thinking…", metadata={"title": title, "status": "pending"})
            ]
        elif isinstance(event, ToolCalled):
            self.turns.setdefault(event.index, []).append(
                gr.ChatMessage(
                    role="assistant",
                    content=md_text(json.dumps(event.call.arguments)),
                    metadata={
                        "title": f"🛠 Tool call (turn {event.index}): {md_text(event.call.name)}",
                        "status": "pending",
                    },
                )
            )
        elif isinstance(event, ToolResultReady):
            if event.result.image is not None:
                self.turns.setdefault(event.index, []).append(
                    _image_message(self.cache, event.result.image, f"{md_text(event.result.name)} output")
                )
        elif isinstance(event, TurnCompleted):
            self.turns[event.turn.index] = turn_messages(event.turn, self.cache)
        elif isinstance(event, VerdictReached):
            self.closing = [verdict_message(event.final, self.trajectory.meta if self.trajectory else None)]
        elif isinstance(event, InvestigationFinished):
            self.trajectory = event.trajectory
            self.closing = self.closing + closing_messages(event.trajectory)

    def messages(self) -> list[gr.ChatMessage]:
        out = self.header + self.opening
        for i in sorted(self.turns):
            out += self.turns[i]
        return out + self.closing

"""The record of one investigation: turns, tool calls, tool images, verdicts, scores, timings, errors.

A :class:`Trajectory` is what the CLI prints, what storage persists turn by turn, and what training
consumes: :func:`to_messages` renders it as chat messages in the Qwen2.5-VL / Hermes layout (tool
images come back as user turns), using only the texts of :mod:`core.protocol`.
"""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from . import protocol
from .protocol import FastAnswer, ToolCall, Verdict

Status = Literal["running", "completed", "failed", "interrupted"]


@dataclass
class ToolResult:
    name: str
    arguments: dict
    stats: dict[str, float]
    expert_p_spoof: (
        float | None
    )  # the tool's expert network (paper Fig. S9), from the registry's readers; None when none reads it (ZoomInTool)
    elapsed_ms: float
    image: np.ndarray | None = field(default=None, repr=False)  # uint8 gray or RGB
    image_path: str | None = None  # where the image was written, relative to the trajectory file


@dataclass
class Turn:
    """One assistant turn and what came of it."""

    index: int  # 0-based position among assistant turns
    kind: Literal["fast", "reasoning"]
    text: str  # the raw assistant text
    fast: FastAnswer | None = None
    think: str | None = None
    tool_call: ToolCall | None = None
    tool_result: ToolResult | None = None
    answer: Verdict | None = None
    parse_error: str | None = None  # the text broke the protocol; fed back to the model
    tool_error: str | None = None  # a well-formed call the registry refused; fed back to the model
    score_spoof: float | None = None  # the policy's P(spoof) for this turn's verdict, if it has one
    elapsed_ms: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)  # policy-specific evidence, shown not parsed

    @property
    def error(self) -> str | None:
        return self.parse_error or self.tool_error


@dataclass
class Final:
    verdict: Verdict
    score_spoof: float  # P(spoof); compare with a threshold fixed before seeing the test data
    source: Literal["answer", "fast_answer_fallback"] = "answer"


@dataclass
class FaceInfo:
    face_detected: bool
    bbox: list[int] | None  # detected face in source pixels
    crop_box: list[int]  # square region of the source resized to 224x224
    source_size: list[int]  # [width, height]
    notes: list[str] = field(default_factory=list)


@dataclass
class Trajectory:
    policy: str
    policy_version: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    source: str | None = None  # file name or path the analyst gave
    image_sha256: str | None = None
    face: FaceInfo | None = None
    crop: np.ndarray | None = field(default=None, repr=False)  # the 224x224 RGB crop investigated
    crop_path: str | None = None
    tools: list[str] = field(default_factory=list)  # tools offered to the model
    turns: list[Turn] = field(default_factory=list)
    final: Final | None = None
    status: Status = "running"
    error: str | None = None
    error_traceback: str | None = None  # where a failed policy broke, for whoever debugs it
    label: Verdict | None = None  # ground truth when known (datasets, analyst corrections)
    timings_ms: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(
        default_factory=dict
    )  # what the loop's prompts added (annotation: hint, guidance, attempt)

    # --- views -------------------------------------------------------------------------------
    @property
    def fast_answer(self) -> FastAnswer | None:
        return next((t.fast for t in self.turns if t.kind == "fast" and t.fast), None)

    @property
    def fast_score(self) -> float | None:
        return next((t.score_spoof for t in self.turns if t.kind == "fast" and t.fast), None)

    @property
    def tool_turns(self) -> list[Turn]:
        return [t for t in self.turns if t.tool_result is not None]

    @property
    def tool_calls_used(self) -> int:
        return len(self.tool_turns)

    # --- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict. Arrays are left out; their files are named by ``crop_path``/``image_path``."""
        d = asdict(_without_arrays(self))
        d.pop("crop", None)
        if not d["meta"]:
            d.pop("meta")  # inference trajectories have none: their JSON stays as it always was
        for t in d["turns"]:
            if t.get("tool_result"):
                t["tool_result"].pop("image", None)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trajectory:
        d = dict(d)
        turns = []
        for t in d.pop("turns", []):
            t = dict(t)
            t["fast"] = FastAnswer(**t["fast"]) if t.get("fast") else None
            t["tool_call"] = ToolCall(**t["tool_call"]) if t.get("tool_call") else None
            t["tool_result"] = ToolResult(**t["tool_result"]) if t.get("tool_result") else None
            turns.append(Turn(**t))
        d["face"] = FaceInfo(**d["face"]) if d.get("face") else None
        d["final"] = Final(**d["final"]) if d.get("final") else None
        return cls(turns=turns, **d)

    def save(self, folder: str | Path) -> Path:
        """Write ``trajectory.json`` with the crop and every tool image as PNG files beside it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.crop is not None:
            self.crop_path = "crop.png"
            Image.fromarray(self.crop).save(folder / self.crop_path)
        for t in self.turns:
            r = t.tool_result
            if r is not None and r.image is not None:
                r.image_path = f"turn{t.index:02d}_{r.name}.png"
                Image.fromarray(r.image).save(folder / r.image_path)
        path = folder / "trajectory.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Trajectory:
        folder = Path(folder)
        traj = cls.from_dict(json.loads((folder / "trajectory.json").read_text()))
        if traj.crop_path:
            traj.crop = np.asarray(Image.open(folder / traj.crop_path))
        for t in traj.turns:
            r = t.tool_result
            if r is not None and r.image_path:
                r.image = np.asarray(Image.open(folder / r.image_path))
        return traj


def _without_arrays(traj: Trajectory) -> Trajectory:
    """A shallow copy whose arrays are None, so that asdict() does not deep-copy images."""
    t2 = copy.copy(traj)
    t2.crop = None
    t2.turns = []
    for t in traj.turns:
        tc = copy.copy(t)
        if t.tool_result is not None:
            tc.tool_result = copy.copy(t.tool_result)
            tc.tool_result.image = None
        t2.turns.append(tc)
    return t2


# --- chat messages --------------------------------------------------------------------------------
INFERENCE = protocol.Prompts()


def prompt_after(turn: Turn, next_kind: str = "reasoning", prompts: protocol.Prompts = INFERENCE) -> list[dict] | None:
    """The user content that follows an assistant turn in the protocol, or None when the conversation
    ends there (the answer; an error, for prompts that do not feed errors back). ``next_kind`` is the
    kind of the following assistant turn ("fast" again = a fast-answer retry)."""
    if turn.kind == "fast":
        text = prompts.after_fast(turn.parse_error, retry=next_kind == "fast")
    elif turn.error:
        text = prompts.after_error(turn.error)
    elif turn.tool_result is not None:
        r = turn.tool_result
        return [_image(r.image, r.image_path), _text(prompts.after_tool(r.name, r.expert_p_spoof))]
    else:
        return None
    return [_text(text)] if text is not None else None


def to_messages(
    traj: Trajectory,
    *,
    system: str | None,
    next_prompt: bool = False,
    next_kind: str = "reasoning",
    prompts: protocol.Prompts = INFERENCE,
) -> list[dict]:
    """Render the trajectory as chat messages (Qwen2.5-VL content-part layout), with the user texts of
    ``prompts`` (default: inference; :class:`core.protocol.AnnotationPrompts` renders the annotator's
    conversation).

    Image parts are ``{"type": "image", "image": <ndarray or None>, "path": <file or None>}``. With
    ``next_prompt=True`` the user message that the policy must answer next (a turn of ``next_kind``)
    is appended.
    """
    msgs: list[dict] = []
    if system:
        msgs.append({"role": "system", "content": [_text(system)]})
    msgs.append({"role": "user", "content": [_image(traj.crop, traj.crop_path), _text(prompts.first_round(traj.meta))]})
    for i, turn in enumerate(traj.turns):
        msgs.append({"role": "assistant", "content": [_text(turn.text)]})
        last = i == len(traj.turns) - 1
        after = prompt_after(turn, next_kind if last else traj.turns[i + 1].kind, prompts)
        if after is None:
            break
        if not last or next_prompt:
            msgs.append({"role": "user", "content": after})
    return msgs


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _image(image: np.ndarray | None, path: str | None) -> dict:
    return {"type": "image", "image": image, "path": path}

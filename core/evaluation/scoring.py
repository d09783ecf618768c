"""Scoring: investigate every image of a manifest with one agent variant, and write the scores.

Unreadable images and investigations without a verdict are recorded with their reason; they never
abort a run. This is the only place where evaluation runs the agent. With ``concurrency`` N, N threads
each run the agent loop on one image after another; a policy with a ``stream()`` (the hf policy) then
generates their turns in batches, one that calls a server (vllm) sends N requests at a time.
"""

from __future__ import annotations

import contextlib
import csv
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .. import agent, faces
from ..errors import InputImageError
from ..registry import TOOL_NAMES, ToolRegistry
from .manifest import ManifestRow
from .metrics import summarize

# The per-image scores CSV of `tarfas eval --scores-out` and of a report's scores.csv.
SCORES_COLUMNS = [
    "path",
    "label",
    "domain",
    "score_spoof",
    "verdict",
    "error",
    "attack_type",
    "split",
    "fast_score",
    "tool_calls",
]


@dataclass
class ScoredImage:
    row: ManifestRow
    score_spoof: float | None  # None when the image could not be read, or the investigation reached no verdict
    face_detected: bool | None = None  # None when the image could not be read
    tool_calls: list[str] = field(default_factory=list)
    fast_score: float | None = None
    error: str | None = None
    ms: float = 0.0  # face preparation (when it was not cached) + investigation

    @property
    def unreadable(self) -> bool:
        return self.score_spoof is None and self.face_detected is None

    @property
    def no_verdict(self) -> bool:
        """Read and investigated, but the policy never gave a verdict (e.g. a model that breaks the protocol)."""
        return self.score_spoof is None and self.face_detected is not None


@dataclass(frozen=True)
class Variant:
    """An agent configuration: the tools offered (None = all six) and the tool-call limit."""

    name: str
    tools: tuple[str, ...] | None
    max_tool_calls: int

    @property
    def key(self) -> tuple:
        return (
            tuple(sorted(self.tools)) if self.tools is not None and set(self.tools) != set(TOOL_NAMES) else None,
            self.max_tool_calls,
        )

    def config(self, on_no_face: str) -> agent.AgentConfig:
        return agent.AgentConfig(
            max_tool_calls=self.max_tool_calls,
            allowed_tools=list(self.tools) if self.tools is not None else None,
            extra={"on_no_face": on_no_face},
        )


def load_face(row: ManifestRow, on_no_face: str = "whole") -> faces.FaceCrop | str:
    """The row's 224x224 face crop, or the message of why it could not be made."""
    try:
        return faces.prepare_face(faces.load_image(row.path), on_no_face=on_no_face)
    except InputImageError as exc:
        return str(exc)


class FaceCache:
    """The loaded and cropped faces of a run, keyed by image path (errors are kept as their message).

    With ``keep=False`` nothing is kept: each face is made when it is scored, so a one-variant run
    holds one image at a time (and its timings include face preparation)."""

    def __init__(self, on_no_face: str = "whole", keep: bool = True):
        self.on_no_face, self.keep = on_no_face, keep
        self._faces: dict[Path, faces.FaceCrop | str] = {}

    def get(self, row: ManifestRow) -> faces.FaceCrop | str:
        if not self.keep:
            return load_face(row, self.on_no_face)
        if row.path not in self._faces:
            self._faces[row.path] = load_face(row, self.on_no_face)
        return self._faces[row.path]

    def prepare(self, rows: list[ManifestRow], progress: bool = True) -> None:
        if self.keep:
            for row in tqdm(rows, desc="face crops", unit="img", disable=not progress, dynamic_ncols=True):
                self.get(row)


def score_face(
    row: ManifestRow,
    face: faces.FaceCrop | str,
    policy,
    config=None,
    *,
    registry: ToolRegistry | None = None,
    t0: float | None = None,
) -> ScoredImage:
    """Investigate one prepared face (or record the error that replaced it) with the tools of ``registry``
    (see :func:`core.agent.investigate`). ``ms`` runs from ``t0`` (default: now), so callers choose
    whether face preparation counts."""
    if isinstance(face, str):
        return ScoredImage(row, None, error=face)
    t0 = time.perf_counter() if t0 is None else t0
    traj = agent.run(face, policy, config, registry=registry, source=row.rel_path)
    ms = (time.perf_counter() - t0) * 1e3
    if traj.final is None:
        return ScoredImage(row, None, face.face_detected, error=traj.error or "no verdict", ms=ms)
    return ScoredImage(
        row,
        traj.final.score_spoof,
        face.face_detected,
        [t.tool_result.name for t in traj.tool_turns],
        traj.fast_score,
        ms=ms,
    )


def score_variant(
    rows,
    face_cache: FaceCache,
    policy,
    variant: Variant,
    *,
    registry: ToolRegistry | None = None,
    progress: bool = True,
    concurrency: int = 1,
) -> dict[Path, ScoredImage]:
    """Investigate every row with one variant (its tools taken from ``registry``); unreadable images are
    recorded, never abort the run. ``concurrency``: investigations in flight at once (threads); the
    result is the same dict, in row order."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    rows = list(rows)
    config = variant.config(face_cache.on_no_face)
    bar = tqdm(total=len(rows), desc=variant.name, unit="img", disable=not progress, dynamic_ncols=True)

    def one(row: ManifestRow) -> ScoredImage:
        t0 = time.perf_counter()
        return score_face(row, face_cache.get(row), policy, config, registry=registry, t0=t0)

    out: dict[Path, ScoredImage] = {}
    with bar:
        if concurrency == 1:
            for row in rows:
                out[row.path] = one(row)
                bar.update()
            return out
        todo, lock = iter(rows), threading.Lock()
        stream = getattr(policy, "stream", None)

        def worker() -> None:
            with stream() if callable(stream) else contextlib.nullcontext():
                while True:
                    with lock:
                        row = next(todo, None)
                    if row is None:
                        return
                    scored = one(row)
                    with lock:
                        out[row.path] = scored
                        bar.update()

        threads = min(concurrency, len(rows))
        with ThreadPoolExecutor(threads, thread_name_prefix="tarfas-eval") as pool:
            for f in [pool.submit(worker) for _ in range(threads)]:
                f.result()  # a bug in a worker is raised here, not lost
    return {row.path: out[row.path] for row in rows}


def metrics_by_domain(scored: Iterable[ScoredImage], threshold: float) -> dict[str, dict]:
    """Per domain and ``pooled``: :func:`~core.evaluation.metrics.summarize` at ``threshold``, plus the
    counts of unreadable images, investigations without a verdict and images without a face."""
    scored = list(scored)
    by: dict[str, list[ScoredImage]] = defaultdict(list)
    for s in scored:
        by[s.row.domain].append(s)
    result = {}
    for name, items in sorted(by.items()) + [("pooled", scored)]:
        ok = [s for s in items if s.score_spoof is not None]
        m = summarize([s.row.y for s in ok], [s.score_spoof for s in ok], threshold) if ok else {"n": 0}
        m["unreadable"] = sum(1 for s in items if s.unreadable)
        m["no_verdict"] = sum(1 for s in items if s.no_verdict)
        m["no_face"] = sum(1 for s in ok if s.face_detected is False)
        result[name] = m
    return result


def write_scores(path: str | Path, scored: Iterable[ScoredImage], threshold: float | None = None) -> None:
    """The per-image scores CSV (:data:`SCORES_COLUMNS`), sorted by path. Images without a score have
    empty score and verdict cells and say why in ``error``; ``verdict`` is empty without a threshold."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SCORES_COLUMNS)
        for s in sorted(scored, key=lambda s: s.row.rel_path):
            r = s.row
            score = "" if s.score_spoof is None else f"{s.score_spoof:.6f}"
            verdict = (
                ""
                if s.score_spoof is None or threshold is None
                else ("spoof" if s.score_spoof >= threshold else "real")
            )
            fast = "" if s.fast_score is None else f"{s.fast_score:.6f}"
            w.writerow(
                [
                    r.rel_path,
                    r.label,
                    r.domain,
                    score,
                    verdict,
                    s.error or "",
                    r.attack_type,
                    r.split,
                    fast,
                    ";".join(s.tool_calls),
                ]
            )

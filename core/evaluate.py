"""Score every image of a manifest with a policy and compute metrics per domain and pooled.

The decision threshold is fixed before looking at the test scores: given explicitly, or the EER
threshold of a dev manifest, or the policy's own threshold shipped with its weights.
"""

from __future__ import annotations

import csv
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import agent, faces
from .errors import InputImageError
from .manifest import ManifestRow
from .metrics import eer_threshold, summarize


@dataclass
class ScoredImage:
    row: ManifestRow
    score_spoof: float | None  # None when the image could not be read, or the investigation reached no verdict
    face_detected: bool | None = None  # None when the image could not be read

    @property
    def unreadable(self) -> bool:
        return self.score_spoof is None and self.face_detected is None

    @property
    def no_verdict(self) -> bool:
        """Read and investigated, but the policy never gave a verdict (e.g. a model that breaks the protocol)."""
        return self.score_spoof is None and self.face_detected is not None
    tool_calls: list[str] = field(default_factory=list)
    fast_score: float | None = None
    error: str | None = None
    ms: float = 0.0


@dataclass
class EvalResult:
    scored: list[ScoredImage]
    threshold: float
    threshold_source: str
    metrics: dict[str, dict]  # domain -> summary; "pooled" for all
    seconds: float

    @property
    def failures(self) -> list[ScoredImage]:
        return [s for s in self.scored if s.score_spoof is None]


def load_face(row: ManifestRow, on_no_face: str = "whole") -> faces.FaceCrop | str:
    """The row's 224x224 face crop, or the message of why it could not be made."""
    try:
        return faces.prepare_face(faces.load_image(row.path), on_no_face=on_no_face)
    except InputImageError as exc:
        return str(exc)


def score_face(row: ManifestRow, face: faces.FaceCrop | str, policy, config=None, *, experts=None, t0: float | None = None) -> ScoredImage:
    """Investigate one prepared face (or record the error that replaced it). ``ms`` runs from ``t0``
    (default: now), so callers choose whether face preparation counts."""
    if isinstance(face, str):
        return ScoredImage(row, None, error=face)
    t0 = time.perf_counter() if t0 is None else t0
    traj = agent.run(face, policy, config, experts=experts, source=row.rel_path)
    ms = (time.perf_counter() - t0) * 1e3
    if traj.final is None:
        return ScoredImage(row, None, face.face_detected, error=traj.error or "no verdict", ms=ms)
    return ScoredImage(row, traj.final.score_spoof, face.face_detected, [t.tool_result.name for t in traj.tool_turns], traj.fast_score, ms=ms)


def score_rows(
    rows: list[ManifestRow],
    policy,
    config: agent.AgentConfig | None = None,
    *,
    experts=None,
    on_no_face: str = "whole",
    progress: bool = True,
    desc: str = "investigating",
) -> list[ScoredImage]:
    """Investigate each image; unreadable images are recorded with their error, never abort the run."""
    out = []
    for row in tqdm(rows, desc=desc, unit="img", disable=not progress, dynamic_ncols=True):
        t0 = time.perf_counter()
        out.append(score_face(row, load_face(row, on_no_face), policy, config, experts=experts, t0=t0))
    return out


def metrics_by_domain(scored: list[ScoredImage], threshold: float) -> dict[str, dict]:
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


def threshold_from_dev(scored_dev: list[ScoredImage]) -> float:
    ok = [s for s in scored_dev if s.score_spoof is not None]
    return eer_threshold([s.row.y for s in ok], [s.score_spoof for s in ok])


def write_scores(path: str | Path, scored: list[ScoredImage], threshold: float) -> None:
    """CSV ``path,label,domain,score_spoof,verdict`` (+ error); unreadable images have empty scores."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "domain", "score_spoof", "verdict", "error"])
        for s in scored:
            if s.score_spoof is None:
                w.writerow([s.row.rel_path, s.row.label, s.row.domain, "", "", s.error or ""])
            else:
                verdict = "spoof" if s.score_spoof >= threshold else "real"
                w.writerow([s.row.rel_path, s.row.label, s.row.domain, f"{s.score_spoof:.6f}", verdict, ""])


def format_table(metrics: dict[str, dict]) -> str:
    def pct(v):
        return "   -  " if v is None else f"{100 * v:6.2f}"

    lines = [f"{'domain':<14}{'n':>6}{'real':>6}{'spoof':>6}{'AUC%':>8}{'EER%':>8}{'HTER%':>8}{'APCER%':>8}{'BPCER%':>8}{'unread':>8}{'noverd':>8}{'noface':>8}"]
    for name, m in metrics.items():
        if not m.get("n"):
            lines.append(f"{name:<14}{0:>6}{'':>6}{'':>6}{'no scored images':>24}{m.get('unreadable', 0):>24}{m.get('no_verdict', 0):>8}")
            continue
        lines.append(
            f"{name:<14}{m['n']:>6}{m['n_real']:>6}{m['n_spoof']:>6}  {pct(m['auc'])}  {pct(m['eer'])}  {pct(m['hter'])}  "
            f"{pct(m['apcer'])}  {pct(m['bpcer'])}{m['unreadable']:>8}{m['no_verdict']:>8}{m['no_face']:>8}"
        )
    return "\n".join(lines)


def summarize_scores(scored: list[ScoredImage]) -> dict:
    ms = [s.ms for s in scored if s.score_spoof is not None]
    return {"median_ms_per_image": float(np.median(ms)) if ms else None}

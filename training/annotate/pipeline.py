"""The annotation run (paper §3.1.3): for each manifest row, annotate, verify, re-annotate once on
failure, then accept or discard; in parallel up to the endpoint's concurrency, resumable.

Resumable: a sample already accepted or rejected is skipped, so a killed run continues where it stopped
with no duplicates. A sample whose annotator failed (endpoint down) is not recorded and is retried by the
next run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from core import faces
from core.dataset import DatasetWriter
from core.errors import InputImageError
from core.evaluation.manifest import ManifestRow
from core.policies.base import Policy
from core.registry import ToolRegistry

from ..annotators import Hint, stop_reason
from ..verify import Issue, verify
from .conversation import L_MAX, annotate_image, default_tool_limit
from .outputs import (
    REJECTED,
    Attempt,
    JsonlLog,
    sample_id,
    write_accepted,
    write_rejected,
    write_review_queue,
    write_stats,
)

SOURCE = "annotation"


@dataclass
class AnnotateConfig:
    """Parameters of one annotation run (recorded in the dataset manifest)."""

    max_turns: int = L_MAX  # L_max: reasoning turns (think + tool call / answer) per annotation
    max_tool_calls: int | None = None  # default: the inference loop's limit (3), at most max_turns - 1
    tools: list[str] | None = None  # tools offered (default: all six)
    concurrency: int = 1  # annotations in flight (the endpoint's concurrency limit)
    review_rate: float = 0.05  # share of accepted samples drawn for manual verification
    on_no_face: Literal["whole", "error"] = "whole"  # "error": a sample without a detected face is rejected
    progress: bool = True

    def __post_init__(self):
        if self.max_turns < 1:
            raise ValueError("max_turns must be >= 1")
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not 0.0 <= self.review_rate <= 1.0:
            raise ValueError("review_rate must be in [0, 1]")
        ToolRegistry(self.tools)  # unknown tool names fail here, before any work

    @property
    def tool_limit(self) -> int:
        """The agent loop's tool-call limit for an annotation."""
        return self.max_tool_calls if self.max_tool_calls is not None else default_tool_limit(self.max_turns)


# --- one sample: annotate, verify, re-annotate once -----------------------------------------------
@dataclass
class SampleResult:
    row: ManifestRow
    status: Literal["accepted", "rejected", "failed"]
    attempts: list[Attempt] = field(default_factory=list)
    input_issue: Issue | None = None  # the image could not be used
    error: str | None = None  # the annotator failed: retried by the next run


def annotate_sample(
    row: ManifestRow, annotator: Policy, *, registry: ToolRegistry | None = None, config: AnnotateConfig | None = None
) -> SampleResult:
    config = config or AnnotateConfig()
    try:
        data = row.path.read_bytes()
        face = faces.prepare_face(faces.load_image(data, name=row.rel_path), on_no_face=config.on_no_face)
    except OSError as exc:
        return SampleResult(
            row, "rejected", input_issue=Issue("input", "unreadable", f"{row.rel_path}: {exc.strerror or exc}")
        )
    except InputImageError as exc:
        code = "no_face" if isinstance(exc, faces.NoFaceError) else "unreadable"
        return SampleResult(row, "rejected", input_issue=Issue("input", code, str(exc)))
    result, sha = SampleResult(row, "rejected"), faces.sha256_bytes(data)
    registry = (registry or ToolRegistry()).only(config.tools)
    hint = Hint(row.label, row.attack_type or None)
    for attempt in (1, 2):  # §3.1.3: failures are re-annotated once, then discarded
        ann = annotate_image(
            face,
            hint,
            annotator,
            registry=registry,
            max_turns=config.max_turns,
            max_tool_calls=config.tool_limit,
            attempt=attempt,
            source=str(row.path),
            image_sha256=sha,
        )
        if stop_reason(ann) == "annotator_error":
            result.status, result.error = "failed", ann.error
            return result
        issues = verify(ann, registry)
        result.attempts.append((ann, issues))
        if not issues:
            result.status = "accepted"
            return result
    return result


# --- the run --------------------------------------------------------------------------------------
@dataclass
class RunSummary:
    out: Path
    todo: int  # samples this run tried
    skipped: int  # already done by an earlier run
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)  # "path: error" of annotator failures
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)


def run_annotation(
    rows: list[ManifestRow],
    annotator: Policy,
    out: str | Path,
    *,
    registry: ToolRegistry | None = None,
    config: AnnotateConfig | None = None,
) -> RunSummary:
    """Annotate every row not yet done in ``out`` and return what happened. Safe to kill and re-run.

    ``annotator``: a policy that answers the annotation conversation (:mod:`training.annotators`);
    ``registry``: the tools and the expert bank that reads their images for the guidance (see
    :func:`training.annotators.resolve_annotator`; default: all tools and no guidance numbers).
    """
    config = config or AnnotateConfig()
    out = Path(out)
    t0 = time.perf_counter()
    writer = DatasetWriter(
        out,
        source=SOURCE,
        created_by=f"tarfas annotate ({annotator.name})",
        resume=True,
        extra={
            "annotator": annotator.name,
            "annotator_version": annotator.version,
            "config": {k: v for k, v in asdict(config).items() if k != "progress"},
        },
    )
    rejected = JsonlLog(out / REJECTED)
    seen, todo = set(), []
    for r in rows:
        sid = sample_id(r)
        if sid in seen:
            continue
        seen.add(sid)
        if not writer.has(sid) and sid not in rejected.ids:
            todo.append(r)
    summary = RunSummary(out, len(todo), len(seen) - len(todo))
    params = {"max_turns": config.max_turns, "max_tool_calls": config.tool_limit}
    bar = tqdm(
        total=len(todo),
        desc=f"annotating ({annotator.name})",
        unit="img",
        disable=not config.progress,
        dynamic_ncols=True,
    )
    try:
        for res in _in_parallel(todo, annotator, registry, config):
            if res.status == "accepted":
                write_accepted(writer, res.row, res.attempts, params=params, review_rate=config.review_rate)
                summary.accepted += 1
            elif res.status == "rejected":
                issues = [res.input_issue] if res.input_issue else res.attempts[-1][1]
                write_rejected(writer, rejected, res.row, issues, res.attempts)
                summary.rejected += 1
            else:
                summary.failed += 1
                summary.failures.append(f"{res.row.rel_path}: {res.error}")
            bar.update(1)
            bar.set_postfix(accepted=summary.accepted, rejected=summary.rejected, failed=summary.failed)
    finally:
        bar.close()
        rejected.close()
        writer.close()
        write_review_queue(out)
        summary.stats = write_stats(out)
        summary.seconds = time.perf_counter() - t0
    return summary


def _in_parallel(rows: list[ManifestRow], annotator, registry, config: AnnotateConfig) -> Iterator[SampleResult]:
    """Results as they complete, with at most ``concurrency`` samples in flight (so a slow endpoint is
    never flooded and memory stays bounded). Writing stays in the caller's thread."""
    if config.concurrency == 1:
        for row in rows:
            yield annotate_sample(row, annotator, registry=registry, config=config)
        return
    pending: set[Future] = set()
    it = iter(rows)
    with ThreadPoolExecutor(config.concurrency, thread_name_prefix="annotate") as pool:
        try:
            while True:
                while len(pending) < config.concurrency:
                    row = next(it, None)
                    if row is None:
                        break
                    pending.add(pool.submit(annotate_sample, row, annotator, registry=registry, config=config))
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        finally:
            for fut in pending:
                fut.cancel()


def load_rows(
    manifest: str | Path,
    *,
    root=None,
    domains: list[str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[ManifestRow]:
    """Manifest rows to annotate; ``limit`` takes a seeded random sample (stable across resumes)."""
    from core.evaluation.manifest import read_manifest, select

    rows = select(read_manifest(manifest, root), domains, split)
    if limit is not None and limit < len(rows):
        rng = np.random.default_rng(seed)
        rows = [rows[i] for i in sorted(rng.choice(len(rows), size=limit, replace=False))]
    return rows


def describe(summary: RunSummary) -> str:
    """A short human summary of a run, for the CLI."""
    s = summary.stats
    lines = [
        f"annotation dataset: {summary.out}",
        f"this run: {summary.todo} samples ({summary.skipped} done before): {summary.accepted} accepted, "
        f"{summary.rejected} rejected, {summary.failed} failed (retried next run) in {summary.seconds:.1f} s",
        f"dataset: {s.get('accepted', 0)} accepted, {s.get('rejected', 0)} rejected; review queue {s.get('review_queue', {}).get('size', 0)}",
    ]
    if s.get("rejection_reasons"):
        lines.append("rejection reasons: " + ", ".join(f"{k} {v}" for k, v in s["rejection_reasons"].items()))
    lines += [f"  failed: {f}" for f in summary.failures[:10]]
    return "\n".join(lines)

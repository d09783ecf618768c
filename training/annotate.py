"""The tool-augmented annotation pipeline (paper §3.1, App. A): build a ToolFAS-style trajectory
dataset from a manifest of labelled images.

For each image: a multi-turn conversation with an annotator (eqs. 1-5: Fig. S8 system prompt; the face,
"This is the image you need to investigate." and the hint; then each requested tool's image with the
expert guidance, until the annotator answers or L_max = 6 reasoning turns), verified for correctness,
format and leakage (§3.1.3), re-annotated once on failure, then accepted or discarded as a bad case.

The output folder is a :mod:`core.dataset` folder (source "annotation") that ``tarfas train sft`` reads.
Each accepted annotation is written as the inference-format trajectory the agent would have produced
(fast answer, think/tool_call turns with the tool images, answer): the hint and the expert guidance are
not in it. The raw annotator conversation is kept in the record's ``meta["annotation"]`` for audit.
Beside the dataset::

    rejected.jsonl       bad cases: every attempt's issues and raw conversation
    review_queue.jsonl   accepted samples for manual verification (a random sample + borderline cases)
    stats.json           turns, tools per attack type, rejection reasons, review queue

Resumable: a sample already accepted or rejected is skipped, so a killed run continues where it stopped
with no duplicates. A sample whose annotator failed (endpoint down) is not recorded and is retried by the
next run. :func:`import_review_queue` puts the queue into the workbench's storage for review in the app.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from core import faces, protocol
from core.dataset import TRAJECTORIES, DatasetWriter, _repair_and_ids, read_dataset
from core.errors import InputImageError, ProtocolParseError, ToolCallError, TarfasError
from core.evaluation.manifest import ManifestRow
from core.protocol import ToolCall
from core.registry import ToolRegistry
from core.trajectory import FaceInfo, Final, ToolResult, Trajectory, Turn

from .annotators import Annotation, AnnotationRequest, Annotator, AnnotatorError, Hint, Step, ToolOutcome
from .verify import Issue, review_flags, verify

SOURCE = "annotation"
REJECTED = "rejected.jsonl"
REVIEW_QUEUE = "review_queue.jsonl"
STATS = "stats.json"
L_MAX = 6  # paper §3.1.2


@dataclass
class AnnotateConfig:
    """Parameters of one annotation run (recorded in the dataset manifest)."""

    max_turns: int = L_MAX  # L_max: reasoning turns (think + tool call / answer) per annotation
    max_tool_calls: int | None = None  # default: max_turns - 1 (the last turn must answer)
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
        return self.max_tool_calls if self.max_tool_calls is not None else self.max_turns - 1


# --- one conversation (eqs. 1-5) ------------------------------------------------------------------
def annotate_image(
    crop: np.ndarray,
    hint: Hint,
    annotator: Annotator,
    *,
    experts=None,
    registry: ToolRegistry | None = None,
    max_turns: int = L_MAX,
    max_tool_calls: int | None = None,
    attempt: int = 1,
) -> Annotation:
    """Run one annotation conversation and return it (unverified).

    The conversation stops at the answer, at the first reply that breaks the protocol or calls a tool
    wrongly (verification rejects it; no error feedback, so the kept conversation is clean), after
    ``max_turns`` reasoning turns, or when the annotator fails (``stop == "annotator_error"``).
    """
    registry = registry or ToolRegistry()
    tool_limit = max_tool_calls if max_tool_calls is not None else max_turns - 1
    ann = Annotation(crop=crop, hint=hint, annotator=annotator.name, tools=registry.names, attempt=attempt,
                     annotator_version=getattr(annotator, "version", ""))

    def ask(kind, turns_left, calls_left) -> tuple[str, float] | None:
        req = AnnotationRequest(ann, kind, ann.messages(next_kind=kind), registry, turns_left, calls_left)
        t0 = time.perf_counter()
        try:
            text = annotator.reply(req)
        except AnnotatorError as exc:
            ann.stop, ann.error = "annotator_error", str(exc)
            return None
        return text, (time.perf_counter() - t0) * 1e3

    got = ask("fast", max_turns, tool_limit)
    if got is None:
        return ann
    step = Step("fast", got[0], elapsed_ms=got[1])
    try:
        step.fast = protocol.parse_fast_answer(step.text)
    except ProtocolParseError as exc:
        step.parse_error = str(exc)
    ann.steps.append(step)
    if step.error:
        ann.stop = "format"
        return ann

    calls = 0
    for turn_no in range(max_turns):
        got = ask("reasoning", max_turns - turn_no, tool_limit - calls)
        if got is None:
            return ann
        step = Step("reasoning", got[0], elapsed_ms=got[1])
        ann.steps.append(step)
        try:
            step.turn = protocol.parse_reasoning_turn(step.text)
        except ProtocolParseError as exc:
            step.parse_error = str(exc)
            ann.stop = "format"
            return ann
        if step.turn.answer is not None:
            ann.stop = "answered"
            return ann
        call = step.turn.tool_call
        if calls >= tool_limit:
            step.tool_error = protocol.TOOL_LIMIT_MESSAGE
            ann.stop = "format"
            return ann
        try:
            ex = registry.execute(call.name, call.arguments, crop)
        except ToolCallError as exc:
            step.tool_error = str(exc)
            ann.stop = "format"
            return ann
        calls += 1
        p = experts.p_spoof(ex.name, ex.output.image) if experts is not None else None
        step.tool = ToolOutcome(ex.name, ex.arguments, ex.output.image, dict(ex.output.stats), p, ex.elapsed_ms)
    ann.stop = "turn_limit"
    return ann


def to_trajectory(ann: Annotation, *, face: faces.FaceCrop | None = None, source: str | None = None,
                  image_sha256: str | None = None, params: dict | None = None) -> Trajectory:
    """The accepted annotation as the inference-format trajectory: fast answer, think/tool_call turns
    with the tool results, answer. Texts are re-rendered canonically (normalised tool arguments);
    hint and guidance are not part of it."""
    traj = Trajectory(
        policy=f"annotation:{ann.annotator}",
        policy_version=ann.annotator_version,
        params=dict(params or {}),
        id=ann.id,
        source=source,
        image_sha256=image_sha256,
        face=FaceInfo(face.face_detected, list(face.bbox) if face.bbox else None, list(face.crop_box), list(face.source_size), list(face.notes)) if face else None,
        crop=ann.crop,
        tools=list(ann.tools),
        label=ann.hint.label,
    )
    for i, s in enumerate(ann.steps):
        if s.kind == "fast":
            traj.turns.append(Turn(i, "fast", protocol.format_fast_answer(s.fast.verdict, s.fast.reason), fast=s.fast, elapsed_ms=s.elapsed_ms))
            continue
        t = s.turn
        if t.tool_call is not None:
            call = ToolCall(s.tool.name, s.tool.arguments)
            turn = Turn(i, "reasoning", protocol.format_tool_call_turn(t.think, call), think=t.think, tool_call=call, elapsed_ms=s.elapsed_ms)
            o = s.tool
            turn.tool_result = ToolResult(o.name, o.arguments, o.stats, o.expert_p_spoof, o.elapsed_ms, o.image)
        else:
            turn = Turn(i, "reasoning", protocol.format_answer_turn(t.think, t.answer), think=t.think, answer=t.answer, elapsed_ms=s.elapsed_ms)
        traj.turns.append(turn)
    traj.final = Final(ann.final, 1.0 if ann.final == "spoof" else 0.0, "answer")
    traj.status = "completed"
    return traj


# --- one sample: annotate, verify, re-annotate once -----------------------------------------------
@dataclass
class SampleResult:
    row: ManifestRow
    status: Literal["accepted", "rejected", "failed"]
    attempts: list[tuple[Annotation, list[Issue]]] = field(default_factory=list)
    face: faces.FaceCrop | None = None
    image_sha256: str | None = None
    input_issue: Issue | None = None  # the image could not be used
    error: str | None = None  # the annotator failed: retried by the next run


def sample_id(row: ManifestRow) -> str:
    """Stable id of a manifest row: its path as written in the manifest."""
    return row.rel_path


def annotate_sample(row: ManifestRow, annotator: Annotator, *, experts=None, config: AnnotateConfig | None = None) -> SampleResult:
    config = config or AnnotateConfig()
    try:
        data = row.path.read_bytes()
        face = faces.prepare_face(faces.load_image(data, name=row.rel_path), on_no_face=config.on_no_face)
    except OSError as exc:
        return SampleResult(row, "rejected", input_issue=Issue("input", "unreadable", f"{row.rel_path}: {exc.strerror or exc}"))
    except InputImageError as exc:
        code = "no_face" if isinstance(exc, faces.NoFaceError) else "unreadable"
        return SampleResult(row, "rejected", input_issue=Issue("input", code, str(exc)))
    result = SampleResult(row, "rejected", face=face, image_sha256=faces.sha256_bytes(data))
    registry = ToolRegistry(config.tools)
    hint = Hint(row.label, row.attack_type or None)
    for attempt in (1, 2):  # §3.1.3: failures are re-annotated once, then discarded
        ann = annotate_image(face.crop, hint, annotator, experts=experts, registry=registry, max_turns=config.max_turns,
                             max_tool_calls=config.tool_limit, attempt=attempt)
        if ann.stop == "annotator_error":
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


def run_annotation(rows: list[ManifestRow], annotator: Annotator, out: str | Path, *, experts=None,
                   config: AnnotateConfig | None = None) -> RunSummary:
    """Annotate every row not yet done in ``out`` and return what happened. Safe to kill and re-run."""
    config = config or AnnotateConfig()
    out = Path(out)
    t0 = time.perf_counter()
    writer = DatasetWriter(out, source=SOURCE, created_by=f"tarfas annotate ({annotator.name})", resume=True,
                           extra={"annotator": annotator.name, "annotator_version": annotator.version,
                                  "config": {k: v for k, v in asdict(config).items() if k != "progress"}})
    rejected = _JsonlLog(out / REJECTED)
    seen, todo = set(), []
    for r in rows:
        sid = sample_id(r)
        if sid in seen:
            continue
        seen.add(sid)
        if not writer.has(sid) and sid not in rejected.ids:
            todo.append(r)
    summary = RunSummary(out, len(todo), len(seen) - len(todo))
    bar = tqdm(total=len(todo), desc=f"annotating ({annotator.name})", unit="img", disable=not config.progress, dynamic_ncols=True)
    try:
        for res in _in_parallel(todo, annotator, experts, config):
            if res.status == "accepted":
                _write_accepted(writer, res, config)
                summary.accepted += 1
            elif res.status == "rejected":
                _write_rejected(writer, rejected, res)
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


def _in_parallel(rows: list[ManifestRow], annotator, experts, config: AnnotateConfig) -> Iterator[SampleResult]:
    """Results as they complete, with at most ``concurrency`` samples in flight (so a slow endpoint is
    never flooded and memory stays bounded). Writing stays in the caller's thread."""
    if config.concurrency == 1:
        for row in rows:
            yield annotate_sample(row, annotator, experts=experts, config=config)
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
                    pending.add(pool.submit(annotate_sample, row, annotator, experts=experts, config=config))
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        finally:
            for fut in pending:
                fut.cancel()


def _row_info(row: ManifestRow) -> dict:
    return {"rel_path": row.rel_path, "domain": row.domain, "split": row.split, "label": row.label, "attack_type": row.attack_type or None}


def _conversation(writer: DatasetWriter, ann: Annotation) -> list[dict]:
    """The raw annotator conversation with images stored in the dataset's images/ folder."""
    msgs = []
    for m in ann.messages():
        content = [{"type": "image", "path": writer.add_image(p["image"])} if p["type"] == "image" else p for p in m["content"]]
        msgs.append({"role": m["role"], "content": content})
    return msgs


def _attempt_record(writer: DatasetWriter, ann: Annotation, issues: list[Issue]) -> dict:
    return {
        "attempt": ann.attempt,
        "stop": ann.stop,
        "issues": [asdict(i) for i in issues],
        "final": ann.final,
        "tools": [s.tool.name for s in ann.tool_steps],
        "expert_p_spoof": [s.tool.expert_p_spoof for s in ann.tool_steps],
        "conversation": _conversation(writer, ann),
    }


def _write_accepted(writer: DatasetWriter, res: SampleResult, config: AnnotateConfig) -> None:
    ann, _ = res.attempts[-1]
    row = res.row
    traj = to_trajectory(ann, face=res.face, source=str(row.path), image_sha256=res.image_sha256,
                         params={"max_turns": config.max_turns, "max_tool_calls": config.tool_limit, "attempt": ann.attempt})
    # Point the trajectory's files at the dataset's images so the queue import can rebuild it.
    traj_dict = traj.to_dict()
    traj_dict["crop_path"] = writer.add_image(traj.crop)
    for td, t in zip(traj_dict["turns"], traj.turns):
        if t.tool_result is not None:
            td["tool_result"]["image_path"] = writer.add_image(t.tool_result.image)
    flags = review_flags(ann)
    if _drawn(sample_id(row), config.review_rate):
        flags.append("random_sample")
    meta = {
        "annotation": {
            **_row_info(row),
            "annotator": ann.annotator,
            "annotator_version": ann.annotator_version,
            "hint": ann.hint.text,
            "review": flags,
            "reasoning_turns": ann.reasoning_turns,
            "tools": [s.tool.name for s in ann.tool_steps],
            "expert_p_spoof": [s.tool.expert_p_spoof for s in ann.tool_steps],
            "fast_verdict": ann.fast.verdict if ann.fast else None,
            "attempts": [_attempt_record(writer, a, i) for a, i in res.attempts],
        },
        "trajectory": traj_dict,
    }
    writer.add_trajectory(traj, id=sample_id(row), label=row.label, attack_type=row.attack_type or None, meta=meta)


def _write_rejected(writer: DatasetWriter, log: _JsonlLog, res: SampleResult) -> None:
    issues = [res.input_issue] if res.input_issue else res.attempts[-1][1]
    log.append({
        "id": sample_id(res.row),
        **_row_info(res.row),
        "reasons": sorted({f"{i.rule}:{i.code}" for i in issues}),
        "issues": [asdict(i) for i in issues],
        "attempts": [_attempt_record(writer, a, i) for a, i in res.attempts],
    })


def _drawn(sid: str, rate: float) -> bool:
    """A reproducible random draw: the same samples are drawn on every run and resume."""
    return int(hashlib.sha256(sid.encode()).hexdigest()[:8], 16) / 0x100000000 < rate


class _JsonlLog:
    """Append-only JSONL with ids, same crash rules as the dataset files (a torn last line is cut)."""

    def __init__(self, path: Path):
        self.path = path
        self.ids = _repair_and_ids(path)
        self._f = open(path, "a", encoding="utf-8")

    def append(self, obj: dict) -> None:
        self._f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._f.flush()
        self.ids.add(obj["id"])

    def close(self) -> None:
        self._f.close()


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- queue and statistics -------------------------------------------------------------------------
def write_review_queue(folder: str | Path) -> list[dict]:
    """(Re)write review_queue.jsonl from the accepted records (so it is right after any resume)."""
    folder = Path(folder)
    queue = []
    for rec in _read_jsonl(folder / TRAJECTORIES):
        a = rec.get("meta", {}).get("annotation", {})
        if a.get("review"):
            queue.append({"id": rec["id"], "trajectory_id": rec["meta"]["trajectory"]["id"], "reasons": a["review"],
                          "label": rec["label"], "attack_type": rec.get("attack_type"), "rel_path": a.get("rel_path")})
    tmp = folder / (REVIEW_QUEUE + ".tmp")
    tmp.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in queue), encoding="utf-8")
    os.replace(tmp, folder / REVIEW_QUEUE)
    return queue


def dataset_stats(folder: str | Path) -> dict:
    """Statistics of an annotation folder: counts, turns, tools per attack type, rejection reasons."""
    folder = Path(folder)
    accepted = _read_jsonl(folder / TRAJECTORIES)
    rejected = _read_jsonl(folder / REJECTED)
    queue = _read_jsonl(folder / REVIEW_QUEUE)
    turns, calls, tool_use, labels = Counter(), Counter(), Counter(), Counter()
    per_attack: dict[str, Counter] = defaultdict(Counter)
    first_failures, fast_agree, reannotated = Counter(), 0, 0
    for rec in accepted:
        a = rec["meta"]["annotation"]
        attack = rec.get("attack_type") or ("real" if rec["label"] == "real" else "unknown")
        labels[rec["label"]] += 1
        turns[a["reasoning_turns"]] += 1
        calls[len(a["tools"])] += 1
        tool_use.update(a["tools"])
        per_attack[attack].update(a["tools"])
        per_attack[attack]["_samples"] += 1
        fast_agree += a.get("fast_verdict") == rec["label"]
        if len(a["attempts"]) > 1:
            reannotated += 1
            for i in a["attempts"][0]["issues"]:
                first_failures[f"{i['rule']}:{i['code']}"] += 1
    reasons = Counter()
    for rec in rejected:
        reasons.update(rec["reasons"])
        if len(rec.get("attempts", [])) > 1:
            for i in rec["attempts"][0]["issues"]:
                first_failures[f"{i['rule']}:{i['code']}"] += 1
    n_acc, n_rej = len(accepted), len(rejected)
    tools_per_attack = {}
    for attack, c in sorted(per_attack.items()):
        n = c.pop("_samples")
        tools_per_attack[attack] = {"samples": n, "mean_tool_calls": round(sum(c.values()) / n, 3), "tools": dict(c.most_common())}
    return {
        "accepted": n_acc,
        "rejected": n_rej,
        "acceptance_rate": round(n_acc / (n_acc + n_rej), 4) if n_acc + n_rej else None,
        "re_annotated_and_accepted": reannotated,
        "labels": dict(labels),
        "reasoning_turns": {str(k): v for k, v in sorted(turns.items())},
        "mean_reasoning_turns": round(sum(k * v for k, v in turns.items()) / n_acc, 3) if n_acc else None,
        "tool_calls": {str(k): v for k, v in sorted(calls.items())},
        "tool_usage": dict(tool_use.most_common()),
        "tools_per_attack_type": tools_per_attack,
        "fast_answer_matches_label": round(fast_agree / n_acc, 4) if n_acc else None,
        "rejection_reasons": dict(reasons.most_common()),
        "first_attempt_failures": dict(first_failures.most_common()),
        "review_queue": {"size": len(queue), "reasons": dict(Counter(r for q in queue for r in q["reasons"]).most_common())},
    }


def write_stats(folder: str | Path) -> dict:
    folder = Path(folder)
    stats = dataset_stats(folder)
    tmp = folder / (STATS + ".tmp")
    tmp.write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    os.replace(tmp, folder / STATS)
    return stats


# --- manual verification in the workbench ---------------------------------------------------------
def queued_trajectories(folder: str | Path) -> Iterator[tuple[dict, Trajectory]]:
    """Each queued sample's entry and its trajectory, images loaded from the dataset."""
    ds = read_dataset(folder)
    by_id = {r.id: r for r in ds.trajectories}
    for q in _read_jsonl(Path(folder) / REVIEW_QUEUE):
        rec = by_id.get(q["id"])
        if rec is None:
            raise TarfasError(f"{folder}: queued sample {q['id']!r} is not in {TRAJECTORIES}")
        traj = Trajectory.from_dict(rec.meta["trajectory"])
        traj.crop = ds.image(traj.crop_path)
        for t in traj.turns:
            if t.tool_result is not None and t.tool_result.image_path:
                t.tool_result.image = ds.image(t.tool_result.image_path)
        yield q, traj


def import_review_queue(folder: str | Path, storage, *, user: str = "annotation") -> list[str]:
    """Put the queued samples into the workbench's storage as cases with their investigations (policy
    "annotation:<annotator>"), so they appear in the app's Queue for manual verification.

    The case holds the original image when it is still at its source path with the same bytes, else the
    face crop (PNG). Idempotent: samples imported before are skipped. Returns the new investigation ids.
    """
    from core.events import InvestigationFinished, InvestigationStarted, TurnCompleted
    from storage.cases import create_case, set_attack_type
    from storage.investigations import InvestigationRecorder
    from storage.models import ATTACK_TYPES, Investigation

    from core.dataset import png_bytes

    imported = []
    for q, traj in queued_trajectories(folder):
        with storage.sessions() as s:
            if s.get(Investigation, traj.id) is not None:
                continue
        data = None
        if traj.source and Path(traj.source).is_file():
            data = Path(traj.source).read_bytes()
            if faces.sha256_bytes(data) != traj.image_sha256:
                data = None  # the file changed since annotation: keep the crop that was annotated
        if data is None:
            data = png_bytes(traj.crop)
            traj.image_sha256 = faces.sha256_bytes(data)
        with storage.sessions.begin() as s:
            case = create_case(s, storage.files, data, filename=q.get("rel_path") or Path(traj.source or "crop.png").name, user=user)
            if q.get("label") == "spoof":  # the queue filters on it; fas-style types map onto the store's
                set_attack_type(s, case.id, q.get("attack_type") if q.get("attack_type") in ATTACK_TYPES else "unknown", user=user)
            case_id = case.id
        traj.params = {**traj.params, "review_reasons": q["reasons"], "dataset_id": q["id"]}
        rec = InvestigationRecorder(storage.sessions, storage.files, case_id, user=user)
        rec.on_event(InvestigationStarted(traj))
        for turn in traj.turns:
            rec.on_event(TurnCompleted(turn))
        rec.on_event(InvestigationFinished(traj))
        imported.append(traj.id)
    return imported


def load_rows(manifest: str | Path, *, root=None, domains: list[str] | None = None, split: str | None = None,
              limit: int | None = None, seed: int = 0) -> list[ManifestRow]:
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


__all__ = [
    "AnnotateConfig", "RunSummary", "SampleResult", "annotate_image", "annotate_sample", "run_annotation", "to_trajectory",
    "dataset_stats", "write_stats", "write_review_queue", "queued_trajectories", "import_review_queue", "load_rows", "describe",
    "sample_id", "L_MAX",
]

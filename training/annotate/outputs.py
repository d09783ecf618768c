"""What an annotation run writes beside its dataset (:mod:`core.dataset` folder, source "annotation"):

    trajectories.jsonl   each accepted sample: the inference-format trajectory (no hint, no guidance);
                         ``meta["annotation"]`` keeps every attempt's raw annotator conversation for audit
    rejected.jsonl       bad cases: every attempt's issues and raw conversation
    review_queue.jsonl   accepted samples for manual verification (a random sample + borderline cases)
    stats.json           turns, tools per attack type, rejection reasons, review queue

Records are keyed by :func:`sample_id`, so a resumed run skips what is done.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from core.dataset import TRAJECTORIES, DatasetWriter, read_dataset, read_jsonl, repair_jsonl
from core.errors import TarfasError
from core.evaluation.manifest import ManifestRow
from core.trajectory import Trajectory

from ..annotators import Hint, attempt_of, final_answer, stop_reason
from ..verify import Issue, review_flags
from .conversation import annotator_messages, training_view

REJECTED = "rejected.jsonl"
REVIEW_QUEUE = "review_queue.jsonl"
STATS = "stats.json"

Attempt = tuple[Trajectory, list[Issue]]  # an annotation conversation and what verification found


def sample_id(row: ManifestRow) -> str:
    """Stable id of a manifest row: its path as written in the manifest."""
    return row.rel_path


def _row_info(row: ManifestRow) -> dict:
    return {
        "rel_path": row.rel_path,
        "domain": row.domain,
        "split": row.split,
        "label": row.label,
        "attack_type": row.attack_type or None,
    }


def _tool_readings(ann: Trajectory) -> dict:
    return {
        "tools": [t.tool_result.name for t in ann.tool_turns],
        "expert_p_spoof": [t.tool_result.expert_p_spoof for t in ann.tool_turns],
    }


def _conversation(writer: DatasetWriter, ann: Trajectory) -> list[dict]:
    """The raw annotator conversation with images stored in the dataset's images/ folder."""
    msgs = []
    for m in annotator_messages(ann):
        content = [
            {"type": "image", "path": writer.add_image(p["image"])} if p["type"] == "image" else p for p in m["content"]
        ]
        msgs.append({"role": m["role"], "content": content})
    return msgs


def _attempt_record(writer: DatasetWriter, ann: Trajectory, issues: list[Issue]) -> dict:
    return {
        "attempt": attempt_of(ann),
        "stop": stop_reason(ann),
        "issues": [asdict(i) for i in issues],
        "final": final_answer(ann),
        **_tool_readings(ann),
        "conversation": _conversation(writer, ann),
    }


def write_accepted(
    writer: DatasetWriter, row: ManifestRow, attempts: list[Attempt], *, params: dict, review_rate: float
) -> None:
    """The accepted (last) attempt as a training record, its conversations kept for audit."""
    ann, _ = attempts[-1]
    traj = training_view(ann, params | {"attempt": attempt_of(ann)})
    # Point the trajectory's files at the dataset's images so the queue import can rebuild it.
    traj_dict = traj.to_dict()
    traj_dict["crop_path"] = writer.add_image(traj.crop)
    for td, t in zip(traj_dict["turns"], traj.turns):
        if t.tool_result is not None:
            td["tool_result"]["image_path"] = writer.add_image(t.tool_result.image)
    flags = review_flags(ann)
    if _drawn(sample_id(row), review_rate):
        flags.append("random_sample")
    meta = {
        "annotation": {
            **_row_info(row),
            "annotator": ann.policy,
            "annotator_version": ann.policy_version,
            "hint": Hint.of(ann).text,
            "review": flags,
            "reasoning_turns": sum(1 for t in ann.turns if t.kind == "reasoning"),
            **_tool_readings(ann),
            "fast_verdict": ann.fast_answer.verdict if ann.fast_answer else None,
            "attempts": [_attempt_record(writer, a, i) for a, i in attempts],
        },
        "trajectory": traj_dict,
    }
    writer.add_trajectory(traj, id=sample_id(row), label=row.label, attack_type=row.attack_type or None, meta=meta)


def write_rejected(
    writer: DatasetWriter, log: JsonlLog, row: ManifestRow, issues: list[Issue], attempts: list[Attempt]
) -> None:
    log.append(
        {
            "id": sample_id(row),
            **_row_info(row),
            "reasons": sorted({f"{i.rule}:{i.code}" for i in issues}),
            "issues": [asdict(i) for i in issues],
            "attempts": [_attempt_record(writer, a, i) for a, i in attempts],
        }
    )


def _drawn(sid: str, rate: float) -> bool:
    """A reproducible random draw: the same samples are drawn on every run and resume."""
    return int(hashlib.sha256(sid.encode()).hexdigest()[:8], 16) / 0x100000000 < rate


class JsonlLog:
    """Append-only JSONL with ids, same crash rules as the dataset files (a torn last line is cut)."""

    def __init__(self, path: Path):
        self.path = path
        self.ids = repair_jsonl(path)
        self._f = open(path, "a", encoding="utf-8")

    def append(self, obj: dict) -> None:
        self._f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._f.flush()
        self.ids.add(obj["id"])

    def close(self) -> None:
        self._f.close()


# --- queue and statistics -------------------------------------------------------------------------
def write_review_queue(folder: str | Path) -> list[dict]:
    """(Re)write review_queue.jsonl from the accepted records (so it is right after any resume)."""
    folder = Path(folder)
    queue = []
    for rec in read_jsonl(folder / TRAJECTORIES):
        a = rec.get("meta", {}).get("annotation", {})
        if a.get("review"):
            queue.append(
                {
                    "id": rec["id"],
                    "trajectory_id": rec["meta"]["trajectory"]["id"],
                    "reasons": a["review"],
                    "label": rec["label"],
                    "attack_type": rec.get("attack_type"),
                    "rel_path": a.get("rel_path"),
                }
            )
    tmp = folder / (REVIEW_QUEUE + ".tmp")
    tmp.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in queue), encoding="utf-8")
    os.replace(tmp, folder / REVIEW_QUEUE)
    return queue


def dataset_stats(folder: str | Path) -> dict:
    """Statistics of an annotation folder: counts, turns, tools per attack type, rejection reasons."""
    folder = Path(folder)
    accepted = read_jsonl(folder / TRAJECTORIES)
    rejected = read_jsonl(folder / REJECTED)
    queue = read_jsonl(folder / REVIEW_QUEUE)
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
        tools_per_attack[attack] = {
            "samples": n,
            "mean_tool_calls": round(sum(c.values()) / n, 3),
            "tools": dict(c.most_common()),
        }
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
        "review_queue": {
            "size": len(queue),
            "reasons": dict(Counter(r for q in queue for r in q["reasons"]).most_common()),
        },
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
    for q in read_jsonl(Path(folder) / REVIEW_QUEUE):
        rec = by_id.get(q["id"])
        if rec is None:
            raise TarfasError(f"{folder}: queued sample {q['id']!r} is not in {TRAJECTORIES}")
        traj = Trajectory.from_dict(rec.meta["trajectory"])
        traj.crop = ds.image(traj.crop_path)
        for t in traj.turns:
            if t.tool_result is not None and t.tool_result.image_path:
                t.tool_result.image = ds.image(t.tool_result.image_path)
        yield q, traj

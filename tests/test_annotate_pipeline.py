"""The annotation pipeline end to end with the offline expert annotator: fas-dev images to a dataset
that training reads, resume after a real kill, concurrency, re-annotation, the review queue in the
workbench's SQLite store, statistics and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app.review_queue import import_review_queue
from core import protocol
from core.dataset import read_dataset
from core.evaluation.manifest import read_manifest
from core.policies import Conversation, PolicyOutput
from core.registry import ToolRegistry
from core.trajectory import Trajectory
from training.annotate import (
    REJECTED,
    REVIEW_QUEUE,
    STATS,
    AnnotateConfig,
    load_rows,
    run_annotation,
)
from training.annotators import ExpertAnnotator, attempt_of

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def annotator() -> ExpertAnnotator:
    return ExpertAnnotator.load()  # the shipped expert ensemble


def all_texts(record) -> list[str]:
    """Texts of the conversation after the (fixed, inference) system prompt."""
    return [p["text"] for m in record.messages[1:] for p in m["content"] if p.get("type") == "text"]


def test_offline_annotator_builds_a_training_dataset_from_fasdev(fasdev, annotator, tmp_path):
    rows = load_rows(fasdev / "manifest.csv", domains=["nuaa", "apfol"], limit=6, seed=3)
    out = tmp_path / "ds"
    summary = run_annotation(
        rows, annotator, out, registry=ToolRegistry(readers=annotator.policy.bank), config=AnnotateConfig(**QUIET)
    )
    assert summary.todo == 6 and summary.failed == 0
    assert summary.accepted == 6, (
        json.loads((out / REJECTED).read_text() or "{}") if (out / REJECTED).stat().st_size else None
    )

    ds = read_dataset(out)  # what `tarfas train sft --stage fi` reads
    assert ds.manifest["source"] == "annotation" and ds.manifest["counts"]["trajectories"] == 6
    by_path = {r.rel_path: r for r in rows}
    for rec in ds.trajectories:
        row = by_path[rec.id]
        assert rec.label == row.label and rec.source == "annotation"
        roles = [m["role"] for m in rec.messages]
        assert roles[:3] == ["system", "user", "assistant"] and roles[-1] == "assistant"
        # the inference conversation: inference system prompt and query, fast answer, tools, answer
        assert rec.messages[0]["content"][0]["text"] == protocol.system_prompt(ToolRegistry().schemas())
        assert rec.messages[1]["content"][1]["text"] == protocol.FIRST_ROUND_QUERY
        assert protocol.parse_fast_answer(rec.messages[2]["content"][0]["text"]).verdict in ("real", "spoof")
        final = protocol.parse_reasoning_turn(rec.messages[-1]["content"][0]["text"])
        assert final.answer == row.label
        a = rec.meta["annotation"]
        assert len(rec.image_paths) == 1 + len(a["tools"]) >= 2  # the face and each tool image
        assert 1 <= a["reasoning_turns"] <= 6
        # hint and expert guidance are in the raw annotator conversation, never in the training one
        for text in all_texts(rec):
            assert "Hint" not in text and "expert" not in text.lower() and "%" not in text
        raw = [p.get("text", "") for m in a["attempts"][-1]["conversation"] for p in m["content"]]
        assert any(protocol.ANNOTATION_QUERY in t and "Hint:" in t for t in raw)
        if any(t != "ZoomInTool" for t in a["tools"]):
            assert any("The expert predicts" in t for t in raw)
        # pixels load back for training
        msgs = ds.messages(rec)
        assert msgs[1]["content"][0]["image"].shape == (224, 224, 3)
        # the trajectory kept for the review queue round-trips
        traj = Trajectory.from_dict(rec.meta["trajectory"])
        assert traj.policy == "annotation:expert" and traj.final.verdict == row.label

    # the SFT loader keeps every accepted annotation for format injection
    from training.datasets import fi_examples, load_sources

    data = load_sources([str(out)], build_dir=tmp_path / "build")
    assert len(fi_examples(data)) == 6 and data.stats["fi_kept"] == 6

    stats = json.loads((out / STATS).read_text())
    assert stats["accepted"] == 6 and sum(stats["reasoning_turns"].values()) == 6
    assert set(stats["tools_per_attack_type"]) <= {"real", "print", "unknown", "replay"}
    assert stats["labels"] == {lab: sum(r.label == lab for r in rows) for lab in {r.label for r in rows}}


def test_resume_after_a_real_kill_finishes_without_duplicates(tiny_manifest, annotator, tmp_path):
    out = tmp_path / "ds"
    # A slowed-down annotator in a separate process, killed with SIGKILL after a few records.
    script = f"""
import time, torch
torch.set_num_threads(1)
from core.registry import ToolRegistry
from training.annotate import AnnotateConfig, load_rows, run_annotation
from training.annotators import ExpertAnnotator
class Slow(ExpertAnnotator):
    def next_turn(self, conv):
        time.sleep(0.1)
        return super().next_turn(conv)
base = ExpertAnnotator.load()
ann = Slow(base.policy)
run_annotation(load_rows({str(tiny_manifest)!r}), ann, {str(out)!r}, registry=ToolRegistry(readers=base.policy.bank), config=AnnotateConfig(progress=False))
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stderr=subprocess.PIPE)
    try:
        lines = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            path = out / "trajectories.jsonl"
            lines = path.read_bytes().count(b"\n") if path.exists() else 0
            if lines >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert not (out / "manifest.json").exists()  # killed before it could finish

    rows = load_rows(tiny_manifest)
    summary = run_annotation(
        rows, annotator, out, registry=ToolRegistry(readers=annotator.policy.bank), config=AnnotateConfig(**QUIET)
    )
    assert summary.skipped >= 3 and summary.todo == len(rows) - summary.skipped
    ds = read_dataset(out)
    rejected = [json.loads(line) for line in (out / REJECTED).read_text().splitlines()]
    ids = [r.id for r in ds.trajectories] + [r["id"] for r in rejected]
    assert len(ids) == len(set(ids)) == len(rows)  # everything once
    assert all(Path(ds.folder / p).is_file() for r in ds.trajectories for p in r.image_paths)

    again = run_annotation(
        rows, annotator, out, registry=ToolRegistry(readers=annotator.policy.bank), config=AnnotateConfig(**QUIET)
    )
    assert again.todo == 0 and again.skipped == len(rows)


def test_concurrent_annotation_writes_the_same_dataset(tiny_manifest, annotator, tmp_path):
    rows = load_rows(tiny_manifest, limit=8, seed=1)
    seq = run_annotation(
        rows,
        annotator,
        tmp_path / "seq",
        registry=ToolRegistry(readers=annotator.policy.bank),
        config=AnnotateConfig(**QUIET),
    )
    par = run_annotation(
        rows,
        annotator,
        tmp_path / "par",
        registry=ToolRegistry(readers=annotator.policy.bank),
        config=AnnotateConfig(concurrency=3, **QUIET),
    )
    assert (seq.accepted, seq.rejected) == (par.accepted, par.rejected)
    a = {r.id: r.messages for r in read_dataset(tmp_path / "seq").trajectories}
    b = {r.id: r.messages for r in read_dataset(tmp_path / "par").trajectories}
    assert a == b  # deterministic annotator: same records whatever the order they completed in


class Leaky(ExpertAnnotator):
    """Writes the expert's number into its answer: on the first attempt only, or always."""

    def __init__(self, policy, always: bool):
        super().__init__(policy)
        self.always = always

    def next_turn(self, conv: Conversation) -> PolicyOutput:
        out = super().next_turn(conv)
        turn = protocol.parse_reasoning_turn(out.text) if conv.kind == "reasoning" else None
        if turn is not None and turn.answer is not None and (self.always or attempt_of(conv.trajectory) == 1):
            return PolicyOutput(
                protocol.format_answer_turn(turn.think + " The expert predicts 91% there's spoof trace.", turn.answer)
            )
        return out


def test_failed_verification_is_re_annotated_once_then_discarded(tiny_manifest, annotator, tmp_path):
    rows = load_rows(tiny_manifest, limit=3, seed=2)
    once = run_annotation(
        rows,
        Leaky(annotator.policy, always=False),
        tmp_path / "once",
        registry=ToolRegistry(readers=annotator.policy.bank),
        config=AnnotateConfig(**QUIET),
    )
    assert once.accepted == 3  # the re-annotation passed
    recs = read_dataset(tmp_path / "once").trajectories
    assert all(
        len(r.meta["annotation"]["attempts"]) == 2 and "re-annotated" in r.meta["annotation"]["review"] for r in recs
    )
    assert once.stats["first_attempt_failures"] == {"leakage:mentions_expert": 3}

    always = run_annotation(
        rows,
        Leaky(annotator.policy, always=True),
        tmp_path / "always",
        registry=ToolRegistry(readers=annotator.policy.bank),
        config=AnnotateConfig(**QUIET),
    )
    assert always.rejected == 3 and always.accepted == 0
    bad = [json.loads(line) for line in (tmp_path / "always" / REJECTED).read_text().splitlines()]
    assert all(r["reasons"] == ["leakage:mentions_expert"] and len(r["attempts"]) == 2 for r in bad)
    assert always.stats["rejection_reasons"] == {"leakage:mentions_expert": 3}


def test_unreadable_images_are_rejected_and_the_run_goes_on(tiny_manifest, annotator, tmp_path):
    folder = tiny_manifest.parent
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    manifest = tmp_path / "m.csv"
    lines = tiny_manifest.read_text().splitlines()
    manifest.write_text(
        "\n".join([lines[0], *[f"{folder}/{ln}" for ln in lines[1:3]], f"{broken},spoof,print,x,train"]) + "\n"
    )
    summary = run_annotation(
        read_manifest(manifest),
        annotator,
        tmp_path / "ds",
        registry=ToolRegistry(readers=annotator.policy.bank),
        config=AnnotateConfig(**QUIET),
    )
    assert (summary.accepted, summary.rejected) == (2, 1)
    bad = json.loads((tmp_path / "ds" / REJECTED).read_text())
    assert bad["reasons"] == ["input:unreadable"]


def test_review_queue_is_imported_into_the_workbench_store(tiny_manifest, annotator, tmp_path):
    from storage.db import open_storage
    from storage.investigations import load_trajectory
    from storage.queries import list_cases

    rows = load_rows(tiny_manifest, limit=6, seed=4)
    out = tmp_path / "ds"
    run_annotation(
        rows,
        annotator,
        out,
        registry=ToolRegistry(readers=annotator.policy.bank),
        config=AnnotateConfig(review_rate=1.0, **QUIET),
    )
    queue = [json.loads(line) for line in (out / REVIEW_QUEUE).read_text().splitlines()]
    assert len(queue) == 6 and all("random_sample" in q["reasons"] for q in queue)

    storage = open_storage(tmp_path / "store")  # a real SQLite file
    try:
        ids = import_review_queue(out, storage, user="annotator-bot")
        assert sorted(ids) == sorted(q["trajectory_id"] for q in queue)
        assert import_review_queue(out, storage) == []  # idempotent
        with storage.sessions() as s:
            cases = list_cases(s)
            assert len(cases) == 6
            assert {c.policy for c in cases} == {"annotation:expert"} and all(c.status == "completed" for c in cases)
            by_id = {q["trajectory_id"]: q for q in queue}
            for c in cases:
                q = by_id[c.investigation_id]
                assert c.verdict == q["label"] and (c.attack_type is not None) == (q["label"] == "spoof")
                traj = load_trajectory(s, storage.files, c.investigation_id)
                rec = next(r for r in read_dataset(out).trajectories if r.id == q["id"])
                assert [t.text for t in traj.turns] == [
                    m["content"][0]["text"] for m in rec.messages if m["role"] == "assistant"
                ]
                assert traj.tool_turns and traj.tool_turns[0].tool_result.image is not None
    finally:
        storage.close()


def test_cli_annotate(tiny_manifest, tmp_path, capsys):
    from app.cli import main

    rc = main(
        [
            "annotate",
            str(tiny_manifest),
            "--out",
            str(tmp_path / "ds"),
            "--limit",
            "3",
            "--no-progress",
            "--queue-into",
            str(tmp_path / "store"),
            "--review-rate",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "3 accepted" in out and "review queue: 3 new investigations" in out
    assert read_dataset(tmp_path / "ds").manifest["extra"]["annotator"] == "expert"
    assert main(["annotate", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x")]) == 2
    assert main(["annotate", str(tiny_manifest), "--out", str(tmp_path / "y"), "--annotator", "openai"]) == 2
    assert "needs --model and --base-url" in capsys.readouterr().err


def test_images_without_a_face_are_rejected_when_asked(annotator, tmp_path):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((300, 300, 3), 128, np.uint8)).save(tmp_path / "wall.png")
    (tmp_path / "m.csv").write_text("path,label,attack_type,domain,split\nwall.png,real,,x,train\n")
    rows = read_manifest(tmp_path / "m.csv")
    summary = run_annotation(
        rows,
        annotator,
        tmp_path / "ds",
        registry=ToolRegistry(readers=annotator.policy.bank),
        config=AnnotateConfig(on_no_face="error", **QUIET),
    )
    assert summary.rejected == 1 and summary.stats["rejection_reasons"] == {"input:no_face": 1}

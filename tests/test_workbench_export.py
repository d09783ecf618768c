"""Reviewed cases -> a training dataset folder in the shared format: labels are the analysts' verdicts,
corrected answers replace the model's, flags and notes travel in the metadata, images sit beside the
JSONL, and the export (who, when, which investigations, file hashes) is recorded with its audit event."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from sqlalchemy import func, select
from workbench_support import answer, fast, review, run_case, tool

from app.export import ExportError, export_dataset
from core import protocol
from core.dataset import DatasetError, read_dataset
from storage.errors import NotFoundError, TamperedFileError
from storage.investigations import load_trajectory
from storage.models import AuditEvent, DatasetExport, DatasetExportItem, ToolResult

torch.set_num_threads(1)


@pytest.fixture
def reviewed(storage, face):
    """Four reviewed runs (spoof confirmed; spoof overturned with a corrected answer; real confirmed;
    unsure) and one unreviewed run."""
    ids = {}
    ids["spoof"] = run_case(
        storage,
        face,
        [fast("spoof", 0.9), tool("FFTTool", "Look for moire."), answer("spoof", 0.9)],
        attack_type="print",
    )
    ids["overturned"] = run_case(
        storage,
        face,
        [
            fast("spoof", 0.8),
            tool("LBPTool"),
            tool("ZoomInTool", bbox=[40, 60, 180, 130]),
            answer("spoof", 0.7, "Flat texture."),
        ],
        attack_type="print",
    )
    ids["real"] = run_case(storage, face, [fast("real", 0.1), answer("real", 0.2)])
    ids["unsure"] = run_case(storage, face, [fast("real", 0.4), answer("real", 0.45)])
    ids["unreviewed"] = run_case(storage, face, [fast("real", 0.3), answer("real", 0.3)])
    review(storage, ids["spoof"][1], "spoof", flags={2: "good_step"})
    corrected = protocol.format_answer_turn("The zoom shows real skin pores; the LBP map is natural.", "real")
    review(
        storage,
        ids["overturned"][1],
        "real",
        notes="Live capture, confirmed by the branch.",
        flags={1: "wrong_reasoning", 2: ["good_step"]},
        corrected_answer=corrected,
    )
    review(storage, ids["real"][1], "real")
    review(storage, ids["unsure"][1], "unsure", notes="Cannot tell.")
    return ids


def _assistant_texts(record) -> list[str]:
    return [m["content"][0]["text"] for m in record.messages if m["role"] == "assistant"]


def test_export_writes_reviewed_cases_with_the_analysts_labels_and_corrections(storage, reviewed, tmp_path):
    result = export_dataset(storage, tmp_path / "ds", user="ana")
    inv = {k: v[1] for k, v in reviewed.items()}
    assert result.investigation_ids == [inv["spoof"], inv["overturned"], inv["real"]]
    assert (
        result.skipped == {"unsure": [inv["unsure"]]} and result.skipped_unsure == 1
    )  # unreviewed: not selected at all

    ds = read_dataset(tmp_path / "ds")  # verifies the JSONL files against the manifest
    assert ds.manifest["source"] == "app-export" and ds.manifest["created_by"] == "ana"
    records = {r.id: r for r in ds.trajectories}
    assert {k: records[inv[k]].label for k in ("spoof", "overturned", "real")} == {
        "spoof": "spoof",
        "overturned": "real",
        "real": "real",
    }
    assert (records[inv["spoof"]].attack_type, records[inv["overturned"]].attack_type) == (
        "print",
        None,
    )  # a real face has no attack

    # The corrected answer replaced the model's final answer turn; the earlier turns are the model's.
    texts = _assistant_texts(records[inv["overturned"]])
    assert len(texts) == 4 and texts[-1] == protocol.format_answer_turn(
        "The zoom shows real skin pores; the LBP map is natural.", "real"
    )
    assert protocol.parse_reasoning_turn(texts[-1]).answer == "real" and "Flat texture." not in "".join(texts)
    meta = records[inv["overturned"]].meta
    assert meta["review"] | {"updated_at": None} == {
        "verdict": "real",
        "notes": "Live capture, confirmed by the branch.",
        "flags": {"1": ["wrong_reasoning"], "2": ["good_step"]},
        "corrected_answer": texts[-1],
        "reviewer": "rita",
        "version": 1,
        "updated_at": None,
    }
    assert (meta["model_verdict"], meta["model_score_spoof"], meta["answer_matches_label"]) == ("spoof", 0.7, True)
    assert meta["corrected"] == {"replaced_turn": 3, "thought_from": "analyst"}
    assert records[inv["spoof"]].meta["review"]["flags"] == {"2": ["good_step"]}

    # The conversation is the agent loop's, with every image present: crop first, then each tool image.
    with storage.sessions() as s:
        traj = load_trajectory(s, storage.files, inv["overturned"])
    images = [
        p["image"] for m in ds.messages(records[inv["overturned"]]) for p in m["content"] if p.get("type") == "image"
    ]
    assert len(images) == 3
    assert np.array_equal(images[0], traj.crop)
    assert [np.array_equal(a, t.tool_result.image) for a, t in zip(images[1:], traj.tool_turns)] == [True, True]
    assert ds.messages(records[inv["overturned"]])[0]["content"][0]["text"].startswith(protocol.ROLE_AND_MISSION)

    # One GRPO query per case: the crop and the analyst's label.
    queries = {q.id: q for q in ds.queries}
    assert {q.meta["investigation_id"]: q.label for q in ds.queries} == {
        inv["spoof"]: "spoof",
        inv["overturned"]: "real",
        inv["real"]: "real",
    }
    assert np.array_equal(ds.image(queries[reviewed["spoof"][0]].image), traj.crop)


def test_the_export_is_recorded_with_its_file_hashes_and_audit_event(storage, reviewed, tmp_path):
    result = export_dataset(storage, tmp_path / "ds", user="ana")
    manifest_bytes = (tmp_path / "ds" / "manifest.json").read_bytes()
    with storage.sessions() as s:
        exp = s.get(DatasetExport, result.export_id)
        items = s.scalars(
            select(DatasetExportItem)
            .where(DatasetExportItem.dataset_export_id == exp.id)
            .order_by(DatasetExportItem.id)
        ).all()
        ev = s.scalars(select(AuditEvent).where(AuditEvent.action == "dataset_export.create")).one()
    assert (exp.created_by, exp.folder, exp.format) == (
        "ana",
        str((tmp_path / "ds").resolve()),
        "tarfas-trajectories/1",
    )
    assert exp.manifest_sha256 == hashlib.sha256(manifest_bytes).hexdigest() == result.manifest_sha256
    assert storage.files.read(exp.manifest_sha256) == manifest_bytes
    assert exp.files == {
        name: hashlib.sha256((tmp_path / "ds" / name).read_bytes()).hexdigest()
        for name in ("trajectories.jsonl", "queries.jsonl")
    }
    assert exp.counts == {
        "trajectories": 3,
        "queries": 3,
        "images": result.manifest["counts"]["images"],
        "skipped_unsure": 1,
    }
    assert [(i.investigation_id, i.review_version, i.label) for i in items] == [
        (reviewed["spoof"][1], 1, "spoof"),
        (reviewed["overturned"][1], 1, "real"),
        (reviewed["real"][1], 1, "real"),
    ]
    assert (ev.actor, ev.entity_id, ev.after["manifest_sha256"], ev.after["files"]) == (
        "ana",
        str(exp.id),
        exp.manifest_sha256,
        exp.files,
    )
    assert set(ev.after["investigations"]) == set(result.investigation_ids)


def test_selected_ids_export_only_those_and_count_the_unreviewed(storage, reviewed, tmp_path):
    picked = [reviewed["real"][1], reviewed["unreviewed"][1], reviewed["real"][1]]
    result = export_dataset(storage, tmp_path / "ds", user="ana", investigation_ids=picked)
    assert result.investigation_ids == [reviewed["real"][1]] and result.skipped == {
        "unreviewed": [reviewed["unreviewed"][1]]
    }
    assert [r.id for r in read_dataset(tmp_path / "ds").trajectories] == [reviewed["real"][1]]
    with pytest.raises(NotFoundError, match="'nope'"):
        export_dataset(storage, tmp_path / "other", user="ana", investigation_ids=["nope"])


def test_a_bare_corrected_verdict_takes_the_analysts_notes_as_the_thought(storage, face, tmp_path):
    _, inv = run_case(
        storage, face, [fast("spoof", 0.9), tool("HOGTool"), answer("spoof", 0.9, "Gradients look flat.")]
    )
    review(storage, inv, "real", notes="Genuine 3D shading under the chin.", corrected_answer="<answer><Real></answer>")
    export_dataset(storage, tmp_path / "ds", user="ana")
    record = read_dataset(tmp_path / "ds").trajectories[0]
    assert _assistant_texts(record)[-1] == protocol.format_answer_turn("Genuine 3D shading under the chin.", "real")
    assert record.meta["corrected"] == {"replaced_turn": 2, "thought_from": "notes"}


def test_a_run_that_never_answered_is_skipped_unless_the_review_supplies_the_answer(storage, face, tmp_path):
    _, failed = run_case(storage, face, [fast("spoof", 0.9), tool("FFTTool")])  # the policy crashes before answering
    review(storage, failed, "spoof")
    with pytest.raises(ExportError, match="nothing to export: 1 no_final_answer"):
        export_dataset(storage, tmp_path / "ds", user="ana")
    assert not (tmp_path / "ds").exists()
    final = protocol.format_answer_turn("The FFT shows a print grid.", "spoof")
    review(storage, failed, "spoof", corrected_answer=final)
    export_dataset(storage, tmp_path / "ds", user="ana")
    record = read_dataset(tmp_path / "ds").trajectories[0]
    assert _assistant_texts(record)[-1] == final and record.meta["corrected"]["replaced_turn"] is None
    assert (
        record.messages[-2]["role"] == "user" and record.messages[-2]["content"][0]["type"] == "image"
    )  # the FFT image, then the answer


@pytest.mark.parametrize(
    ("corrected", "message"),
    [
        (protocol.format_answer_turn("Print grid.", "spoof"), "says spoof but the analyst's verdict is real"),
        (protocol.format_tool_call_turn("Zoom.", protocol.ToolCall("ZoomInTool", {})), "not a tool call"),
        ("It is real, trust me", "does not follow the protocol"),
        ("Real", "bare verdict that differs"),  # no notes to explain it
    ],
)
def test_a_correction_that_cannot_be_trained_on_stops_the_export_before_anything_is_written(
    storage, face, tmp_path, corrected, message
):
    _, inv = run_case(storage, face, [fast("spoof", 0.9), answer("spoof", 0.9)])
    review(storage, inv, "real", corrected_answer=corrected)
    with pytest.raises(ExportError, match=message):
        export_dataset(storage, tmp_path / "ds", user="ana")
    assert not (tmp_path / "ds").exists()
    with storage.sessions() as s:
        assert s.scalar(select(func.count()).select_from(DatasetExport)) == 0


def test_an_export_never_overwrites_a_folder_and_nothing_is_recorded(storage, reviewed, tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not empty"):
        export_dataset(storage, tmp_path / "ds", user="ana")
    assert (tmp_path / "ds" / "notes.txt").read_text() == "keep me"
    with storage.sessions() as s:
        assert s.scalar(select(func.count()).select_from(DatasetExport)) == 0


def test_nothing_to_export_says_why(storage, face, tmp_path):
    with pytest.raises(ExportError, match="no reviewed investigations"):
        export_dataset(storage, tmp_path / "ds", user="ana")
    _, inv = run_case(storage, face, [fast("real", 0.1), answer("real", 0.1)])
    review(storage, inv, "unsure")
    with pytest.raises(ExportError, match="1 unsure"):
        export_dataset(storage, tmp_path / "ds", user="ana")


def test_a_tampered_evidence_file_stops_the_export_and_nothing_is_recorded(storage, reviewed, tmp_path):
    with storage.sessions() as s:
        sha = s.scalars(select(ToolResult.image_sha256)).first()
    path = storage.files.path(sha)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes() + b"edited")
    with pytest.raises(TamperedFileError, match="modified after it was stored"):
        export_dataset(storage, tmp_path / "ds", user="ana")
    assert not (tmp_path / "ds" / "manifest.json").exists()  # a half export is never taken for a dataset
    with pytest.raises(DatasetError, match="no manifest.json"):
        read_dataset(tmp_path / "ds")
    with storage.sessions() as s:
        assert s.scalar(select(func.count()).select_from(DatasetExport)) == 0

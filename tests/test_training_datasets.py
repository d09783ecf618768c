"""One loader for every source of training data (annotation folders, app exports, manifests through the
expert policy) and the three views the stages train on: KT pairs, FI trajectories, GRPO queries."""

from __future__ import annotations

import json

import pytest
import torch
from training_support import write_dataset

from core import protocol
from core.dataset import read_dataset
from training.datasets import (
    LABEL_REASONS,
    TrainingDataError,
    fi_check,
    fi_examples,
    grpo_queries,
    kt_examples,
    load_sources,
    to_hf_dataset,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("training_data")
    ann = write_dataset(root / "annotation", source="annotation", n=4)
    exp = write_dataset(root / "export", source="app-export", n=4, queries=False, wrong_final_every=2)
    return ann, exp


def test_annotation_and_export_folders_load_through_one_loader(folders, tmp_path):
    data = load_sources([str(f) for f in folders], build_dir=tmp_path)
    assert [d.manifest["source"] for d in data.datasets] == ["annotation", "app-export"]
    fp = data.fingerprints()
    assert fp[0]["source"] == "annotation" and len(fp[0]["manifest_sha256"]) == 64
    assert fp[1]["files"] == read_dataset(folders[1]).manifest["files"]


def test_kt_view_is_the_first_round_with_a_fast_answer(folders, tmp_path):
    data = load_sources([str(folders[0])], build_dir=tmp_path)
    rows = kt_examples(data)
    assert len(rows) == 4  # the queries hold the same crops as the trajectories: one example per face
    row = rows[0]
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert row["messages"][1]["content"] == [{"type": "image"}, {"type": "text", "text": protocol.FIRST_ROUND_QUERY}]
    fast = protocol.parse_fast_answer(row["messages"][2]["content"][0]["text"])
    assert fast.verdict == row["label"] and len(row["images"]) == 1
    assert data.stats["kt_from_trajectory"] == 4


def test_kt_answer_is_written_from_the_label_when_the_recorded_one_disagrees(tmp_path):
    from training_support import faces, scripted_trajectory

    from core.dataset import DatasetWriter

    ((face, label),) = faces(1)
    traj = scripted_trajectory(face, label, 0)
    with DatasetWriter(tmp_path / "ds", source="app-export", created_by="t") as w:
        w.add_trajectory(traj, id="t0", label="spoof")  # the analyst overturned a "real" fast answer
    rows = kt_examples(load_sources([str(tmp_path / "ds")], build_dir=tmp_path))
    assert rows[0]["messages"][2]["content"][0]["text"] == protocol.format_fast_answer("spoof", LABEL_REASONS["spoof"])


def test_fi_view_keeps_whole_trajectories_that_end_on_the_label(folders, tmp_path):
    data = load_sources([str(f) for f in folders], build_dir=tmp_path)
    rows = fi_examples(data)
    assert data.stats["fi_kept"] == 6 and data.stats["fi_dropped_final_answer_not_label"] == 2
    row = rows[0]
    roles = [m["role"] for m in row["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    # face image in turn 1, the tool image as a user turn after the tool call
    assert len(row["images"]) == 2 and row["messages"][5]["content"][0] == {"type": "image"}
    assert row["messages"][3]["content"] == [{"type": "text", "text": protocol.second_round_prompt()}]
    assert len(fi_examples(data, keep_mismatched=True)) == 8


def test_fi_check_refuses_malformed_and_refused_calls(folders):
    rec = read_dataset(folders[0]).trajectories[0]
    assert fi_check(rec) is None
    bad = json.loads(json.dumps(rec.__dict__))
    bad["messages"][4]["content"][0]["text"] = "no tags at all"
    from core.dataset import TrajectoryRecord

    assert fi_check(TrajectoryRecord(**bad)) == "malformed_turn"
    refused = json.loads(json.dumps(rec.__dict__))
    refused["messages"][5]["content"] = [{"type": "text", "text": protocol.error_feedback("unknown tool")}]
    assert fi_check(TrajectoryRecord(**refused)) == "refused_tool_call"


def test_a_folder_listed_twice_repeats_its_fi_trajectories_but_not_its_faces(folders, tmp_path):
    # How a recipe weighs one source more in FI (training.cli.nano_e2e lists NUAA twice): FI repeats the
    # trajectories, while KT and GRPO still take each distinct face once.
    once = load_sources([str(folders[0])], build_dir=tmp_path)
    twice = load_sources([str(folders[0]), str(folders[0])], build_dir=tmp_path)
    assert len(fi_examples(twice)) == 2 * len(fi_examples(once)) == 8
    assert len(kt_examples(twice)) == len(kt_examples(once)) == 4
    assert len(grpo_queries(twice)) == len(grpo_queries(once)) == 4


def test_grpo_view_is_query_label_pairs(folders, tmp_path):
    data = load_sources([str(f) for f in folders], build_dir=tmp_path)
    rows = grpo_queries(data)
    assert len(rows) == 8  # 4 query crops + 4 export crops (exports hold no queries here: taken from trajectories)
    assert rows[0]["prompt"][1]["content"][1]["text"] == protocol.FIRST_ROUND_QUERY
    assert {r["label"] for r in rows} == {"real", "spoof"}
    ds = to_hf_dataset([{"prompt": r["prompt"], "image": r["image"], "label": r["label"]} for r in rows])
    assert ds[0]["image"].size == (224, 224)


def test_manifest_is_built_with_the_expert_policy(tiny_manifest, tmp_path):
    data = load_sources([str(tiny_manifest)], build_dir=tmp_path, max_examples=6)
    ds = data.datasets[0]
    assert ds.manifest["source"] == "manifest-expert" and ds.manifest["counts"]["queries"] == 6
    assert ds.trajectories and all(r.label in ("real", "spoof") for r in ds.trajectories)
    # the expert policy's texts follow the protocol: every assistant turn parses
    rec = ds.trajectories[0]
    texts = [m["content"][0]["text"] for m in rec.messages if m["role"] == "assistant"]
    protocol.parse_fast_answer(texts[0])
    assert protocol.parse_reasoning_turn(texts[-1]).answer in ("real", "spoof")
    again = load_sources([str(tiny_manifest)], build_dir=tmp_path, max_examples=6)  # cached by its selection
    assert again.datasets[0].folder == ds.folder
    assert len(kt_examples(data)) == 6


def test_bad_sources_are_refused(tmp_path):
    with pytest.raises(TrainingDataError, match="no training data"):
        load_sources([], build_dir=tmp_path)
    with pytest.raises(TrainingDataError, match="neither a dataset folder"):
        load_sources([str(tmp_path / "missing")], build_dir=tmp_path)
    with pytest.raises(TrainingDataError, match="empty"):
        to_hf_dataset([])

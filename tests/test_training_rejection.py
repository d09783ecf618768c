"""Rejection sampling (`tarfas train rs`, training/rejection.py): which sampled investigations are kept, that
the kept ones are FI training data, which faces are sampled, and the command end to end on a nano model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from training_support import faces, nano_model, scripted_trajectory

from app.cli import main as cli_main
from core import protocol
from core.agent import AgentConfig, run
from core.dataset import DatasetWriter, read_dataset
from core.evaluation.manifest import read_manifest
from core.policies import ScriptedPolicy
from training.configs import RejectionSamplingConfig
from training.datasets import TrainingDataError, fi_check, fi_examples, load_sources
from training.rejection import keep_or_reject, rejection_reason, select_rows

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _rows(tiny_manifest, label):
    return [r for r in read_manifest(tiny_manifest) if r.label == label]


def test_a_valid_right_investigation_is_kept_a_wrong_one_only_with_keep_valid(tmp_path):
    (face, label), _ = faces(2)
    right = scripted_trajectory(face, label, 0)
    wrong = scripted_trajectory(face, label, 0, wrong_final=True)
    assert rejection_reason(right, label) is None
    assert rejection_reason(wrong, label) == "wrong_verdict"
    assert rejection_reason(wrong, label, keep="valid") is None


def test_a_malformed_investigation_is_rejected_with_its_protocol_error(face):
    replies = [protocol.format_fast_answer("spoof", "Flat."), "<think>a print", "<think>a print", "<think>a print"]
    traj = run(face, ScriptedPolicy(replies), AgentConfig())
    reason = rejection_reason(traj, "spoof", keep="valid")
    assert reason is not None and reason.startswith("format: turn 2")


def test_over_the_tool_limit_is_a_format_error(face):
    call = protocol.format_tool_call_turn("look", protocol.ToolCall("FFTTool", {}))
    replies = [protocol.format_fast_answer("spoof", "Flat."), call, call, protocol.format_answer_turn("ok", "spoof")]
    traj = run(face, ScriptedPolicy(replies), AgentConfig(max_tool_calls=2))
    assert rejection_reason(traj, "spoof", max_tool_calls=2) is None
    assert rejection_reason(traj, "spoof", max_tool_calls=1).startswith("format:")


def test_kept_investigations_are_fi_training_data_named_by_their_face(tmp_path, tiny_manifest):
    row_real, row_spoof = _rows(tiny_manifest, "real")[0], _rows(tiny_manifest, "spoof")[0]
    (f_real, _), (f_spoof, _) = faces(2)
    cfg = RejectionSamplingConfig(manifest=str(tiny_manifest), model="m", samples_per_face=2)
    with DatasetWriter(tmp_path / "rs", source="rejection-sampling", created_by="tests") as w:
        assert keep_or_reject(w, scripted_trajectory(f_real, "real", 0), row_real, 0, cfg) is None
        assert keep_or_reject(w, scripted_trajectory(f_real, "real", 1), row_real, 1, cfg) is None
        assert keep_or_reject(w, scripted_trajectory(f_spoof, "spoof", 2, wrong_final=True), row_spoof, 0, cfg) == (
            "wrong_verdict"
        )
    records = read_dataset(tmp_path / "rs").trajectories
    assert [r.id for r in records] == [f"{row_real.rel_path}#0", f"{row_real.rel_path}#1"]
    assert all(r.label == "real" and r.meta["domain"] == row_real.domain for r in records)
    assert all(fi_check(r) is None for r in records)
    examples = fi_examples(load_sources([str(tmp_path / "rs")], build_dir=tmp_path / "build"))
    assert len(examples) == 2 and all(ex["images"] and ex["source"] == "rejection-sampling" for ex in examples)


def test_faces_already_in_a_folder_are_skipped_limit_is_a_seeded_sample_and_shards_split_it(tmp_path, tiny_manifest):
    rows = read_manifest(tiny_manifest)
    (face, _), _ = faces(2)
    with DatasetWriter(tmp_path / "ann", source="annotation", created_by="tests") as w:  # annotation's naming
        for r in rows[:5]:
            w.add_trajectory(scripted_trajectory(face, r.label, 0), id=r.rel_path, label=r.label)
    cfg = RejectionSamplingConfig(manifest=str(tiny_manifest), model="m", exclude=[str(tmp_path / "ann")])
    left = select_rows(cfg)
    assert {r.rel_path for r in left} == {r.rel_path for r in rows[5:]}
    a = select_rows(RejectionSamplingConfig(manifest=str(tiny_manifest), model="m", limit=4, seed=3))
    b = select_rows(RejectionSamplingConfig(manifest=str(tiny_manifest), model="m", limit=4, seed=3))
    assert len(a) == 4 and [r.rel_path for r in a] == [r.rel_path for r in b]
    shards = [select_rows(RejectionSamplingConfig(manifest=str(tiny_manifest), model="m", limit=9, seed=3,
                                                  num_shards=2, shard=k)) for k in (0, 1)]  # fmt: skip
    whole = select_rows(RejectionSamplingConfig(manifest=str(tiny_manifest), model="m", limit=9, seed=3))
    assert [len(s) for s in shards] == [5, 4]
    assert sorted(r.rel_path for s in shards for r in s) == sorted(r.rel_path for r in whole)
    with pytest.raises(TrainingDataError, match="no faces left"):
        select_rows(RejectionSamplingConfig(manifest=str(tiny_manifest), model="m", domains=["elsewhere"]))


def test_config_refuses_greedy_and_empty_settings():
    with pytest.raises(ValueError, match="temperature"):
        RejectionSamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="samples_per_face"):
        RejectionSamplingConfig(samples_per_face=0)
    with pytest.raises(ValueError, match="limit"):
        RejectionSamplingConfig(limit=0)
    with pytest.raises(ValueError, match="shard"):
        RejectionSamplingConfig(num_shards=2, shard=2)


def test_train_rs_samples_every_face_through_the_agent_loop_and_counts_what_it_kept(
    tmp_path, tmp_path_factory, tiny_manifest, capsys
):
    model = nano_model(tmp_path_factory)
    out = tmp_path / "rs"
    argv = ["train", "rs", "--model", str(model), "--manifest", str(tiny_manifest), "--domains", "synthetic-a",
            "--limit", "3", "--samples-per-face", "2", "--max-new-tokens", "12", "--batch-size", "4", "--out", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    ds = read_dataset(out)
    stats = ds.manifest["extra"]["stats"]
    assert ds.manifest["source"] == "rejection-sampling" and stats["faces"] == 3 and stats["sampled"] == 6
    assert stats["kept"] + stats["format"] + stats["wrong_verdict"] == 6 and len(ds.trajectories) == stats["kept"]
    assert stats["kept_real"] + stats["kept_spoof"] == stats["kept"]
    assert ds.manifest["extra"]["config"]["model"] == str(model)
    printed = capsys.readouterr().out
    assert json.loads(printed.split("[rs] ")[1].splitlines()[0])["sampled"] == 6
    # an untrained model's turns are malformed: the reasons are the protocol's errors
    assert sum(ds.manifest["extra"]["format_errors"].values()) == stats["format"]
    # a finished folder is not overwritten; the CLI says why in one line
    assert cli_main(argv) != 0
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["train", "rs", "--manifest", str(tiny_manifest), "--out", str(tmp_path / "x")]) != 0
    assert "--model is required" in capsys.readouterr().err

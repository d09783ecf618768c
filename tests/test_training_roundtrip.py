"""The corrections loop closes: reviewed investigations -> the app's export -> `tarfas train sft/grpo --data
EXPORT_DIR` -> an adapter / model that the hf policy loads, with the export's hash in its lineage."""

from __future__ import annotations

import os

import torch
from workbench_support import answer, fast, review, run_case, tool

from app.cli import main
from app.export import export_dataset
from core import protocol
from core.agent import AgentConfig, run
from core.policies import load_policy
from training.lineage import read_lineage

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def test_export_train_and_load_as_policy(storage, face, tmp_path_factory, tmp_path):
    from training_support import nano_model

    nano = nano_model(tmp_path_factory)
    _, spoof = run_case(
        storage,
        face,
        [fast("spoof", 0.9), tool("FFTTool", "Look for moire."), answer("spoof", 0.9)],
        attack_type="print",
    )
    _, overturned = run_case(storage, face, [fast("spoof", 0.8), tool("LBPTool"), answer("spoof", 0.7)])
    review(storage, spoof, "spoof")
    review(
        storage,
        overturned,
        "real",
        corrected_answer=protocol.format_answer_turn("The LBP map shows natural skin.", "real"),
    )
    export = export_dataset(storage, tmp_path / "export", user="ana")
    assert export.exported == 2

    common = ["--data", str(export.folder), "--threads", "1", "--save-steps", "0", "--per-device-train-batch-size", "2"]
    assert (
        main(
            [
                "train",
                "sft",
                "--stage",
                "fi",
                "--model",
                str(nano),
                "--out",
                str(tmp_path / "fi"),
                "--max-steps",
                "2",
                *common,
            ]
        )
        == 0
    )
    adapter = tmp_path / "fi" / "adapter"
    lin = read_lineage(adapter)
    assert lin["data"][0]["source"] == "app-export"
    assert lin["data"][0]["manifest_sha256"] == export.manifest_sha256  # the exact export it learned from
    assert lin["data_stats"]["fi_kept"] == 2  # the analyst's correction made the overturned run usable

    # The new adapter is selectable as the policy (what the app's model picker and `--policy hf` load).
    policy = load_policy("hf", model=str(nano), adapter=str(adapter), max_new_tokens=4)
    assert str(adapter) in policy.description
    # ... and shows the analyst what it learned from: the stage and the exact export (manifest hash).
    assert "stage fi" in policy.description and export.manifest_sha256[:12] in policy.description
    traj = run(face, policy, AgentConfig(max_tool_calls=1, max_format_errors=0))
    assert traj.policy == "hf" and traj.turns  # an untrained nano model: its text need not parse

    assert main(["train", "grpo", "--model", str(nano), "--adapter", str(adapter), "--use-lora", "--out", str(tmp_path / "rl"),
                 "--num-generations", "2", "--max-steps", "1", "--max-new-tokens", "8", "--max-completion-length", "200", *common]) == 0  # fmt: skip
    rl = read_lineage(tmp_path / "rl" / "adapter")
    assert rl["stage"] == "grpo" and rl["parent_adapter"]["lineage"]["stage"] == "fi"
    assert rl["data"][0]["manifest_sha256"] == export.manifest_sha256

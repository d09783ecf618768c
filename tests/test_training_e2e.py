"""The CPU end-to-end run, shortened: nano model -> KT -> FI -> DT-GRPO -> `tarfas eval` on a few fas-dev
images, every step through the real `tarfas` commands (training/cli/nano_e2e.py). Skipped without fas-dev."""

from __future__ import annotations

import math
import os

import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def test_nano_pipeline_runs_end_to_end_on_fas_dev(fasdev, tmp_path):
    from training.cli.nano_e2e import pipeline
    from training.lineage import read_lineage

    summary = pipeline(tmp_path, fasdev / "manifest.csv", quick=True)
    kt, fi, rl = (
        read_lineage(tmp_path / "kt" / "model"),
        read_lineage(tmp_path / "fi" / "model"),
        read_lineage(tmp_path / "grpo" / "model"),
    )
    assert (kt["stage"], fi["stage"], rl["stage"]) == ("kt", "fi", "grpo")
    assert (
        kt["data"][0]["source"] == "manifest-expert"
        and fi["data"][0]["manifest_sha256"] == kt["data"][0]["manifest_sha256"]
    )
    assert fi["result"]["log"][-1]["loss"] < fi["result"]["log"][0]["loss"] or len(fi["result"]["log"]) == 1
    assert all(math.isfinite(h["loss"]) for h in kt["result"]["log"] + fi["result"]["log"] + rl["result"]["log"])
    assert "rewards/r_rsn/mean" in rl["result"]["log"][0] and "accuracy/final" in rl["result"]["log"][0]
    ev = summary["eval"]["kt+fi+dt-grpo"]
    assert ev["policy"] == "hf" and ev["metrics"]["pooled"]["n"] + ev["metrics"]["pooled"]["no_verdict"] == 4

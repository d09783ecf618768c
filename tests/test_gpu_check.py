"""scripts/gpu-check.sh with CUDA hidden: the nano parts run on the CPU and report their figures, the 7B parts
say they were skipped for want of CUDA, and the last line of stdout is the one JSON object."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_without_cuda_runs_the_nano_parts_and_skips_the_7b(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--out", str(tmp_path / "work"), "--threads", "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["device"] == "cpu" and report["cuda"] is None and report["ok"] is True
    for name in ("qwen7b_build", "qwen7b_policy", "qwen7b_eval", "qwen7b_train"):
        assert report[name] == {"skipped": "no CUDA"}
    assert report["nano"]["archs"] == ["internvl", "qwen2_5_vl"]
    policy = report["nano_policy"]
    assert policy["turns"] == 4 and policy["status"] == "completed" and policy["verdict"] == "spoof"
    assert policy["tokens_per_s"] > 0 and policy["new_tokens"] > 50 and policy["score_pass"] == "generation"
    train = report["nano_train"]
    assert math.isfinite(train["kt"]["loss"]) and math.isfinite(train["fi"]["loss"])
    assert train["grpo"]["reward"] is not None and all(train[s]["seconds"] > 0 for s in ("kt", "fi", "grpo"))
    ev = report["nano_eval"]
    assert ev["concurrency"] == 4 and ev["mean_batch"] > 1 and ev["ratio"] > 0
    assert (tmp_path / "work" / "nano_train" / "kt" / "adapter").is_dir()  # real training runs wrote their output


def test_gpu_check_refuses_unknown_options():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--bogus" in proc.stderr

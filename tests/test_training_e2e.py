"""The CPU end-to-end run, shortened (training/cli/nano_e2e.py --quick): nano model -> `tarfas annotate` ->
KT -> FI -> rejection sampling -> DT-GRPO -> both models investigate held-out NUAA test images through the
agent loop, every training step through the real `tarfas` commands. Skipped without fas-dev. The full run (micro model) and
its figures are in docs/training.md."""

from __future__ import annotations

import json
import math
import os

import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def test_pipeline_runs_end_to_end_on_fas_dev_and_prints_its_figures_last(fasdev, tmp_path, capsys):
    from training.cli.nano_e2e import main
    from training.lineage import read_lineage

    assert main(["--out", str(tmp_path), "--manifest", str(fasdev / "manifest.csv"), "--quick"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kt, fi, rl = (read_lineage(tmp_path / s / "model") for s in ("kt", "fi", "grpo"))
    assert (kt["stage"], fi["stage"], rl["stage"]) == ("kt", "fi", "grpo")
    # the training data is the annotation pipeline's output, the same folder for every stage
    assert (
        kt["data"][0]["source"] == "annotation" and fi["data"][0]["manifest_sha256"] == kt["data"][0]["manifest_sha256"]
    )
    assert [d["manifest_sha256"] for d in fi["data"]] == [fi["data"][0]["manifest_sha256"]] * 2  # NUAA listed twice
    # annotation allows the agent loop's 3 tool calls (not more), so FI teaches the limit inference has
    from core.dataset import read_dataset

    records = read_dataset(tmp_path / "ann-nuaa").trajectories
    assert records and all(r.meta["trajectory"]["params"]["max_tool_calls"] == 3 for r in records)
    # rejection sampling: the FI model investigated NUAA train faces (two shards of two); GRPO starts from
    # the model fine-tuned on what it kept, or from FI's when it kept nothing
    shards = [read_dataset(tmp_path / f"rs1-{k}") for k in range(2)]
    stats = [ds.manifest["extra"]["stats"] for ds in shards]
    assert all(ds.manifest["source"] == "rejection-sampling" for ds in shards)
    assert [s["sampled"] for s in stats] == [2, 2] and [len(ds.trajectories) for ds in shards] == [
        s["kept"] for s in stats
    ]
    kept = sum(s["kept"] for s in stats)
    sft = tmp_path / ("rs1" if kept else "fi") / "model"
    assert rl["base_model"]["path"] == str(sft.resolve())
    assert all(math.isfinite(h["loss"]) for h in kt["result"]["log"] + fi["result"]["log"] + rl["result"]["log"])
    assert "rewards/r_rsn/mean" in rl["result"]["log"][0] and "accuracy/final" in rl["result"]["log"][0]
    # GRPO's queries: faces of fas-dev's other cameras, kept when the SFT model's fast answer is unsure
    sel = rl["data_stats"]["query_selection"]
    assert sel["candidates"] == 4 and sel["band"] == 0.01 and line["grpo_queries_kept"] == f"{sel['kept']}/4"
    assert rl["config"]["domains"] == ["apfol", "rienheuver"] and rl["config"]["select_band"] == 0.01
    # ... and the investigations the SFT model last learnt from are replayed beside (their FI loss joins GRPO's):
    # what rejection sampling kept, or the annotations when it kept nothing
    replayed = [str(tmp_path / f"rs1-{k}") for k in range(2) if stats[k]["kept"]] or [str(tmp_path / "ann-nuaa")]
    assert rl["config"]["replay_data"] == replayed and rl["config"]["replay_coef"] == 1.0
    assert all(h["replay/nll"] > 0 for h in rl["result"]["log"])
    for key in ("sampled_format_ok", "auc_fi", "auc_grpo", "acc_fi", "acc_grpo", "grpo_reward_first",
                "grpo_reward_last", "grpo_steps", "seconds", "delta_acc_ci95", "delta_auc_ci95", "dev_reward_fi",
                "dev_reward_grpo", "delta_dev_reward_ci95", "rs_kept"):  # fmt: skip
        assert key in line, key
    # the dev reward is DT-GRPO's reward of the sampled investigations: within its range [-1.1, 1.5]
    assert -1.1 <= line["dev_reward_fi"] <= 1.5 and len(line["delta_dev_reward_ci95"]) == 2
    assert line["grpo_steps"] == 1 and line["n_eval"] == 4 and 0.0 <= line["sampled_format_ok"] <= 1.0
    assert line["model"] == "nano" and line["seconds"] > 0 and line["rs_kept"] == [f"{kept}/4"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["line"] == line and set(summary["eval"]) == {
        "fi/greedy",
        "fi/sampled",
        "grpo/greedy",
        "grpo/sampled",
    }

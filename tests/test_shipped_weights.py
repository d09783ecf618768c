"""The shipped expert weights (assets/experts): they load offline, carry their recipe, data digests, LODO
results and threshold, drive a full investigation, call the demo samples right, and score the training
data the way training did (same face crops, same preprocessing)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from core import agent, faces, protocol
from core.evaluation.manifest import read_manifest
from core.experts import DEFAULT_DIR, EXPERT_TOOLS, RGB, ZOOM, ExpertBank
from core.policies import load_policy
from core.registry import ToolRegistry
from core.samples import SAMPLES

pytestmark = pytest.mark.skipif(
    not (DEFAULT_DIR / "experts.json").exists(), reason="no shipped weights in assets/experts"
)
META = json.loads((DEFAULT_DIR / "experts.json").read_text()) if (DEFAULT_DIR / "experts.json").exists() else {}


def test_shipped_bank_loads_with_recipe_threshold_and_every_network():
    bank = ExpertBank.load()
    assert set(bank.nets) == {RGB, *EXPERT_TOOLS}
    assert bank.specs[RGB].kind == "probe"
    assert [t.arch for t in bank.nets[RGB].trunks] == ["mobilenet_v2", "efficientnet_lite0", "colour_lbp"]
    assert len(META["recipe"]["manifests"]) == 2 and len(META["data"]["domains"]) == 10
    assert META["data"]["images"] > 8000 and len(META["data"]["digest"]) == 16
    assert 0.0 < META["policy"]["threshold"] < 1.0
    size = sum(p.stat().st_size for p in DEFAULT_DIR.glob("*.safetensors"))
    assert size <= 20e6, "shipped weights must stay under 20 MB"


def test_the_lodo_table_is_what_the_stored_out_of_fold_logits_give():
    """experts.json's leave-one-domain-out table is reproduced from lodo_logits.csv (the README's table
    comes from experts.json)."""
    from training.experts import lodo_table, read_lodo_logits

    _, domain, y, raw = read_lodo_logits(DEFAULT_DIR / "lodo_logits.csv")
    folds = [r["domain"] for r in META["lodo"]["domains"]]
    again = lodo_table(raw, y, domain, folds, META["policy"]["max_tool_calls"])
    for a, b in zip(again["domains"], META["lodo"]["domains"]):
        assert a["domain"] == b["domain"] and a["n"] == b["n"]
        for k in ("auc", "eer", "hter", "apcer", "bpcer", "threshold"):
            assert a[k] == pytest.approx(b[k], abs=1e-9), (a["domain"], k)


@pytest.mark.parametrize("name", list(SAMPLES))
def test_default_policy_calls_the_demo_samples_right(name):
    path = DEFAULT_DIR.parent / "samples" / name
    policy = load_policy("expert")
    traj = agent.run(faces.prepare_face(faces.load_image(path)), policy, registry=ToolRegistry(readers=policy.bank))
    assert traj.status == "completed" and traj.final.source == "answer"
    assert 1 <= traj.tool_calls_used <= 3
    for t in traj.turns:
        (protocol.parse_fast_answer if t.kind == "fast" else protocol.parse_reasoning_turn)(t.text)
    assert (traj.final.verdict == "spoof") == (traj.final.score_spoof >= policy.threshold)
    expected = "real" if "live" in name else "spoof"
    assert traj.final.verdict == expected, (
        f"{name}: P(spoof) {traj.final.score_spoof:.3f}, threshold {policy.threshold:.3f}"
    )


@pytest.mark.data
def test_training_images_are_scored_as_training_saw_them(fasdev):
    """A seeded sample of the (trained-on) data: the shipped networks separate it, so the inference path
    (YuNet crop, resizing, normalisation) is the one the networks were trained with."""
    from sklearn.metrics import roc_auc_score

    manifests = [fasdev / "manifest.csv", fasdev.parent / "fas-train" / "manifest.csv"]
    rows = [r for m in manifests if m.exists() for r in read_manifest(m)]
    rows = random.Random(0).sample(rows, 80)
    bank = ExpertBank.load()
    crops = [faces.prepare_face(faces.load_image(r.path), on_no_face="whole").crop for r in rows]
    raw = bank.raw_logits(RGB, crops)
    y = [r.y for r in rows]
    assert np.isfinite(raw).all() and len(set(raw.tolist())) == len(raw)  # scores rank: no ties
    assert roc_auc_score(y, raw) > 0.9
    assert set(bank.calibration) == {RGB, *EXPERT_TOOLS, ZOOM}

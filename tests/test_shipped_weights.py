"""The shipped expert weights (assets/experts): they load offline, carry their recipe and threshold,
drive a full investigation, and keep the cross-domain quality measured when they were trained."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from core import agent, faces, protocol
from core.experts import DEFAULT_DIR, EXPERT_TOOLS, RGB, ExpertBank
from core.manifest import read_manifest, select
from core.policies import load_policy
from core.samples import SAMPLES

pytestmark = pytest.mark.skipif(not (DEFAULT_DIR / "experts.json").exists(), reason="no shipped weights in assets/experts")


def test_shipped_bank_loads_with_recipe_threshold_and_every_network():
    bank = ExpertBank.load()
    assert set(bank.nets) == {RGB, *EXPERT_TOOLS}
    meta = json.loads((DEFAULT_DIR / "experts.json").read_text())
    assert meta["recipe"]["train_domains"] and meta["data"]["train_digest"]
    assert 0.0 < meta["policy"]["threshold"] < 1.0
    assert "dev" in meta["policy"]
    size = sum(p.stat().st_size for p in DEFAULT_DIR.glob("*.safetensors"))
    assert size < 5 * 2**20, "shipped weights must stay small"


@pytest.mark.parametrize("name", list(SAMPLES))
def test_default_policy_investigates_the_demo_samples(name, tmp_path):
    path = DEFAULT_DIR.parent / "samples" / name
    policy = load_policy("expert")
    traj = agent.run(faces.prepare_face(faces.load_image(path)), policy, experts=policy.bank)
    assert traj.status == "completed" and traj.final.source == "answer"
    assert 1 <= traj.tool_calls_used <= 3
    for t in traj.turns:
        (protocol.parse_fast_answer if t.kind == "fast" else protocol.parse_reasoning_turn)(t.text)
    assert (traj.final.verdict == "spoof") == (traj.final.score_spoof >= policy.threshold)


@pytest.mark.data
def test_cross_session_quality_on_nuaa_test_is_kept(fasdev):
    """Measured for the shipped weights: AUC 0.941 on all 2,266 nuaa-test images (unseen session).
    A 120-image seeded sample must stay well above chance."""
    from sklearn.metrics import roc_auc_score

    rows = select(read_manifest(fasdev / "manifest.csv"), ["nuaa"], "test")
    rows = random.Random(0).sample(rows, 120)
    policy = load_policy("expert")
    scores, labels = [], []
    for r in rows:
        face = faces.prepare_face(faces.load_image(r.path), on_no_face="whole")
        scores.append(agent.run(face, policy, experts=policy.bank).final.score_spoof)
        labels.append(r.y)
    assert np.isfinite(scores).all()
    assert roc_auc_score(labels, scores) > 0.8

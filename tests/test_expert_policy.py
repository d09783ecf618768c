"""The expert bank (weights on disk) and the offline expert policy, with a really trained tiny bank."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from core import protocol
from core.agent import AgentConfig, run
from core.errors import WeightsError
from core.evidence import EvidenceModel, expected_gain
from core.experts import EXPERT_TOOLS, RGB, ExpertBank
from core.policies import load_policy
from core.policies.expert import ExpertPolicy
from core.registry import TOOL_NAMES, ToolRegistry
from training.experts import score_crop


@pytest.fixture(scope="module")
def policy(tiny_weights) -> ExpertPolicy:
    return ExpertPolicy.load(tiny_weights)


@pytest.fixture
def weights_copy(tiny_weights, tmp_path):
    dst = tmp_path / "w"
    shutil.copytree(tiny_weights, dst)
    return dst


def _inputs(crop: np.ndarray) -> dict[str, np.ndarray]:
    reg = ToolRegistry()
    out = {RGB: crop}
    for name in EXPERT_TOOLS:
        out[name] = reg.execute(name, {}, crop).output.image
    return out


# --- ExpertBank on disk ---------------------------------------------------------------------------
def test_bank_has_rgb_and_one_expert_per_non_zoom_tool(tiny_weights):
    bank = ExpertBank.load(tiny_weights)
    assert set(bank.nets) == {RGB, *EXPERT_TOOLS}
    assert "ZoomInTool" not in bank.nets and set(EXPERT_TOOLS) == set(TOOL_NAMES) - {"ZoomInTool"}
    assert set(bank.calibration) == set(bank.nets) | {"ZoomInTool"}  # the zoomed view has its own calibration
    assert all(not net.training for net in bank.nets.values())  # loaded in eval mode
    assert len(bank.version) == 12 and int(bank.version, 16) >= 0


def test_bank_save_load_round_trip(tiny_weights, tmp_path, crop):
    bank = ExpertBank.load(tiny_weights)
    again = ExpertBank.load(tiny_weights)
    assert again.version == bank.version  # stable across loads

    bank.save(tmp_path / "copy")
    copy = ExpertBank.load(tmp_path / "copy")
    assert copy.version == bank.version  # same tensors -> same bytes -> same hash
    assert copy.calibration == bank.calibration
    assert copy.meta["policy"] == bank.meta["policy"]
    for key, image in _inputs(crop).items():
        p1, p2 = bank.p_spoof(key, image), copy.p_spoof(key, image)
        assert 0.0 <= p1 <= 1.0
        assert p1 == p2, key
        assert bank.logit(key, image) == copy.logit(key, image)
    assert bank.p_spoof("ZoomInTool", crop) is None  # no tool expert reads zoom images ...
    # ... the policy's ZoomIn evidence is the RGB network on the region, under the zoom view's calibration
    raw = bank.raw_logits(RGB, [crop])[0]
    assert bank.logit("ZoomInTool", crop) == pytest.approx(
        bank.calibration["ZoomInTool"].a * raw + bank.calibration["ZoomInTool"].b
    )
    with pytest.raises(KeyError):
        bank.logit("NoSuchTool", crop)


def test_changed_weights_change_the_version(weights_copy, tiny_weights):
    import torch

    bank = ExpertBank.load(weights_copy)
    with torch.no_grad():
        next(bank.nets["HOGTool"].parameters()).add_(0.01)
    bank.save(weights_copy)
    assert ExpertBank.load(weights_copy).version != ExpertBank.load(tiny_weights).version


def test_missing_experts_json(tmp_path):
    with pytest.raises(WeightsError, match="experts.json") as exc:
        ExpertBank.load(tmp_path)
    assert str(tmp_path) in str(exc.value)
    assert "tarfas train experts" in str(exc.value)  # says how to get weights
    with pytest.raises(WeightsError):
        ExpertPolicy.load(tmp_path / "does-not-exist")


def test_missing_weights_file(weights_copy):
    (weights_copy / "lbptool.safetensors").unlink()
    with pytest.raises(WeightsError, match="lbptool.safetensors"):
        ExpertBank.load(weights_copy)


def test_mismatched_weights_file(weights_copy):
    # The FFT expert's tensors (1 input channel, 4x4 pooling) in the RGB network's file.
    shutil.copy(weights_copy / "ffttool.safetensors", weights_copy / "rgb.safetensors")
    with pytest.raises(WeightsError, match="does not match the RGB network"):
        ExpertBank.load(weights_copy)


def test_mismatched_architecture_in_json(weights_copy):
    meta = json.loads((weights_copy / "experts.json").read_text())
    meta["networks"]["HOGTool"]["arch"]["options"]["hidden"] = 32
    (weights_copy / "experts.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="HOGTool"):
        ExpertBank.load(weights_copy)


def test_corrupted_weights_file(weights_copy):
    (weights_copy / "rgb.safetensors").write_bytes(b"this is not a safetensors file" * 4)
    with pytest.raises(WeightsError, match="rgb.safetensors"):
        ExpertBank.load(weights_copy)


def test_truncated_weights_file(weights_copy):
    path = weights_copy / "wavelettransformtool.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="wavelettransformtool.safetensors"):
        ExpertBank.load(weights_copy)


def test_corrupted_experts_json(weights_copy):
    (weights_copy / "experts.json").write_text('{"networks": ')
    with pytest.raises(WeightsError, match="experts.json"):
        ExpertBank.load(weights_copy)


# --- ExpertPolicy through the agent loop ---------------------------------------------------------
def _check_trajectory(traj, policy, max_tool_calls, allowed=None):
    assert traj.status == "completed", traj.error
    assert traj.error is None
    assert traj.policy == "expert" and traj.policy_version == policy.version
    fast, rest = traj.turns[0], traj.turns[1:]
    assert fast.kind == "fast"
    parsed_fast = protocol.parse_fast_answer(fast.text)
    assert 0.0 <= fast.score_spoof <= 1.0
    assert parsed_fast.verdict == ("spoof" if fast.score_spoof >= policy.threshold else "real")
    for t in rest:
        assert t.kind == "reasoning"
        assert t.parse_error is None and t.tool_error is None, t.text
        parsed = protocol.parse_reasoning_turn(t.text)
        assert parsed.think
        assert (parsed.tool_call is None) != (parsed.answer is None)
    # tools: every non-final turn calls one, the last one answers
    assert all(t.tool_call is not None and t.tool_result is not None for t in rest[:-1])
    assert rest[-1].answer is not None and rest[-1].tool_call is None
    names = [t.tool_result.name for t in traj.tool_turns]
    assert len(names) == len(set(names)), f"repeated tool: {names}"
    assert min(1, max_tool_calls) <= len(names) <= max_tool_calls
    assert set(names) <= set(allowed or TOOL_NAMES)
    for t in traj.tool_turns:
        r = t.tool_result
        if r.name == "ZoomInTool":
            assert r.expert_p_spoof is None
        else:
            assert r.expert_p_spoof is not None and 0.0 <= r.expert_p_spoof <= 1.0, r
        assert r.image is not None
    # final answer
    final = traj.final
    assert final.source == "answer"
    assert 0.0 <= final.score_spoof <= 1.0
    assert final.score_spoof == rest[-1].score_spoof
    assert final.verdict == rest[-1].answer
    assert (final.verdict == "spoof") == (final.score_spoof >= policy.threshold)
    return names


@pytest.mark.parametrize("max_tool_calls", [1, 2, 3, 6])
def test_policy_investigation_follows_the_protocol(policy, face, max_tool_calls):
    traj = run(face, policy, AgentConfig(max_tool_calls=max_tool_calls), registry=ToolRegistry(readers=policy.bank))
    _check_trajectory(traj, policy, max_tool_calls)


def test_zero_tool_calls_answers_directly(policy, face):
    traj = run(face, policy, AgentConfig(max_tool_calls=0), registry=ToolRegistry(readers=policy.bank))
    assert traj.status == "completed" and traj.error is None
    assert traj.tool_calls_used == 0
    assert [t.kind for t in traj.turns] == ["fast", "reasoning"]
    assert traj.turns[1].answer in ("real", "spoof") and traj.turns[1].parse_error is None
    assert traj.final.source == "answer"
    # with no tools the only evidence is the RGB network: the final score is the fast answer's
    assert traj.final.score_spoof == pytest.approx(traj.fast_score, abs=1e-9)
    assert (traj.final.verdict == "spoof") == (traj.final.score_spoof >= policy.threshold)


def test_allowed_tools_subset_is_respected(policy, face):
    allowed = ["FFTTool", "LBPTool"]
    traj = run(
        face, policy, AgentConfig(max_tool_calls=3, allowed_tools=allowed), registry=ToolRegistry(readers=policy.bank)
    )
    names = _check_trajectory(traj, policy, 2, allowed)
    assert traj.tools == allowed
    assert len(names) >= 1


def test_only_zoom_allowed(policy, face):
    traj = run(
        face,
        policy,
        AgentConfig(max_tool_calls=3, allowed_tools=["ZoomInTool"]),
        registry=ToolRegistry(readers=policy.bank),
    )
    names = _check_trajectory(traj, policy, 1, ["ZoomInTool"])
    assert names == ["ZoomInTool"]
    assert traj.tool_turns[0].tool_result.arguments == {"bbox": policy.zoom_box}


def test_score_does_not_depend_on_tool_annotation(policy, face):
    """Without ``experts`` the loop leaves expert_p_spoof empty and the policy runs the experts itself."""
    with_bank = run(face, policy, AgentConfig(), registry=ToolRegistry(readers=policy.bank))
    without = run(face, policy, AgentConfig(), registry=ToolRegistry())
    assert [t.tool_result.name for t in without.tool_turns] == [t.tool_result.name for t in with_bank.tool_turns]
    assert all(t.tool_result.expert_p_spoof is None for t in without.tool_turns)
    assert without.final.score_spoof == pytest.approx(with_bank.final.score_spoof, abs=1e-6)


def test_policy_is_deterministic(tiny_weights, face):
    a = ExpertPolicy.load(tiny_weights)
    b = ExpertPolicy.load(tiny_weights)
    t1 = run(face, a, AgentConfig(), registry=ToolRegistry(readers=a.bank))
    t2 = run(
        face, a, AgentConfig(), registry=ToolRegistry(readers=a.bank)
    )  # same policy object (its cache is per trajectory)
    t3 = run(face, b, AgentConfig(), registry=ToolRegistry(readers=b.bank))
    texts = [t.text for t in t1.turns]
    assert [t.text for t in t2.turns] == texts
    assert [t.text for t in t3.turns] == texts
    assert t1.final.score_spoof == t2.final.score_spoof == t3.final.score_spoof
    assert t1.final.verdict == t2.final.verdict == t3.final.verdict


def test_policy_says_what_it_is(policy):
    d = policy.description.lower()
    assert "expert ensemble" in d
    assert "no language model" in d
    assert policy.name == "expert"
    assert policy.version == policy.bank.version


def test_threshold_shipped_with_the_weights(tiny_weights):
    meta = json.loads((tiny_weights / "experts.json").read_text())
    shipped = meta["policy"]["threshold"]
    assert 0.0 <= shipped <= 1.0
    assert ExpertPolicy.load(tiny_weights).threshold == shipped
    assert load_policy("expert", weights=tiny_weights).threshold == shipped
    assert ExpertPolicy.load(tiny_weights, threshold=0.25).threshold == 0.25
    assert ExpertPolicy.load(tiny_weights, threshold=0.0).threshold == 0.0  # 0 is a threshold, not "unset"


def test_threshold_decides_the_verdict(tiny_weights, face):
    low = ExpertPolicy.load(tiny_weights, threshold=0.0)
    high = ExpertPolicy.load(tiny_weights, threshold=1.0 + 1e-9)
    t_low = run(face, low, AgentConfig(), registry=ToolRegistry(readers=low.bank))
    t_high = run(face, high, AgentConfig(), registry=ToolRegistry(readers=high.bank))
    assert t_low.final.verdict == "spoof" and t_low.fast_answer.verdict == "spoof"
    assert t_high.final.verdict == "real" and t_high.fast_answer.verdict == "real"


def test_score_crop(policy, crop, face):
    s = score_crop(policy, crop)
    assert 0.0 <= s <= 1.0
    assert s == pytest.approx(
        run(face, policy, AgentConfig(), registry=ToolRegistry(readers=policy.bank)).final.score_spoof, abs=1e-9
    )


# --- tool choice ----------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_expected_gain_of_an_uninformative_expert_is_zero(p):
    assert expected_gain(p, (0.5, 0.5), (1.2, 1.2)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_expected_gain_grows_with_separation(p):
    gains = [expected_gain(p, (-d, d), (1.0, 1.0)) for d in (0.25, 1.0, 2.0, 4.0)]
    assert gains[0] > 0
    assert gains == sorted(gains) and len(set(gains)) == len(gains)
    # never more than what is still unknown about the class
    h = -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    assert all(g <= h + 1e-9 for g in gains)
    # well separated classes: almost all of it is learned
    assert gains[-1] == pytest.approx(h, rel=0.02)
    # a noisier expert with the same means tells less
    assert expected_gain(p, (-1, 1), (3.0, 3.0)) < gains[1]


def test_expected_gain_is_zero_when_already_certain():
    mu, sd = (-2, 2), (1, 1)
    assert expected_gain(1e-12, mu, sd) == pytest.approx(0.0, abs=1e-6)
    assert expected_gain(0.5, mu, sd) > expected_gain(0.95, mu, sd) > expected_gain(0.999, mu, sd)


# --- conditioning on the evidence seen so far -----------------------------------------------------
def _model(rho: float) -> "EvidenceModel":
    """Two evidence keys A and B, equally informative alone, correlated rho within each class."""
    cov = [[1.0, rho], [rho, 1.0]]
    return EvidenceModel({"keys": ["A", "B"], "mean": [[-2.0, -2.0], [2.0, 2.0]], "cov": [cov, cov]})


def test_a_tool_that_repeats_known_evidence_is_worth_less():
    p = 0.5
    alone = expected_gain(p, *_model(0.9).predictive("B", {}))
    after_a_redundant = expected_gain(p, *_model(0.9).predictive("B", {"A": 0.0}))
    after_a_independent = expected_gain(p, *_model(0.0).predictive("B", {"A": 0.0}))
    assert after_a_redundant < after_a_independent == pytest.approx(alone)


def test_conditional_prediction_follows_the_observed_value():
    (m0, m1), (s0, s1) = _model(0.8).predictive("B", {"A": 3.0})
    assert m0 == pytest.approx(-2.0 + 0.8 * 5.0) and m1 == pytest.approx(2.0 + 0.8 * 1.0)
    assert s0 == pytest.approx(0.6) and s1 == pytest.approx(0.6)  # sqrt(1 - 0.8^2)


def test_shipped_style_weights_carry_an_evidence_model(tiny_weights):
    policy = ExpertPolicy.load(tiny_weights)
    assert policy.evidence_model is not None
    assert set(policy.evidence_model.keys) == {RGB, *EXPERT_TOOLS, "ZoomInTool"}

"""Calibration profiles (core.calibration): fitted from reviewed cases with a prior on "change nothing",
thresholds chosen on cross-validated scores, a versioned JSON refused for another policy version, and
applied the same way by `tarfas investigate/eval --calibration` and the policies themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from core import agent
from core.calibration import (
    CalibrationProfile,
    ProfileError,
    Target,
    choose_prior_strength,
    choose_threshold,
    fit_profile,
    fit_score_model,
)
from core.policies import PolicyOutput, ScriptedPolicy, resolve
from core.policies.calibrated import CalibratedPolicy
from core.protocol import format_answer_turn, format_fast_answer


def camera(n: int, seed: int = 0, informative_score: bool = True, informative_features: bool = False):
    """Reviewed cases of one camera: the policy's scores sit on the wrong side of 0.5 (spoof ~0.3,
    real ~0.1); optionally the scores carry nothing and 8 features carry the label."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    centre = np.where(y == 1, -0.8, -2.2) if informative_score else np.full(len(y), -1.5)
    scores = 1 / (1 + np.exp(-(centre + rng.normal(0, 0.4, len(y)))))
    x = rng.normal(size=(len(y), 8))
    if informative_features:
        x[:, 0] += 2.5 * y
    return scores, y, x


def hter(p, y, t):
    return (np.mean(p[y == 1] < t) + np.mean(p[y == 0] >= t)) / 2


def test_a_few_reviews_move_the_policy_little_and_many_move_it_further():
    s, y, _ = camera(400)
    few = fit_score_model(s[[0, 1, 398, 399]], y[[0, 1, 398, 399]])
    many = fit_score_model(s, y)
    assert abs(few.a - 1) < 0.2 and 0 < few.b < many.b / 2  # four reviews: a step towards the fix
    assert many.b > 1.5  # 400 reviews: the spoofs' low scores are lifted over 0.5
    assert hter(s, y, 0.5) > 0.45 and hter(many.p_spoof(s), y, 0.5) < 0.1


def test_features_fix_a_ranking_the_score_gets_wrong():
    s, y, x = camera(200, informative_score=False, informative_features=True)
    prof = fit_profile(s, y, features=x, features_source="test", policy="p", policy_version="v", policy_threshold=0.5)
    s2, y2, x2 = camera(400, seed=1, informative_score=False, informative_features=True)
    p2 = prof.model.p_spoof(s2, x2)
    assert hter(s2, y2, 0.5) > 0.45
    assert hter(p2, y2, prof.threshold) < 0.2  # new cases of the same camera (the features alone allow ~0.11)
    assert prof.metrics["before"]["hter"] > 0.45 and prof.metrics["after"]["hter"] < 0.2
    with pytest.raises(ProfileError, match="features"):
        prof.model.p_spoof(s2)  # a profile that reads features needs them


def test_the_prior_strength_is_chosen_by_cross_validation():
    s, y, x = camera(200, informative_score=True)  # features are noise: keep the policy's ranking
    assert choose_prior_strength(s, y, x) >= 30
    s, y, x = camera(200, informative_score=False, informative_features=True)  # the features know better
    assert choose_prior_strength(s, y, x) <= 3


@pytest.mark.parametrize("text", ["eer", "apcer=0.05", "bpcer=0.1"])
def test_thresholds_meet_their_target(text):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 200)
    p = 1 / (1 + np.exp(-(rng.normal(0, 1, 400) + 1.5 * y)))
    target = Target.parse(text)
    t = choose_threshold(y, p, target)
    apcer, bpcer = np.mean(p[y == 1] < t), np.mean(p[y == 0] >= t)
    if target.kind == "apcer":
        assert apcer <= 0.05 and np.mean(p[y == 1] < np.nextafter(t, 2)) > 0.05 - 1e-9 or bpcer < 1
    elif target.kind == "bpcer":
        assert bpcer <= 0.1
    else:
        assert abs(apcer - bpcer) < 0.03
    assert str(target) == text


@pytest.mark.parametrize("bad", ["apcer", "apcer=x", "bpcer=1.5", "hter=0.1"])
def test_bad_targets_are_refused(bad):
    with pytest.raises(ValueError, match="target must be"):
        Target.parse(bad)


def test_the_profile_is_a_versioned_json_named_by_its_content(tmp_path):
    s, y, x = camera(60)
    prof = fit_profile(s, y, features=x, features_source="test", policy="expert", policy_version="v1", name="site A",
                       created_by="ana", review_sha256=["b" * 64, "a" * 64])  # fmt: skip
    path = prof.save(tmp_path / "p.json")
    back = CalibrationProfile.load(path)
    assert back == prof and back.id == prof.id and len(prof.id) == 12
    assert back.review_sha256 == ["a" * 64, "b" * 64] and back.n_reviews == 60 and back.created_by == "ana"
    assert json.loads(path.read_text())["format"] == 1
    assert CalibrationProfile.from_dict(prof.to_dict() | {"name": "site B"}).id != prof.id
    for text, match in (
        ("{not json", "not readable"),
        (json.dumps({"format": 99}), "format"),
        (json.dumps({"format": 1}), "malformed"),
    ):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ProfileError, match=match):
            CalibrationProfile.load(tmp_path / "bad.json")
    with pytest.raises(ProfileError, match="not found"):
        CalibrationProfile.load(tmp_path / "none.json")


def test_a_profile_for_another_policy_or_version_is_refused(tiny_weights):
    policy, _ = resolve("expert", weights=tiny_weights)
    s, y, _ = camera(40)
    for name, version in (("expert", "another-version"), ("vllm", policy.version)):
        prof = fit_profile(s, y, policy=name, policy_version=version, evaluate=False)
        with pytest.raises(ProfileError, match="fitted for policy"):
            resolve("expert", weights=tiny_weights, calibration=prof)


def test_the_expert_policy_decides_and_speaks_with_the_profile(tiny_weights, face):
    plain, registry = resolve("expert", weights=tiny_weights)
    s, y, _ = camera(40)
    prof = fit_profile(s, y, features=np.random.default_rng(0).normal(size=(40, registry.readers.features(face.crop).size)),
                       features_source=registry.readers.features_source, policy="expert", policy_version=plain.version, evaluate=False)  # fmt: skip
    policy, registry = resolve("expert", weights=tiny_weights, calibration=prof)
    bank = registry.readers  # under a profile the RGB logit comes from the features the profile reads
    assert bank.logit_of_features(bank.features(face.crop)) == pytest.approx(bank.logit("RGB", face.crop), abs=1e-9)
    assert policy.threshold == prof.threshold != plain.threshold
    before = agent.run(face, plain, registry=registry)
    after = agent.run(face, policy, registry=registry)
    assert after.meta["calibration_profile"]["id"] == prof.id and "calibration_profile" not in before.meta
    assert [t.tool_result.name for t in after.tool_turns] == [t.tool_result.name for t in before.tool_turns]
    expected = prof.p_spoof(before.final.score_spoof, registry.readers.features(face.crop))
    assert after.final.score_spoof == pytest.approx(expected)
    assert f"{prof.threshold:.2f} of calibration profile {prof.id}" in after.turns[-1].text
    assert after.final.verdict == ("spoof" if expected >= prof.threshold else "real")


def test_any_other_policy_is_wrapped_and_its_scores_mapped(face):
    replies = [PolicyOutput(format_fast_answer("real", "looks live"), score_spoof=0.2),
               PolicyOutput(format_answer_turn("checked", "real"), score_spoof=0.3)]  # fmt: skip
    inner = ScriptedPolicy(replies)
    s, y, _ = camera(40)
    prof = fit_profile(s, y, policy=inner.name, policy_version=getattr(inner, "version", ""), evaluate=False)
    traj = agent.run(face, CalibratedPolicy(inner, prof))
    assert traj.fast_score == pytest.approx(prof.p_spoof(0.2)) and traj.final.score_spoof == pytest.approx(
        prof.p_spoof(0.3)
    )
    assert traj.meta["calibration_profile"]["threshold"] == prof.threshold


def test_cli_calibrate_then_investigate_and_eval_with_the_profile(tiny_weights, tiny_manifest, tmp_path, capsys):
    out = tmp_path / "site.json"
    w = ["--weights", str(tiny_weights)]
    assert (
        main(["calibrate", str(tiny_manifest), *w, "--out", str(out), "--name", "site A", "--target", "bpcer=0.1"]) == 0
    )
    text = capsys.readouterr().out
    assert "policy as shipped" in text and "nested 5-fold CV" in text and str(out) in text
    prof = CalibrationProfile.load(out)
    assert (
        prof.n_reviews == 24
        and prof.target == "bpcer=0.1"
        and prof.name == "site A"
        and prof.features.startswith("expert-rgb@")
    )
    assert prof.metrics["before"]["hter"] is not None and prof.metrics["after"]["hter"] is not None

    assert (
        main(["eval", str(tiny_manifest), *w, "--calibration", str(out), "--json-out", str(tmp_path / "m.json")]) == 0
    )
    assert f"calibration profile {prof.id}" in capsys.readouterr().out.splitlines()[0]
    m = json.loads((tmp_path / "m.json").read_text())
    assert (
        m["calibration_profile"]["id"] == prof.id
        and m["threshold"] == prof.threshold
        and "hter" in m["metrics"]["pooled"]
    )

    image = Path(tiny_manifest).parent / "s00_0.png"
    assert (
        main(
            [
                "investigate",
                str(image),
                *w,
                "--calibration",
                str(out),
                "--json",
                "--on-no-face",
                "whole",
                "--out-dir",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    d = json.loads(capsys.readouterr().out)
    assert d["final"]["threshold"] == prof.threshold

    other = prof.to_dict() | {"policy_version": "not-this-one"}
    other.pop("id")
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["eval", str(tiny_manifest), *w, "--calibration", str(tmp_path / "other.json")]) == 2
    err = capsys.readouterr().err
    assert "fitted for policy expert [not-this-one]" in err and len(err.strip().splitlines()) == 1
    assert main(["calibrate", str(tiny_manifest), *w, "--out", str(out), "--target", "hter=0.1"]) == 2

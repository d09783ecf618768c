"""The full FAS metric set of core.evaluation.metrics against hand-computed cases (spoof = positive class;
score >= threshold is spoof): APCER per attack type, ACER, BPCER@APCER, the optimistic HTER at the
test EER, and the stratified bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from core.evaluation.metrics import (
    UNSPECIFIED_ATTACK,
    apcer_by_attack_type,
    attack_type_key,
    bootstrap_ci,
    bpcer_at_apcer,
    error_rates,
    fas_metrics,
    hter_at_test_eer,
    stratified_resamples,
)

# 2 real, 4 spoof of three kinds; threshold 0.5.
Y = [0, 0, 1, 1, 1, 1]
S = [0.1, 0.6, 0.2, 0.7, 0.4, 0.9]
T = ["", "print", "print", "print", "replay", ""]  # a real face with an attack type: ignored


def test_apcer_by_attack_type_by_hand():
    per = apcer_by_attack_type(Y, S, T, 0.5)
    # print: 0.2 accepted, 0.7 rejected -> 1/2; replay: 0.4 accepted -> 1; unspecified: 0.9 rejected -> 0
    assert per == {"print": (0.5, 2), "replay": (1.0, 1), UNSPECIFIED_ATTACK: (0.0, 1)}


def test_fas_metrics_by_hand():
    m = fas_metrics(Y, S, 0.5, T)
    assert (m.n, m.n_real, m.n_spoof) == (6, 2, 4)
    assert m.apcer == pytest.approx(2 / 4)  # 0.2 and 0.4 accepted
    assert m.bpcer == pytest.approx(1 / 2)  # 0.6 rejected
    assert m.hter == pytest.approx(0.5)
    assert m.worst_attack_type == "replay" and m.worst_apcer == 1.0
    assert m.acer == pytest.approx((1.0 + 0.5) / 2)  # worst type, not pooled
    assert m.apcer_by_type == {"print": 0.5, "replay": 1.0, "unspecified": 0.0}
    assert m.n_by_type == {"print": 2, "replay": 1, "unspecified": 1}
    # AUC: spoof > real in 0.2>0.1, 0.7>{0.1,0.6}, 0.4>0.1, 0.9>{0.1,0.6} = 6 of 8 pairs
    assert m.auc == pytest.approx(6 / 8)
    assert m.ci == {} and m.n_boot == 0
    d = m.to_dict()
    assert d["acer"] == m.acer and d["bpcer_at_apcer"] == m.bpcer_at_apcer


def test_unknown_is_a_type_and_empty_is_unspecified():
    assert attack_type_key("") == UNSPECIFIED_ATTACK
    assert attack_type_key(None) == UNSPECIFIED_ATTACK
    assert attack_type_key(" Unknown ") == "unknown"
    per = apcer_by_attack_type([1, 1, 1], [0.1, 0.9, 0.9], ["unknown", "", "unknown"], 0.5)
    assert per == {"unknown": (0.5, 2), UNSPECIFIED_ATTACK: (0.0, 1)}


def test_without_attack_types_every_attack_is_unspecified():
    m = fas_metrics(Y, S, 0.5)
    assert m.apcer_by_type == {UNSPECIFIED_ATTACK: 0.5}
    assert m.acer == m.hter  # one type: ACER == HTER


def test_no_attacks_no_types():
    m = fas_metrics([0, 0, 0], [0.2, 0.6, 0.9], 0.5, ["", "", ""])
    assert m.apcer_by_type == {} and m.worst_attack_type is None and m.worst_apcer is None
    assert m.acer is None and m.hter is None and m.apcer is None
    assert m.bpcer == pytest.approx(2 / 3)
    assert m.auc is None and m.eer is None and m.hter_at_test_eer is None
    assert m.bpcer_at_apcer == {"5%": None, "1%": None}


def test_only_attacks():
    m = fas_metrics([1, 1], [0.2, 0.9], 0.5, ["print", "replay"])
    assert m.apcer_by_type == {"print": 1.0, "replay": 0.0}
    assert m.worst_attack_type == "print" and m.bpcer is None and m.acer is None


def test_empty_input():
    m = fas_metrics([], [], 0.5, [])
    assert m.n == 0 and m.auc is None and m.apcer_by_type == {} and m.acer is None


def test_attack_types_must_match_length():
    with pytest.raises(ValueError):
        apcer_by_attack_type([0, 1], [0.1, 0.9], ["print"], 0.5)


def test_bpcer_at_apcer_by_hand():
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    s = [0.1, 0.2, 0.3, 0.6, 0.4, 0.5, 0.7, 0.9]
    # APCER <= 5% or 1%: every attack detected -> threshold 0.4 -> the real face at 0.6 is rejected.
    assert bpcer_at_apcer(y, s, 0.05) == (0.25, 0.4)
    assert bpcer_at_apcer(y, s, 0.01) == (0.25, 0.4)
    # APCER <= 25% allows missing 0.4: threshold 0.5 still rejects 0.6 -> 0.25.
    assert bpcer_at_apcer(y, s, 0.25)[0] == 0.25
    # APCER <= 50%: threshold 0.7 rejects no real face.
    assert bpcer_at_apcer(y, s, 0.5) == (0.0, 0.7)
    # Cross-check against error_rates at the returned threshold.
    b, thr = bpcer_at_apcer(y, s, 0.05)
    assert error_rates(y, s, thr) == (0.0, b)


def test_bpcer_at_apcer_with_ties():
    # A real and a spoof tie at 0.5: catching that spoof rejects that real face too.
    y = [0, 1, 0, 1]
    s = [0.5, 0.5, 0.2, 0.8]
    assert bpcer_at_apcer(y, s, 0.05) == (0.5, 0.5)
    assert bpcer_at_apcer(y, s, 0.5) == (0.0, 0.8)
    # All scores tied: the only way to catch every attack is to reject every real face.
    assert bpcer_at_apcer([0, 1, 0, 1], [0.3] * 4, 0.01) == (1.0, 0.3)


@pytest.mark.parametrize("label", [0, 1])
def test_bpcer_at_apcer_single_class(label):
    assert bpcer_at_apcer([label] * 3, [0.1, 0.5, 0.9], 0.05) == (None, None)


def test_hter_at_test_eer_is_the_optimistic_figure():
    # Same data as test_metrics.test_error_rates_by_hand: at threshold 0.5, HTER = 1/2.
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.5, 0.7, 0.2, 0.6, 0.9]
    # Only at 0.6 do the rates meet (APCER 1/3: 0.2; BPCER 1/3: 0.7); the EER threshold is the middle
    # of [0.5, 0.6) -> 0.55, where HTER = 1/3: lower than at the a-priori threshold 0.5.
    assert hter_at_test_eer(y, s) == pytest.approx(1 / 3)
    m = fas_metrics(y, s, 0.5)
    assert m.hter == pytest.approx(0.5) and m.hter_at_test_eer == pytest.approx(1 / 3)
    assert m.eer_threshold == pytest.approx(0.55)
    assert hter_at_test_eer([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert hter_at_test_eer([1, 1], [0.1, 0.2]) is None
    # all tied: every threshold errs on one class completely
    assert hter_at_test_eer([0, 1, 0, 1], [0.4] * 4) == 0.5


def test_stratified_resamples_keep_counts_and_are_seeded():
    strata = np.array([0] * 5 + [1] * 3 + [2] * 2)
    a = list(stratified_resamples(strata, 20, seed=3))
    b = list(stratified_resamples(strata, 20, seed=3))
    c = list(stratified_resamples(strata, 20, seed=4))
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c))
    for idx in a:
        assert len(idx) == 10
        assert np.bincount(strata[idx], minlength=3).tolist() == [5, 3, 2]


def test_bootstrap_ci_by_hand():
    y = [0, 0, 1, 1]
    # Perfect separation survives every resample.
    assert bootstrap_ci(y, [0.1, 0.2, 0.8, 0.9], lambda yy, ss: roc_auc_score(yy, ss), n_boot=50) == (1.0, 1.0)
    # A constant statistic has a zero-width interval.
    assert bootstrap_ci(y, [0.1, 0.2, 0.8, 0.9], lambda yy, ss: 0.3, n_boot=10) == (0.3, 0.3)
    # No value from any resample -> None; no resamples -> None.
    assert bootstrap_ci([1, 1], [0.1, 0.2], lambda yy, ss: None, n_boot=10) is None
    assert bootstrap_ci(y, [0.1, 0.2, 0.8, 0.9], lambda yy, ss: 1.0, n_boot=0) is None
    # The BPCER at 0.5 of reals {0.1, 0.6}: each resample has 0, 1 or 2 rejections -> [0, 1] at 95%.
    lo, hi = bootstrap_ci(y, [0.1, 0.6, 0.8, 0.9], lambda yy, ss: error_rates(yy, ss, 0.5)[1], n_boot=400, seed=1)
    assert (lo, hi) == (0.0, 1.0)


def test_fas_metrics_intervals():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.random(300) + 0.6 * y
    t = ["print" if i % 3 else "replay" for i in range(300)]
    m = fas_metrics(y, s, 0.8, t, n_boot=200, seed=5)
    assert set(m.ci) == {"auc", "eer", "hter", "acer", "apcer", "bpcer"}
    assert m.n_boot == 200 and m.ci_level == 0.95
    for k, (lo, hi) in m.ci.items():
        v = getattr(m, k)
        assert 0 <= lo <= hi <= 1
        assert lo - 1e-9 <= v <= hi + 1e-9, k  # the point estimate lies inside its interval here
    again = fas_metrics(y, s, 0.8, t, n_boot=200, seed=5)
    assert again.ci == m.ci  # seeded: reproducible
    # One class: no AUC/EER/HTER interval, but BPCER has one.
    m0 = fas_metrics([0, 0, 0, 0], [0.1, 0.9, 0.2, 0.95], 0.5, n_boot=50)
    assert set(m0.ci) == {"bpcer"}
    # A rare attack type is never lost by a resample (stratified by type), so ACER always exists.
    m1 = fas_metrics([0, 0, 1, 1, 1], [0.1, 0.2, 0.9, 0.8, 0.3], 0.5, ["", "", "print", "print", "replay"], n_boot=100)
    assert m1.ci["acer"] == [pytest.approx((1.0 + 0.0) / 2)] * 2

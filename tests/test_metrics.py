"""core.evaluation.metrics against hand-computed cases (spoof = positive class; score >= threshold is spoof)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from core.evaluation.metrics import eer, eer_threshold, error_rates, summarize


def test_perfect_separation():
    y = [0, 0, 1, 1]
    s = [0.1, 0.2, 0.8, 0.9]
    m = summarize(y, s, 0.5)
    assert m["auc"] == 1.0
    assert m["eer"] == 0.0
    assert (m["apcer"], m["bpcer"], m["hter"], m["accuracy"]) == (0.0, 0.0, 0.0, 1.0)
    assert (m["n"], m["n_real"], m["n_spoof"]) == (4, 2, 2)
    e, thr = eer(y, s)
    assert e == 0.0
    # The EER threshold lies strictly between the classes: the middle of the gap [0.2, 0.8].
    assert 0.2 < thr < 0.8
    assert thr == pytest.approx(0.5)
    assert eer_threshold(y, s) == thr
    # ... and it really separates them.
    assert error_rates(y, s, thr) == (0.0, 0.0)


def test_eer_threshold_is_not_on_a_score():
    # Gap between the highest real (0.3) and the lowest spoof (0.4): the threshold is its middle, so a
    # slight shift of either score does not flip a decision.
    y = [0, 0, 0, 1, 1, 1]
    s = [0.05, 0.2, 0.3, 0.4, 0.7, 0.95]
    e, thr = eer(y, s)
    assert e == 0.0
    assert thr == pytest.approx(0.35)
    assert error_rates(y, np.asarray(s) + 0.04, thr) == (0.0, 0.0)
    assert error_rates(y, np.asarray(s) - 0.04, thr) == (0.0, 0.0)


def test_fully_inverted_scores():
    y = [0, 0, 1, 1]
    s = [0.8, 0.9, 0.1, 0.2]
    m = summarize(y, s, 0.5)
    assert m["auc"] == 0.0
    assert m["eer"] == 1.0  # every decision is wrong at the point where the error rates meet
    assert (m["apcer"], m["bpcer"], m["hter"], m["accuracy"]) == (1.0, 1.0, 1.0, 0.0)


def test_all_scores_tied():
    y = [0, 1, 0, 1, 1]
    s = [0.4] * 5
    m = summarize(y, s, 0.5)
    assert m["auc"] == 0.5
    assert m["eer"] == 0.5
    # Everything below the threshold: every attack accepted, every real face accepted.
    assert (m["apcer"], m["bpcer"], m["hter"]) == (1.0, 0.0, 0.5)
    # At a threshold equal to the tied score everything is spoof (score >= threshold).
    assert error_rates(y, s, 0.4) == (0.0, 1.0)
    assert eer_threshold(y, s) == pytest.approx(0.4)


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_gives_none_not_an_exception(label):
    y = [label] * 3
    s = [0.2, 0.6, 0.9]
    m = summarize(y, s, 0.5)
    assert m["auc"] is None and m["eer"] is None and m["hter"] is None
    apcer, bpcer = error_rates(y, s, 0.5)
    if label == 0:  # only real faces: no attacks to accept
        assert m["apcer"] is None and apcer is None
        assert m["bpcer"] == pytest.approx(2 / 3) and bpcer == pytest.approx(2 / 3)
        assert (m["n_real"], m["n_spoof"]) == (3, 0)
    else:
        assert m["bpcer"] is None and bpcer is None
        assert m["apcer"] == pytest.approx(1 / 3) and apcer == pytest.approx(1 / 3)
        assert (m["n_real"], m["n_spoof"]) == (0, 3)
    assert m["accuracy"] == pytest.approx(2 / 3 if label == 1 else 1 / 3)
    with pytest.raises(ValueError, match="both"):
        eer(y, s)


def test_empty_input():
    m = summarize([], [], 0.5)
    assert m["n"] == 0
    assert m["auc"] is None and m["apcer"] is None and m["bpcer"] is None and m["hter"] is None


def test_error_rates_by_hand():
    # 3 real, 3 spoof; threshold 0.5.
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.5, 0.7, 0.2, 0.6, 0.9]
    # real: 0.1 -> real (ok), 0.5 -> spoof (>= threshold: rejected), 0.7 -> spoof (rejected): BPCER 2/3
    # spoof: 0.2 -> real (accepted), 0.6 -> spoof, 0.9 -> spoof: APCER 1/3
    apcer, bpcer = error_rates(y, s, 0.5)
    assert apcer == pytest.approx(1 / 3)
    assert bpcer == pytest.approx(2 / 3)
    m = summarize(y, s, 0.5)
    assert m["apcer"] == pytest.approx(1 / 3)
    assert m["bpcer"] == pytest.approx(2 / 3)
    assert m["hter"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["threshold"] == 0.5
    # AUC by hand: of the 9 (real, spoof) pairs the spoof scores higher in 0.2>0.1, 0.6>{0.1,0.5},
    # 0.9>{0.1,0.5,0.7} = 6 pairs.
    assert m["auc"] == pytest.approx(6 / 9)
    # Just above 0.5, the real face at exactly 0.5 is accepted again.
    assert error_rates(y, s, 0.5000001) == (pytest.approx(1 / 3), pytest.approx(1 / 3))


def test_auc_matches_sklearn_on_random_data():
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = int(rng.integers(5, 200))
        y = rng.integers(0, 2, n)
        if len(set(y)) < 2:
            y[0], y[1] = 0, 1
        s = np.round(rng.random(n) + 0.3 * y, 2)  # rounding makes ties
        m = summarize(y, s, 0.5)
        assert m["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert 0.0 <= m["eer"] <= 1.0
        # The EER threshold makes APCER and BPCER as close as any threshold can.
        e, thr = eer(y, s)
        apcer, bpcer = error_rates(y, s, thr)
        gaps = [abs(a - b) for a, b in (error_rates(y, s, t) for t in list(np.unique(s)) + [np.inf])]
        assert abs(apcer - bpcer) == pytest.approx(min(gaps), abs=1e-12)


@pytest.mark.parametrize(
    "y, s",
    [
        ([0, 1, 2], [0.1, 0.5, 0.9]),  # label 2
        ([0, -1], [0.1, 0.9]),  # negative label
        ([0, 1], [0.1, math.nan]),  # NaN score
        ([0, 1], [0.1, math.inf]),  # infinite score
        ([0, 1, 1], [0.1, 0.9]),  # length mismatch
        ([[0, 1], [1, 0]], [[0.1, 0.9], [0.8, 0.2]]),  # not 1-D
    ],
)
def test_invalid_input_raises_value_error(y, s):
    with pytest.raises(ValueError):
        summarize(y, s, 0.5)
    with pytest.raises(ValueError):
        error_rates(y, s, 0.5)
    with pytest.raises(ValueError):
        eer(y, s)


def test_string_labels_raise_value_error():
    with pytest.raises(ValueError):
        summarize(["real", "spoof"], [0.1, 0.9], 0.5)


def test_fractional_labels_raise_value_error():
    with pytest.raises(ValueError):
        summarize([0.7, 1.0], [0.1, 0.9], 0.5)

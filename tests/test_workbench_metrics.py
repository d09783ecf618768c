"""Model vs analyst over reviewed investigations: agreement, confusion matrix and ROC, checked against
values computed by hand, and the two figures."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from workbench_support import answer, fast, review, run_case

from app.review_metrics import confusion_figure, review_metrics, roc_figure

torch.set_num_threads(1)

# (analyst verdict, model verdict, model P(spoof)); None = not reviewed
RUNS = [
    ("spoof", "spoof", 0.9),
    ("spoof", "real", 0.4),
    ("real", "real", 0.1),
    ("real", "spoof", 0.6),
    ("real", "real", 0.3),
    ("unsure", "spoof", 0.7),
    (None, "spoof", 0.95),
]


@pytest.fixture
def runs(storage, face):
    for analyst, model, p in RUNS:
        _, inv = run_case(storage, face, [fast(model, p), answer(model, p)])
        if analyst is not None:
            review(storage, inv, analyst)


def test_agreement_confusion_and_roc_match_the_hand_computed_values(storage, runs):
    with storage.sessions() as s:
        m = review_metrics(s)
    assert (m.reviewed, m.unsure, m.labelled, m.compared, m.no_model_verdict) == (6, 1, 5, 5, 0)
    assert (m.agreed, m.agreement) == (3, pytest.approx(3 / 5))
    # rows: analyst real, spoof; columns: model real, spoof
    assert m.confusion == [[2, 1], [1, 1]]
    # spoof scores {0.9, 0.4} vs real {0.1, 0.6, 0.3}: 5 of the 6 pairs are ordered right
    assert m.roc.auc == pytest.approx(5 / 6) and (m.roc.n_real, m.roc.n_spoof) == (3, 2)
    assert m.roc.fpr[0] == 0.0 and m.roc.fpr[-1] == 1.0 and m.roc.tpr[-1] == 1.0


def test_a_threshold_recomputes_the_model_verdicts_from_the_scores(storage, runs):
    with storage.sessions() as s:
        m = review_metrics(s, threshold=0.35)
    # spoof at 0.9 and 0.4, real at 0.1 and 0.3, real at 0.6 still called spoof
    assert (m.agreed, m.confusion, m.threshold) == (4, [[2, 1], [0, 2]], 0.35)
    assert m.roc.auc == pytest.approx(5 / 6)  # the ROC does not depend on the threshold
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        review_metrics(s, threshold=2.0)


def test_roc_is_none_with_one_class_and_nothing_reviewed_gives_empty_metrics(storage, face):
    with storage.sessions() as s:
        m = review_metrics(s)
    assert (m.reviewed, m.compared, m.agreement, m.confusion, m.roc) == (0, 0, None, [[0, 0], [0, 0]], None)
    _, inv = run_case(storage, face, [fast("real", 0.2), answer("real", 0.2)])
    review(storage, inv, "real")
    with storage.sessions() as s:
        m = review_metrics(s)
    assert (m.agreement, m.confusion, m.roc) == (1.0, [[1, 0], [0, 0]], None)
    for fig in (roc_figure(m), confusion_figure(m)):  # still drawable: they say what is missing
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        assert Image.open(buf).size[0] > 100


def test_the_figures_show_the_curve_and_the_counts(storage, runs):
    with storage.sessions() as s:
        m = review_metrics(s)
    roc = roc_figure(m)
    ax = roc.axes[0]
    curve = ax.lines[1]
    assert list(curve.get_xdata()) == m.roc.fpr and list(curve.get_ydata()) == m.roc.tpr
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["chance", "model (AUC = 0.833)"]
    cm = confusion_figure(m)
    assert sorted(t.get_text() for t in cm.axes[0].texts) == ["1", "1", "1", "2"]
    assert "agreement 60%" in cm.axes[0].get_title()
    buf = io.BytesIO()
    roc.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_can_be_limited_to_one_policy(storage, runs):
    with storage.sessions() as s:
        assert review_metrics(s, policy="scripted").reviewed == 6
        assert review_metrics(s, policy="expert").reviewed == 0

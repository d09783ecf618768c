"""How well the model agrees with the analysts, over reviewed cases.

Each case counts once, with its latest review and the run that review judged (a re-run keeps the case's
review: the Queue shows the same one, :mod:`storage.queries`). The analyst's verdict is the truth; reviews marked unsure are counted but carry no label. The model's
verdict is the stored final verdict, or ``score_spoof >= threshold`` when a threshold is given; its
score for the ROC is the stored final P(spoof). Metrics come from scikit-learn; the figures are
matplotlib Figures drawn without pyplot (Agg canvas), safe in a server thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve
from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import Investigation, Review
from storage.queries import case_review_id

LABELS = ("real", "spoof")  # spoof is the positive class


@dataclass
class RocCurve:
    fpr: list[float]
    tpr: list[float]
    thresholds: list[float]  # the first is +inf (nothing flagged), as sklearn gives it
    auc: float
    n_real: int
    n_spoof: int


@dataclass
class ReviewMetrics:
    reviewed: int  # cases with a review, whatever its verdict
    unsure: int  # reviews that gave no label
    labelled: int  # reviews saying real or spoof
    compared: int  # labelled reviews of runs that have a model verdict (agreement, confusion)
    agreed: int
    agreement: float | None  # agreed / compared; None when nothing could be compared
    confusion: list[list[int]]  # rows: analyst real, spoof; columns: model real, spoof
    roc: RocCurve | None  # None unless both classes have a scored run
    threshold: float | None = None  # the threshold the model verdicts were recomputed with, if any
    labels: tuple[str, str] = field(default=LABELS)

    @property
    def no_model_verdict(self) -> int:
        return self.labelled - self.compared


def review_metrics(session: Session, threshold: float | None = None, *, policy: str | None = None) -> ReviewMetrics:
    """Agreement, confusion matrix and ROC over the reviewed investigations (of ``policy``, if given)."""
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a P(spoof) in [0, 1], got {threshold}")
    latest_of_case = case_review_id(Investigation.case_id, Investigation)  # the case's review
    stmt = (
        select(Review.verdict, Investigation.verdict, Investigation.score_spoof)
        .join(Investigation, Review.investigation_id == Investigation.id)
        .where(Review.id == latest_of_case)
    )
    if policy is not None:
        stmt = stmt.where(Investigation.policy == policy)
    rows = session.execute(stmt).all()

    labelled = [(a, m, p) for a, m, p in rows if a in LABELS]
    truth, pred = [], []
    for analyst, model, p in labelled:
        if threshold is not None:
            model = None if p is None else ("spoof" if p >= threshold else "real")
        if model in LABELS:
            truth.append(analyst)
            pred.append(model)
    cm = confusion_matrix(truth, pred, labels=list(LABELS)) if truth else np.zeros((2, 2), dtype=int)
    agreed = int(np.trace(cm))

    scored = [(a, p) for a, _, p in labelled if p is not None]
    roc = roc_of([a == "spoof" for a, _ in scored], [p for _, p in scored])
    return ReviewMetrics(
        reviewed=len(rows),
        unsure=sum(1 for a, _, _ in rows if a == "unsure"),
        labelled=len(labelled),
        compared=len(truth),
        agreed=agreed,
        agreement=agreed / len(truth) if truth else None,
        confusion=cm.astype(int).tolist(),
        roc=roc,
        threshold=threshold,
    )


def roc_of(y, scores) -> RocCurve | None:
    """The ROC of ``scores`` (P(spoof)) against ``y`` (1 or True = spoof); None unless both classes are there."""
    y, s = np.asarray(y, dtype=int), np.asarray(scores, dtype=float)
    if not len(y) or not 0 < y.sum() < len(y):
        return None
    fpr, tpr, thr = roc_curve(y, s)
    return RocCurve(
        fpr.tolist(), tpr.tolist(), thr.tolist(), float(roc_auc_score(y, s)), int((y == 0).sum()), int(y.sum())
    )


def operating_point(y, scores, threshold: float) -> tuple[float, float]:
    """(false positive rate, true positive rate) of deciding spoof when ``scores >= threshold``."""
    y, s = np.asarray(y, dtype=int), np.asarray(scores, dtype=float)
    spoof = s >= threshold
    return float(spoof[y == 0].mean()), float(spoof[y == 1].mean())


def _figure(size=(4.2, 4.0)) -> Figure:
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # attaches an Agg canvas: savefig / gr.Plot work without pyplot
    return fig


def roc_figure(metrics: ReviewMetrics) -> Figure:
    """The ROC of the model's P(spoof) against the analysts' verdicts (a note when it cannot be drawn)."""
    return roc_comparison_figure([("model", metrics.roc, None)])


def roc_comparison_figure(curves: list[tuple[str, RocCurve | None, tuple[float, float] | None]]) -> Figure:
    """ROC curves over the same reviews, each ``(label, curve, operating point or None)``: e.g. the
    policy's own scores with its threshold beside the calibrated scores with the profile's."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    drawn = [(label, roc, point) for label, roc, point in curves if roc is not None]
    for k, (label, roc, point) in enumerate(drawn):
        color = f"C{k}"
        ax.plot(
            roc.fpr, roc.tpr, drawstyle="steps-post", linewidth=2, color=color, label=f"{label} (AUC = {roc.auc:.3f})"
        )
        if point is not None:
            ax.plot(*point, marker="o", markersize=9, color=color, markeredgecolor="black", linestyle="none")
    if drawn:
        roc = drawn[0][1]
        ax.set_title(f"ROC over {roc.n_real} real + {roc.n_spoof} spoof reviews")
        ax.legend(loc="lower right")
    else:
        ax.set_title("ROC")
        ax.text(
            0.5,
            0.5,
            "needs reviews of both classes\n(real and spoof) with model scores",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate (real called spoof)")
    ax.set_ylabel("true positive rate (spoof caught)")
    return fig


def confusion_figure(metrics: ReviewMetrics) -> Figure:
    """The confusion matrix: analyst verdict (rows) against model verdict (columns), with counts."""
    agreement = "n/a" if metrics.agreement is None else f"{metrics.agreement:.0%}"
    return confusion_matrix_figure(
        metrics.confusion, f"{metrics.compared} compared, agreement {agreement}", metrics.labels
    )


def confusion_matrix_figure(confusion, title: str, labels=LABELS) -> Figure:
    """A 2x2 confusion matrix (rows: analyst real, spoof; columns: model real, spoof) with its counts."""
    fig = _figure()
    ax = fig.add_subplot()
    cm = np.asarray(confusion)
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
    names = [label.capitalize() for label in labels]
    ax.set_xticks(range(2), labels=names)
    ax.set_yticks(range(2), labels=names)
    ax.set_xlabel("model verdict")
    ax.set_ylabel("analyst verdict")
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                str(int(cm[i, j])),
                ha="center",
                va="center",
                color="white" if cm[i, j] > cm.max() / 2 else "black",
                fontsize=14,
            )
    ax.set_title(title)
    return fig

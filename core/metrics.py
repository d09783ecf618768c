"""Face anti-spoofing metrics on P(spoof) scores (spoof = positive class), built on scikit-learn.

ISO/IEC 30107-3 terms: APCER = attacks accepted as real, BPCER = real faces rejected as attacks,
HTER = ACER = (APCER + BPCER) / 2 at a threshold fixed beforehand; EER where the two error rates meet.
A sample is called spoof when ``score >= threshold``.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def _check(y, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    s = np.asarray(scores, dtype=float)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be 1-D of the same length")
    if not np.isin(y, (0, 1)).all():  # checked before the cast, so 0.7 is refused rather than truncated
        raise ValueError("labels must be 0 (real) or 1 (spoof)")
    y = y.astype(int)
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y, s


def error_rates(y, scores, threshold: float) -> tuple[float | None, float | None]:
    """(APCER, BPCER) at ``threshold``; None for a class with no samples."""
    y, s = _check(y, scores)
    pred = s >= threshold
    apcer = float((~pred[y == 1]).mean()) if (y == 1).any() else None
    bpcer = float(pred[y == 0].mean()) if (y == 0).any() else None
    return apcer, bpcer


def eer(y, scores) -> tuple[float, float]:
    """(EER, threshold at the EER) from sklearn's ROC; requires both classes."""
    y, s = _check(y, scores)
    if len(np.unique(y)) < 2:
        raise ValueError("EER needs both real and spoof samples")
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    fnr = 1.0 - tpr
    gap = np.abs(fpr - fnr)
    best = np.flatnonzero(gap == gap.min())
    i = int(best[0])
    # Every threshold in [thr[best[-1]], thr[best[0]]] reaches the EER, and so does anything down to the
    # next score below; take the middle of that range rather than its edge (on separable data, the edge
    # is the lowest spoof score itself and the slightest shift of the scores flips decisions).
    hi = float(thr[best[0]]) if np.isfinite(thr[best[0]]) else float(s.max())
    j = int(best[-1]) + 1
    lo = float(thr[j]) if j < len(thr) else float(s.min())
    return float((fpr[i] + fnr[i]) / 2), (hi + lo) / 2


def eer_threshold(y, scores) -> float:
    return eer(y, scores)[1]


def summarize(y, scores, threshold: float) -> dict:
    """AUC, EER, and APCER/BPCER/HTER at the given (a-priori) threshold. Undefined values are None."""
    y, s = _check(y, scores)
    both = len(np.unique(y)) == 2
    apcer, bpcer = error_rates(y, s, threshold)
    out = {
        "n": int(len(y)),
        "n_real": int((y == 0).sum()),
        "n_spoof": int((y == 1).sum()),
        "auc": float(roc_auc_score(y, s)) if both else None,
        "eer": eer(y, s)[0] if both else None,
        "threshold": float(threshold),
        "apcer": apcer,
        "bpcer": bpcer,
        "hter": (apcer + bpcer) / 2 if both else None,
        "accuracy": float(((s >= threshold) == (y == 1)).mean()) if len(y) else None,
    }
    return out

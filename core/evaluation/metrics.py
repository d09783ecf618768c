"""Face anti-spoofing metrics on P(spoof) scores (spoof = positive class), built on scikit-learn.

ISO/IEC 30107-3 terms: APCER = attacks accepted as real, BPCER = real faces rejected as attacks, at a
threshold fixed beforehand (from dev data, or given). HTER = (APCER + BPCER) / 2 with APCER over all
attacks pooled; ACER = (worst APCER over attack types + BPCER) / 2 (ISO/OULU-NPU: the APCER of the
worst presentation-attack instrument species). With one attack type the two are equal. EER where the
two error rates meet. A sample is called spoof when ``score >= threshold``.

:func:`fas_metrics` computes the whole set (with stratified bootstrap confidence intervals) and returns
a :class:`FasMetrics`; the small functions below it are its parts. Every curve comes from
scikit-learn's ``roc_curve`` (ties are one threshold, as sklearn treats them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

UNSPECIFIED_ATTACK = "unspecified"  # spoofs whose manifest row has an empty attack_type
APCER_TARGETS = (0.05, 0.01)  # operating points of BPCER@APCER (ISO/IEC 30107-3 style)


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


# --- the full FAS metric set --------------------------------------------------------------------
def attack_type_key(attack_type: str | None) -> str:
    """The group name of a spoof's attack type: lower-cased, empty -> ``unspecified`` ('unknown' stays
    a type of its own: the source says it does not know, which is not the same as not saying)."""
    t = (attack_type or "").strip().lower()
    return t or UNSPECIFIED_ATTACK


def apcer_by_attack_type(
    y, scores, attack_types: Sequence[str | None], threshold: float
) -> dict[str, tuple[float, int]]:
    """{attack type: (APCER, number of attacks)} over the spoofs (real faces are ignored, whatever
    their attack_type). Empty when there are no spoofs. Types are sorted by name."""
    y, s = _check(y, scores)
    if len(attack_types) != len(y):
        raise ValueError(f"{len(attack_types)} attack types for {len(y)} labels")
    types = np.asarray([attack_type_key(t) for t in attack_types], dtype=object)
    out = {}
    for t in sorted(set(types[y == 1])):
        m = (y == 1) & (types == t)
        out[t] = (float((s[m] < threshold).mean()), int(m.sum()))
    return out


def bpcer_at_apcer(y, scores, max_apcer: float) -> tuple[float | None, float | None]:
    """(lowest BPCER among the thresholds whose APCER <= max_apcer, that threshold), from sklearn's
    ROC; (None, None) without both classes. The ROC always ends at APCER = 0, so it always exists."""
    y, s = _check(y, scores)
    if len(np.unique(y)) < 2:
        return None, None
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    apcer = 1.0 - tpr
    ok = np.flatnonzero(apcer <= max_apcer + 1e-12)
    i = ok[np.argmin(fpr[ok])]  # fpr rises along the curve: the first feasible point has the lowest BPCER
    return float(fpr[i]), float(thr[i]) if np.isfinite(thr[i]) else float(s.max())


def hter_at_test_eer(y, scores) -> float | None:
    """HTER at the EER threshold of these very scores: the OPTIMISTIC, paper-style figure (the
    threshold is chosen by looking at the test labels). None without both classes."""
    y, s = _check(y, scores)
    if len(np.unique(y)) < 2:
        return None
    a, b = error_rates(y, s, eer_threshold(y, s))
    return (a + b) / 2


def stratified_resamples(strata, n_boot: int, seed: int = 0):
    """``n_boot`` index arrays, each drawing the samples of every stratum with replacement within
    that stratum (so every resample keeps the stratum counts). ``strata`` is one label per sample:
    the class (0/1), or finer (class and attack type). Seeded."""
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(strata == c) for c in np.unique(strata)]
    for _ in range(n_boot):
        yield np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])


def _percentile_interval(values: list[float], level: float) -> tuple[float, float] | None:
    if not values:
        return None
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_ci(
    y,
    scores,
    statistic: Callable[[np.ndarray, np.ndarray], float | None],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile interval of ``statistic(y, scores)`` over ``n_boot`` stratified resamples
    (:func:`stratified_resamples`). None when no resample gives a value (e.g. AUC of one class)."""
    y, s = _check(y, scores)
    if n_boot <= 0 or len(y) == 0:
        return None
    values = [v for idx in stratified_resamples(y, n_boot, seed) if (v := statistic(y[idx], s[idx])) is not None]
    return _percentile_interval(values, level)


@dataclass
class FasMetrics:
    """Every figure of one set of scores at one a-priori threshold. Rates are fractions (0..1);
    None where undefined (a class or an attack type with no samples)."""

    n: int
    n_real: int
    n_spoof: int
    threshold: float  # fixed before looking at these scores
    auc: float | None
    eer: float | None
    eer_threshold: float | None  # of these scores (what the optimistic HTER uses)
    apcer: float | None  # all attacks pooled
    bpcer: float | None
    hter: float | None  # (APCER + BPCER) / 2 at `threshold`
    acer: float | None  # (worst per-type APCER + BPCER) / 2 at `threshold`
    hter_at_test_eer: float | None  # OPTIMISTIC: threshold tuned on these labels (paper-style)
    apcer_by_type: dict[str, float] = field(default_factory=dict)
    n_by_type: dict[str, int] = field(default_factory=dict)
    worst_attack_type: str | None = None
    worst_apcer: float | None = None
    bpcer_at_apcer: dict[str, float | None] = field(default_factory=dict)  # "5%" -> BPCER
    accuracy: float | None = None
    ci: dict[str, list[float]] = field(default_factory=dict)  # metric -> [low, high]
    ci_level: float | None = None
    n_boot: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _pct_key(x: float) -> str:
    return f"{100 * x:g}%"


def fas_metrics(
    y,
    scores,
    threshold: float,
    attack_types: Sequence[str | None] | None = None,
    *,
    apcer_targets: Sequence[float] = APCER_TARGETS,
    n_boot: int = 0,
    seed: int = 0,
    ci_level: float = 0.95,
) -> FasMetrics:
    """The full metric set at the a-priori ``threshold``. ``attack_types`` (one per sample, ignored
    for real faces) gives APCER per type and ACER; without it every attack is ``unspecified``.
    ``n_boot`` > 0 adds percentile bootstrap intervals for AUC, EER, HTER, ACER, APCER and BPCER,
    stratified by class and, within the attacks, by attack type (so no resample loses a type; the
    threshold stays fixed: only the test samples are resampled)."""
    y, s = _check(y, scores)
    types = list(attack_types) if attack_types is not None else [""] * len(y)
    both = len(np.unique(y)) == 2
    base = summarize(y, s, threshold)
    by_type = apcer_by_attack_type(y, s, types, threshold)
    worst = max(by_type, key=lambda t: by_type[t][0]) if by_type else None  # ties: the first by name
    worst_apcer = by_type[worst][0] if worst else None
    bpcer = base["bpcer"]
    m = FasMetrics(
        n=base["n"],
        n_real=base["n_real"],
        n_spoof=base["n_spoof"],
        threshold=float(threshold),
        auc=base["auc"],
        eer=base["eer"],
        eer_threshold=eer_threshold(y, s) if both else None,
        apcer=base["apcer"],
        bpcer=bpcer,
        hter=base["hter"],
        acer=(worst_apcer + bpcer) / 2 if worst_apcer is not None and bpcer is not None else None,
        hter_at_test_eer=hter_at_test_eer(y, s),
        apcer_by_type={t: v[0] for t, v in by_type.items()},
        n_by_type={t: v[1] for t, v in by_type.items()},
        worst_attack_type=worst,
        worst_apcer=worst_apcer,
        bpcer_at_apcer={_pct_key(a): bpcer_at_apcer(y, s, a)[0] for a in apcer_targets},
        accuracy=base["accuracy"],
    )
    if n_boot > 0 and len(y):
        names = sorted(by_type)
        code = np.asarray([names.index(attack_type_key(t)) if yi == 1 else -1 for t, yi in zip(types, y)])
        values: dict[str, list[float]] = {k: [] for k in ("auc", "eer", "hter", "acer", "apcer", "bpcer")}
        for idx in stratified_resamples(code, n_boot, seed):  # the same resamples for every metric
            yb, sb, cb = y[idx], s[idx], code[idx]
            accepted = sb < threshold
            a = float(accepted[yb == 1].mean()) if (yb == 1).any() else None
            b = float((~accepted[yb == 0]).mean()) if (yb == 0).any() else None
            got = {"apcer": a, "bpcer": b, "hter": (a + b) / 2 if both else None}
            per = [float(accepted[cb == c].mean()) for c in range(len(names))]
            got["acer"] = (max(per) + b) / 2 if per and b is not None else None
            if both:
                got["auc"] = float(roc_auc_score(yb, sb))
                got["eer"] = eer(yb, sb)[0]
            for k, v in got.items():
                if v is not None:
                    values[k].append(v)
        for k, vals in values.items():
            ci = _percentile_interval(vals, ci_level)
            if ci is not None:
                m.ci[k] = list(ci)
        m.ci_level, m.n_boot = ci_level, n_boot
    return m


def domain_eer_threshold(y, scores, domains) -> float:
    """The threshold where the APCER and BPCER averaged over domains meet: every capture domain counts
    the same, however many images it has (a threshold meant to transfer to a new camera). Domains with
    one class add to that class's average only."""
    y, s = _check(y, scores)
    domains = np.asarray(domains)
    cands = np.unique(s)
    if len(cands) > 2000:  # every score is a candidate on small sets; quantiles on large ones
        cands = np.unique(np.quantile(s, np.linspace(0, 1, 2001)))
    mids = np.concatenate([[cands[0] - 1e-9], (cands[:-1] + cands[1:]) / 2, [cands[-1] + 1e-9]])
    apcer, bpcer = [], []
    for d in np.unique(domains):
        m = domains == d
        sp, re = np.sort(s[m & (y == 1)]), np.sort(s[m & (y == 0)])
        if len(sp):
            apcer.append(np.searchsorted(sp, mids, side="left") / len(sp))  # attacks scored below t
        if len(re):
            bpcer.append(1.0 - np.searchsorted(re, mids, side="left") / len(re))  # real scored at or above t
    if not apcer or not bpcer:
        raise ValueError("the domain-averaged EER needs both real and spoof samples")
    gap = np.abs(np.mean(apcer, axis=0) - np.mean(bpcer, axis=0))
    best = np.flatnonzero(gap == gap.min())
    return float((mids[best[0]] + mids[best[-1]]) / 2)

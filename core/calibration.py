"""Calibration profiles: a policy adapted to one deployment from the analysts' own reviewed cases.

Every camera is a new domain: a threshold fixed on someone else's data sits in the wrong place, and on
some cameras the ranking itself is off. A profile fixes both with a small model fitted on reviewed cases:

    P'(spoof) = sigmoid(a * logit(P) + b + delta . z),    z = (x - mean) / scale

``P`` is the policy's score and ``x`` the face's features from the expert ensemble's RGB network (the
frozen ImageNet features its linear probe reads; optional). The fit is a MAP logistic regression whose
Gaussian prior is centred on "change nothing" (a = 1, b = 0, delta = 0), so a handful of reviews moves
the model a little and many move it further (Bishop, *Pattern Recognition and Machine Learning*, §4.5;
Platt, 1999, for the a, b part). The prior on delta, the part with one weight per feature that could
overfit, has precision ``prior_strength``, chosen for each profile by cross-validation on its reviews
(strong where the reviews agree with the policy as shipped). ``z`` is standardised with the reviewed
cases' own statistics, so that prior is the same in every direction.

The decision threshold is chosen on cross-validated calibrated scores (never on scores the model was
fitted on): the EER point, or a target APCER or BPCER. The before/after figures a profile carries are
nested cross-validated, so they are what the profile will do on the camera's next images.

A profile is a small versioned JSON file (:meth:`CalibrationProfile.save`); it is refused for any other
policy or policy version (:meth:`CalibrationProfile.check`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from sklearn.model_selection import StratifiedKFold

from .errors import TarfasError
from .evaluation.metrics import eer_threshold, summarize

FORMAT = 1
DEFAULT_PRIOR_STRENGTH = "auto"  # chosen per profile by cross-validation over PRIOR_GRID
PRIOR_GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)  # for the feature weights
SCORE_PRIOR = 1.0  # precision of the prior on a, b (the Platt part)
_EPS = 1e-6


class ProfileError(TarfasError):
    """A profile that cannot be used: unreadable, of another format, or made for another policy."""


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(x) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


# --- the decision target -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """How the threshold is chosen: ``eer``, ``apcer=0.05`` (at most 5% of attacks accepted, then the
    fewest real faces refused) or ``bpcer=0.05`` (at most 5% of real faces refused)."""

    kind: str = "eer"
    value: float | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        text = text.strip().lower()
        if text == "eer":
            return cls()
        kind, _, value = text.partition("=")
        try:
            v = float(value)
        except ValueError:
            v = -1.0
        if kind not in ("apcer", "bpcer") or not 0.0 <= v < 1.0:
            raise ValueError(f"target must be eer, apcer=R or bpcer=R with 0 <= R < 1; got {text!r}")
        return cls(kind, v)

    def __str__(self) -> str:
        return "eer" if self.kind == "eer" else f"{self.kind}={self.value:g}"


def choose_threshold(y, p, target: Target) -> float:
    """The threshold on ``p`` (spoof when ``p >= threshold``) that meets ``target`` on these scores."""
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    if target.kind == "eer":
        return eer_threshold(y, p)
    cands = np.unique(np.concatenate([[0.0, 1.0 + _EPS], p]))
    spoof, real = p[y == 1], p[y == 0]
    apcer = np.array([(spoof < t).mean() for t in cands])
    bpcer = np.array([(real >= t).mean() for t in cands])
    if target.kind == "apcer":  # the highest threshold that keeps APCER within the target: fewest real refused
        return float(cands[np.flatnonzero(apcer <= target.value + 1e-12).max()])
    return float(cands[np.flatnonzero(bpcer <= target.value + 1e-12).min()])


# --- the model ---------------------------------------------------------------------------------------
@dataclass
class ScoreModel:
    """``P' = sigmoid(a * logit(P) + b + delta . (x - mean) / scale)``; without ``delta``, Platt scaling."""

    a: float = 1.0
    b: float = 0.0
    delta: list[float] | None = None
    mean: list[float] | None = None
    scale: list[float] | None = None

    @property
    def uses_features(self) -> bool:
        return self.delta is not None

    def logit(self, scores, features=None) -> np.ndarray:
        out = self.a * logit(scores) + self.b
        if self.uses_features:
            if features is None:
                raise ProfileError("this profile reads the face's RGB features; none were given")
            z = (np.asarray(features, dtype=np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
            out = out + z @ np.asarray(self.delta)
        return out

    def p_spoof(self, scores, features=None) -> np.ndarray:
        return sigmoid(self.logit(scores, features))


def fit_score_model(scores, y, features=None, prior_strength: float = 1.0) -> ScoreModel:
    """The MAP fit of :class:`ScoreModel` on labelled scores (and features): real and spoof reviews
    weigh the same in total, and the Gaussian prior is centred on a = 1, b = 0, delta = 0 (the policy as
    shipped), with precision :data:`SCORE_PRIOR` on a and b (two numbers: a few reviews can place them)
    and ``prior_strength`` on delta (one per feature: the part that can overfit)."""
    y = np.asarray(y, dtype=np.float64)
    if len(np.unique(y)) < 2:
        raise ValueError("a profile needs reviewed real faces and reviewed attacks")
    s = logit(scores)
    cols = [s, np.ones_like(s)]
    mean = scale = None
    if features is not None:
        x = np.asarray(features, dtype=np.float64)
        mean, scale = x.mean(0), x.std(0) + 1e-6
        cols.append(((x - mean) / scale).T)
    design = np.vstack(cols).T  # (n, 2 + d)
    centre = np.zeros(design.shape[1])
    centre[0] = 1.0
    precision = np.full(design.shape[1], float(prior_strength))
    precision[:2] = SCORE_PRIOR
    w = np.where(y == 1, 0.5 / y.sum(), 0.5 / (1 - y).sum()) * len(y)  # classes weigh the same

    def loss(theta):
        t = design @ theta
        nll = np.sum(w * (np.logaddexp(0.0, t) - y * t))
        grad = design.T @ (w * (sigmoid(t) - y))
        d = theta - centre
        return nll + 0.5 * d @ (precision * d), grad + precision * d

    theta = minimize(loss, centre, jac=True, method="L-BFGS-B").x
    model = ScoreModel(float(theta[0]), float(theta[1]))
    if features is not None:
        model.delta, model.mean, model.scale = theta[2:].tolist(), mean.tolist(), scale.tolist()
    return model


def _folds(y: np.ndarray, k: int, seed: int):
    k = int(min(k, np.bincount(y.astype(int)).min()))
    if k < 2:
        raise ValueError("cross-validation needs at least 2 reviewed real faces and 2 reviewed attacks")
    return StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)


def cross_validated(scores, y, features=None, prior_strength: float = 1.0, k: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold calibrated P(spoof): each review scored by a model fitted without it."""
    scores, y = np.asarray(scores, dtype=np.float64), np.asarray(y)
    feats = None if features is None else np.asarray(features, dtype=np.float64)
    out = np.empty(len(y))
    for tr, te in _folds(y, k, seed):
        m = fit_score_model(scores[tr], y[tr], None if feats is None else feats[tr], prior_strength)
        out[te] = m.p_spoof(scores[te], None if feats is None else feats[te])
    return out


def choose_prior_strength(scores, y, features=None, k: int = 5, seed: int = 0, grid=PRIOR_GRID) -> float:
    """The prior strength of :data:`PRIOR_GRID` with the lowest cross-validated log loss (real and spoof
    weighing the same): strong where the reviews agree with the policy as shipped (a camera like those it
    was trained on), weak where they show it something new."""
    return _choose(scores, y, features, k, seed, grid)[0]


def _choose(scores, y, features, k: int, seed: int, grid=PRIOR_GRID) -> tuple[float, np.ndarray]:
    """The chosen prior strength and its out-of-fold scores (which the threshold is chosen on)."""
    y = np.asarray(y)
    w = np.where(y == 1, 0.5 / max(1, (y == 1).sum()), 0.5 / max(1, (y == 0).sum()))
    best = None
    for lam in grid:  # the first of equal losses wins, as min() would
        oof = cross_validated(scores, y, features, lam, k, seed)
        p = np.clip(oof, _EPS, 1 - _EPS)
        loss = float(-np.sum(w * (y * np.log(p) + (1 - y) * np.log1p(-p))))
        if best is None or loss < best[0]:
            best = (loss, float(lam), oof)
    return best[1], best[2]


def _strength(prior_strength, scores, y, features, k, seed) -> tuple[float, np.ndarray]:
    """``(prior strength, out-of-fold calibrated scores at it)``: chosen by cross-validation for "auto"."""
    if prior_strength == "auto":
        return _choose(scores, y, features, k, seed)
    lam = float(prior_strength)
    return lam, cross_validated(scores, y, features, lam, k, seed)


# --- the profile -------------------------------------------------------------------------------------
@dataclass
class CalibrationProfile:
    policy: str
    policy_version: str
    model: ScoreModel
    threshold: float  # on the calibrated P'(spoof)
    target: str  # how the threshold was chosen (Target's text)
    prior_strength: float  # chosen by cross-validation (PRIOR_GRID) unless given
    n_reviews: int
    n_real: int
    n_spoof: int
    review_sha256: list[str] = field(default_factory=list)  # the reviewed images, sorted
    features: str | None = None  # where x comes from ("expert-rgb@<bank version>"), None without features
    name: str = ""
    created_by: str = ""
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    metrics: dict = field(default_factory=dict)  # "before" / "after" on the reviewed set (after: nested CV)
    format: int = FORMAT

    @property
    def id(self) -> str:
        """The first 12 hex digits of the sha256 of the profile's content: its name in logs and records."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return {"id": self.id, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> CalibrationProfile:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ProfileError(
                f"not a calibration profile of format {FORMAT} (got format {d.get('format') if isinstance(d, dict) else None!r})"
            )
        d = dict(d)
        d.pop("id", None)
        try:
            d["model"] = ScoreModel(**d["model"])
            return cls(**d)
        except (TypeError, KeyError) as exc:
            raise ProfileError(f"malformed calibration profile: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> CalibrationProfile:
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ProfileError(f"calibration profile {path} not found") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ProfileError(f"calibration profile {path} is not readable JSON: {exc}") from exc
        return cls.from_dict(d)

    def check(self, policy_name: str, policy_version: str) -> None:
        """Refuse a profile fitted for another policy or another version of it."""
        if (self.policy, self.policy_version) != (policy_name, policy_version):
            raise ProfileError(
                f"calibration profile {self.id} was fitted for policy {self.policy} [{self.policy_version}], "
                f"not {policy_name} [{policy_version}]; fit a new profile for this policy"
            )

    def summary(self) -> dict:
        """What a record of a verdict keeps of the profile it was calibrated with."""
        return {
            "id": self.id,
            "name": self.name,
            "threshold": self.threshold,
            "target": self.target,
            "n_reviews": self.n_reviews,
        }

    def p_spoof(self, score, features=None) -> float:
        return float(self.model.p_spoof(np.atleast_1d(score), None if features is None else np.atleast_2d(features))[0])

    def describe(self) -> str:
        name = f" {self.name!r}" if self.name else ""
        return f"calibration profile {self.id}{name}: threshold {self.threshold:.3f} ({self.target}), {self.n_reviews} reviews"


def _rates(y, p, threshold) -> dict:
    m = summarize(y, p, threshold)
    return {k: m[k] for k in ("n", "auc", "apcer", "bpcer", "hter")} | {"threshold": float(threshold)}


def fit_profile(
    scores,
    y,
    *,
    policy: str,
    policy_version: str,
    features=None,
    features_source: str | None = None,
    target: Target | str = "eer",
    prior_strength: float | str = DEFAULT_PRIOR_STRENGTH,
    policy_threshold: float | None = None,
    review_sha256: list[str] | None = None,
    name: str = "",
    created_by: str = "",
    k: int = 5,
    seed: int = 0,
    evaluate: bool = True,
) -> CalibrationProfile:
    """Fit a profile on reviewed cases: ``scores`` (the policy's P(spoof)), ``y`` (1 = spoof) and
    optionally ``features`` (one row per case). With ``evaluate``, ``metrics`` holds the reviewed set
    before (the policy's scores at ``policy_threshold``) and after (nested cross-validation: each fold
    scored by a profile, threshold included, fitted on the other folds)."""
    target = Target.parse(target) if isinstance(target, str) else target
    scores, y = np.asarray(scores, dtype=np.float64), np.asarray(y).astype(int)
    feats = None if features is None else np.asarray(features, dtype=np.float64)
    if feats is not None and feats.shape[0] != len(y):
        raise ValueError(f"{feats.shape[0]} feature rows for {len(y)} reviews")
    chosen, oof = _strength(prior_strength, scores, y, feats, k, seed)
    profile = CalibrationProfile(
        policy=policy,
        policy_version=policy_version,
        model=fit_score_model(scores, y, feats, chosen),
        threshold=choose_threshold(y, oof, target),
        target=str(target),
        prior_strength=chosen,
        n_reviews=len(y),
        n_real=int((y == 0).sum()),
        n_spoof=int((y == 1).sum()),
        review_sha256=sorted(review_sha256 or []),
        features=features_source if feats is not None else None,
        name=name,
        created_by=created_by,
    )
    if evaluate:
        if policy_threshold is not None:
            profile.metrics["before"] = _rates(y, scores, policy_threshold)
        profile.metrics["after"] = nested_cv_rates(scores, y, feats, target, prior_strength, k, seed)
    return profile


def nested_cv_rates(
    scores, y, features, target: Target, prior_strength: float | str, k: int = 5, seed: int = 0
) -> dict:
    """AUC, APCER, BPCER and HTER of profiles on reviews they were not fitted on (the choice of the prior
    strength and of the threshold included)."""
    p, spoof = np.empty(len(y)), np.empty(len(y), dtype=bool)
    for tr, te in _folds(y, k, seed):
        f = None if features is None else features[tr]
        lam, inner = _strength(prior_strength, scores[tr], y[tr], f, k, seed)
        t = choose_threshold(y[tr], inner, target)
        m = fit_score_model(scores[tr], y[tr], f, lam)
        p[te] = m.p_spoof(scores[te], None if features is None else features[te])
        spoof[te] = p[te] >= t
    m = summarize(y, p, 0.5)  # AUC of the out-of-fold P'; the rates below use each fold's own threshold
    apcer, bpcer = float(np.mean(~spoof[y == 1])), float(np.mean(spoof[y == 0]))
    return {
        "n": int(len(y)),
        "auc": m["auc"],
        "apcer": apcer,
        "bpcer": bpcer,
        "hter": (apcer + bpcer) / 2,
        "threshold": None,
    }

"""How the expert ensemble weighs evidence and picks its next tool: pure functions on calibrated logits.

The evidence model is a per-class Gaussian of all experts' calibrated logits (RGB view, each tool
expert, the zoomed view), fitted on out-of-domain scores (leave-one-domain-out) with one covariance
shared by both classes (Ledoit-Wolf shrunk). Two things follow from it:

- **Fusion**: P(spoof | the logits observed so far) is linear discriminant analysis restricted to the
  observed experts (the other dimensions marginalise out), so correlated experts are not counted
  twice and the same model serves any subset of tools.
- **Tool choice**: the next tool is the one whose logit, predicted from what was observed, is expected
  to tell the most about the class (expected information gain, in bits).

The same functions drive the live policy (:mod:`core.policies.expert`) and its replay on stored logits
(:func:`replay`), which training uses to fix the threshold and to measure the policy out of domain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DECISIVE = 0.97  # stop once P(spoof) is outside [1 - DECISIVE, DECISIVE] ...
MIN_GAIN_BITS = 0.005  # ... or when no tool is expected to tell anything more


def _entropy(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def expected_gain(p: float, mu: tuple[float, float], sigma: tuple[float, float], points: int = 81) -> float:
    """Expected information gain (bits) about the class from observing one expert's calibrated logit,
    distributed per class as N(mu[c], sigma[c]^2), when the current belief is P(spoof) = p."""
    (m0, m1), (s0, s1) = mu, sigma
    lo, hi = min(m0 - 4 * s0, m1 - 4 * s1), max(m0 + 4 * s0, m1 + 4 * s1)
    x = np.linspace(lo, hi, points)
    f0 = np.exp(-0.5 * ((x - m0) / s0) ** 2) / s0
    f1 = np.exp(-0.5 * ((x - m1) / s1) ** 2) / s1
    mix = p * f1 + (1 - p) * f0
    post = p * f1 / np.maximum(mix, 1e-300)
    w = mix / mix.sum()
    return float(_entropy(p) - (w * _entropy(post)).sum())


class EvidenceModel:
    """Per-class Gaussian of the calibrated logits: ``mean[c]`` and ``cov[c]`` (c = 0 real, 1 spoof)
    over ``keys``. Fitted with a shared covariance; stored in experts.json."""

    def __init__(self, spec: dict):
        self.keys = list(spec["keys"])
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.mean = [np.asarray(m, float) for m in spec["mean"]]
        self.cov = [np.asarray(c, float) for c in spec["cov"]]

    @classmethod
    def fit(
        cls, x: np.ndarray, y: np.ndarray, keys: list[str], weight: np.ndarray | None = None, ridge: float = 0.05
    ) -> EvidenceModel:
        """Fit on calibrated logits ``x`` (N, K) with labels ``y``: class means, and one covariance of the
        class-centred logits shrunk by Ledoit-Wolf plus ``ridge`` on the diagonal (no exact certainties).
        ``weight`` (N,) weighs samples (e.g. so that every domain and class counts the same)."""
        from sklearn.covariance import LedoitWolf

        x, y = np.asarray(x, float), np.asarray(y, int)
        w = np.ones(len(y)) if weight is None else np.asarray(weight, float)
        means = [np.average(x[y == c], axis=0, weights=w[y == c]) for c in (0, 1)]
        centred = x - np.where(y[:, None] == 1, means[1], means[0])
        # Ledoit-Wolf has no sample weights: resample the centred rows in proportion to their weight.
        rng = np.random.default_rng(0)
        rows = rng.choice(len(y), size=max(len(y), 2000), p=w / w.sum())
        cov = LedoitWolf(assume_centered=True).fit(centred[rows]).covariance_ + ridge * np.eye(len(keys))
        return cls({"keys": list(keys), "mean": [m.tolist() for m in means], "cov": [cov.tolist(), cov.tolist()]})

    def to_dict(self) -> dict:
        return {"keys": self.keys, "mean": [m.tolist() for m in self.mean], "cov": [c.tolist() for c in self.cov]}

    def log_odds(self, observed: dict[str, float]) -> float:
        """log P(spoof | observed) / P(real | observed) with even priors: the Gaussian log-likelihood
        ratio of the observed logits (unobserved experts marginalised out); 0 when nothing is known."""
        obs = [k for k in observed if k in self.index]
        if not obs:
            return 0.0
        idx = [self.index[k] for k in obs]
        x = np.array([observed[k] for k in obs], float)
        ll = []
        for m, c in zip(self.mean, self.cov):
            s = c[np.ix_(idx, idx)]
            d = x - m[idx]
            _, logdet = np.linalg.slogdet(s)
            ll.append(-0.5 * (d @ np.linalg.solve(s, d) + logdet))
        return float(ll[1] - ll[0])

    def predictive(self, key: str, observed: dict[str, float]) -> tuple[tuple[float, float], tuple[float, float]]:
        """((mu_real, mu_spoof), (sd_real, sd_spoof)) of ``key``'s logit, conditioned on ``observed``."""
        k = self.index[key]
        obs = [o for o in observed if o in self.index and o != key]
        idx = [self.index[o] for o in obs]
        x = np.array([observed[o] for o in obs], float)
        mus, sds = [], []
        for m, c in zip(self.mean, self.cov):
            if idx:
                w = np.linalg.solve(c[np.ix_(idx, idx)], c[idx, k])
                mu = m[k] + w @ (x - m[idx])
                var = c[k, k] - c[k, idx] @ w
            else:
                mu, var = m[k], c[k, k]
            mus.append(float(mu))
            sds.append(float(np.sqrt(max(var, 1e-3))))
        return (mus[0], mus[1]), (sds[0], sds[1])

    def gain(self, key: str, observed: dict[str, float], p: float | None = None) -> float:
        """Expected information (bits) from observing ``key`` next; ``p``: the current P(spoof) if known."""
        p = sigmoid(self.log_odds(observed)) if p is None else p
        return expected_gain(p, *self.predictive(key, observed))


def sigmoid(x: float) -> float:
    """Logistic function, exact in float64 (no clipping: scores keep their ranking)."""
    return float(1.0 / (1.0 + np.exp(-x))) if x >= 0 else float(np.exp(x) / (1.0 + np.exp(x)))


@dataclass
class Choice:
    """What the policy decided after the evidence so far: the next tool (None = answer now)."""

    tool: str | None
    p_spoof: float  # belief from the evidence so far
    gains: dict[str, float] = field(default_factory=dict)  # expected bits of every candidate
    reason: str = ""  # why it stops: "decisive", "no_gain", "limit", "no_tools"


def choose(
    model: EvidenceModel,
    observed: dict[str, float],
    candidates: list[str],
    calls_made: int,
    calls_left: int,
    min_calls: int = 1,
) -> Choice:
    """The next step of an investigation: call the most informative candidate tool, or answer.

    It always looks at ``min_calls`` tools when it may, then stops once the evidence is decisive or no
    tool is expected to add ``MIN_GAIN_BITS``."""
    p = sigmoid(model.log_odds(observed))
    gains = {n: model.gain(n, observed, p) for n in candidates if n in model.index}
    best = max(gains, key=gains.get) if gains else None
    if best is None:
        return Choice(None, p, gains, "no_tools")
    if calls_left <= 0:
        return Choice(None, p, gains, "limit")
    if calls_made >= min_calls:
        if p >= DECISIVE or p <= 1 - DECISIVE:
            return Choice(None, p, gains, "decisive")
        if gains[best] < MIN_GAIN_BITS:
            return Choice(None, p, gains, "no_gain")
    return Choice(best, p, gains)


def replay(
    model: EvidenceModel,
    logits: dict[str, float],
    tools: list[str],
    max_calls: int = 3,
    min_calls: int = 1,
    first: str = "RGB",
) -> tuple[list[str], float]:
    """Run the policy's decisions on stored logits (every expert's logit known in advance, revealed
    only when its tool is called). Returns the tools called, in order, and the final P(spoof)."""
    observed = {first: logits[first]}
    called: list[str] = []
    while True:
        c = choose(
            model, observed, [t for t in tools if t not in called], len(called), max_calls - len(called), min_calls
        )
        if c.tool is None:
            return called, c.p_spoof
        called.append(c.tool)
        observed[c.tool] = logits[c.tool]

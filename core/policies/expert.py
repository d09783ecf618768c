"""The offline default policy: the expert ensemble. No language model, no download, CPU only.

- Fast answer: the RGB face network's calibrated P(spoof).
- Tool choice: the tool with the largest expected information gain about real/spoof given the
  current belief and the evidence seen so far (a per-class joint Gaussian of all experts' logits on
  dev data, conditioned on what was observed), so the choice depends on what is still uncertain and
  a tool that would repeat known evidence is passed over; stop early once the evidence is decisive,
  or at the tool-call limit.
- Evidence: each tool's expert network (paper Fig. S9) on the tool image; ZoomInTool's evidence is the
  RGB network on the enlarged region.
- Final score: reliability-weighted mean of calibrated logits (weights = dev AUC - 0.5), compared with
  the threshold fixed on dev data and shipped with the weights.
- Text: written from the measured numbers in the protocol's format, and it says what it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .. import protocol
from ..experts import RGB, Calibration, ExpertBank
from ..faces import FaceCrop
from ..registry import TOOL_FAMILIES
from ..trajectory import Trajectory
from .base import Conversation, PolicyOutput

DECISIVE = 0.97  # then stop once P(spoof) is outside [1 - DECISIVE, DECISIVE] ...
MIN_GAIN_BITS = 0.005  # ... or when no tool is expected to tell us anything more

PURPOSE = {
    "ZoomInTool": "to inspect the cheeks and nose up close for print dots, paper grain or screen pixels",
    "FFTTool": "to look for periodic peaks of screen moire or print halftone in the spectrum",
    "LBPTool": "to look for paper grain or screen texture in the skin micro-texture",
    "WaveletTransformTool": "to compare the fine-scale noise with natural camera noise",
    "EdgeDetectionTool": "to look for blurred fine edges of a recapture or straight paper/bezel borders",
    "HOGTool": "to check whether the facial gradient structure looks flattened",
}
STAT_LABELS = {
    "sharpness": ("sharpness", "{:.0f}"),
    "magnification": ("magnification", "{:.1f}x"),
    "peak_ratio": ("spectral peak ratio", "{:.1f}"),
    "high_freq_ratio": ("high-frequency energy", "{:.3f}"),
    "entropy": ("LBP entropy", "{:.2f} bits"),
    "nonuniform_fraction": ("non-uniform patterns", "{:.1%}"),
    "detail_l1": ("finest detail", "{:.4f}"),
    "diagonal_share_l1": ("diagonal share", "{:.2f}"),
    "edge_density": ("edge density", "{:.1%}"),
    "orientation_entropy": ("orientation entropy", "{:.2f} bits"),
}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, x))))


def _entropy(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(p, 1e-9, 1 - 1e-9)
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
    """Per-class joint Gaussian of the calibrated logits (fitted on dev, stored in experts.json). Gives
    the distribution of a not-yet-called tool's logit under each class *given* what was observed."""

    def __init__(self, spec: dict):
        self.keys = list(spec["keys"])
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.mean = [np.asarray(m, float) for m in spec["mean"]]
        self.cov = [np.asarray(c, float) for c in spec["cov"]]

    def predictive(self, key: str, observed: dict[str, float]) -> tuple[tuple[float, float], tuple[float, float]]:
        """((mu_real, mu_spoof), (sd_real, sd_spoof)) of ``key``'s logit, conditioned on ``observed``."""
        k = self.index[key]
        obs = [self.index[o] for o in observed if o in self.index]
        x = np.array([observed[o] for o in observed if o in self.index])
        mus, sds = [], []
        for m, c in zip(self.mean, self.cov):
            if obs:
                w = np.linalg.solve(c[np.ix_(obs, obs)], c[obs, k])
                mu = m[k] + w @ (x - m[obs])
                var = c[k, k] - c[k, obs] @ w
            else:
                mu, var = m[k], c[k, k]
            mus.append(float(mu))
            sds.append(float(np.sqrt(max(var, 1e-3))))
        return (mus[0], mus[1]), (sds[0], sds[1])


@dataclass
class Evidence:
    key: str  # "RGB" or a tool name
    logit: float  # calibrated logit of P(spoof)
    weight: float

    @property
    def p(self) -> float:
        return _sigmoid(self.logit)


class ExpertPolicy:
    name = "expert"
    description = (
        "Expert ensemble (offline default, no language model): an RGB face CNN gives the fast answer, "
        "per-tool expert CNNs (TAR-FAS Fig. S9) read each tool image, tools are chosen by expected "
        "information gain, and the reasoning text is written from the measured evidence."
    )

    def __init__(self, bank: ExpertBank, threshold: float | None = None, min_tool_calls: int = 1):
        """``min_tool_calls``: tools looked at before the policy may stop early (default 1: the point
        of the protocol is to check the first impression)."""
        self.bank = bank
        self.min_tool_calls = min_tool_calls
        self.version = bank.version
        shipped = bank.meta.get("policy", {}).get("threshold")
        self.threshold = float(threshold if threshold is not None else (shipped if shipped is not None else 0.5))
        zoom = bank.meta.get("zoom", {})
        self.zoom_box = list(zoom.get("bbox", [56, 72, 168, 184]))
        zc = zoom.get("calibration", {})
        self.zoom_cal = Calibration(zc.get("a", 1.0), zc.get("b", 0.0), tuple(zc.get("mu", (-2, 2))), tuple(zc.get("sigma", (1.5, 1.5))), zc.get("dev_auc"))
        spec = bank.meta.get("evidence_model")
        self.evidence_model = EvidenceModel(spec) if spec else None
        self._cache: dict[tuple[str, int], Evidence] = {}

    @classmethod
    def load(cls, weights: str | Path | None = None, threshold: float | None = None, min_tool_calls: int = 1) -> ExpertPolicy:
        return cls(ExpertBank.load(weights), threshold, min_tool_calls)

    # --- evidence ---------------------------------------------------------------------------------
    def _cal(self, key: str) -> Calibration:
        return self.zoom_cal if key == "ZoomInTool" else self.bank.calibration[key]

    def _weight(self, key: str) -> float:
        auc = self._cal(key).dev_auc
        return max((auc if auc is not None else 0.75) - 0.5, 0.02)

    def _evidence(self, traj: Trajectory, crop: np.ndarray) -> list[Evidence]:
        ev = [self._cached(traj, -1, RGB, lambda: self.bank.logit(RGB, crop))]
        for t in traj.turns:
            r = t.tool_result
            if r is None or r.image is None:
                continue
            if r.name == "ZoomInTool":
                def zoom_logit(img=r.image):  # the RGB network on the enlarged region, with its own calibration
                    return self.bank.logit(RGB, cv2.resize(img, (224, 224), interpolation=cv2.INTER_CUBIC), self.zoom_cal)

                ev.append(self._cached(traj, t.index, r.name, zoom_logit))
            elif r.expert_p_spoof is not None:
                p = min(max(r.expert_p_spoof, 1e-6), 1 - 1e-6)
                ev.append(Evidence(r.name, math.log(p / (1 - p)), self._weight(r.name)))
            else:
                ev.append(self._cached(traj, t.index, r.name, lambda img=r.image, k=r.name: self.bank.logit(k, img)))
        return ev

    def _cached(self, traj: Trajectory, index: int, key: str, compute) -> Evidence:
        ck = (traj.id, index)
        if ck not in self._cache:
            if len(self._cache) > 4096:  # one entry per turn: bounded for long-running servers
                self._cache.clear()
            self._cache[ck] = Evidence(key, float(compute()), self._weight(key))
        return self._cache[ck]

    def _gain(self, key: str, p: float, evidence: list[Evidence]) -> float:
        """Expected information from calling ``key`` now: conditioned on the evidence so far when the
        weights ship a joint model, else from the tool's own per-class statistics."""
        if self.evidence_model is not None and key in self.evidence_model.index:
            mu, sd = self.evidence_model.predictive(key, {e.key: e.logit for e in evidence})
        else:
            cal = self._cal(key)
            mu, sd = cal.mu, cal.sigma
        return expected_gain(p, mu, sd)

    @staticmethod
    def fuse(evidence: list[Evidence]) -> float:
        """Reliability-weighted mean of calibrated logits -> P(spoof)."""
        total = sum(e.weight for e in evidence)
        return _sigmoid(sum(e.weight * e.logit for e in evidence) / total)

    # --- turns ------------------------------------------------------------------------------------
    def next_turn(self, conv: Conversation) -> PolicyOutput:
        traj = conv.trajectory
        evidence = self._evidence(traj, conv.crop)
        if traj.fast_answer is None:
            return self._fast_turn(evidence[0])
        p = self.fuse(evidence)
        used = {t.tool_result.name for t in traj.turns if t.tool_result is not None}
        candidates = [n for n in conv.registry.names if n not in used and (n == "ZoomInTool" or n in self.bank.nets)]
        gains = {n: self._gain(n, p, evidence) for n in candidates}
        best = max(gains, key=gains.get) if gains else None
        looked = len(used) >= self.min_tool_calls
        decisive = looked and (p >= DECISIVE or p <= 1 - DECISIVE or (best is not None and gains[best] < MIN_GAIN_BITS))
        notes = {"p_spoof_so_far": p, "evidence": {e.key: round(e.p, 4) for e in evidence}, "expected_gain_bits": {k: round(v, 4) for k, v in gains.items()}}
        if best is None or conv.tool_calls_left <= 0 or decisive:
            return self._answer_turn(traj, evidence, p, notes)
        return self._tool_turn(traj, evidence, p, best, gains[best], notes)

    def _fast_turn(self, rgb: Evidence) -> PolicyOutput:
        p = rgb.p
        verdict = "spoof" if p >= self.threshold else "real"
        look = "shows signs of a recaptured face (print or screen)" if verdict == "spoof" else "looks like a live face"
        reason = f"At a glance the face {look}; the RGB face network gives P(spoof) = {p:.2f}."
        return PolicyOutput(protocol.format_fast_answer(verdict, reason), score_spoof=p, notes={"evidence": {RGB: round(p, 4)}, "policy": "expert ensemble"})

    def _tool_turn(self, traj, evidence, p, tool, gain, notes) -> PolicyOutput:
        parts = [self._last_result_sentence(traj, evidence)]
        lean = "spoof" if p >= self.threshold else "real"
        if len(evidence) == 1:
            parts.append(f"My first impression leans {lean} (P(spoof) = {p:.2f}) and needs checking.")
        else:
            parts.append(f"The evidence so far leans {lean} (P(spoof) = {p:.2f}).")
        auc = self._cal(tool).dev_auc
        parts.append(
            f"Next I use {tool} {PURPOSE[tool]}: it is the most informative {TOOL_FAMILIES[tool]} check left "
            f"(expected gain {gain:.2f} bits" + (f", dev AUC {auc:.2f})." if auc is not None else ").")
        )
        args = {"bbox": list(self.zoom_box)} if tool == "ZoomInTool" else {}
        text = protocol.format_tool_call_turn(" ".join(s for s in parts if s), protocol.ToolCall(tool, args))
        return PolicyOutput(text, score_spoof=None, notes=notes)

    def _answer_turn(self, traj, evidence, p, notes) -> PolicyOutput:
        verdict = "spoof" if p >= self.threshold else "real"
        parts = [self._last_result_sentence(traj, evidence)]
        listing = ", ".join(f"{'RGB view' if e.key == RGB else e.key} {e.p:.0%}" for e in evidence)
        parts.append(f"Spoof evidence: {listing}.")
        strength = "clearly" if abs(p - self.threshold) > 0.3 else "narrowly"
        parts.append(
            f"Weighted by each expert's reliability, P(spoof) = {p:.2f}, {strength} "
            f"{'above' if verdict == 'spoof' else 'below'} the decision threshold {self.threshold:.2f}: "
            + ("this is a presentation attack." if verdict == "spoof" else "this is a live face.")
        )
        return PolicyOutput(protocol.format_answer_turn(" ".join(s for s in parts if s), verdict), score_spoof=p, notes=notes)

    def _last_result_sentence(self, traj: Trajectory, evidence: list[Evidence]) -> str:
        last = traj.turns[-1] if traj.turns else None
        if last is None or last.kind == "fast":
            return ""
        if last.error:
            return "The last call failed, so I continue with the evidence I have."
        r = last.tool_result
        if r is None:
            return ""
        ev = next((e for e in reversed(evidence) if e.key == r.name), None)
        stats = ", ".join(STAT_LABELS[k][0] + " " + STAT_LABELS[k][1].format(v) for k, v in r.stats.items() if k in STAT_LABELS)
        who = "the RGB network on the enlarged region" if r.name == "ZoomInTool" else "the expert"
        reading = f"{who} reads {ev.p:.0%} spoof trace" if ev else "no expert reading"
        return f"{r.name} result: {reading}" + (f" ({stats})." if stats else ".")

    # --- convenience ------------------------------------------------------------------------------
    def score_crop(self, crop: np.ndarray, max_tool_calls: int = 3) -> float:
        """Final P(spoof) of a full investigation of a 224x224 crop (used to fix the dev threshold)."""
        from ..agent import AgentConfig, run

        face = FaceCrop(crop, None, (0, 0, crop.shape[1], crop.shape[0]), (crop.shape[1], crop.shape[0]), True)
        traj = run(face, self, AgentConfig(max_tool_calls=max_tool_calls), experts=self.bank)
        if traj.final is None:
            raise RuntimeError(traj.error or "investigation failed")
        return traj.final.score_spoof

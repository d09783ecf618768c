"""The offline default policy: the expert ensemble. No language model, no download, CPU only.

- Fast answer: the RGB face network's calibrated P(spoof).
- Tool choice: the tool with the largest expected information gain about real/spoof given the
  evidence seen so far (:mod:`core.evidence`): a tool that would repeat known evidence is passed over;
  stop early once the evidence is decisive, or at the tool-call limit.
- Evidence: each tool's expert network (paper Fig. S9) on the tool image; a tool whose output is a view
  of the face (ZoomInTool) is read by the RGB network with that view's calibration.
- Final score: P(spoof | the evidence observed), from the evidence model fitted on out-of-domain scores,
  compared with the threshold shipped with the weights (also fixed on out-of-domain scores).
- Text: written from the measured numbers in the protocol's format, and it says what it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import protocol
from ..calibration import CalibrationProfile
from ..errors import UnknownToolError
from ..evidence import MIN_GAIN_BITS, EvidenceModel, choose
from ..experts import RGB, ZOOM, ExpertBank, sigmoid
from ..registry import tool_spec
from ..trajectory import Trajectory
from .base import Conversation, PolicyOutput
from .calibrated import crop_features, features_reader

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


class ExpertPolicy:
    name = "expert"
    description = (
        "Expert ensemble (offline default, no language model): an RGB face network (linear probes on "
        "ImageNet-pretrained features and colour texture) gives the fast answer, per-tool expert CNNs "
        "(TAR-FAS Fig. S9) read each tool image, tools are chosen by expected information gain, and the "
        "reasoning text is written from the measured evidence."
    )

    def __init__(
        self,
        bank: ExpertBank,
        threshold: float | None = None,
        min_tool_calls: int = 1,
        calibration: CalibrationProfile | None = None,
    ):
        """``min_tool_calls``: tools looked at before the policy may stop early (default 1: the point
        of the protocol is to check the first impression). ``calibration``: a deployment's profile; the
        scores the policy states and its threshold are then the profile's."""
        self.bank = bank
        self.min_tool_calls = min_tool_calls
        self.version = bank.version
        shipped = bank.meta.get("policy", {}).get("threshold")
        self.threshold = float(threshold if threshold is not None else (shipped if shipped is not None else 0.5))
        self.zoom_box = bank.view_args(ZOOM).get("bbox") or tool_spec(ZOOM).default_args["bbox"]
        self.evidence_model = EvidenceModel(bank.meta["evidence_model"])
        self._cache: dict[tuple[str, int], float] = {}
        self.calibration = calibration
        self._features, self._feature_cache = None, {}
        if calibration is not None:
            calibration.check(self.name, self.version)
            self._features = features_reader(calibration, bank)
            self.threshold = calibration.threshold

    def with_calibration(self, profile: CalibrationProfile) -> ExpertPolicy:
        return ExpertPolicy(self.bank, None, self.min_tool_calls, calibration=profile)

    def _stated(self, p: float, conv: Conversation) -> float:
        """The P(spoof) the policy states and decides on: the profile's calibration of ``p``, if any."""
        if self.calibration is None:
            return p
        return self.calibration.p_spoof(p, crop_features(self._feature_cache, self._features, conv))

    @classmethod
    def load(
        cls, weights: str | Path | None = None, threshold: float | None = None, min_tool_calls: int = 1
    ) -> ExpertPolicy:
        return cls(ExpertBank.load(weights), threshold, min_tool_calls)

    # --- evidence ---------------------------------------------------------------------------------
    def _observed(self, conv: Conversation) -> dict[str, float]:
        """Calibrated logits of everything looked at so far: the RGB view, then each tool result."""
        traj = conv.trajectory
        observed = {RGB: self._cached(traj, -1, lambda: self._rgb_logit(conv))}
        for t in traj.turns:
            r = t.tool_result
            if r is None or r.image is None:
                continue
            p = r.expert_p_spoof
            if p is not None and 0.0 < p < 1.0:  # the registry's readers already ran the expert
                observed[r.name] = float(np.log(p) - np.log1p(-p))
            elif self.bank.reads(r.name):  # an expert, or a view of the face (ZoomIn) for the RGB network
                observed[r.name] = self._cached(traj, t.index, lambda img=r.image, k=r.name: self.bank.logit(k, img))
        return observed

    def _rgb_logit(self, conv: Conversation) -> float:
        if self._features is not None:  # a profile reads the RGB features: the network runs once for both
            return self.bank.logit_of_features(crop_features(self._feature_cache, self._features, conv))
        return self.bank.logit(RGB, conv.crop)

    def _cached(self, traj: Trajectory, index: int, compute) -> float:
        ck = (traj.id, index)
        if ck not in self._cache:
            if len(self._cache) > 4096:  # one entry per turn: bounded for long-running servers
                self._cache.clear()
            self._cache[ck] = float(compute())
        return self._cache[ck]

    def p_spoof(self, observed: dict[str, float]) -> float:
        """P(spoof | the observed calibrated logits), from the evidence model."""
        return sigmoid(self.evidence_model.log_odds(observed))

    # --- turns ------------------------------------------------------------------------------------
    def next_turn(self, conv: Conversation) -> PolicyOutput:
        traj = conv.trajectory
        observed = self._observed(conv)
        if traj.fast_answer is None:
            return self._fast_turn(self._stated(self.p_spoof({RGB: observed[RGB]}), conv))
        used = [t.tool_result.name for t in traj.turns if t.tool_result is not None]
        candidates = [n for n in conv.registry.names if n not in used and self.bank.reads(n)]
        c = choose(self.evidence_model, observed, candidates, len(used), conv.tool_calls_left, self.min_tool_calls)
        notes = {
            "p_spoof_so_far": c.p_spoof,
            "evidence": {k: round(sigmoid(v), 4) for k, v in observed.items()},
            "expected_gain_bits": {k: round(v, 4) for k, v in c.gains.items()},
        }
        p = self._stated(c.p_spoof, conv)
        if self.calibration is not None:
            notes["p_spoof_uncalibrated"] = c.p_spoof
        if c.tool is None:
            return self._answer_turn(traj, observed, p, notes)
        return self._tool_turn(traj, observed, p, conv.registry.spec(c.tool), c.gains[c.tool], notes)

    def _fast_turn(self, p: float) -> PolicyOutput:
        verdict = "spoof" if p >= self.threshold else "real"
        look = "shows signs of a recaptured face (print or screen)" if verdict == "spoof" else "looks like a live face"
        calibrated = " after this deployment's calibration" if self.calibration is not None else ""
        reason = f"At a glance the face {look}; the RGB face network gives P(spoof) = {p:.2f}{calibrated}."
        return PolicyOutput(
            protocol.format_fast_answer(verdict, reason),
            score_spoof=p,
            notes={"evidence": {RGB: round(p, 4)}, "policy": "expert ensemble"},
        )

    def _tool_turn(self, traj, observed, p, spec, gain, notes) -> PolicyOutput:
        tool = spec.name
        parts = [self._last_result_sentence(traj, observed)]
        lean = "spoof" if p >= self.threshold else "real"
        first = len(observed) == 1
        auc = self.bank.calibration[tool].auc if tool in self.bank.calibration else None
        why = f"expected gain {gain:.2f} bits" if gain >= 0.01 else "expected gain under 0.01 bits"
        why += f", AUC {auc:.2f} on cameras it was not trained on" if auc is not None else ""
        if gain < MIN_GAIN_BITS:  # a check the protocol asks for, not one the evidence needs
            parts.append(
                f"{'My first impression' if first else 'The evidence so far'} leans {lean} (P(spoof) = {p:.2f}), "
                f"and no tool left is expected to change it much; I still check it once."
            )
            parts.append(f"I use {tool} {spec.purpose}: the most informative {spec.family} check left ({why}).")
        else:
            parts.append(
                f"My first impression leans {lean} (P(spoof) = {p:.2f}) and needs checking."
                if first
                else f"The evidence so far leans {lean} (P(spoof) = {p:.2f})."
            )
            parts.append(
                f"Next I use {tool} {spec.purpose}: it is the most informative {spec.family} check left ({why})."
            )
        args = self.bank.view_args(tool) or dict(spec.default_args)  # a view is looked at as it was calibrated
        text = protocol.format_tool_call_turn(" ".join(s for s in parts if s), protocol.ToolCall(tool, args))
        return PolicyOutput(text, score_spoof=None, notes=notes)

    def _answer_turn(self, traj, observed, p, notes) -> PolicyOutput:
        verdict = "spoof" if p >= self.threshold else "real"
        parts = [self._last_result_sentence(traj, observed)]
        # each as it was reported: the fast answer's P for the RGB view, each expert's reading for a tool
        listing = ", ".join(
            f"RGB view {self.p_spoof({RGB: v}):.0%}" if k == RGB else f"{k} {sigmoid(v):.0%}"
            for k, v in observed.items()
        )
        parts.append(f"Spoof evidence: {listing}.")
        strength = "clearly" if abs(p - self.threshold) > 0.3 else "narrowly"
        parts.append(
            f"Taken together, allowing for how the experts agree, P(spoof) = {p:.2f}, {strength} "
            f"{'above' if verdict == 'spoof' else 'below'} the decision threshold {self.threshold:.2f}{self._threshold_origin()}: "
            + ("this is a presentation attack." if verdict == "spoof" else "this is a live face.")
        )
        return PolicyOutput(
            protocol.format_answer_turn(" ".join(s for s in parts if s), verdict), score_spoof=p, notes=notes
        )

    def _threshold_origin(self) -> str:
        if self.calibration is None:
            return ""
        return f" of calibration profile {self.calibration.id} ({self.calibration.n_reviews} reviewed cases)"

    def _last_result_sentence(self, traj: Trajectory, observed: dict[str, float]) -> str:
        last = traj.turns[-1] if traj.turns else None
        if last is None or last.kind == "fast":
            return ""
        if last.error:
            return "The last call failed, so I continue with the evidence I have."
        r = last.tool_result
        if r is None:
            return ""
        stats = ", ".join(
            STAT_LABELS[k][0] + " " + STAT_LABELS[k][1].format(v) for k, v in r.stats.items() if k in STAT_LABELS
        )
        who = _reader(r.name)
        reading = (
            f"{who} reads {sigmoid(observed[r.name]):.0%} spoof trace" if r.name in observed else "no expert reading"
        )
        return f"{r.name} result: {reading}" + (f" ({stats})." if stats else ".")


def _reader(tool: str) -> str:
    """Who reads a tool's output, in words (a tool unknown to this version: its expert)."""
    try:
        return tool_spec(tool).reader
    except UnknownToolError:
        return "the expert"

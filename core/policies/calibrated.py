"""A policy under a deployment's calibration profile (core.calibration): its scores mapped by the
profile, its decision threshold the profile's. The expert policy takes a profile natively (its reasoning
text then speaks of the calibrated numbers); any other policy is wrapped, since a language model's text
does not state a threshold."""

from __future__ import annotations

import numpy as np

from ..calibration import CalibrationProfile, ProfileError
from .base import Conversation, PolicyOutput


def features_reader(profile: CalibrationProfile, bank):
    """The function that gives a crop's features as the profile was fitted with them (None when the
    profile reads no features). Refuses a bank of another version: its features mean something else."""
    if profile.features is None:
        return None
    if bank is None or bank.features_source != profile.features:
        have = bank.features_source if bank is not None else "no expert bank"
        raise ProfileError(
            f"calibration profile {profile.id} reads the features of {profile.features}; this server has {have}"
        )
    return bank.features


class CalibratedPolicy:
    """``inner`` with every score mapped by ``profile`` and the profile's threshold."""

    def __init__(self, inner, profile: CalibrationProfile, bank=None):
        profile.check(inner.name, getattr(inner, "version", ""))
        self.inner, self.calibration = inner, profile
        self.name, self.version = inner.name, getattr(inner, "version", "")
        self.description = getattr(inner, "description", inner.name)
        self.threshold = profile.threshold
        self._features = features_reader(profile, bank)
        self._cache: dict[str, np.ndarray] = {}  # trajectory id -> its crop's features (reused across turns)

    def __getattr__(self, name):  # everything else (bank, device, ...) is the inner policy's
        return getattr(self.inner, name)

    def next_turn(self, conv: Conversation) -> PolicyOutput:
        out = self.inner.next_turn(conv)
        if out.score_spoof is not None:
            out.score_spoof = self.calibration.p_spoof(
                out.score_spoof, crop_features(self._cache, self._features, conv)
            )
        return out


def crop_features(cache: dict, features, conv: Conversation) -> np.ndarray | None:
    """The features of the conversation's crop, computed once per trajectory (``features`` None: none)."""
    if features is None:
        return None
    key = conv.trajectory.id
    if key not in cache:
        if len(cache) > 256:  # bounded for long-running servers
            cache.clear()
        cache[key] = features(conv.crop)
    return cache[key]


def calibrate(policy, profile: CalibrationProfile, bank=None):
    """``policy`` under ``profile`` (refused with a ProfileError when the profile was fitted for another
    policy or version, or reads features that ``bank`` does not give)."""
    if hasattr(policy, "with_calibration"):
        return policy.with_calibration(profile)
    return CalibratedPolicy(policy, profile, bank)

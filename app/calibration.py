"""Calibration profiles from the analysts' own reviews (the workbench side of :mod:`core.calibration`).

:func:`fit_from_reviews` fits a profile on reviewed cases: the score of each case is the policy's own
P(spoof) of the investigation the review judged (before any calibration that run had), the label is the
analyst's verdict (unsure reviews carry none), the features are the expert bank's reading of the stored
face crop. It also gives what the profile changes on those cases: confusion matrices, HTER and ROC
curves with the old and the new operating point (the "after" figures are cross-validated, as the
profile's own metrics are). :func:`rescore` shows old cases under a profile; it is a view and never
writes: what the agent said at the time stays as it was recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from core.calibration import CalibrationProfile, cross_validated, fit_profile
from core.errors import TarfasError
from storage.db import Storage
from storage.queries import RunFilter, RunRow, list_runs

from .review_metrics import RocCurve, operating_point, roc_of

MIN_PER_CLASS = 3  # nested cross-validation needs at least this many reviewed real faces and attacks


class CalibrationInputError(TarfasError, ValueError):
    """Not enough (or not the right) reviewed cases to fit a profile."""


@dataclass
class CalibrationFit:
    """A profile fitted on reviewed cases, with the cases and what the profile changes on them."""

    profile: CalibrationProfile
    runs: list[RunRow]  # the reviewed runs it was fitted on, one per case
    y: np.ndarray  # 1 = the analyst said spoof
    scores: np.ndarray  # the policy's own P(spoof)
    calibrated: np.ndarray  # out-of-fold calibrated P(spoof): each case scored by a profile fitted without it
    policy_threshold: float | None  # the policy's own decision threshold
    left_out: dict[str, int] = field(default_factory=dict)  # why other reviewed runs were not used

    @property
    def confusion_before(self) -> list[list[int]] | None:
        """Rows analyst real / spoof, columns model real / spoof: the policy's scores at its threshold."""
        if self.policy_threshold is None:
            return None
        return _confusion(self.y, self.scores >= self.policy_threshold)

    @property
    def confusion_after(self) -> list[list[int]]:
        """The same under the profile, from its nested cross-validated error rates (``metrics["after"]``)."""
        after = self.profile.metrics["after"]
        n_real, n_spoof = int((self.y == 0).sum()), int((self.y == 1).sum())
        fp, fn = round(after["bpcer"] * n_real), round(after["apcer"] * n_spoof)
        return [[n_real - fp, fp], [fn, n_spoof - fn]]

    @property
    def roc_before(self) -> RocCurve | None:
        return roc_of(self.y, self.scores)

    @property
    def roc_after(self) -> RocCurve | None:
        return roc_of(self.y, self.calibrated)

    @property
    def point_before(self) -> tuple[float, float] | None:
        if self.policy_threshold is None:
            return None
        return operating_point(self.y, self.scores, self.policy_threshold)

    @property
    def point_after(self) -> tuple[float, float]:
        return operating_point(self.y, self.calibrated, self.profile.threshold)


def _confusion(y: np.ndarray, spoof: np.ndarray) -> list[list[int]]:
    return [
        [int(((y == 0) & ~spoof).sum()), int(((y == 0) & spoof).sum())],
        [int(((y == 1) & ~spoof).sum()), int(((y == 1) & spoof).sum())],
    ]


def select_reviews(runs: list[RunRow], policy: str, version: str) -> tuple[list[RunRow], dict[str, int]]:
    """The reviewed runs a profile for ``policy`` [``version``] can be fitted on (the latest reviewed run of
    each case), and how many others were left out, by reason."""
    left: dict[str, int] = {}

    def skip(reason: str) -> None:
        left[reason] = left.get(reason, 0) + 1

    latest: dict[str, RunRow] = {}
    for r in runs:  # oldest first: a later reviewed run of the same case replaces an earlier one
        if r.analyst_verdict not in ("real", "spoof"):
            skip("reviewed as unsure")
        elif (r.policy, r.policy_version) != (policy, version):
            skip("run by another policy or version")
        elif r.policy_score is None:
            skip("calibrated run without the policy's own score")
        elif r.crop_sha256 is None:
            skip("no stored face crop")
        else:
            if r.case_id in latest:
                skip("an earlier run of the same case")
            latest[r.case_id] = r
    return list(latest.values()), left


def fit_from_reviews(
    storage: Storage,
    policy,
    *,
    filters: RunFilter | None = None,
    target: str = "eer",
    name: str = "",
    user: str = "",
    features: bool = True,
    bank=None,
    prior_strength: float | str = "auto",
) -> CalibrationFit:
    """Fit a profile for ``policy`` (as loaded, uncalibrated: its name, version and threshold) on the reviewed
    cases that ``filters`` selects. ``features``: also read each face crop with ``bank`` (the expert bank;
    refused without one). Raises :class:`CalibrationInputError` when there are too few reviews."""
    version = getattr(policy, "version", "")
    with storage.sessions() as s:
        runs = list_runs(s, filters=RunFilter(**{**_fields(filters), "reviewed_only": True, "limit": None}))
    chosen, left = select_reviews(runs, policy.name, version)
    y = np.array([r.analyst_verdict == "spoof" for r in chosen], dtype=int)
    n_real, n_spoof = int((y == 0).sum()), int(y.sum())
    if n_real < MIN_PER_CLASS or n_spoof < MIN_PER_CLASS:
        why = "; ".join(f"{n} {reason}" for reason, n in left.items())
        raise CalibrationInputError(
            f"a profile needs at least {MIN_PER_CLASS} reviewed real faces and {MIN_PER_CLASS} reviewed attacks "
            f"investigated by {policy.name} [{version}]; the filters give {n_real} real and {n_spoof} spoof"
            + (f" (left out: {why})" if why else "")
            + ". Review more cases or widen the filters."
        )
    if features and bank is None:
        raise CalibrationInputError("no expert bank to read the faces' features with; fit without features")
    scores = np.array([r.policy_score for r in chosen], dtype=np.float64)
    x = None
    if features:
        x = np.stack([bank.features(storage.files.read_png(r.crop_sha256)) for r in chosen])
    threshold = getattr(policy, "threshold", None)
    profile = fit_profile(
        scores,
        y,
        policy=policy.name,
        policy_version=version,
        features=x,
        features_source=bank.features_source if features else None,
        target=target,
        prior_strength=prior_strength,
        policy_threshold=threshold,
        review_sha256=[r.image_sha256 for r in chosen],
        name=name,
        created_by=user,
    )
    calibrated = cross_validated(scores, y, x, profile.prior_strength)  # as fit_profile chose the threshold on
    return CalibrationFit(profile, chosen, y, scores, calibrated, threshold, left)


@dataclass
class Rescored:
    """An old run under a profile, beside what was recorded at the time (never written back)."""

    run: RunRow
    p_spoof: float | None  # under the profile; None when it cannot be re-scored
    verdict: str | None
    note: str = ""  # why it was not re-scored

    @property
    def changed(self) -> bool:
        return self.verdict is not None and self.verdict != self.run.verdict


def rescore(
    storage: Storage, profile: CalibrationProfile, *, filters: RunFilter | None = None, bank=None
) -> list[Rescored]:
    """Every run ``filters`` selects, re-scored under ``profile``: its policy's own score mapped by the
    profile and compared with the profile's threshold. Runs of another policy or version, or without the
    policy's own score, are listed with the reason. Nothing is written."""
    if profile.features is not None and (bank is None or bank.features_source != profile.features):
        have = bank.features_source if bank is not None else "no expert bank"
        raise CalibrationInputError(
            f"profile {profile.id} reads the features of {profile.features}; this server has {have}"
        )
    with storage.sessions() as s:
        runs = list_runs(s, filters=filters)
    out = []
    for r in runs:
        if (r.policy, r.policy_version) != (profile.policy, profile.policy_version):
            out.append(Rescored(r, None, None, f"run by {r.policy} [{r.policy_version}]"))
        elif r.policy_score is None:
            out.append(Rescored(r, None, None, "the policy's own score was not recorded"))
        elif profile.features is not None and r.crop_sha256 is None:
            out.append(Rescored(r, None, None, "no stored face crop"))
        else:
            x = bank.features(storage.files.read_png(r.crop_sha256)) if profile.features is not None else None
            p = profile.p_spoof(r.policy_score, x)
            out.append(Rescored(r, p, "spoof" if p >= profile.threshold else "real"))
    return out


def _fields(filters: RunFilter | None) -> dict:
    f = filters or RunFilter()
    return {"since": f.since, "until": f.until, "uploader": f.uploader, "source": f.source}

"""``tarfas calibrate MANIFEST --out PROFILE.json``: fit a deployment's calibration profile
(core.calibration) from labelled images of its own cameras, and show what it changes."""

from __future__ import annotations

import argparse
import getpass
import hashlib
import sys
from dataclasses import dataclass, field

from .flags import add_config_args, config_from_args
from .policy import add_policy_args, load_policy

HELP = "fit a calibration profile (score mapping + threshold) from labelled images of your own cameras"
DESCRIPTION = (
    "Investigates every image of the manifest (format of fas-dev/manifest.csv) and fits a profile: a mapping of the "
    "policy's score (and the face's RGB features) to a calibrated P(spoof), with a prior that keeps a few reviews from "
    "overfitting, and a threshold chosen on cross-validated scores. Prints the reviewed set's metrics before and after "
    "(nested cross-validation). Apply it with --calibration PROFILE.json (investigate, eval) or activate it in the app."
)


def _default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


@dataclass
class CalibrateOptions:
    manifest: str = field(
        default="", metadata={"help": "manifest CSV of labelled images from the deployment's cameras"}
    )
    out: str = field(default="", metadata={"help": "where to write the profile (JSON)"})
    root: str | None = field(default=None, metadata={"help": "folder the manifest paths are relative to"})
    domains: list[str] | None = field(default=None, metadata={"help": "comma-separated domains to keep"})
    split: str | None = field(default=None, metadata={"help": "keep rows of this split only"})
    limit: int | None = field(default=None, metadata={"help": "use a seeded sample of at most N images"})
    target: str = field(
        default="eer", metadata={"help": "threshold: eer, apcer=R (at most R of attacks accepted) or bpcer=R"}
    )
    prior_strength: str = field(
        default="auto",
        metadata={
            "help": "precision of the prior on 'change nothing' (larger: moves less); auto: chosen by cross-validation"
        },
    )
    features: bool = field(
        default=True, metadata={"help": "also read the face's RGB features (--no-features: score and threshold only)"}
    )
    name: str = field(default="", metadata={"help": "a name for the profile (e.g. the site or camera)"})
    created_by: str = field(
        default_factory=_default_user, metadata={"help": "who made the profile (default: the login name)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the sample and of the cross-validation folds"})

    def __post_init__(self):
        from core.calibration import Target

        if not self.out:
            raise ValueError("--out PROFILE.json is required")
        Target.parse(self.target)  # refused here, before any image is read
        if self.prior_strength != "auto":
            try:
                ok = float(self.prior_strength) > 0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"--prior-strength must be 'auto' or a number > 0, got {self.prior_strength!r}")
            self.prior_strength = float(self.prior_strength)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, CalibrateOptions, positional=("manifest",))
    add_policy_args(p, calibration=False)


def run(args) -> int:
    from core.calibration import fit_profile
    from core.evaluation.analyses import run_evaluation
    from core.evaluation.protocols import manifest_protocol
    from core.evaluation.report import format_table, pct
    from core.evaluation.scoring import load_face

    opts = config_from_args(CalibrateOptions, args)
    protocol = manifest_protocol(opts.manifest, opts.root, domains=opts.domains, split=opts.split, limit=opts.limit)
    policy, registry = load_policy(args)
    result = run_evaluation(
        protocol, policy, registry=registry, n_boot=0, seed=opts.seed, on_no_face=args.on_no_face or "whole"
    )
    scored = [s for s in result.target_scores() if s.score_spoof is not None]
    for s in result.target_scores():
        if s.score_spoof is None:
            print(
                f"left out ({'unreadable' if s.unreadable else 'no verdict'}): {s.row.rel_path}: {s.error}",
                file=sys.stderr,
            )
    bank = registry.readers if opts.features else None
    if opts.features and bank is None:
        raise ValueError("no expert bank to read the faces' features; use --no-features for a score-only profile")
    features = None
    if bank is not None:
        features = [bank.features(load_face(s.row, args.on_no_face or "whole").crop) for s in scored]
    profile = fit_profile(
        [s.score_spoof for s in scored], [s.row.y for s in scored], policy=policy.name, policy_version=getattr(policy, "version", ""),
        features=features, features_source=bank.features_source if bank is not None else None, target=opts.target,
        prior_strength=opts.prior_strength, policy_threshold=getattr(policy, "threshold", None),
        review_sha256=[hashlib.sha256(s.row.path.read_bytes()).hexdigest() for s in scored], name=opts.name,
        created_by=opts.created_by, seed=opts.seed,
    )  # fmt: skip
    profile.save(opts.out)
    before, after = profile.metrics.get("before"), profile.metrics["after"]
    print(
        f"reviewed set: {profile.n_reviews} images ({profile.n_real} real, {profile.n_spoof} spoof); policy {policy.name} [{profile.policy_version}]"
    )

    def row(name: str, m: dict, threshold: float) -> list[str]:
        return [name, *(pct(m[k]) for k in ("auc", "apcer", "bpcer", "hter")), f"{threshold:.3f}"]

    rows = [row("policy as shipped", before, before["threshold"])] if before else []
    rows.append(row("with the profile (nested 5-fold CV)", after, profile.threshold))
    print(format_table(["", "AUC %", "APCER %", "BPCER %", "HTER %", "threshold"], rows, markdown=False))
    print(f"{profile.describe()}, target {profile.target}, prior strength {profile.prior_strength:g}"
          f"{', reads RGB features' if profile.features else ''}: written to {opts.out}")  # fmt: skip
    return 0

"""Run an evaluation protocol with a policy, and the paper's analyses on the same images.

Every image is loaded and face-cropped once per run (:class:`FaceCache`), and investigated once per
agent *variant* (a tool set and a tool-call limit, :class:`Variant`); every table is computed from
those scores. The analyses (TAR-FAS paper):

- ``fast``: fast answer vs reasoning answer (Table S6), from the same trajectories;
- ``tools``: ablation by the tools offered (Table 2): ZoomIn only, + frequency, + texture,
  + structure, all;
- ``tool-use``: which tools are called for real faces and for each attack type;
- ``max-calls``: the effect of the maximum number of tool calls (Fig. S11).

The decision threshold of each fold is fixed before its target scores are looked at: the EER
threshold of the source scores (``source_eer``, recomputed for each variant and for the fast answer,
since each is its own classifier), the policy's shipped threshold, or a given number.
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..registry import FAMILIES, TOOL_FAMILIES, TOOL_NAMES, ToolRegistry
from .manifest import ManifestRow
from .metrics import FasMetrics, attack_type_key, eer_threshold, fas_metrics
from .protocols import Fold, Protocol, ProtocolError, Selection
from .scoring import FaceCache, ScoredImage, Variant, score_variant

ANALYSES = ("fast", "tools", "tool-use", "max-calls")
MAX_CALLS_GRID = (1, 2, 3, 4)  # paper Fig. S11


def tools_of(families: tuple[str, ...] | None) -> tuple[str, ...] | None:
    return None if families is None else tuple(n for n in TOOL_NAMES if TOOL_FAMILIES[n] in families)


def _short(names) -> str:
    """ "FFTTool", "WaveletTransformTool" -> "FFT, Wavelet": tool names as the paper's tables write them."""
    return ", ".join(re.sub(r"(Transform|Detection)?Tool$", "", n) for n in names)


def _ablation() -> tuple[tuple[str, tuple[str, ...] | None], ...]:
    """Paper Table 2: the zoom tools alone, then with each other family of tools, then all tools."""
    base, others = FAMILIES[0], FAMILIES[1:]
    zoom = _short(tools_of((base,)))
    rows = [(f"{zoom} only", (base,))]
    rows += [(f"{zoom} + {f} ({_short(tools_of((f,)))})", (base, f)) for f in others if tools_of((f,))]
    return (*rows, ("All tools", None))


ABLATION = _ablation()


# --- fold metrics --------------------------------------------------------------------------------
@dataclass
class FoldResult:
    fold: str
    threshold: float
    threshold_source: str
    source_n: int
    targets: dict[str, FasMetrics]
    pooled: FasMetrics | None = None  # over all targets of the fold, when it has more than one
    unreadable: dict[str, int] = field(default_factory=dict)

    @property
    def headline(self) -> FasMetrics:
        return self.pooled if self.pooled is not None else next(iter(self.targets.values()))

    def to_dict(self) -> dict:
        return {
            "fold": self.fold,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "source_n": self.source_n,
            "targets": {k: v.to_dict() for k, v in self.targets.items()},
            "pooled": self.pooled.to_dict() if self.pooled else None,
            "unreadable": self.unreadable,
        }


def _score(s: ScoredImage, answer: str) -> float | None:
    return s.score_spoof if answer == "reasoning" else s.fast_score


def _metrics(items: list[ScoredImage], answer: str, threshold: float, n_boot: int, seed: int) -> FasMetrics:
    ok = [s for s in items if _score(s, answer) is not None]
    return fas_metrics(
        [s.row.y for s in ok],
        [_score(s, answer) for s in ok],
        threshold,
        [s.row.attack_type for s in ok],
        n_boot=n_boot,
        seed=seed,
    )


def evaluate_folds(
    protocol: Protocol,
    picked: dict[Selection, list[ManifestRow]],
    scores: dict[Path, ScoredImage],
    *,
    answer: str = "reasoning",
    policy_threshold: tuple[float | None, str] = (None, ""),
    n_boot: int = 0,
    seed: int = 0,
) -> list[FoldResult]:
    """Metrics of every fold for one variant's scores. ``answer``: "reasoning" (final) or "fast"."""
    results = []
    for fold in protocol.folds:
        threshold, source_of, source_n = _fold_threshold(protocol, fold, picked, scores, answer, policy_threshold)
        targets, unread = {}, {}
        everything = []
        for sel in fold.targets:
            items = [scores[r.path] for r in picked[sel]]
            everything += items
            targets[sel.name] = _metrics(items, answer, threshold, n_boot, seed)
            unread[sel.name] = sum(1 for s in items if _score(s, answer) is None)
        pooled = (
            _metrics(list({s.row.path: s for s in everything}.values()), answer, threshold, n_boot, seed)
            if len(fold.targets) > 1
            else None
        )
        results.append(FoldResult(fold.name, threshold, source_of, source_n, targets, pooled, unread))
    return results


def policy_threshold_of(policy) -> tuple[float | None, str]:
    """The policy's own threshold and where it comes from: a deployment's calibration profile, or the
    threshold shipped with its weights."""
    profile = getattr(policy, "calibration", None)
    if profile is not None:
        return (
            profile.threshold,
            f"the policy's threshold under {profile.describe()} ({profile.target} of its cross-validated scores)",
        )
    origin = "the policy's threshold: its shipped threshold, fixed on held-out data when it was trained"
    return getattr(policy, "threshold", None), origin


def _fold_threshold(protocol, fold: Fold, picked, scores, answer, policy_threshold) -> tuple[float, str, int]:
    """The one place where an evaluation's decision threshold is fixed, before any target score is
    looked at: ``(threshold, where it came from, source images used)``."""
    mode = protocol.threshold
    if isinstance(mode, float):
        return mode, f"given a priori ({protocol.threshold_origin})", 0
    if mode == "policy":
        value, origin = policy_threshold
        if value is None:
            raise ProtocolError(
                "this policy ships no threshold; give one (--threshold, --dev-manifest or the protocol's threshold)"
            )
        return float(value), origin, 0
    ok = [scores[r.path] for r in picked[fold.source] if _score(scores[r.path], answer) is not None]
    y = [s.row.y for s in ok]
    if len(set(y)) < 2:
        raise ProtocolError(
            f"fold {fold.name}: the source {fold.source.name} needs real and spoof images to fix a threshold"
        )
    return (
        eer_threshold(y, [_score(s, answer) for s in ok]),
        f"EER of the {answer} scores on the source ({fold.source.name}, {len(ok)} images)",
        len(ok),
    )


def headline_columns(folds: list[FoldResult]) -> dict[str, FasMetrics]:
    """The columns of a compact table: each target (prefixed by its fold when there are several
    folds), and the pooled targets of folds that have more than one."""
    cols = {}
    for f in folds:
        prefix = f"{f.fold}: " if len(folds) > 1 and len(f.targets) > 1 else ""
        for name, m in f.targets.items():
            cols[prefix + name] = m
        if f.pooled is not None:
            cols[prefix + "pooled"] = f.pooled
    return cols


def fold_mean(folds: list[FoldResult], key: str) -> float | None:
    """Mean of a metric over the folds' headline figures (the paper's 'average' column)."""
    vals = [getattr(f.headline, key) for f in folds]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


# --- analyses ------------------------------------------------------------------------------------
def answer_changes(protocol, picked, scores, fast: list[FoldResult], reasoning: list[FoldResult]) -> dict[str, dict]:
    """Per fold, over its target images: how often the reasoning answer changed the fast answer's
    decision (each at its own threshold), and whether the change corrected or broke it."""
    out = {}
    for fold, fr, rr in zip(protocol.folds, fast, reasoning):
        rows = {r.path: r for sel in fold.targets for r in picked[sel]}
        n = changed = corrected = broken = 0
        for p, row in rows.items():
            s = scores[p]
            if s.score_spoof is None or s.fast_score is None:
                continue
            n += 1
            f_spoof, r_spoof = s.fast_score >= fr.threshold, s.score_spoof >= rr.threshold
            if f_spoof != r_spoof:
                changed += 1
                if r_spoof == bool(row.y):
                    corrected += 1
                else:
                    broken += 1
        out[fold.name] = {"n": n, "changed": changed, "corrected": corrected, "broken": broken}
    return out


def tool_use_by_attack_type(scored: list[ScoredImage]) -> dict[str, dict]:
    """Per group (``real`` and each attack type): images, mean tool calls per image, the fraction
    of images that called each tool, each family's share of all calls, and the first tool chosen."""
    groups: dict[str, list[ScoredImage]] = defaultdict(list)
    for s in scored:
        if s.score_spoof is not None:
            groups["real" if s.row.y == 0 else attack_type_key(s.row.attack_type)].append(s)
    out = {}
    for g in sorted(groups, key=lambda k: (k != "real", k)):
        items = groups[g]
        calls = [c for s in items for c in s.tool_calls]
        fam = Counter(TOOL_FAMILIES[c] for c in calls)
        first = Counter(s.tool_calls[0] for s in items if s.tool_calls)
        out[g] = {
            "n": len(items),
            "mean_calls": float(np.mean([len(s.tool_calls) for s in items])),
            "tool_rate": {t: sum(1 for s in items if t in s.tool_calls) / len(items) for t in TOOL_NAMES},
            "family_share": {f: (fam[f] / len(calls) if calls else 0.0) for f in FAMILIES},
            "first_tool": {t: first[t] / len(items) for t in TOOL_NAMES},
        }
    return out


# --- the whole run -------------------------------------------------------------------------------
@dataclass
class VariantResult:
    variant: Variant
    folds: list[FoldResult]
    seconds: float
    mean_calls: float  # tool calls per investigated image


@dataclass
class EvaluationResult:
    protocol: Protocol
    policy: str
    policy_version: str
    main: Variant
    folds: list[FoldResult]  # the main variant's reasoning answer, with bootstrap intervals
    scores: dict[Path, ScoredImage]  # the main variant's per-image results
    picked: dict[Selection, list[ManifestRow]]
    seed: int
    n_boot: int
    analyses: list[str] = field(default_factory=list)
    fast: list[FoldResult] | None = None
    answer_changes: dict | None = None
    ablation: list[VariantResult] = field(default_factory=list)
    max_calls: list[VariantResult] = field(default_factory=list)
    tool_use: dict | None = None
    seconds: float = 0.0
    variant_seconds: dict[str, float] = field(default_factory=dict)
    calibration: dict | None = None  # the calibration profile the policy decided with (its summary)

    @property
    def images(self) -> int:
        return len(self.scores)

    def target_scores(self) -> list[ScoredImage]:
        """The main variant's results on the images some fold tests (not those that only calibrate)."""
        paths = {r.path for f in self.protocol.folds for sel in f.targets for r in self.picked[sel]}
        return [s for p, s in self.scores.items() if p in paths]


def _mean_calls(scores: dict[Path, ScoredImage]) -> float:
    ok = [len(s.tool_calls) for s in scores.values() if s.score_spoof is not None]
    return float(np.mean(ok)) if ok else 0.0


def pick_rows(
    protocol: Protocol, seed: int = 0, limit_per_domain: int | None = None
) -> dict[Selection, list[ManifestRow]]:
    """The rows of each selection. A cap is applied per part (domain/split), with one seeded sample
    per part, so that a part shared by several selections (leave-one-out) uses the same images.
    ``protocol.limit`` then keeps one seeded sample of that many of all target images."""
    pool = protocol.read_pool()
    part_rows = {}
    picked = {}
    for sel in protocol.selections():
        rows: dict[Path, ManifestRow] = {}
        for part in sel.parts:
            if part not in part_rows:
                part_rows[part] = protocol.sample([r for i, r in pool if part.matches(i, r)], seed, limit_per_domain)
            rows.update((r.path, r) for r in part_rows[part])
        if not rows:
            raise ProtocolError(f"selection {sel.name!r} of protocol {protocol.name!r} matches no manifest rows")
        picked[sel] = sorted(rows.values(), key=lambda r: r.rel_path)
    if protocol.limit:
        targets = {s for f in protocol.folds for s in f.targets}
        kept = {
            r.path
            for r in protocol.sample({r.path: r for s in targets for r in picked[s]}.values(), seed, protocol.limit)
        }
        for s in targets:
            picked[s] = [r for r in picked[s] if r.path in kept]
    return picked


def run_evaluation(
    protocol: Protocol,
    policy,
    *,
    registry: ToolRegistry | None = None,
    tools: tuple[str, ...] | None = None,
    max_tool_calls: int = 3,
    analyses: tuple[str, ...] | list[str] = (),
    max_calls_grid: tuple[int, ...] = MAX_CALLS_GRID,
    seed: int = 0,
    n_boot: int = 1000,
    limit_per_domain: int | None = None,
    on_no_face: str = "whole",
    progress: bool = True,
    concurrency: int = 1,
) -> EvaluationResult:
    """Score the protocol's images once per variant and compute its folds and ``analyses``.
    ``concurrency``: investigations in flight at once (core.evaluation.scoring.score_variant)."""
    unknown = set(analyses) - set(ANALYSES)
    if unknown:
        raise ValueError(f"unknown analyses {sorted(unknown)}; known: {', '.join(ANALYSES)}")
    t0 = time.perf_counter()
    picked = pick_rows(protocol, seed, limit_per_domain)
    rows = sorted({r.path: r for rs in picked.values() for r in rs}.values(), key=lambda r: r.rel_path)
    # Faces are kept in memory only when several variants investigate the same images.
    face_cache = FaceCache(on_no_face, keep=bool({"tools", "max-calls"} & set(analyses)))
    face_cache.prepare(rows, progress)
    policy_threshold = policy_threshold_of(policy)
    cache: dict[tuple, tuple[dict[Path, ScoredImage], float]] = {}

    def scores_of(v: Variant) -> dict[Path, ScoredImage]:
        if v.key not in cache:
            t = time.perf_counter()
            cache[v.key] = (
                score_variant(
                    rows, face_cache, policy, v, registry=registry, progress=progress, concurrency=concurrency
                ),
                time.perf_counter() - t,
            )
        return cache[v.key][0]

    def folds_of(v: Variant, answer="reasoning", boot=0) -> list[FoldResult]:
        return evaluate_folds(
            protocol, picked, scores_of(v), answer=answer, policy_threshold=policy_threshold, n_boot=boot, seed=seed
        )

    main = Variant("main" if tools is None else "main (" + ",".join(tools) + ")", tools, max_tool_calls)
    res = EvaluationResult(
        protocol,
        getattr(policy, "name", type(policy).__name__),
        getattr(policy, "version", ""),
        main,
        folds_of(main, boot=n_boot),
        scores_of(main),
        picked,
        seed,
        n_boot,
        list(analyses),
    )
    if "fast" in analyses:
        res.fast = folds_of(main, "fast")
        res.answer_changes = answer_changes(protocol, picked, res.scores, res.fast, res.folds)
    if "tool-use" in analyses:
        res.tool_use = tool_use_by_attack_type(list(res.scores.values()))
    if "tools" in analyses:
        for name, fams in ABLATION:
            v = Variant(name, tools_of(fams), max_tool_calls)
            res.ablation.append(VariantResult(v, folds_of(v), cache[v.key][1], _mean_calls(cache[v.key][0])))
    if "max-calls" in analyses:
        for n in max_calls_grid:
            v = Variant(f"max {n} tool call{'s' if n != 1 else ''}", tools, n)
            res.max_calls.append(VariantResult(v, folds_of(v), cache[v.key][1], _mean_calls(cache[v.key][0])))
    res.variant_seconds = {str(k): secs for k, (_, secs) in cache.items()}
    profile = getattr(policy, "calibration", None)
    res.calibration = profile.summary() if profile is not None else None
    res.seconds = time.perf_counter() - t0
    return res

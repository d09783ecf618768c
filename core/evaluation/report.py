"""Evaluation reports: ``report.md`` + ``report.json`` + ROC/DET plots (PNG) + per-image scores.

A report records what is needed to reproduce it: the exact command line, the seed, the versions of
tarfas / torch / scikit-learn, the policy with its version and the hashes of its weight files, the
protocol file's hash, and where each decision threshold came from.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from ..dataset import sha256_file
from .analyses import EvaluationResult, FoldResult, fold_mean, headline_columns
from .metrics import FasMetrics
from .scoring import write_scores

OPTIMISTIC_NOTE = (
    "HTER@test-EER is the optimistic, paper-style figure: its threshold is the EER threshold of the "
    "test scores themselves, i.e. chosen by looking at the test labels. The HTER column uses the "
    "threshold fixed beforehand and is the honest one."
)


@dataclass
class RunInfo:
    command: list[str]
    seed: int
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    versions: dict[str, str] = field(default_factory=dict)
    weights_dir: str | None = None
    weights_sha256: dict[str, str] = field(default_factory=dict)
    protocol_sha256: str | None = None
    manifests_sha256: dict[str, str] = field(default_factory=dict)
    limit_per_domain: int | None = None
    max_tool_calls: int | None = None
    tools: list[str] | None = None

    @property
    def command_line(self) -> str:
        return shlex.join(self.command)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("tarfas", "torch", "scikit-learn", "numpy", "opencv-python-headless"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def shown_path(path: str | Path) -> str:
    """A path as the report shows it: relative to the working directory when it is below or beside
    it (so that reports do not carry one machine's absolute paths), else absolute."""
    path = Path(path).resolve()
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)
    return rel if rel.count("..") <= 2 else str(path)


def run_info(
    result: EvaluationResult, command: list[str] | None = None, weights_dir: str | Path | None = None
) -> RunInfo:
    info = RunInfo(command or ["tarfas", *sys.argv[1:]], result.seed, versions=package_versions())
    if weights_dir is not None and Path(weights_dir).is_dir():
        info.weights_dir = shown_path(weights_dir)
        info.weights_sha256 = {p.name: sha256_file(p) for p in sorted(Path(weights_dir).iterdir()) if p.is_file()}
    info.protocol_sha256 = result.protocol.file_sha256()
    info.manifests_sha256 = {shown_path(m): sha256_file(m) for m, _ in result.protocol.manifests if m.is_file()}
    info.limit_per_domain = result.protocol.limit_per_domain
    info.max_tool_calls = result.main.max_tool_calls
    info.tools = list(result.main.tools) if result.main.tools else None
    return info


# --- formatting ----------------------------------------------------------------------------------
def pct(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}"


def pct_ci(m: FasMetrics, key: str) -> str:
    v = getattr(m, key)
    ci = m.ci.get(key)
    return pct(v) + (f" [{pct(ci[0], 1)}, {pct(ci[1], 1)}]" if ci and v is not None else "")


def format_table(header: list[str], rows: list[list[str]], *, markdown: bool = True) -> str:
    """Every table of an evaluation: Markdown (reports), or aligned plain text (the terminal), where the
    first column is left-aligned and the others right-aligned."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(c)) for c in col) + (0 if i == 0 else 2) for i, col in enumerate(zip(header, *rows))]
    fmt = lambda r: "".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join(fmt([str(c) for c in r]).rstrip() for r in [header, *rows])


def domain_table(metrics: dict[str, dict]) -> str:
    """The terminal table of `tarfas eval`: per domain and pooled (:func:`~core.evaluation.scoring.metrics_by_domain`)."""
    header = ["domain", "n", "real", "spoof", "AUC%", "EER%", "HTER%", "APCER%", "BPCER%", "unread", "noverd", "noface"]
    rows = []
    for name, m in metrics.items():
        counts = [str(m.get("unreadable", 0)), str(m.get("no_verdict", 0)), str(m.get("no_face", 0))]
        if not m.get("n"):
            rows.append([name, "0", "", "", "no scored images", "", "", "", "", *counts])
            continue
        rows.append(
            [name, str(m["n"]), str(m["n_real"]), str(m["n_spoof"])]
            + [pct(m[k]) for k in ("auc", "eer", "hter", "apcer", "bpcer")]
            + counts
        )
    return format_table(header, rows, markdown=False)


def metrics_table(fold: FoldResult) -> str:
    ci = any(m.ci for m in fold.targets.values())
    header = [
        "target",
        "n (real/spoof)",
        "AUC %" + (" [95% CI]" if ci else ""),
        "EER %",
        "HTER %" + (" [95% CI]" if ci else ""),
        "APCER %",
        "BPCER %",
        "ACER %",
        "worst attack (APCER %)",
        "BPCER@APCER=5% %",
        "BPCER@APCER=1% %",
        "HTER@test-EER % (optimistic)",
    ]
    rows = []
    items = list(fold.targets.items()) + ([("**pooled targets**", fold.pooled)] if fold.pooled is not None else [])
    for name, m in items:
        worst = f"{m.worst_attack_type} ({pct(m.worst_apcer)})" if m.worst_attack_type else "–"
        unread = fold.unreadable.get(name, 0)
        rows.append(
            [
                name,
                f"{m.n} ({m.n_real}/{m.n_spoof})" + (f", {unread} unreadable" if unread else ""),
                pct_ci(m, "auc"),
                pct(m.eer),
                pct_ci(m, "hter"),
                pct(m.apcer),
                pct(m.bpcer),
                pct(m.acer),
                worst,
                pct(m.bpcer_at_apcer.get("5%")),
                pct(m.bpcer_at_apcer.get("1%")),
                pct(m.hter_at_test_eer),
            ]
        )
    return format_table(header, rows)


def attack_table(fold: FoldResult) -> str:
    types = sorted({t for m in fold.targets.values() for t in m.apcer_by_type})
    if not types:
        return ""
    rows = []
    for name, m in fold.targets.items():
        rows.append(
            [name]
            + [f"{pct(m.apcer_by_type[t])} (n={m.n_by_type[t]})" if t in m.apcer_by_type else "–" for t in types]
            + [pct(m.bpcer)]
        )
    return format_table(["target"] + [f"APCER {t} %" for t in types] + ["BPCER %"], rows)


def compact_table(
    rows: list[tuple[str, list[FoldResult]]], extra: dict[str, str] | None = None, extra_name: str = ""
) -> str:
    """Rows = configurations; columns = HTER % / AUC % of each headline column (+ the mean over folds,
    + an extra column given per row name)."""
    cols = list(headline_columns(rows[0][1]))
    many = len(rows[0][1]) > 1
    header = (
        ["configuration"]
        + [f"{c} HTER % / AUC %" for c in cols]
        + (["mean HTER % / AUC %"] if many else [])
        + ([extra_name] if extra else [])
    )
    out = []
    for name, folds in rows:
        hc = headline_columns(folds)
        r = [name] + [f"{pct(hc[c].hter)} / {pct(hc[c].auc)}" for c in cols]
        if many:
            r.append(f"{pct(fold_mean(folds, 'hter'))} / {pct(fold_mean(folds, 'auc'))}")
        if extra:
            r.append(extra.get(name, "–"))
        out.append(r)
    return format_table(header, out)


# --- plots ---------------------------------------------------------------------------------------
def _curves(result: EvaluationResult) -> list[tuple[str, np.ndarray, np.ndarray]]:
    curves = []
    for fold, fr in zip(result.protocol.folds, result.folds):
        prefix = f"{fold.name}: " if len(result.folds) > 1 and len(fold.targets) > 1 else ""
        sels = list(fold.targets) + ([None] if len(fold.targets) > 1 else [])
        for sel in sels:
            rows = (
                {r.path: r for t in fold.targets for r in result.picked[t]}
                if sel is None
                else {r.path: r for r in result.picked[sel]}
            )
            ok = [result.scores[p] for p in rows if result.scores[p].score_spoof is not None]
            y = np.asarray([s.row.y for s in ok])
            if len(set(y.tolist())) < 2:
                continue
            curves.append(
                (prefix + ("pooled" if sel is None else sel.name), y, np.asarray([s.score_spoof for s in ok]))
            )
    return curves


def plot_roc_det(result: EvaluationResult, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm
    from sklearn.metrics import det_curve, roc_auc_score, roc_curve

    curves = _curves(result)
    if not curves:
        return []
    title = f"{result.protocol.name}\npolicy {result.policy} [{result.policy_version}]"
    fig, ax = plt.subplots(figsize=(6, 5.5), dpi=120)
    for name, y, s in curves:
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=1.6, label=f"{name} (AUC {100 * roc_auc_score(y, s):.1f}%)")
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    ax.set(xlabel="BPCER (real faces rejected)", ylabel="1 - APCER (attacks detected)", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(f"ROC · {title}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png")
    plt.close(fig)

    ticks = np.array([0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95])
    eps = 1e-4
    fig, ax = plt.subplots(figsize=(6, 5.5), dpi=120)
    for name, y, s in curves:
        # det_curve: false positives = real faces rejected (BPCER), false negatives = attacks accepted (APCER)
        bpcer, apcer, _ = det_curve(y, s)
        ax.plot(norm.ppf(np.clip(bpcer, eps, 1 - eps)), norm.ppf(np.clip(apcer, eps, 1 - eps)), lw=1.6, label=name)
    lim = norm.ppf([eps, 1 - eps])
    ax.plot(lim, lim, ls=":", c="grey", lw=1, label="EER line")
    labels = [f"{100 * t:g}%" for t in ticks]
    ax.set_xticks(norm.ppf(ticks), labels, fontsize=8)
    ax.set_yticks(norm.ppf(ticks), labels, fontsize=8)
    ax.set(
        xlim=norm.ppf([0.0005, 0.97]),
        ylim=norm.ppf([0.0005, 0.97]),
        xlabel="BPCER (real faces rejected)",
        ylabel="APCER (attacks accepted)",
    )
    ax.set_title(f"DET · {title}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "det.png")
    plt.close(fig)
    return ["roc.png", "det.png"]


def plot_max_calls(result: EvaluationResult, out_dir: Path) -> list[str]:
    if not result.max_calls:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [vr.variant.max_tool_calls for vr in result.max_calls]
    cols = list(headline_columns(result.max_calls[0].folds))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=120)
    for c in cols:
        h = [headline_columns(vr.folds)[c].hter for vr in result.max_calls]
        a = [headline_columns(vr.folds)[c].auc for vr in result.max_calls]
        a1.plot(ns, [np.nan if v is None else 100 * v for v in h], marker="o", label=c)
        a2.plot(ns, [np.nan if v is None else 100 * v for v in a], marker="o", label=c)
    a1.set(xlabel="max tool calls", ylabel="HTER % (a-priori threshold)", xticks=ns)
    a2.set(xlabel="max tool calls", ylabel="AUC %", xticks=ns)
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    a2.legend(fontsize=8)
    fig.suptitle(f"Effect of the tool-call limit (paper Fig. S11)\n{result.protocol.name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "max_tool_calls.png")
    plt.close(fig)
    return ["max_tool_calls.png"]


# --- the report ----------------------------------------------------------------------------------
def report_dict(result: EvaluationResult, info: RunInfo) -> dict:
    p = result.protocol
    d = {
        "protocol": {
            "name": p.name,
            "kind": p.kind,
            "description": p.description,
            "file": shown_path(p.path) if p.path else None,
            "spec": p.spec,
            "threshold_mode": p.threshold,
        },
        "run": asdict(info)
        | {
            "command_line": info.command_line,
            "seconds": result.seconds,
            "images": result.images,
            "n_boot": result.n_boot,
        },
        "policy": {"name": result.policy, "version": result.policy_version},
        "selections": {s.name: len(rows) for s, rows in result.picked.items()},
        "results": [f.to_dict() for f in result.folds],
        "mean_over_folds": {k: fold_mean(result.folds, k) for k in ("hter", "auc", "eer", "acer")}
        if len(result.folds) > 1
        else None,
        "notes": {"optimistic": OPTIMISTIC_NOTE},
    }
    if result.fast is not None:
        d["fast_vs_reasoning"] = {
            "fast": [f.to_dict() for f in result.fast],
            "reasoning": [f.to_dict() for f in result.folds],
            "answer_changes": result.answer_changes,
        }
    if result.ablation:
        d["tool_ablation"] = [
            {
                "name": v.variant.name,
                "tools": v.variant.tools,
                "max_tool_calls": v.variant.max_tool_calls,
                "seconds": v.seconds,
                "mean_calls": v.mean_calls,
                "folds": [f.to_dict() for f in v.folds],
            }
            for v in result.ablation
        ]
    if result.max_calls:
        d["max_tool_calls"] = [
            {
                "max_tool_calls": v.variant.max_tool_calls,
                "seconds": v.seconds,
                "mean_calls": v.mean_calls,
                "folds": [f.to_dict() for f in v.folds],
            }
            for v in result.max_calls
        ]
    if result.tool_use is not None:
        d["tool_use_by_attack_type"] = result.tool_use
    return d


def markdown(result: EvaluationResult, info: RunInfo, images: list[str]) -> str:
    p = result.protocol
    L = [f"# Evaluation: {p.name}", ""]
    if p.description:
        L += [p.description.strip(), ""]
    L += [
        "## Run",
        "",
        f"- command: `{info.command_line}`",
        f"- protocol: `{p.kind}`" + (f", file `{p.path.name}` (sha256 {info.protocol_sha256[:12]})" if p.path else ""),
        f"- policy: **{result.policy}** version `{result.policy_version}`"
        + (f", weights `{info.weights_dir}`" if info.weights_dir else ""),
        f"- agent: max {result.main.max_tool_calls} tool calls, tools: {', '.join(result.main.tools) if result.main.tools else 'all six'}",
        f"- images: {result.images} ({', '.join(f'{s.name}: {len(r)}' for s, r in result.picked.items())})"
        + (f"; at most {info.limit_per_domain} per domain/split (seeded sample)" if info.limit_per_domain else ""),
        f"- seed {result.seed}; bootstrap: {result.n_boot} stratified resamples, 95% percentile intervals",
        f"- versions: {', '.join(f'{k} {v}' for k, v in info.versions.items())}",
        f"- created {info.created_at}, {result.seconds:.0f} s",
    ]
    if info.weights_sha256:
        L.append("- weights sha256: " + ", ".join(f"{k} `{v[:12]}`" for k, v in info.weights_sha256.items()))
    L.append("")
    L += ["## Results (reasoning answer)", ""]
    for f in result.folds:
        L += [f"### {f.fold}", "", f"Threshold {f.threshold:.4f}: {f.threshold_source}.", "", metrics_table(f), ""]
        at = attack_table(f)
        if at:
            L += ["APCER per attack type (at the same threshold):", "", at, ""]
    if len(result.folds) > 1:
        L += [
            f"Mean over folds: HTER {pct(fold_mean(result.folds, 'hter'))} %, AUC {pct(fold_mean(result.folds, 'auc'))} %, EER {pct(fold_mean(result.folds, 'eer'))} %.",
            "",
        ]
    L += [f"_{OPTIMISTIC_NOTE}_", ""]
    L += [f"![{im}]({im})" for im in images if im in ("roc.png", "det.png")] + [""]
    if result.fast is not None:
        L += [
            "## Fast answer vs reasoning answer (paper Table S6)",
            "",
            "Both from the same trajectories; each answer's threshold is fixed the same way (for `source_eer`, on its own source scores).",
            "",
        ]
        L += [compact_table([("Fast answer", result.fast), ("Reasoning answer", result.folds)]), ""]
        for fr, rr in zip(result.fast, result.folds):
            L.append(f"- {fr.fold}: thresholds: fast answer {fr.threshold:.4f}, reasoning answer {rr.threshold:.4f}.")
        for fold, c in (result.answer_changes or {}).items():
            L.append(
                f"- {fold}: the reasoning changed the fast decision on {c['changed']} of {c['n']} target images ({c['corrected']} corrected, {c['broken']} broken)."
            )
        L.append("")
    if result.ablation:
        L += [
            "## Ablation by the tools offered (paper Table 2)",
            "",
            f"Each configuration is a separate investigation of every image (max {result.main.max_tool_calls} tool calls), with its own threshold.",
            "",
        ]
        calls = {v.variant.name: f"{v.mean_calls:.2f}" for v in result.ablation}
        L += [compact_table([(v.variant.name, v.folds) for v in result.ablation], calls, "mean tool calls"), ""]
    if result.max_calls:
        L += ["## Maximum number of tool calls (paper Fig. S11)", ""]
        calls = {v.variant.name: f"{v.mean_calls:.2f}" for v in result.max_calls}
        L += [compact_table([(v.variant.name, v.folds) for v in result.max_calls], calls, "mean tool calls"), ""]
        L += [f"![{im}]({im})" for im in images if im == "max_tool_calls.png"] + [""]
    if result.tool_use is not None:
        L += [
            "## Tool use per attack type",
            "",
            "Over every image investigated by the main configuration (source and targets): % of images that called each tool, mean calls per image, and each family's share of the calls.",
            "",
        ]
        from ..registry import FAMILIES, TOOL_NAMES

        families = (*FAMILIES[1:], FAMILIES[0])  # the image-analysis families first, then zoom
        header = ["group", "n", "mean calls"] + [f"{t} %" for t in TOOL_NAMES] + [" / ".join(families) + " share %"]
        rows = []
        for g, u in result.tool_use.items():
            fam = u["family_share"]
            rows.append(
                [g, str(u["n"]), f"{u['mean_calls']:.2f}"]
                + [pct(u["tool_rate"][t], 1) for t in TOOL_NAMES]
                + [" / ".join(pct(fam[k], 0) for k in families)]
            )
        L += [format_table(header, rows), ""]
    L += [
        "## Definitions",
        "",
        "Spoof is the positive class; an image is called spoof when P(spoof) >= threshold. APCER: attacks accepted as real; BPCER: real faces rejected; HTER = (APCER + BPCER)/2 at the a-priori threshold; ACER = (worst per-attack-type APCER + BPCER)/2; BPCER@APCER=x: the lowest BPCER among the ROC thresholds whose APCER <= x; EER and AUC are threshold-free. Spoofs without an attack type are grouped as `unspecified`.",
        "",
    ]
    return "\n".join(L)


def write_report(result: EvaluationResult, out_dir: str | Path, info: RunInfo) -> Path:
    """Write report.md, report.json, roc.png, det.png (+ max_tool_calls.png) and scores.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = plot_roc_det(result, out) + plot_max_calls(result, out)
    # A verdict column only where every image has one threshold (a single fold).
    write_scores(
        out / "scores.csv", result.scores.values(), result.folds[0].threshold if len(result.folds) == 1 else None
    )
    d = report_dict(result, info)
    d["files"] = images + ["scores.csv", "report.md", "report.json"]
    (out / "report.json").write_text(json.dumps(d, indent=2, default=_json_default))
    (out / "report.md").write_text(markdown(result, info, images))
    return out / "report.md"


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

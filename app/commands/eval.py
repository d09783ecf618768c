"""``tarfas eval MANIFEST|PROTOCOL``: score labelled images through core.evaluation's one runner and
print the per-domain table, or the protocol's folds, analyses and written report."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import EXIT_FAILED, EXIT_INPUT
from .flags import add_config_args, config_from_args
from .policy import add_policy_args, agent_options, load_policy

HELP = "score every image of a manifest (or run a protocol file) and print AUC / EER / HTER per domain"
DESCRIPTION = (
    "With a manifest CSV: score it and print per-domain metrics. With a protocol file (.yaml/.yml/.json, "
    "see docs/evaluation.md and protocols/): run the protocol. --report DIR writes report.md/report.json with ROC/DET plots."
)


@dataclass
class EvalOptions:
    manifest: str = field(
        default="", metadata={"help": "manifest CSV, or an evaluation protocol file (.yaml/.yml/.json)"}
    )
    root: str | None = field(
        default=None, metadata={"help": "folder the manifest paths are relative to (default: the manifest's folder)"}
    )
    domains: list[str] | None = field(default=None, metadata={"help": "comma-separated domains to keep"})
    split: str | None = field(default=None, metadata={"help": "keep rows of this split only (train/test)"})
    limit: int | None = field(default=None, metadata={"help": "score at most N images (a seeded sample)"})
    scores_out: str | None = field(
        default=None, metadata={"help": "write the per-image scores CSV (path,label,domain,score_spoof,verdict,...)"}
    )
    threshold: float | None = field(default=None, metadata={"help": "decision threshold on P(spoof), fixed a priori"})
    dev_manifest: str | None = field(
        default=None, metadata={"help": "fix the threshold at the EER of this dev manifest"}
    )
    json_out: str | None = field(default=None, metadata={"help": "write the metrics as JSON"})
    report: str | None = field(
        default=None, metadata={"help": "write report.md, report.json, roc.png, det.png and scores.csv to this folder"}
    )
    analyses: list[str] | None = field(
        default=None,
        metadata={"help": "comma-separated: fast,tools,tool-use,max-calls (or 'all'); implies the report runner"},
    )
    max_calls_grid: list[int] = field(
        default_factory=lambda: [1, 2, 3, 4], metadata={"help": "tool-call limits of the max-calls analysis"}
    )
    limit_per_domain: int | None = field(
        default=None, metadata={"help": "at most N images per domain/split selection (a seeded sample)"}
    )
    concurrency: int = field(
        default=1,
        metadata={
            "help": "investigations in flight at once: hf generates their turns in batches, vllm sends that many "
            "requests at a time (1 = one image after another)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the samples and of the bootstrap"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for the 95%% intervals; 0 = none"})

    def __post_init__(self):
        from core.evaluation.analyses import ANALYSES

        self.analyses = list(ANALYSES) if self.analyses == ["all"] else (self.analyses or [])
        if self.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")
        if self.limit and not self.plain:
            raise ValueError("--limit is for plain runs; with a protocol or --report use --limit-per-domain")
        if self.is_protocol and (self.domains or self.split or self.dev_manifest or self.root):
            raise ValueError(
                "--domains/--split/--dev-manifest/--root belong in the protocol file, not on the command line"
            )

    @property
    def is_protocol(self) -> bool:
        from core.evaluation.protocols import is_protocol_file

        return is_protocol_file(self.manifest)

    @property
    def plain(self) -> bool:
        """A manifest without report or analyses: the per-domain text table."""
        return not (self.is_protocol or self.report or self.analyses)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, EvalOptions, positional=("manifest",))
    add_policy_args(p)


def run(args) -> int:
    from core.evaluation import analyses, report
    from core.evaluation.protocols import load_protocol, manifest_protocol

    opts, agent = config_from_args(EvalOptions, args), agent_options(args)  # every flag checked before any work
    if opts.is_protocol:
        protocol = load_protocol(opts.manifest)
        if opts.threshold is not None:
            protocol.threshold = float(opts.threshold)
    else:
        protocol = manifest_protocol(
            opts.manifest,
            opts.root,
            domains=opts.domains,
            split=opts.split,
            threshold=opts.threshold if opts.threshold is not None else "policy",
            dev_manifest=opts.dev_manifest,
            limit=opts.limit,
        )
    if opts.limit_per_domain is not None:
        protocol.limit_per_domain = opts.limit_per_domain
    _check_images_exist(protocol, opts)  # before the policy loads: a wrong root is the usual cause
    policy, registry = load_policy(args)
    result = analyses.run_evaluation(
        protocol,
        policy,
        registry=registry,
        tools=tuple(agent.tools) if agent.tools else None,
        max_tool_calls=agent.max_tool_calls,
        analyses=opts.analyses,
        max_calls_grid=tuple(opts.max_calls_grid),
        seed=opts.seed,
        n_boot=0 if opts.plain else opts.bootstrap,
        on_no_face=agent.on_no_face or "whole",
        progress=opts.plain or sys.stderr.isatty() or bool(opts.report),
        concurrency=opts.concurrency,
    )
    for s in result.scores.values():
        if s.score_spoof is None:
            print(f"{'unreadable' if s.unreadable else 'no verdict'}: {s.row.rel_path}: {s.error}", file=sys.stderr)
    scored_none = not any(s.score_spoof is not None for s in result.scores.values())
    if scored_none:
        unreadable = sum(1 for s in result.scores.values() if s.unreadable)
        if unreadable == len(result.scores):  # nothing could even be read: no metrics at all
            print(f"error: none of the {unreadable} images could be read; nothing was scored", file=sys.stderr)
            return EXIT_INPUT
        # Read, but the policy reached no verdict on any (e.g. a barely trained model): the table and files
        # are still written (its no_verdict column counts them), and the exit status says nothing was scored.
        print(
            f"error: the policy reached no verdict on any of the {len(result.scores)} images "
            f"({unreadable} unreadable); nothing was scored and every metric below is empty",
            file=sys.stderr,
        )
    if opts.plain:
        _print_plain(result, opts)
        return EXIT_FAILED if scored_none else 0
    print(
        f"protocol {protocol.name} ({protocol.kind}); policy: {result.policy} [{result.policy_version}]; {result.images} images in {result.seconds:.1f} s"
    )
    for f in result.folds:
        print(f"\n{f.fold}: threshold {f.threshold:.4f} ({f.threshold_source})")
        print(report.metrics_table(f))
    if result.fast is not None:
        print(
            "\nfast answer vs reasoning answer (paper Table S6)\n"
            + report.compact_table([("Fast answer", result.fast), ("Reasoning answer", result.folds)])
        )
    for title, variants in (
        ("tools offered (paper Table 2)", result.ablation),
        ("max tool calls (paper Fig. S11)", result.max_calls),
    ):
        if variants:
            calls = {v.variant.name: f"{v.mean_calls:.2f}" for v in variants}
            print(
                f"\n{title}\n"
                + report.compact_table([(v.variant.name, v.folds) for v in variants], calls, "mean tool calls")
            )
    if opts.report:
        from core.experts import DEFAULT_DIR

        weights = args.weights or (DEFAULT_DIR if getattr(policy, "bank", None) is not None else None)
        path = report.write_report(result, opts.report, report.run_info(result, _command(args), weights))
        print(f"\nreport: {path}")
    if opts.json_out:
        Path(opts.json_out).write_text(
            json.dumps(
                {
                    "policy": result.policy,
                    "policy_version": result.policy_version,
                    "calibration_profile": result.calibration,
                    "results": [f.to_dict() for f in result.folds],
                },
                indent=2,
            )
        )
    return EXIT_FAILED if scored_none else 0


def _check_images_exist(protocol, opts: EvalOptions) -> None:
    """Refuse a manifest none of whose images exist, with a hint at the folder its paths are relative to."""
    rows: dict[int, list] = {}
    for i, row in protocol.read_pool():
        rows.setdefault(i, []).append(row)
    for i, (manifest, root) in enumerate(protocol.manifests):
        found = rows.get(i, [])
        if found and not any(r.path.exists() for r in found):
            base = root or manifest.parent
            hint = (
                "set its root in the protocol file"
                if opts.is_protocol
                else "give --root DIR, the folder they are relative to"
            )
            raise ValueError(
                f"none of the {len(found)} images of {manifest} exist (e.g. {found[0].path}; paths are read "
                f"relative to {base}): {hint}"
            )


def _print_plain(result, opts: EvalOptions) -> None:
    from core.evaluation import report, scoring

    (fold,) = result.folds
    scored = result.target_scores()
    metrics = scoring.metrics_by_domain(scored, fold.threshold)
    ms = [s.ms for s in scored if s.score_spoof is not None]
    median = float(statistics.median(ms)) if ms else None
    print(
        f"policy: {result.policy} [{result.policy_version}]  threshold {fold.threshold:.4f} ({fold.threshold_source})"
    )
    print(report.domain_table(metrics))
    print(f"{len(scored)} images in {result.seconds:.1f} s; median {median or 0:.1f} ms per image")
    if opts.scores_out:
        scoring.write_scores(opts.scores_out, scored, fold.threshold)
    if opts.json_out:
        Path(opts.json_out).write_text(
            json.dumps(
                {
                    "policy": result.policy,
                    "policy_version": result.policy_version,
                    "threshold": fold.threshold,
                    "threshold_source": fold.threshold_source,
                    "calibration_profile": result.calibration,
                    "metrics": metrics,
                    "median_ms_per_image": median,
                },
                indent=2,
            )
        )


def _command(args) -> list[str]:
    """The command line that reproduces this run (every option spelled out, defaults included)."""
    parts = ["tarfas", "eval", str(args.manifest)]
    for k, v in vars(args).items():
        if k in ("command", "manifest", "handler") or v is None or v is False:
            continue
        if isinstance(v, list):
            v = ",".join(map(str, v))
        parts += ["--" + k.replace("_", "-")] + ([] if v is True else [str(v)])
    return parts

"""The ``tarfas`` command line.

  tarfas investigate IMAGE [--policy expert] [--max-tool-calls N] [--json] [--out-dir DIR]
  tarfas eval MANIFEST [--root DIR] [--policy expert] [--scores-out FILE.csv] [--threshold T | --dev-manifest M]
  tarfas eval MANIFEST|PROTOCOL.yaml --report DIR [--analyses fast,tools,tool-use,max-calls|all] [--bootstrap N]
  tarfas train experts [--manifest M] [--train-domains nuaa] [--epochs 10] [--out assets/experts]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

EXIT_INPUT = 2  # bad input (unreadable image, no face, bad manifest)
EXIT_FAILED = 1  # the investigation itself failed


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default="expert", help="policy that investigates (default: expert, the offline ensemble)")
    p.add_argument("--weights", default=None, help="expert weights folder (default: the shipped assets/experts)")
    p.add_argument("--max-tool-calls", type=int, default=3, help="tool calls allowed per investigation (paper: 3)")
    p.add_argument("--tools", default=None, help="comma-separated subset of tools to offer (default: all six)")
    p.add_argument("--on-no-face", choices=["error", "whole"], default=None, help="when no face is found: stop with an error, or analyse the whole image")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tarfas", description="Forensic face anti-spoofing with tool-augmented reasoning (TAR-FAS).")
    sub = parser.add_subparsers(dest="command", required=True)

    inv = sub.add_parser("investigate", help="investigate one face image and print the trajectory")
    inv.add_argument("image")
    _add_policy_args(inv)
    inv.add_argument("--json", action="store_true", help="print one JSON object (tool images are written to --out-dir)")
    inv.add_argument("--out-dir", default=None, help="folder for the crop, tool images and trajectory.json (default: a new temp folder)")

    ev = sub.add_parser(
        "eval",
        help="score every image of a manifest (or run a protocol file) and print AUC / EER / HTER per domain",
        description="With a manifest CSV: score it and print per-domain metrics. With a protocol file (.yaml/.yml/.json, "
        "see docs/evaluation.md and protocols/): run the protocol. --report DIR writes report.md/report.json with ROC/DET plots.",
    )
    ev.add_argument("manifest", help="manifest CSV, or an evaluation protocol file (.yaml/.yml/.json)")
    ev.add_argument("--root", default=None, help="folder the manifest paths are relative to (default: the manifest's folder)")
    _add_policy_args(ev)
    ev.add_argument("--domains", default=None, help="comma-separated domains to keep")
    ev.add_argument("--split", default=None, help="keep rows of this split only (train/test)")
    ev.add_argument("--limit", type=int, default=None, help="score at most N images (a seeded sample)")
    ev.add_argument("--scores-out", default=None, help="write path,label,domain,score_spoof,verdict to this CSV")
    ev.add_argument("--threshold", type=float, default=None, help="decision threshold on P(spoof), fixed a priori")
    ev.add_argument("--dev-manifest", default=None, help="fix the threshold at the EER of this dev manifest")
    ev.add_argument("--json-out", default=None, help="write the metrics as JSON")
    ev.add_argument("--report", default=None, metavar="DIR", help="write report.md, report.json, roc.png, det.png and scores.csv to DIR")
    ev.add_argument("--analyses", default=None, help="comma-separated: fast,tools,tool-use,max-calls (or 'all'); implies the report runner")
    ev.add_argument("--max-calls-grid", default="1,2,3,4", help="tool-call limits of the max-calls analysis (default: 1,2,3,4)")
    ev.add_argument("--limit-per-domain", type=int, default=None, help="at most N images per domain/split selection (a seeded sample)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the samples and of the bootstrap (default: 0)")
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals; 0 = none (default: 1000)")

    tr = sub.add_parser("train", help="train models")
    trs = tr.add_subparsers(dest="what", required=True)
    te = trs.add_parser("experts", help="train the expert ensemble (RGB classifier + one CNN per tool)")
    from training.configs import ExpertTrainConfig

    _dataclass_args(te, ExpertTrainConfig)
    return parser


def _dataclass_args(p: argparse.ArgumentParser, cls) -> None:
    """One flag per config field (TRL-style: the dataclass is the single source of defaults)."""
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, list):
            p.add_argument(flag, default=default, type=lambda s: [x for x in s.split(",") if x], help=f"comma-separated (default: {','.join(default)})")
        elif isinstance(default, bool):
            p.add_argument(flag, default=default, action=argparse.BooleanOptionalAction)
        elif default is None:
            p.add_argument(flag, default=None, type=int if f.name.startswith("max_") else str)
        else:
            p.add_argument(flag, default=default, type=type(default), help=f"(default: {default})")


def _load_policy(args):
    from core.policies import load_policy

    if args.policy == "expert":
        return load_policy("expert", weights=args.weights)
    return load_policy(args.policy)


def _experts_for(policy, args):
    """The expert bank used to annotate tool results (the expert policy's own, else the shipped one)."""
    bank = getattr(policy, "bank", None)
    if bank is not None:
        return bank
    from core.errors import WeightsError
    from core.experts import ExpertBank

    try:
        return ExpertBank.load(args.weights)
    except WeightsError:
        return None


def _config(args, on_no_face: str):
    from core.agent import AgentConfig
    from core.registry import ToolRegistry

    tools = [t.strip() for t in args.tools.split(",")] if args.tools else None
    ToolRegistry(tools)  # unknown names -> ValueError with the known ones, before any work is done
    return AgentConfig(max_tool_calls=args.max_tool_calls, allowed_tools=tools, extra={"on_no_face": on_no_face})


def cmd_investigate(args) -> int:
    from core import agent, faces
    from core.errors import InputImageError, TarfasError

    t0 = time.perf_counter()
    on_no_face = args.on_no_face or "error"
    try:
        data = Path(args.image).read_bytes() if Path(args.image).is_file() else None
        if data is None:
            raise faces.InvalidImageError(f"{args.image}: no such file")
        rgb = faces.load_image(data, name=str(args.image))
        t_load = time.perf_counter()
        face = faces.prepare_face(rgb, on_no_face=on_no_face)
        t_face = time.perf_counter()
    except InputImageError as exc:
        return _input_error(args, exc)
    try:
        policy = _load_policy(args)
        config = _config(args, on_no_face)
    except (TarfasError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    traj = agent.run(face, policy, config, experts=_experts_for(policy, args), source=str(args.image), image_sha256=faces.sha256_bytes(data))
    traj.timings_ms = {"load": (t_load - t0) * 1e3, "face": (t_face - t_load) * 1e3, **traj.timings_ms}
    out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="tarfas-"))
    traj.save(out_dir)
    threshold = getattr(policy, "threshold", None)
    if args.json:
        print(json.dumps(trajectory_json(traj, out_dir, policy, threshold), indent=2))
    else:
        print(render_text(traj, out_dir, policy, threshold))
    return 0 if traj.status == "completed" else EXIT_FAILED


def _input_error(args, exc) -> int:
    if args.json:
        print(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc)}, "image": str(args.image)}))
    print(f"error: {exc}", file=sys.stderr)
    return EXIT_INPUT


def trajectory_json(traj, out_dir: Path, policy, threshold) -> dict:
    """The stable JSON of ``tarfas investigate --json`` (documented keys; more may be added)."""
    d = traj.to_dict()
    fast = traj.fast_answer
    return {
        "policy": traj.policy,
        "policy_version": traj.policy_version,
        "policy_description": getattr(policy, "description", ""),
        "image": traj.source,
        "image_sha256": traj.image_sha256,
        "status": traj.status,
        "error": traj.error,
        "face": d["face"],
        "crop_path": str(out_dir / traj.crop_path) if traj.crop_path else None,
        "fast_answer": {"verdict": fast.verdict, "reason": fast.reason, "score_spoof": traj.fast_score} if fast else None,
        "tool_calls": [
            {
                "name": t.tool_result.name,
                "arguments": t.tool_result.arguments,
                "image_path": str(out_dir / t.tool_result.image_path),
                "expert_p_spoof": t.tool_result.expert_p_spoof,
                "stats": t.tool_result.stats,
                "elapsed_ms": t.tool_result.elapsed_ms,
            }
            for t in traj.tool_turns
        ],
        "final": {"verdict": traj.final.verdict, "score_spoof": traj.final.score_spoof, "threshold": threshold, "source": traj.final.source} if traj.final else None,
        "turns": d["turns"],
        "timings_ms": traj.timings_ms,
        "trajectory_path": str(out_dir / "trajectory.json"),
    }


def render_text(traj, out_dir: Path, policy, threshold) -> str:
    lines = [f"tarfas investigation of {traj.source}", f"policy: {getattr(policy, 'description', traj.policy)} [{traj.policy_version}]"]
    if traj.face and traj.face.notes:
        lines += [f"note: {n}" for n in traj.face.notes]
    for t in traj.turns:
        head = "fast answer" if t.kind == "fast" else f"turn {t.index}"
        lines.append(f"\n[{head}] {t.text}")
        if t.tool_result is not None:
            r = t.tool_result
            p = "" if r.expert_p_spoof is None else f"  expert P(spoof trace) = {r.expert_p_spoof:.2f}"
            lines.append(f"  -> {r.name}{json.dumps(r.arguments) if r.arguments else ''}: {out_dir / r.image_path}{p}")
        if t.error:
            lines.append(f"  !! {t.error}")
    if traj.final:
        thr = f" (threshold {threshold:.3f})" if threshold is not None else ""
        fb = " [fallback to the fast answer]" if traj.final.source != "answer" else ""
        lines.append(f"\nFINAL: {traj.final.verdict.upper()}  P(spoof) = {traj.final.score_spoof:.3f}{thr}{fb}")
    if traj.error:
        lines.append(f"error: {traj.error}")
    lines.append(f"time: {traj.timings_ms.get('total', 0):.0f} ms (+ {traj.timings_ms.get('face', 0):.0f} ms face crop); files: {out_dir}")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    import random

    from core import evaluate
    from core.errors import TarfasError
    from core.eval_protocols import is_protocol_file
    from core.manifest import read_manifest, select

    if is_protocol_file(args.manifest) or args.report or args.analyses:
        return _cmd_eval_report(args)
    t0 = time.time()
    try:
        rows = read_manifest(args.manifest, args.root)
        rows = select(rows, args.domains.split(",") if args.domains else None, args.split)
        if args.limit and len(rows) > args.limit:
            rows = sorted(random.Random(0).sample(rows, args.limit), key=lambda r: r.rel_path)
        if not rows:
            raise TarfasError("no rows left after the --domains/--split filters")
        policy = _load_policy(args)
        config = _config(args, args.on_no_face or "whole")
    except (TarfasError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    experts = _experts_for(policy, args)
    on_no_face = args.on_no_face or "whole"
    if args.threshold is not None:
        threshold, source = args.threshold, "--threshold"
    elif args.dev_manifest:
        try:
            dev_rows = read_manifest(args.dev_manifest)
            dev = evaluate.score_rows(dev_rows, policy, config, experts=experts, on_no_face=on_no_face, desc="dev")
            threshold, source = evaluate.threshold_from_dev(dev), f"EER of {args.dev_manifest}"
        except (TarfasError, ValueError) as exc:
            print(f"error: --dev-manifest: {exc}", file=sys.stderr)
            return EXIT_INPUT
    elif getattr(policy, "threshold", None) is not None:
        threshold, source = policy.threshold, f"{policy.name} policy's threshold (fixed on its dev data)"
    else:
        print("error: this policy ships no threshold; give --threshold or --dev-manifest", file=sys.stderr)
        return EXIT_INPUT
    scored = evaluate.score_rows(rows, policy, config, experts=experts, on_no_face=on_no_face)
    metrics = evaluate.metrics_by_domain(scored, threshold)
    print(f"policy: {policy.name} [{getattr(policy, 'version', '')}]  threshold {threshold:.4f} ({source})")
    print(evaluate.format_table(metrics))
    for s in scored:
        if s.score_spoof is None:
            print(f"unreadable: {s.row.rel_path}: {s.error}", file=sys.stderr)
    extra = evaluate.summarize_scores(scored)
    print(f"{len(scored)} images in {time.time() - t0:.1f} s; median {extra['median_ms_per_image'] or 0:.1f} ms per image")
    if args.scores_out:
        evaluate.write_scores(args.scores_out, scored, threshold)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"policy": policy.name, "policy_version": getattr(policy, "version", ""), "threshold": threshold, "threshold_source": source, "metrics": metrics, **extra}, indent=2))
    return 0


def _cmd_eval_report(args) -> int:
    """`tarfas eval` with a protocol file, --report or --analyses: core.analysis runs it, core.report writes it."""
    from core import analysis, report
    from core.errors import TarfasError
    from core.eval_protocols import is_protocol_file, load_protocol, manifest_protocol

    try:
        if args.limit:
            raise TarfasError("--limit is for plain runs; with a protocol or --report use --limit-per-domain")
        if is_protocol_file(args.manifest):
            if args.domains or args.split or args.dev_manifest or args.root:
                raise TarfasError("--domains/--split/--dev-manifest/--root belong in the protocol file, not on the command line")
            protocol = load_protocol(args.manifest)
            if args.threshold is not None:
                protocol.threshold = float(args.threshold)
        else:
            threshold = float(args.threshold) if args.threshold is not None else "policy"
            protocol = manifest_protocol(args.manifest, args.root, domains=args.domains.split(",") if args.domains else None, split=args.split, threshold=threshold, dev_manifest=args.dev_manifest)
        if args.limit_per_domain is not None:
            protocol.limit_per_domain = args.limit_per_domain
        names = [a.strip() for a in (args.analyses or "").split(",") if a.strip()]
        analyses = list(analysis.ANALYSES) if names == ["all"] else names
        grid = tuple(int(x) for x in args.max_calls_grid.split(",") if x.strip())
        policy = _load_policy(args)
        config = _config(args, args.on_no_face or "whole")
        result = analysis.run_evaluation(
            protocol, policy, experts=_experts_for(policy, args), tools=tuple(config.allowed_tools) if config.allowed_tools else None,
            max_tool_calls=config.max_tool_calls, analyses=analyses, max_calls_grid=grid, seed=args.seed, n_boot=args.bootstrap,
            on_no_face=args.on_no_face or "whole", progress=sys.stderr.isatty() or bool(args.report),
        )
    except (TarfasError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    print(f"protocol {protocol.name} ({protocol.kind}); policy: {result.policy} [{result.policy_version}]; {result.images} images in {result.seconds:.1f} s")
    for f in result.folds:
        print(f"\n{f.fold}: threshold {f.threshold:.4f} ({f.threshold_source})")
        print(report.metrics_table(f))
    if result.fast is not None:
        print("\nfast answer vs reasoning answer (paper Table S6)\n" + report.compact_table([("Fast answer", result.fast), ("Reasoning answer", result.folds)]))
    if result.ablation:
        print("\ntools offered (paper Table 2)\n" + report.compact_table([(v.variant.name, v.folds) for v in result.ablation], {v.variant.name: f"{v.mean_calls:.2f}" for v in result.ablation}, "mean tool calls"))
    if result.max_calls:
        print("\nmax tool calls (paper Fig. S11)\n" + report.compact_table([(v.variant.name, v.folds) for v in result.max_calls], {v.variant.name: f"{v.mean_calls:.2f}" for v in result.max_calls}, "mean tool calls"))
    for s in result.scores.values():
        if s.score_spoof is None:
            print(f"unreadable: {s.row.rel_path}: {s.error}", file=sys.stderr)
    if args.report:
        from core.experts import DEFAULT_DIR

        weights = args.weights or (DEFAULT_DIR if getattr(policy, "bank", None) is not None else None)
        path = report.write_report(result, args.report, report.run_info(result, _eval_command(args), weights))
        print(f"\nreport: {path}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"policy": result.policy, "policy_version": result.policy_version, "results": [f.to_dict() for f in result.folds]}, indent=2))
    return 0


def _eval_command(args) -> list[str]:
    """The command line that reproduces this run (every option spelled out, defaults included)."""
    parts = ["tarfas", "eval", str(args.manifest)]
    for k, v in vars(args).items():
        if k in ("command", "manifest") or v is None or v is False:
            continue
        parts += ["--" + k.replace("_", "-")] + ([] if v is True else [str(v)])
    return parts


def cmd_train(args) -> int:
    if args.what == "experts":
        from training.configs import ExpertTrainConfig
        from training.experts import train_experts

        cfg = ExpertTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ExpertTrainConfig)})
        path = train_experts(cfg)
        print(f"saved {path}")
        return 0
    return EXIT_INPUT


def _single_thread_inference() -> None:
    """Per-image networks are tiny: one thread is fastest, and on a busy machine torch's default
    (one thread per core) oversubscribes and runs ~50x slower. TARFAS_THREADS overrides."""
    import os

    import torch

    torch.set_num_threads(int(os.environ.get("TARFAS_THREADS", "1")))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("investigate", "eval"):
        _single_thread_inference()
    handlers = {"investigate": cmd_investigate, "eval": cmd_eval, "train": cmd_train}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

"""The ``tarfas`` command line.

  tarfas investigate IMAGE [--policy expert] [--max-tool-calls N] [--json] [--out-dir DIR]
      --policy hf --model DIR [--adapter DIR] | --policy vllm --base-url URL --model NAME [--api-key-env VAR]
  tarfas model init-nano OUT [--arch qwen2_5_vl|internvl] [--seed 0]
  tarfas eval MANIFEST [--root DIR] [--policy expert] [--scores-out FILE.csv] [--threshold T | --dev-manifest M]
  tarfas eval MANIFEST|PROTOCOL.yaml --report DIR [--analyses fast,tools,tool-use,max-calls|all] [--bootstrap N]
  tarfas app [--data-dir DIR] [--db URL] [--host H] [--port P] [--auth USER:PASS ...] [--users-file F]
  tarfas train experts [--manifests fas-dev,fas-train] [--domains ...] [--epochs 3] [--out assets/experts] [--calibrate-only]
  tarfas train sft --stage kt|fi --model DIR --data EXPORT_DIR[,MANIFEST.csv] [--adapter DIR] --out OUT
  tarfas train grpo --model DIR [--adapter DIR] --data EXPORT_DIR --out OUT [--reward dt|st]
  tarfas annotate MANIFEST --out DIR [--annotator expert|openai --model M --base-url URL] [--queue-into DATA_DIR]
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
    p.add_argument("--model", default=None, help="hf: checkpoint folder (Qwen2.5-VL / InternVL3-hf); vllm: served model name")
    p.add_argument("--adapter", default=None, help="hf: PEFT LoRA adapter folder")
    p.add_argument("--base-url", default=None, help="vllm: OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key-env", default=None, help="vllm: environment variable that holds the API key")
    p.add_argument("--max-new-tokens", type=int, default=512, help="hf/vllm: token budget of one assistant turn (default: 512)")
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

    ap = sub.add_parser("app", help="serve the analyst workbench (Gradio): investigate, review, queue, export, metrics")
    ap.add_argument("--data-dir", default="tarfas-data", help="case store folder: tarfas.db and the evidence files (default: ./tarfas-data)")
    ap.add_argument("--db", default=None, metavar="URL", help="SQLAlchemy database URL instead of <data-dir>/tarfas.db")
    ap.add_argument("--host", default="127.0.0.1", help="address to serve on (beyond localhost needs --auth or --users-file)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--auth", action="append", default=[], metavar="USER:PASS", help="an analyst login (repeatable)")
    ap.add_argument("--users-file", default=None, help="file of user:password lines (chmod 600)")
    ap.add_argument("--concurrency", type=int, default=2, help="investigations run at once (default: 2)")
    ap.add_argument("--max-file-mb", type=int, default=20, help="upload size limit in MiB (default: 20)")

    tr = sub.add_parser("train", help="train models")
    trs = tr.add_subparsers(dest="what", required=True)
    te = trs.add_parser("experts", help="train the expert ensemble (pretrained RGB network + one CNN per tool), choosing and calibrating on held-out domains",
                        description="Leave-one-domain-out training: epochs, calibration, fusion and the threshold are fitted on out-of-fold scores of domains the networks never saw; then the shipped networks are trained on every domain. See README (Shipped weights).")
    from training.configs import ExpertTrainConfig

    _dataclass_args(te, ExpertTrainConfig)
    from training.configs import GRPOConfig, SFTConfig

    ts = trs.add_parser("sft", help="supervised fine-tuning of an MLLM policy: --stage kt (fast answers) or fi (multi-turn trajectories)",
                        description="TRL SFTTrainer + LoRA (paper §3.2.1-3.2.2). --data takes dataset folders (app export, annotation) "
                        "and/or manifest CSVs, comma-separated. Writes OUT/adapter (or OUT/model) with tarfas_lineage.json. See docs/training.md.")
    _dataclass_args(ts, SFTConfig)
    tg = trs.add_parser("grpo", help="DT-GRPO with real tool rollouts (or the ST-GRPO baseline with --reward st)",
                        description="TRL GRPOTrainer whose rollouts run tarfas's agent loop and tools (paper §3.2.3). "
                        "Writes OUT/model (or OUT/adapter with --use-lora) with tarfas_lineage.json. See docs/training.md.")
    _dataclass_args(tg, GRPOConfig)

    mo = sub.add_parser("model", help="model folders for the hf / vllm policies")
    mos = mo.add_subparsers(dest="what", required=True)
    nano = mos.add_parser("init-nano", help="build a tiny offline Qwen2.5-VL or InternVL3 (real architecture, local tokenizer) into OUT")
    nano.add_argument("out")
    nano.add_argument("--arch", choices=["qwen2_5_vl", "internvl"], default="qwen2_5_vl")
    nano.add_argument("--seed", type=int, default=0)

    an = sub.add_parser(
        "annotate",
        help="build a ToolFAS-style trajectory dataset from a manifest with an annotator guided by the tool experts",
        description="Multi-turn tool-augmented annotation (TAR-FAS §3.1): verified, re-annotated once on failure, "
        "resumable. Writes a dataset folder that `tarfas train sft` reads. See docs/annotation.md.",
    )
    an.add_argument("manifest", help="manifest CSV (path,label,attack_type,domain,split)")
    an.add_argument("--out", required=True, help="dataset folder (created, or resumed if it holds an earlier annotation run)")
    an.add_argument("--annotator", default="expert", help="'expert' (offline, the expert ensemble) or 'openai' (an OpenAI-compatible endpoint)")
    an.add_argument("--model", default=None, help="model name served by the endpoint (--annotator openai)")
    an.add_argument("--base-url", default=None, help="endpoint base URL, e.g. http://127.0.0.1:8000/v1 (--annotator openai)")
    an.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key (default: OPENAI_API_KEY)")
    an.add_argument("--structured", choices=["auto", "on", "off"], default="auto", help="JSON-schema replies: auto = when the endpoint accepts them")
    an.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: 120)")
    an.add_argument("--retries", type=int, default=3, help="retries per request on timeouts, 5xx/429 and malformed replies (default: 3)")
    an.add_argument("--temperature", type=float, default=0.7)
    an.add_argument("--concurrency", type=int, default=None, help="annotations in flight (default: 1 for expert, 4 for openai)")
    an.add_argument("--weights", default=None, help="expert weights folder for the guidance (default: the shipped assets/experts)")
    an.add_argument("--root", default=None, help="folder the manifest paths are relative to (default: the manifest's folder)")
    an.add_argument("--domains", default=None, help="comma-separated domains to keep")
    an.add_argument("--split", default=None, help="keep rows of this split only")
    an.add_argument("--limit", type=int, default=None, help="annotate a seeded random sample of N rows")
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--max-turns", type=int, default=6, help="L_max: reasoning turns per annotation (paper: 6)")
    an.add_argument("--tools", default=None, help="comma-separated subset of tools to offer (default: all six)")
    an.add_argument("--review-rate", type=float, default=0.05, help="share of accepted samples drawn for manual verification (default: 0.05)")
    an.add_argument("--on-no-face", choices=["whole", "error"], default="whole", help="no face found: annotate the whole image, or reject the sample")
    an.add_argument("--queue-into", default=None, metavar="DATA_DIR", help="afterwards, import the review queue into this workbench case store")
    an.add_argument("--no-progress", action="store_true")
    return parser


def _dataclass_args(p: argparse.ArgumentParser, cls) -> None:
    """One flag per config field (TRL-style: the dataclass is the single source of defaults)."""
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, list):
            item = type(default[0]) if default else str  # a list of numbers parses as numbers
            p.add_argument(flag, default=default, type=lambda s, item=item: [item(x) for x in s.split(",") if x],
                           help=f"comma-separated (default: {','.join(map(str, default))})")
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
    if args.policy == "hf":
        if not args.model:
            raise ValueError("--policy hf needs --model DIR (a Qwen2.5-VL or InternVL3-hf checkpoint folder)")
        return load_policy("hf", model=args.model, adapter=args.adapter, max_new_tokens=args.max_new_tokens)
    if args.policy == "vllm":
        if not args.base_url or not args.model:
            raise ValueError("--policy vllm needs --base-url URL and --model NAME")
        return load_policy("vllm", base_url=args.base_url, model=args.model, api_key_env=args.api_key_env, max_new_tokens=args.max_new_tokens)
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
    """`tarfas eval`: a manifest (a one-fold protocol) or a protocol file, through one runner
    (core.evaluation.analyses); --report and --analyses add the written report and the paper's analyses."""
    from core.errors import TarfasError
    import statistics

    from core.evaluation import analyses, report, scoring
    from core.evaluation.protocols import is_protocol_file, load_protocol, manifest_protocol

    plain = not (is_protocol_file(args.manifest) or args.report or args.analyses)
    try:
        if args.limit and not plain:
            raise TarfasError("--limit is for plain runs; with a protocol or --report use --limit-per-domain")
        if is_protocol_file(args.manifest):
            if args.domains or args.split or args.dev_manifest or args.root:
                raise TarfasError("--domains/--split/--dev-manifest/--root belong in the protocol file, not on the command line")
            protocol = load_protocol(args.manifest)
            if args.threshold is not None:
                protocol.threshold = float(args.threshold)
        else:
            threshold = float(args.threshold) if args.threshold is not None else "policy"
            protocol = manifest_protocol(args.manifest, args.root, domains=args.domains.split(",") if args.domains else None, split=args.split,
                                         threshold=threshold, dev_manifest=args.dev_manifest, limit=args.limit)
        if args.limit_per_domain is not None:
            protocol.limit_per_domain = args.limit_per_domain
        names = [a.strip() for a in (args.analyses or "").split(",") if a.strip()]
        wanted = list(analyses.ANALYSES) if names == ["all"] else names
        grid = tuple(int(x) for x in args.max_calls_grid.split(",") if x.strip())
        policy = _load_policy(args)
        config = _config(args, args.on_no_face or "whole")
        result = analyses.run_evaluation(
            protocol, policy, experts=_experts_for(policy, args), tools=tuple(config.allowed_tools) if config.allowed_tools else None,
            max_tool_calls=config.max_tool_calls, analyses=wanted, max_calls_grid=grid, seed=args.seed, n_boot=0 if plain else args.bootstrap,
            on_no_face=args.on_no_face or "whole", progress=plain or sys.stderr.isatty() or bool(args.report),
        )
    except (TarfasError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    for s in result.scores.values():
        if s.score_spoof is None:
            print(f"{'unreadable' if s.unreadable else 'no verdict'}: {s.row.rel_path}: {s.error}", file=sys.stderr)
    if plain:
        (fold,) = result.folds
        scored = result.target_scores()
        metrics = scoring.metrics_by_domain(scored, fold.threshold)
        ms = [s.ms for s in scored if s.score_spoof is not None]
        median = float(statistics.median(ms)) if ms else None
        print(f"policy: {result.policy} [{result.policy_version}]  threshold {fold.threshold:.4f} ({fold.threshold_source})")
        print(report.domain_table(metrics))
        print(f"{len(scored)} images in {result.seconds:.1f} s; median {median or 0:.1f} ms per image")
        if args.scores_out:
            scoring.write_scores(args.scores_out, scored, fold.threshold)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({"policy": result.policy, "policy_version": result.policy_version, "threshold": fold.threshold,
                                                       "threshold_source": fold.threshold_source, "metrics": metrics, "median_ms_per_image": median}, indent=2))
        return 0
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
    if args.what in ("sft", "grpo"):
        from core.errors import TarfasError
        from training.configs import GRPOConfig, SFTConfig

        cls = SFTConfig if args.what == "sft" else GRPOConfig
        cfg = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
        try:
            if args.what == "sft":
                from training.sft import train_sft as train
            else:
                from training.grpo import train_grpo as train
            path = train(cfg)
        except (TarfasError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_INPUT
        print(f"saved {path}")
        return 0
    return EXIT_INPUT


def cmd_app(args) -> int:
    from app.server import serve
    from app.ui.auth import AuthConfigError, load_users

    try:
        users = load_users(args.auth, args.users_file)
        serve(args.data_dir, db_url=args.db, host=args.host, port=args.port, users=users,
              concurrency=args.concurrency, max_file_mb=args.max_file_mb)
    except AuthConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    return 0


def _single_thread_inference() -> None:
    """Per-image networks are tiny: one thread is fastest, and on a busy machine torch's default
    (one thread per core) oversubscribes and runs ~50x slower. TARFAS_THREADS overrides."""
    import os

    import torch

    torch.set_num_threads(int(os.environ.get("TARFAS_THREADS", "1")))


def cmd_model(args) -> int:
    from core.mllm.nano import NanoSpec, build_nano

    t0 = time.perf_counter()
    out = build_nano(args.out, args.arch, NanoSpec(seed=args.seed))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"nano {args.arch} model written to {out} ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_annotate(args) -> int:
    from core.errors import TarfasError
    from core.experts import ExpertBank
    from training.annotate import AnnotateConfig, describe, import_review_queue, load_rows, run_annotation

    try:
        rows = load_rows(args.manifest, root=args.root, domains=args.domains.split(",") if args.domains else None,
                         split=args.split, limit=args.limit, seed=args.seed)
        config = AnnotateConfig(max_turns=args.max_turns, tools=[t.strip() for t in args.tools.split(",")] if args.tools else None,
                                concurrency=args.concurrency or (1 if args.annotator == "expert" else 4),
                                review_rate=args.review_rate, on_no_face=args.on_no_face, progress=not args.no_progress)
        if args.annotator == "expert":
            from training.annotators import ExpertAnnotator

            annotator = ExpertAnnotator.load(args.weights)
            experts = annotator.policy.bank
        elif args.annotator == "openai":
            from training.annotators import OpenAIAnnotator

            if not args.model or not args.base_url:
                raise ValueError("--annotator openai needs --model and --base-url")
            annotator = OpenAIAnnotator(args.model, args.base_url, api_key_env=args.api_key_env, timeout=args.timeout,
                                        retries=args.retries, structured=args.structured, temperature=args.temperature)
            experts = ExpertBank.load(args.weights)
        else:
            raise ValueError(f"unknown annotator {args.annotator!r}; use 'expert' or 'openai'")
        summary = run_annotation(rows, annotator, args.out, experts=experts, config=config)
    except (TarfasError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    print(describe(summary))
    if args.queue_into:
        from storage.db import open_storage

        storage = open_storage(args.queue_into)
        try:
            ids = import_review_queue(args.out, storage)
        finally:
            storage.close()
        print(f"review queue: {len(ids)} new investigations in {args.queue_into}")
    return EXIT_FAILED if summary.failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("investigate", "eval", "app", "annotate"):
        _single_thread_inference()
    handlers = {"investigate": cmd_investigate, "eval": cmd_eval, "train": cmd_train, "app": cmd_app, "model": cmd_model,
                "annotate": cmd_annotate}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

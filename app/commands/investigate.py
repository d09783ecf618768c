"""``tarfas investigate IMAGE``: one investigation, printed as text or as one JSON object."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from . import EXIT_FAILED, EXIT_INPUT
from .policy import add_policy_args, agent_options, load_policy

HELP = "investigate one face image and print the trajectory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image")
    add_policy_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (tool images are written to --out-dir)")
    p.add_argument(
        "--out-dir",
        default=None,
        help="folder for the crop, tool images and trajectory.json (default: a new temp folder)",
    )


def run(args) -> int:
    from core import agent, faces
    from core.errors import InputImageError

    t0 = time.perf_counter()
    on_no_face = args.on_no_face or "error"
    try:
        path = Path(args.image)
        if not path.is_file():
            raise faces.InvalidImageError(f"{args.image}: {'is a directory' if path.is_dir() else 'no such file'}")
        data = path.read_bytes()
        rgb = faces.load_image(data, name=str(args.image))
        t_load = time.perf_counter()
        face = faces.prepare_face(rgb, on_no_face=on_no_face)
        t_face = time.perf_counter()
    except InputImageError as exc:
        if args.json:
            print(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc)}, "image": str(args.image)}))
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    config = agent_options(args).agent_config(on_no_face)
    policy, registry = load_policy(args)
    traj = agent.run(
        face, policy, config, registry=registry, source=str(args.image), image_sha256=faces.sha256_bytes(data)
    )
    traj.timings_ms = {"load": (t_load - t0) * 1e3, "face": (t_face - t_load) * 1e3, **traj.timings_ms}
    out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="tarfas-"))
    traj.save(out_dir)
    threshold = getattr(policy, "threshold", None)
    if args.json:
        print(json.dumps(trajectory_json(traj, out_dir, policy, threshold), indent=2))
    else:
        print(render_text(traj, out_dir, policy, threshold))
    return 0 if traj.status == "completed" else EXIT_FAILED


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
        "fast_answer": {"verdict": fast.verdict, "reason": fast.reason, "score_spoof": traj.fast_score}
        if fast
        else None,
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
        "final": {
            "verdict": traj.final.verdict,
            "score_spoof": traj.final.score_spoof,
            "threshold": threshold,
            "source": traj.final.source,
        }
        if traj.final
        else None,
        "turns": d["turns"],
        "timings_ms": traj.timings_ms,
        "trajectory_path": str(out_dir / "trajectory.json"),
    }


def render_text(traj, out_dir: Path, policy, threshold) -> str:
    lines = [
        f"tarfas investigation of {traj.source}",
        f"policy: {getattr(policy, 'description', traj.policy)} [{traj.policy_version}]",
    ]
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
    lines.append(
        f"time: {traj.timings_ms.get('total', 0):.0f} ms (+ {traj.timings_ms.get('face', 0):.0f} ms face crop); files: {out_dir}"
    )
    return "\n".join(lines)

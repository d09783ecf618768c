"""The whole tool-aware training pipeline on a CPU in minutes: nano model -> KT -> FI -> DT-GRPO -> eval.

    .venv/bin/python -m training.cli.nano_e2e --out runs/nano-e2e            # fas-dev NUAA subset, a few minutes
    .venv/bin/python -m training.cli.nano_e2e --out /tmp/e2e --quick         # the shortened run CI does

Every step is the real ``tarfas`` command (run in-process, printed as it runs), so this file is also a
worked example of the commands. The nano model (~1M parameters) is trained with all its parameters: LoRA
on a model this small barely moves (measured: LoRA at lr 1e-4..2e-2 leaves the FI loss near 2 after 60
steps, full training reaches 0.06), while real 7-8B models use the paper's LoRA (the defaults).
A nano model learns the output format from a few dozen examples, not face anti-spoofing: its metrics are
reported as they come, and an untrained or briefly trained nano model is expected near chance.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

FAS_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "fas-dev" / "manifest.csv"


def _run(argv: list[str], done: Path | None = None) -> None:
    """Run one tarfas command, unless ``done`` (its output, with lineage) exists from an earlier run."""
    from app.cli import main

    if done is not None and (done / "tarfas_lineage.json").is_file():
        print(f"\n(skipping tarfas {argv[0]} {argv[1]}: {done} exists)", flush=True)
        return
    print("\n$ tarfas " + shlex.join(argv), flush=True)
    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"tarfas {argv[0]} {argv[1] if len(argv) > 1 else ''} failed with exit code {rc}")


def pipeline(out: Path, manifest: Path, *, quick: bool = False, threads: int = 1) -> dict:
    """Run the pipeline into ``out``; returns the measured summary (also written to ``out/summary.json``)."""
    n_train, kt_steps, fi_steps, grpo_steps, n_eval, g = (12, 8, 8, 1, 4, 2) if quick else (64, 60, 120, 6, 32, 4)
    tokens = "32" if quick else "160"  # per assistant turn
    log_every = "2" if quick else "10"
    out.mkdir(parents=True, exist_ok=True)
    data = ["--data", str(manifest), "--domains", "nuaa", "--split", "train", "--max-examples", str(n_train),
            "--build-dir", str(out / "data"), "--threads", str(threads), "--save-steps", "0"]  # fmt: skip
    times = {}
    t = time.perf_counter()
    if not (out / "nano" / "config.json").is_file():
        _run(["model", "init-nano", str(out / "nano")])
    times["init_nano_s"] = time.perf_counter() - t

    t = time.perf_counter()
    _run(["train", "sft", "--stage", "kt", "--model", str(out / "nano"), "--out", str(out / "kt"), *data, "--no-use-lora",
          "--learning-rate", "3e-3", "--lr-scheduler-type", "constant", "--max-steps", str(kt_steps),
          "--per-device-train-batch-size", "4", "--logging-steps", log_every], out / "kt" / "model")  # fmt: skip
    times["kt_s"] = time.perf_counter() - t

    t = time.perf_counter()
    _run(["train", "sft", "--stage", "fi", "--model", str(out / "kt" / "model"), "--out", str(out / "fi"), *data, "--no-use-lora",
          "--learning-rate", "3e-3", "--lr-scheduler-type", "constant", "--max-steps", str(fi_steps),
          "--per-device-train-batch-size", "2", "--logging-steps", log_every], out / "fi" / "model")  # fmt: skip
    times["fi_s"] = time.perf_counter() - t

    t = time.perf_counter()
    _run(["train", "grpo", "--model", str(out / "fi" / "model"), "--out", str(out / "grpo"), *data,
          "--num-generations", str(g), "--per-device-train-batch-size", str(2 * g), "--max-steps", str(grpo_steps),
          "--learning-rate", "1e-5", "--max-new-tokens", tokens, "--max-completion-length", "1536"], out / "grpo" / "model")  # fmt: skip
    times["grpo_s"] = time.perf_counter() - t

    results = {}
    stages = (("untrained", out / "nano"), ("kt+fi", out / "fi" / "model"), ("kt+fi+dt-grpo", out / "grpo" / "model"))
    for name, model in stages[-1:] if quick else stages:
        t = time.perf_counter()
        _run(["eval", str(manifest), "--domains", "nuaa", "--split", "test", "--limit", str(n_eval), "--policy", "hf",
              "--model", str(model), "--max-new-tokens", tokens, "--threshold", "0.5", "--json-out", str(out / f"eval-{name}.json")])  # fmt: skip
        times[f"eval_{name}_s"] = time.perf_counter() - t
        results[name] = json.loads((out / f"eval-{name}.json").read_text())
    lineage = json.loads((out / "grpo" / "model" / "tarfas_lineage.json").read_text())
    summary = {"times": times, "eval": results, "grpo_log": lineage["result"]["log"], "quick": quick}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.cli.nano_e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/nano-e2e")
    p.add_argument("--manifest", default=str(FAS_DEV))
    p.add_argument("--quick", action="store_true", help="the shortened CI run (seconds per stage)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    summary = pipeline(Path(args.out), Path(args.manifest), quick=args.quick, threads=args.threads)
    print("\n== summary ==")
    print(
        json.dumps(
            {"times": summary["times"], "eval": {k: v for k, v in summary["eval"].items()}}, indent=2, default=str
        )[:4000]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

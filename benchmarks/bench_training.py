"""Training speed benchmark on the CPU: seconds per SFT step (KT, FI) and per DT-GRPO step, with the share
of a GRPO step spent executing the visual tools, for the micro model (the CPU recipe's size, ``--size nano``
for the unit-test size), against the targets of issue 16 (micro: SFT step <= 1 s, GRPO step with 8 rollouts
<= 20 s). The steps run as the CPU recipe (training/cli/nano_e2e.py) runs them: SFT on both cores
(``--sft-threads 2``) with bf16 autocast where the CPU has native bf16 and the shared prompt prefix computed
once per batch; GRPO on one thread (in the recipe the evaluation runs beside it), with the same precision.
``--precision fp32`` and ``--no-share-prefix`` measure what those choices save.

    .venv/bin/python benchmarks/bench_training.py [--steps N] [--size micro|nano] [--grpo-model DIR]

Data: 16 NUAA train images of ../shared/data/fas-dev turned into trajectories by the expert policy
(training.datasets.build_from_manifest), or the three shipped samples when fas-dev is absent. The GRPO
model is ``--grpo-model`` (default: runs/nano-e2e/fi/model from ``python -m training.cli.nano_e2e`` when it
exists, else the untrained model, which calls no tool: its tool share is then 0, and says so). The SFT steps
train all parameters at the batch sizes of the CPU recipe (training/cli/nano_e2e.py: KT 4, FI 2); the GRPO
step samples 8 rollouts (2 queries x G = 4) at T = 1 with the recipe's 192-token turn budget.
Step times are medians over N steps after one warm-up step; the machine is shared, so compare ratios
measured in one run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)

from transformers import TrainerCallback  # noqa: E402

from core.mllm.nano import build_nano, spec_for  # noqa: E402
from training.cli.nano_e2e import recipe_precision  # noqa: E402
from training.configs import GRPOConfig, SFTConfig  # noqa: E402
from training.grpo import train_grpo  # noqa: E402
from training.lineage import read_lineage  # noqa: E402
from training.sft import train_sft  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FASDEV = ROOT.parent / "shared" / "data" / "fas-dev" / "manifest.csv"


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t = [], None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)


def sample_manifest(folder: Path) -> tuple[Path, dict]:
    if FASDEV.is_file():
        return FASDEV, {"domains": ["nuaa"], "split": "train", "max_examples": 16}
    path = folder / "samples.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "attack_type", "domain", "split"])
        for name, label, attack in (("astronaut_live.png", "real", ""), ("astronaut_print_SIMULATED.png", "spoof", "print"),
                                    ("astronaut_replay_SIMULATED.png", "spoof", "replay")):  # fmt: skip
            w.writerow([str(ROOT / "assets" / "samples" / name), label, attack, "samples", "train"])
    return path, {}


def tool_call_ms(data_dir: Path) -> float:
    """Mean time of one executed tool call (validation + operator) on the benchmark's face crops."""
    from core.dataset import read_dataset
    from core.registry import ToolRegistry

    reg = ToolRegistry(None)
    crops = [
        ds.image(q.image)
        for d in sorted(data_dir.iterdir())
        if (d / "manifest.json").is_file()
        for ds in [read_dataset(d)]
        for q in ds.queries
    ]
    times = []
    for crop in crops:
        for name in reg.names:
            args = {"bbox": [56, 56, 168, 168]} if name == "ZoomInTool" else {}
            times.append(reg.execute(name, args, crop).elapsed_ms)
    return statistics.mean(times)


# Issue 16's targets for the micro model: SFT step <= 1 s, GRPO step (8 rollouts) <= 20 s.
TARGETS = {"micro": (1.0, 1.0, 20.0)}


def _n_params(folder: Path) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--grpo-model", default=None)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--size", choices=["micro", "nano"], default="micro")
    p.add_argument("--sft-threads", type=int, default=2)
    p.add_argument("--precision", choices=["recipe", "bf16", "fp32"], default="recipe")
    p.add_argument("--no-share-prefix", dest="share_prefix", action="store_false")
    args = p.parse_args()
    precision = recipe_precision() if args.precision == "recipe" else args.precision
    tmp = Path(tempfile.mkdtemp(prefix="bench_training_"))
    nano = build_nano(tmp / args.size, spec=spec_for(args.size))
    manifest, sel = sample_manifest(tmp)
    common = dict(
        data=[str(manifest)],
        build_dir=str(tmp / "data"),
        threads=1,
        save_steps=0,
        logging_steps=1,
        max_steps=args.steps + 1,
        **sel,
    )
    rows = []
    t0 = time.perf_counter()
    # the CPU recipe trains every parameter, on both cores
    all_params = dict(use_lora=False, max_length=2048, threads=args.sft_threads, precision=precision,
                      share_prefix=args.share_prefix)  # fmt: skip
    train_sft(SFTConfig(stage="kt", model=str(nano), out=str(tmp / "warm"), **(common | all_params | {"max_steps": 1})))
    print(f"data build (expert-policy trajectories) + 1 warm-up step: {time.perf_counter() - t0:.1f} s")
    for stage, batch in (("kt", 4), ("fi", 2)):
        timer = StepTimer()
        train_sft(
            SFTConfig(stage=stage, model=str(nano), out=str(tmp / stage), per_device_train_batch_size=batch,
                      **(common | all_params)),
            callbacks=[timer],
        )  # fmt: skip
        rows.append(
            (f"SFT {stage.upper()} step (all parameters, batch {batch})", median_after_warmup(timer.times), None)
        )

    default = ROOT / "runs" / "micro-e2e" / "fi" / "model"
    model = args.grpo_model or (str(default) if default.is_dir() else str(nano))
    g = args.generations
    timer = StepTimer()
    out = train_grpo(GRPOConfig(model=model, out=str(tmp / "grpo"), num_generations=g, per_device_train_batch_size=2 * g,
                                max_new_tokens=192, max_completion_length=2048, learning_rate=2e-5, precision=precision, **common), callbacks=[timer])  # fmt: skip
    log = read_lineage(out)["result"]["log"][1:] or read_lineage(out)["result"]["log"]
    share = statistics.mean(h["time/tools_share"] for h in log)
    tools_s = statistics.mean(h["time/tools_s"] for h in log)
    gen_share = statistics.median(h["time/generate_s"] / h["step_time"] for h in log)
    calls = statistics.mean(h["tools/calls_per_rollout"] for h in log)
    rows.append((f"GRPO step ({2 * g} rollouts, G={g})", median_after_warmup(timer.times), share))

    n_params = _n_params(nano)
    print(
        f"\n{args.size} model ({n_params / 1e6:.1f}M parameters), {args.steps} timed steps each (median after a warm-up "
        f"step); SFT: {args.sft_threads} threads, {precision}, shared prefix {'on' if args.share_prefix else 'off'}; "
        f"GRPO: 1 thread, {precision}"
    )
    targets = TARGETS.get(args.size, (None, None, None))
    print(f"{'what':44s} {'s/step':>8s} {'target':>7s} {'ratio':>6s} {'tool share':>11s}")
    for (what, s, sh), target in zip(rows, targets, strict=True):
        tgt = "" if target is None else f"{target:7.1f}"
        ratio = "" if target is None else f"{s / target:6.2f}"
        print(f"{what:44s} {s:8.2f} {tgt:>7s} {ratio:>6s} {'' if sh is None else f'{100 * sh:10.3f}%':>11s}")
    print(
        f"GRPO model: {model}; tool calls per rollout {calls:.2f} ({1e3 * tools_s:.1f} ms of tools a step, mean); "
        f"sampling share of the step {100 * gen_share:.0f}%"
    )
    # A nano model rarely calls tools; what the share would be at the paper's 3 calls per rollout:
    call_ms = tool_call_ms(tmp / "data")
    full = 3 * 2 * g * call_ms / 1e3 / rows[-1][1]
    print(
        f"one tool call: {call_ms:.2f} ms (mean over the six tools on the crops); at 3 calls per rollout the tools "
        f"would take {100 * full:.2f}% of this GRPO step"
    )
    kt, fi, grpo = (r[1] for r in rows)
    print(f"ratios: FI/KT step {fi / kt:.2f}; GRPO/FI step {grpo / fi:.2f}")


if __name__ == "__main__":
    main()

"""The whole tool-aware training pipeline on a CPU: micro model -> annotation -> KT -> FI -> rejection
sampling -> DT-GRPO -> eval.

    .venv/bin/python -m training.cli.nano_e2e --out runs/micro-e2e        # the full run (docs/training.md)
    .venv/bin/python -m training.cli.nano_e2e --out /tmp/e2e --quick      # the shortened run CI does (nano model)

Every step up to the models is a real ``tarfas`` command run in-process and printed as it runs (so this
file is also a worked example of the commands):

1. ``tarfas model init-nano --size micro``: Qwen2.5-VL at ~4.8M parameters (``--quick``: the ~1M nano);
2. ``tarfas annotate`` (the offline expert annotator, tool-call limit 3 as the agent loop) over the NUAA
   train split of fas-dev and a sample of ../shared/data/fas-train;
3. ``tarfas train sft --stage kt`` then ``--stage fi`` (a = 0.9) on both annotation folders, all parameters,
   on both cores with bf16 autocast where the CPU has native bf16;
4. rejection sampling, ``rs_rounds`` times: ``tarfas train rs`` (the model investigates NUAA train faces at
   T = 1; the investigations that follow the protocol and reach the label are kept), then ``--stage fi`` on
   the kept ones;
5. ``tarfas train grpo`` (DT-GRPO, the paper's reward) from that SFT model, on faces of fas-dev's other
   cameras (apfol, rienheuver: no stage before saw them) whose fast answer it is unsure of (``--select-band``),
   with the investigations rejection sampling kept replayed beside (``--replay-data``: their FI loss joins GRPO's);
6. the SFT model and the DT-GRPO model investigate held-out NUAA **test** images of fas-dev through the agent
   loop (training/policy_eval.py: batched, the inference parsers, the class-token score): greedy for
   accuracy and AUC, and sampled at T = 1 for the format rate and DT-GRPO's mean reward. Each pass runs in
   a one-thread process, the SFT model's beside GRPO training (two processes: the 2 cores the run is
   budgeted for).

The last line printed is one JSON object: ``sampled_format_ok`` (the SFT model after rejection sampling,
T = 1), ``sampled_format_ok_grpo``, ``auc_fi``, ``auc_grpo``, ``acc_fi``, ``acc_grpo``, ``dev_reward_fi``,
``dev_reward_grpo`` (``_fi``: that SFT model), the paired-bootstrap 95% intervals of the GRPO - SFT
differences over the dev images, ``grpo_reward_first`` / ``grpo_reward_last`` (means over the first and last
10% of steps), ``grpo_steps``, ``grpo_queries_kept`` (queries kept by ``--select-band`` / candidates), ``rs_kept``
(kept/sampled investigations of each rejection-sampling round) and ``seconds``. Stages that already have an output are skipped on a re-run.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
FAS_DEV = SHARED / "fas-dev" / "manifest.csv"
FAS_TRAIN = SHARED / "fas-train" / "manifest.csv"


@dataclass(frozen=True)
class Plan:
    """Sizes of one run (measured choices: docs/training.md, "CPU end to end")."""

    size: str = "micro"
    n_nuaa: int = 872  # NUAA train images of fas-dev to annotate (all of them)
    n_train: int = 480  # images of fas-train to annotate (0: none). More faces lift AUC (0.64 -> 0.75) when FI
    nuaa_repeats: int = 1  # times the NUAA folder is listed in --data (FI repeats it; 2 + 1,500 faces: fourth round)
    kt_steps: int = 150  # gets the steps to see them 1.5 times (docs/training.md, third round)
    kt_batch: int = 4
    kt_lr: float = 1e-3
    fi_steps: int = 1000
    fi_batch: int = 2
    fi_lr: float = 2e-3  # cosine decay: the annealed end is what makes sampled (T = 1) turns well-formed
    rs_rounds: int = 1  # rejection sampling after FI (`tarfas train rs`, then FI on what it kept): docs, fifth round
    rs_faces: int = 128  # NUAA train faces sampled by each of the two processes in a round
    rs_steps: int = 120  # about one epoch of what 256 faces keep
    rs_lr: float = 5e-4
    grpo_steps: int = 16
    grpo_g: int = 4
    grpo_queries: int = 2  # queries per step (x G completions)
    grpo_lr: float = 5e-5
    grpo_beta: float = 0.0  # KL coefficient (the paper's 0)
    # GRPO's queries: faces of fas-dev's other cameras (print attacks the SFT data never showed), of which only
    # those the SFT model is unsure of are kept (`--select-band`: a sure model gives unanimous groups and no
    # gradient; docs/training.md, seventh round)
    grpo_pool_domains: str = "apfol,rienheuver"
    grpo_pool: int = 384
    grpo_select_band: float = 0.01
    # The FI loss of the investigations rejection sampling kept (the SFT model's own valid, correct ones) joins
    # GRPO's loss, so the format it learnt is not traded for the verdicts (`--replay-data`: eighth round)
    grpo_replay_coef: float = 1.0
    grpo_replay_batch: int = 2
    max_new_tokens: int = 192  # per assistant turn (the annotations' longest is 177 tokens)
    sft_threads: int = 2  # KT and FI run alone: both cores (GRPO and the evaluation run one thread a process)
    n_eval: int = 128  # held-out NUAA test images
    eval_batch: int = 16


FULL = Plan()
QUICK = Plan(size="nano", n_nuaa=12, n_train=0, nuaa_repeats=2, kt_steps=6, kt_batch=4, fi_steps=6, fi_batch=2, fi_lr=3e-3,
             rs_rounds=1, rs_faces=2, rs_steps=2, grpo_steps=1, grpo_g=2, grpo_queries=1, grpo_pool=4, max_new_tokens=24,
             n_eval=4, eval_batch=4)  # fmt: skip


def recipe_precision() -> str:
    """The recipe's ``--precision``: bf16 autocast (fp32 weights) where the CPU computes bf16 natively, else fp32."""
    from training.sft import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "fp32"


def _run(argv: list[str], done: Path | None = None) -> None:
    """Run one tarfas command, unless ``done`` (its output) exists from an earlier run."""
    from app.cli import main

    if done is not None and done.exists():
        print(f"\n(skipping tarfas {argv[0]} {argv[1]}: {done} exists)", flush=True)
        return
    print("\n$ tarfas " + shlex.join(argv), flush=True)
    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"tarfas {argv[0]} {argv[1] if len(argv) > 1 else ''} failed with exit code {rc}")


def held_out(manifest: Path, n: int, seed: int = 0) -> tuple[list, list[str], list[str]]:
    """``n`` NUAA test faces of fas-dev (seeded sample, balanced by label): crops, labels, paths."""
    from core.evaluation.manifest import read_manifest, select
    from core.evaluation.scoring import load_face

    rows = select(read_manifest(manifest), ["nuaa"], "test")
    rng = random.Random(seed)
    picked = []
    for label in ("real", "spoof"):
        pool = [r for r in rows if r.label == label]
        picked += rng.sample(pool, min(len(pool), n // 2 + (n % 2 if label == "real" else 0)))
    crops, labels, paths = [], [], []
    for r in picked:
        face = load_face(r, "whole")
        if not isinstance(face, str):
            crops.append(face.crop)
            labels.append(r.label)
            paths.append(r.rel_path)
    return crops, labels, paths


MODES = {"greedy": 0.0, "sampled": 1.0}  # evaluation passes: name -> sampling temperature


def eval_pass(
    folder: str,
    mode: str,
    *,
    manifest: str,
    n: int,
    seed: int,
    max_new_tokens: int,
    batch_size: int,
    threads: int,
    draw: int = 0,
) -> list:
    """One evaluation pass of the model in ``folder`` over the held-out images (greedy or sampled at T = 1):
    a list of :class:`training.policy_eval.ImageResult`. ``seed`` picks the images; the pass samples with
    ``seed + draw``. Runs in a worker process as well as here."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from core.mllm.processor import load_model_and_processor
    from training.policy_eval import evaluate_policy

    torch.set_num_threads(threads)
    crops, labels, _ = held_out(Path(manifest), n, seed)
    lm = load_model_and_processor(folder)
    return evaluate_policy(lm.model, lm.processor, crops, labels, temperature=MODES[mode],
                           max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed + draw)  # fmt: skip


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def pipeline(
    out: Path,
    manifest: Path = FAS_DEV,
    *,
    quick: bool = False,
    threads: int = 1,
    train_manifest: Path | None = FAS_TRAIN,
    seed: int = 0,
) -> dict:
    """Run the pipeline into ``out``; returns the summary (also written to ``out/summary.json``).

    Two processes of one thread each (this one and a spawned worker) share the independent work: the two
    annotation folders, and the evaluation passes beside GRPO training (see below)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return _pipeline(out, manifest, pool, quick=quick, threads=threads, train_manifest=train_manifest, seed=seed)


def _pipeline(out: Path, manifest: Path, pool, *, quick: bool, threads: int, train_manifest: Path | None, seed: int):
    from core.dataset import read_dataset
    from training.lineage import read_lineage
    from training.policy_eval import metrics, paired_bootstrap

    plan = QUICK if quick else FULL
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    def stage(name: str, fn) -> None:
        t = time.perf_counter()
        fn()
        times[name] = round(time.perf_counter() - t, 1)

    base = out / plan.size
    stage("init_s", lambda: _run(["model", "init-nano", str(base), "--size", plan.size, "--seed", str(seed)],
                                 base / "config.json"))  # fmt: skip

    # Listing a folder twice repeats its FI examples (KT and GRPO take each distinct face once)
    data = [out / "ann-nuaa"] * plan.nuaa_repeats
    annotations = [(["annotate", str(manifest), "--out", str(out / "ann-nuaa"), "--domains", "nuaa", "--split", "train",
                     "--limit", str(plan.n_nuaa), "--seed", str(seed), "--no-progress"], out / "ann-nuaa" / "stats.json")]  # fmt: skip
    if plan.n_train and train_manifest is not None and Path(train_manifest).is_file():
        data.append(out / "ann-train")
        annotations.append((["annotate", str(train_manifest), "--out", str(out / "ann-train"), "--limit",
                             str(plan.n_train), "--seed", str(seed), "--no-progress"], out / "ann-train" / "stats.json"))  # fmt: skip

    def annotate() -> None:  # fas-train's folder in the worker, NUAA's here
        beside = [pool.submit(_run, argv, done) for argv, done in annotations[1:]]
        _run(*annotations[0])
        for f in beside:
            f.result()

    stage("annotate_s", annotate)

    given = ["--data", ",".join(map(str, data))]
    common = ["--no-use-lora", "--save-steps", "0", "--seed", str(seed), "--precision", recipe_precision()]
    # SFT runs alone on the machine: both cores; GRPO shares them with the evaluation: one thread
    sft = [*common, "--threads", str(max(threads, plan.sft_threads)), "--max-length", "2048", "--warmup-ratio",
           "0.05", "--logging-steps", "5"]  # fmt: skip
    kt, fi, rl = out / "kt" / "model", out / "fi" / "model", out / "grpo" / "model"
    stage("kt_s", lambda: _run(["train", "sft", "--stage", "kt", "--model", str(base), "--out", str(out / "kt"),
                                *given, *sft, "--lr-scheduler-type", "constant_with_warmup", "--learning-rate",
                                str(plan.kt_lr), "--max-steps", str(plan.kt_steps),
                                "--per-device-train-batch-size", str(plan.kt_batch)], kt / "tarfas_lineage.json"))  # fmt: skip
    fi_args = ["--first-turn-weight", "0.9", "--lr-scheduler-type", "cosine", "--per-device-train-batch-size",
               str(plan.fi_batch)]  # fmt: skip
    stage("fi_s", lambda: _run(["train", "sft", "--stage", "fi", "--model", str(kt), "--out", str(out / "fi"),
                                *given, *sft, *fi_args, "--learning-rate", str(plan.fi_lr), "--max-steps", str(plan.fi_steps)],
                               fi / "tarfas_lineage.json"))  # fmt: skip

    # Rejection sampling: the FI model investigates NUAA train faces at T = 1, and FI goes on with the valid
    # investigations that reach the label (training/rejection.py); two shards, one here and one in the worker.
    # Not fas-train's faces: the model is right mostly on their real ones, so 73% of what it kept there was real.
    sft_model, rs_counts, replay = fi, [], list(data)  # replay: what the SFT model last learnt from

    def rejection_rounds() -> None:
        nonlocal sft_model, replay
        for r in range(1, plan.rs_rounds + 1):
            folders = [out / f"rs{r}-{k}" for k in range(2)]
            runs = [(["train", "rs", "--model", str(sft_model), "--manifest", str(manifest), "--domains", "nuaa",
                      "--split", "train", "--limit", str(2 * plan.rs_faces), "--seed", str(seed + r), "--num-shards",
                      "2", "--shard", str(k), "--max-new-tokens", str(plan.max_new_tokens), "--batch-size",
                      str(plan.eval_batch), "--out", str(f)], f / "manifest.json") for k, f in enumerate(folders)]  # fmt: skip
            beside = pool.submit(_run, *runs[1])
            _run(*runs[0])
            beside.result()
            stats = [read_dataset(f, verify=False).manifest["extra"]["stats"] for f in folders]
            rs_counts.append({"sampled": sum(s["sampled"] for s in stats), "kept": sum(s["kept"] for s in stats)})
            kept = [f for f, s in zip(folders, stats, strict=True) if s["kept"]]
            if not kept:  # nothing to learn from (an untrained model): the model goes on unchanged
                print(f"\n(rejection sampling round {r}: no investigation kept; no fine-tuning)", flush=True)
                continue
            nxt, replay = out / f"rs{r}" / "model", kept
            _run(["train", "sft", "--stage", "fi", "--model", str(sft_model), "--out", str(out / f"rs{r}"), "--data",
                  ",".join(map(str, kept)), *sft, *fi_args, "--learning-rate", str(plan.rs_lr), "--max-steps",
                  str(plan.rs_steps)], nxt / "tarfas_lineage.json")  # fmt: skip
            sft_model = nxt

    stage("rs_s", rejection_rounds)

    def run_grpo() -> None:
        pool_args = ["--data", str(manifest), "--domains", plan.grpo_pool_domains, "--max-examples", str(plan.grpo_pool),
                     "--select-band", str(plan.grpo_select_band)]  # fmt: skip
        if plan.grpo_replay_coef:
            pool_args += ["--replay-data", ",".join(map(str, dict.fromkeys(replay))), "--replay-coef",
                          str(plan.grpo_replay_coef), "--replay-batch", str(plan.grpo_replay_batch)]  # fmt: skip
        _run(["train", "grpo", "--model", str(sft_model), "--out", str(out / "grpo"), *pool_args, *common, "--threads",
              str(threads), "--num-generations", str(plan.grpo_g), "--per-device-train-batch-size",
              str(plan.grpo_g * plan.grpo_queries), "--max-steps", str(plan.grpo_steps), "--learning-rate",
              str(plan.grpo_lr), "--beta", str(plan.grpo_beta), "--temperature", "1.0", "--max-new-tokens",
              str(plan.max_new_tokens), "--max-completion-length", "2048", "--logging-steps", "1"],
             rl / "tarfas_lineage.json")  # fmt: skip

    # Held-out evaluation: the same dev images for both models (paired), each (model, mode) pass in its own
    # process with one thread. The SFT model's passes run in a second process while GRPO trains here, and of
    # the GRPO model's two passes one runs there and one here: on 2 cores the evaluation adds about one
    # pass's time after GRPO instead of four.
    job = dict(manifest=str(manifest), n=plan.n_eval, seed=seed, max_new_tokens=plan.max_new_tokens,
               batch_size=plan.eval_batch, threads=threads)  # fmt: skip
    results: dict[tuple[str, str], list] = {}
    pending = {("fi", mode): pool.submit(eval_pass, str(sft_model), mode, **job) for mode in MODES}
    stage("grpo_s", run_grpo)
    t = time.perf_counter()
    pending[("grpo", "greedy")] = pool.submit(eval_pass, str(rl), "greedy", **job)
    results[("grpo", "sampled")] = eval_pass(str(rl), "sampled", **job)
    for key, fut in pending.items():
        results[key] = fut.result()
    times["eval_after_grpo_s"] = round(time.perf_counter() - t, 1)
    evals = {}
    for name, mode in (("fi", "greedy"), ("fi", "sampled"), ("grpo", "greedy"), ("grpo", "sampled")):
        evals[f"{name}/{mode}"] = metrics(results[(name, mode)])
        print(f"[eval {name} {mode}] {json.dumps(evals[f'{name}/{mode}'])}", flush=True)
    _, labels, paths = held_out(manifest, plan.n_eval, seed)
    ci = paired_bootstrap(results[("fi", "greedy")], results[("grpo", "greedy")], seed=seed)
    # GRPO's objective: the mean reward of investigations sampled at T = 1, FI vs GRPO on the same dev images
    ci_sampled = paired_bootstrap(results[("fi", "sampled")], results[("grpo", "sampled")], seed=seed)

    grpo_lineage = read_lineage(rl)
    log, selection = grpo_lineage["result"]["log"], grpo_lineage["data_stats"].get("query_selection", {})
    rewards = [h["reward"] for h in log if "reward" in h]
    k = max(1, round(0.1 * len(rewards)))
    fi_log = read_lineage(fi)["result"]["log"]
    line = {
        "sampled_format_ok": evals["fi/sampled"]["format_ok"],
        "sampled_format_ok_grpo": evals["grpo/sampled"]["format_ok"],
        "greedy_format_ok_fi": evals["fi/greedy"]["format_ok"],
        "auc_fi": _round(evals["fi/greedy"]["auc"]),
        "auc_grpo": _round(evals["grpo/greedy"]["auc"]),
        "acc_fi": _round(evals["fi/greedy"]["accuracy"]),
        "acc_grpo": _round(evals["grpo/greedy"]["accuracy"]),
        "delta_acc_ci95": ci["delta_acc_ci95"],
        "delta_auc_ci95": ci["delta_auc_ci95"],
        "dev_reward_fi": _round(evals["fi/sampled"]["mean_reward"]),
        "dev_reward_grpo": _round(evals["grpo/sampled"]["mean_reward"]),
        "delta_dev_reward_ci95": ci_sampled["delta_reward_ci95"],
        "grpo_reward_first": _mean(rewards[:k]),
        "grpo_reward_last": _mean(rewards[-k:]),
        "grpo_steps": len(rewards),
        "grpo_queries_kept": f"{selection.get('kept')}/{selection.get('candidates')}",  # --select-band
        "fi_nll_later_turns_last": fi_log[-1].get("nll/later_turns") if fi_log else None,
        "rs_kept": [f"{c['kept']}/{c['sampled']}" for c in rs_counts],  # rejection sampling, round by round
        "n_eval": len(labels),
        "model": plan.size,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    summary = {"line": line, "times": times, "plan": asdict(plan), "eval": evals, "grpo_log": log,
               "eval_images": paths, "quick": quick}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _round(x):
    return None if x is None else round(x, 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.cli.nano_e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/micro-e2e")
    p.add_argument("--manifest", default=str(FAS_DEV), help="fas-dev manifest (NUAA train: training; test: eval)")
    p.add_argument("--train-manifest", default=str(FAS_TRAIN), help="extra annotated training images (fas-train)")
    p.add_argument("--quick", action="store_true", help="the shortened CI run (nano model, seconds per stage)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    summary = pipeline(Path(args.out), Path(args.manifest), quick=args.quick, threads=args.threads,
                       train_manifest=Path(args.train_manifest), seed=args.seed)  # fmt: skip
    print("\n== summary ==")
    print(json.dumps({"times": summary["times"], "eval": summary["eval"]}, indent=2, default=str))
    print(json.dumps(summary["line"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

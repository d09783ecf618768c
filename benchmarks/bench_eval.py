"""Evaluation throughput of the hf policy: one image at a time vs batched, concurrent investigations.

    .venv/bin/python benchmarks/bench_eval.py [--model DIR] [--images 100] [--concurrency 8] [--threads 2]

Scores ``--images`` faces (../shared/data/fas-dev when present, else shifted crops of scikit-image's
astronaut) through ``core.evaluation.scoring.score_variant``, the loop of ``tarfas eval``, twice:

- **one at a time** (the path before batching): ``--concurrency 1``, every turn prefilled from the first
  token, and the class score from a second forward pass after every turn that holds a class token;
- **batched**: ``--concurrency N`` investigations in flight, their turns generated in padded batches, the
  KV of the text every conversation starts with (system prompt, tool schemas) computed once and shared,
  the class score read at the decoding step that produced it.

The model is ``--model DIR``, or else a freshly built, untrained "micro" Qwen2.5-VL (core.mllm.nano). An
untrained model cannot follow the protocol, so by default every investigation *generates* (through the
real generate loop, token by token, core.mllm.forcing) a fast answer, an FFTTool call and an answer, as a
trained model would; ``--free`` lets the model generate freely instead (garbage, fed back as errors). Both
runs must agree (same verdicts; scores within 1e-4). Prints the seconds of each, the ratio and the target
(issue #16: >= 3x). Face crops are made once beforehand and timed apart. CPU timings on a shared machine
are upper bounds.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import protocol  # noqa: E402
from core.evaluation.manifest import ManifestRow  # noqa: E402
from core.evaluation.scoring import FaceCache, Variant, score_variant  # noqa: E402
from core.policies import readers_for  # noqa: E402
from core.policies.hf import HFPolicy  # noqa: E402
from core.registry import ToolRegistry  # noqa: E402

TARGET = 3.0
FAS_DEV = ROOT.parent / "shared" / "data" / "fas-dev"
FAST = protocol.format_fast_answer("spoof", "The face looks flat, with a paper-like surface and no depth.")
CALL = protocol.format_tool_call_turn(
    "I look for the periodic peaks of a print or a screen in the spectrum.", protocol.ToolCall("FFTTool", {})
)
ANSWER = protocol.format_answer_turn("The spectrum shows the periodic peaks of a recaptured image.", "spoof")


def micro_model(out: Path) -> tuple[Path, str]:
    from core.mllm import nano

    sizes = getattr(nano, "SIZES", {})
    spec = sizes.get("micro") or nano.NanoSpec(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768)
    return nano.build_nano(
        out, "qwen2_5_vl", spec=spec
    ), "micro" if "micro" in sizes else "NanoSpec(hidden=256, layers=4)"


def image_rows(n: int, tmp: Path) -> tuple[list[ManifestRow], str]:
    """n labelled images: a seeded sample of fas-dev, or shifted crops of the astronaut written as PNGs."""
    if (FAS_DEV / "manifest.csv").is_file():
        import random

        with open(FAS_DEV / "manifest.csv") as f:
            rows = list(csv.DictReader(f))
        random.Random(0).shuffle(rows)
        picked = [
            ManifestRow(FAS_DEV / r["path"], r["path"], r["label"], r.get("attack_type", ""), r.get("domain", ""), "")
            for r in rows[:n]
        ]
        return picked, f"fas-dev ({len(picked)} of {len(rows)}, seeded sample)"
    import skimage.data
    from PIL import Image

    rgb = skimage.data.astronaut()
    out = []
    for i in range(n):
        dy, dx = (i * 7) % 48, (i * 13) % 48
        path = tmp / f"face{i:03d}.png"
        Image.fromarray(rgb[dy : 464 + dy, dx : 464 + dx]).save(path)
        out.append(ManifestRow(path, path.name, "spoof" if i % 2 else "real", "", "synthetic", ""))
    return out, "synthetic (shifted astronaut crops; ../shared/data/fas-dev absent)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="hf checkpoint folder (default: build an untrained micro Qwen2.5-VL)")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--free", action="store_true", help="free generation instead of generated protocol turns")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            model, size = Path(args.model), args.model
        else:
            t = time.perf_counter()
            model, size = micro_model(tmp / "micro")
            print(f"built the untrained {size} model in {time.perf_counter() - t:.1f} s")
        rows, source = image_rows(args.images, tmp)
        faces = FaceCache("whole")
        t = time.perf_counter()
        faces.prepare(rows, progress=False)
        face_s = time.perf_counter() - t

        def policy(new_path: bool) -> HFPolicy:
            from transformers import LogitsProcessorList

            from core.mllm.forcing import ForcedTurns

            p = HFPolicy.load(
                model, max_new_tokens=args.max_new_tokens, score_from_generation=new_path, prefix_cache=new_path
            )
            if not args.free:
                p.generation_kwargs["logits_processor"] = LogitsProcessorList(
                    [ForcedTurns(p.tokenizer, [FAST, CALL, ANSWER])]
                )
            return p

        runs = {}
        for name, conc, from_gen in (
            ("one at a time", 1, False),
            (f"batched x{args.concurrency}", args.concurrency, True),
        ):
            p = policy(from_gen)
            registry = ToolRegistry(readers=readers_for(p))
            n_params = sum(x.numel() for x in p.model.parameters())
            t = time.perf_counter()
            scored = score_variant(
                rows, faces, p, Variant("main", None, 3), registry=registry, progress=False, concurrency=conc
            )
            runs[name] = (time.perf_counter() - t, scored, p.batch_sizes)
        (name1, (s1, sc1, _)), (name2, (s2, sc2, sizes)) = runs.items()
        both = [(sc1[k], sc2[k]) for k in sc1]
        verdicts = sum(a.score_spoof is not None for a, _ in both)
        same = all((a.score_spoof is None) == (b.score_spoof is None) for a, b in both)
        diff = max((abs(a.score_spoof - b.score_spoof) for a, b in both if a.score_spoof is not None), default=0.0)
        ratio = s1 / s2
        print(
            f"model: {size} ({n_params / 1e6:.1f}M parameters), torch threads {args.threads}; images: {source}; "
            f"face crops {face_s:.1f} s (once, not in the figures below)"
        )
        print(f"workload: {'free generation' if args.free else 'generated fast answer + FFTTool call + answer'}, "
              f"max {args.max_new_tokens} new tokens per turn; {verdicts}/{len(both)} verdicts")  # fmt: skip
        print(f"{name1:>16}: {s1:7.1f} s  ({len(both) / s1:.2f} images/s)")
        print(f"{name2:>16}: {s2:7.1f} s  ({len(both) / s2:.2f} images/s; mean batch {statistics.mean(sizes):.1f})")
        print(
            f"ratio {ratio:.2f}x vs target >= {TARGET:.0f}x: {'PASS' if ratio >= TARGET else 'FAIL'}; same verdicts: {same}; "
            f"max score difference {diff:.2e}"
        )
        print(json.dumps({"images": len(both), "one_at_a_time_s": round(s1, 2), "batched_s": round(s2, 2),
                          "concurrency": args.concurrency, "ratio": round(ratio, 2), "target": TARGET,
                          "same_verdicts": same, "max_score_diff": diff}))  # fmt: skip


if __name__ == "__main__":
    main()

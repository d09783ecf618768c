"""Two checkpoints, several sampled (T = 1) draws each on the same held-out NUAA test faces of fas-dev:
valid-format rate, DT-GRPO's mean reward and accuracy per model, and paired-bootstrap 95% intervals of the
differences (training.policy_eval.draws_bootstrap). This is how the e2e's SFT and DT-GRPO models are compared
beyond its one 128-face pass (docs/training.md, eighth round):

    .venv/bin/python -m training.cli.compare DIR/rs1/model DIR/grpo/model --faces 512 --draws 2

Draw d samples with seed ``seed + d`` on the faces ``held_out(manifest, faces, seed)`` picks, so draw 0 of
128 faces is the e2e's own sampled pass. Passes run in ``--workers`` one-thread processes. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from .nano_e2e import FAS_DEV, eval_pass


def compare(
    a: str, b: str, *, manifest: str, faces: int, draws: int, seed: int, max_new_tokens: int, workers: int
) -> dict:
    from training.policy_eval import draws_bootstrap

    if faces < 2 or draws < 1:
        raise ValueError(f"need at least 2 faces and 1 draw, got {faces} faces and {draws} draws")
    job = dict(manifest=manifest, n=faces, max_new_tokens=max_new_tokens, batch_size=16, threads=1)
    t = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = {
            (m, d): pool.submit(eval_pass, m, "sampled", seed=seed, draw=d, **job) for m in (a, b) for d in range(draws)
        }
        results = {k: f.result() for k, f in runs.items()}
    line = draws_bootstrap([results[(a, d)] for d in range(draws)], [results[(b, d)] for d in range(draws)], seed=seed)
    return {"a": a, "b": b, **line, "seconds": round(time.perf_counter() - t, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.cli.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="model folder (the baseline)")
    p.add_argument("b", help="model folder (the differences are b - a)")
    p.add_argument("--manifest", default=str(FAS_DEV), help="fas-dev manifest: its NUAA test faces are used")
    p.add_argument("--faces", type=int, default=128, help="held-out faces (half real, half spoof)")
    p.add_argument("--draws", type=int, default=5, help="sampled investigations per face and model")
    p.add_argument("--seed", type=int, default=0, help="picks the faces; draw d samples with seed + d")
    p.add_argument("--max-new-tokens", type=int, default=192, help="per assistant turn (the e2e's)")
    p.add_argument("--workers", type=int, default=2, help="one-thread evaluation processes")
    args = p.parse_args(argv)
    try:
        line = compare(args.a, args.b, manifest=args.manifest, faces=args.faces, draws=args.draws, seed=args.seed,
                       max_new_tokens=args.max_new_tokens, workers=args.workers)  # fmt: skip
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())

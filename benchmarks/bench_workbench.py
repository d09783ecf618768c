"""Workbench benchmark: the case queue (one SQL query per page) and the review metrics on a SQLite store
with many cases, and the analyst's waits in the UI handlers (issue 14).

    .venv/bin/python benchmarks/bench_workbench.py [--cases 10000] [--repeats 7]

Fills a temporary store with ``--cases`` cases, 1.3 investigations each (every third case re-run),
two thirds of them reviewed, then times list_cases (first page of 200) with each filter, count_cases
and review_metrics. Target (issue 3): a queue page <= 50 ms median at 10,000 cases on the 2-core
machine, so the queue tab stays interactive. Prints medians and the ratio to the target (< 1.0 meets it).
Rows are inserted directly (no tool runs): this measures the queries, not the agent.

The UI part (issue 14 targets, through the same handler functions the browser calls):
- upload -> first turn: the Investigate stream's first update that shows a turn, after a real upload of
  the live sample investigated by the expert policy (the time the browser needs to draw it is not in it),
  target <= 0.5 s; then the gaps between turns as they are shown;
- opening a case with 6 tool images (Review's open: transcript, case view, history), target <= 0.5 s, cold
  (first open, images written to the UI cache) and warm;
- the Queue tab's filter over all the cases (query, cells, colours), target <= 0.3 s.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.review_metrics import review_metrics  # noqa: E402
from storage.db import open_storage  # noqa: E402
from storage.models import ATTACK_TYPES, Case, Investigation, Review  # noqa: E402
from storage.queries import CaseFilter, count_cases, list_cases  # noqa: E402

TARGET_PAGE_MS = 50.0
TARGET_FIRST_TURN_MS = 500.0
TARGET_OPEN_MS = 500.0
TARGET_QUEUE_TAB_MS = 300.0
SIX_TOOLS = ["ZoomInTool", "FFTTool", "LBPTool", "WaveletTransformTool", "EdgeDetectionTool", "HOGTool"]


def fill(storage, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with storage.sessions.begin() as s:
        for i in range(n):
            sha = f"{rng.getrandbits(256):064x}"
            case = Case(
                id=f"{i:032x}",
                image_sha256=sha,
                filename=f"upload_{i}.png",
                byte_size=1000,
                created_by="bench",
                created_at=t0 + timedelta(seconds=10 * i),
                attack_type=rng.choice((None, *ATTACK_TYPES)),
            )
            s.add(case)
            for k in range(2 if i % 3 == 0 else 1):
                p = rng.random()
                inv = Investigation(
                    id=f"{i:030x}{k:02x}",
                    case_id=case.id,
                    policy="expert",
                    policy_version="bench",
                    params={},
                    tools=[],
                    status="completed",
                    verdict="spoof" if p >= 0.5 else "real",
                    score_spoof=p,
                    timings_ms={},
                    started_by="bench",
                    started_at=case.created_at + timedelta(seconds=k),
                    finished_at=case.created_at + timedelta(seconds=k + 1),
                )
                s.add(inv)
                if rng.random() < 2 / 3:
                    truth = "spoof" if rng.random() < p else "real"
                    s.add(
                        Review(
                            investigation_id=inv.id,
                            verdict=rng.choice((truth,) * 9 + ("unsure",)),
                            notes="",
                            reviewer="bench",
                            created_at=inv.finished_at,
                            updated_at=inv.finished_at,
                        )
                    )
            if i % 2000 == 1999:
                s.flush()


def median_ms(fn, repeats: int) -> float:
    fn()  # warm the page cache and SQLAlchemy's statement cache
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        storage = open_storage(tmp)
        t = time.perf_counter()
        fill(storage, args.cases)
        print(f"filled {args.cases} cases in {time.perf_counter() - t:.1f} s")
        filters = {
            "all": None,
            "unreviewed": CaseFilter(unreviewed_only=True),
            "disagreement": CaseFilter(disagreement_only=True),
            "uncertain": CaseFilter(uncertain_only=True, threshold=0.589, band=0.1),
            "attack=print": CaseFilter(attack_type="print"),
            "text search": CaseFilter(text="upload_99"),
            "page 10": CaseFilter(offset=2000),
        }
        print(f"{'query':<28}{'median ms':>10}{'ratio':>8}{'rows':>7}")
        with storage.sessions() as s:
            for name, f in filters.items():
                ms = median_ms(lambda f=f: list_cases(s, filters=f), args.repeats)
                print(
                    f"{'list_cases ' + name:<28}{ms:>10.1f}{ms / TARGET_PAGE_MS:>8.2f}{len(list_cases(s, filters=f)):>7}"
                )
            ms = median_ms(lambda: count_cases(s), args.repeats)
            print(f"{'count_cases':<28}{ms:>10.1f}{ms / TARGET_PAGE_MS:>8.2f}{count_cases(s):>7}")
            ms = median_ms(lambda: review_metrics(s), args.repeats)
            m = review_metrics(s)
            print(
                f"{'review_metrics':<28}{ms:>10.1f}{'':>8}{m.reviewed:>7}  (agreement {m.agreement:.3f}, AUC {m.roc.auc:.3f})"
            )
        storage.close()
    ui(args)
    return 0


def six_tool_replies() -> list[str]:
    calls = [
        f'<think>Look with {t}.</think><tool_call>{{"name": "{t}", "arguments": {{}}}}</tool_call>' for t in SIX_TOOLS
    ]
    return ["<Spoof><reason>Moire and flat texture.</reason>", *calls, "<think>Done.</think><answer><Spoof></answer>"]


def ui(args) -> None:
    """The analyst's waits, through the workbench's own handlers on a real store and runner."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from app.policy_catalog import PolicyCatalog, PolicyEntry
    from app.runner import RunSettings
    from app.server import build
    from app.ui import tab_investigate, tab_queue, tab_review
    from core.policies import load_policy
    from core.policies.scripted import ScriptedPolicy

    samples = Path(__file__).resolve().parents[1] / "assets" / "samples"
    scripted = ScriptedPolicy(six_tool_replies())

    def loader(name, **kw):
        return scripted if name == "scripted" else load_policy(name, **kw)

    print(f"\n{'UI wait':<48}{'ms':>10}{'ratio':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        catalog = PolicyCatalog(
            {"expert": PolicyEntry("expert", "expert"), "scripted": PolicyEntry("scripted", "scripted")}
        )
        ctx, _ = build(tmp, policy_loader=loader, catalog=catalog)
        try:
            # Upload -> first turn shown, then each further turn.
            firsts, gaps = [], []
            for k in range(args.repeats):
                t0 = time.perf_counter()
                job = ctx.runner.submit(samples / "astronaut_live.png", filename=f"live{k}.png", user="bench")
                shown, turns = [], 0
                for out in tab_investigate.stream_jobs(ctx, [(f"live{k}.png", job)]):
                    n = sum(1 for m in out[0] if getattr(m, "metadata", None) and "turn" in m.metadata.get("title", ""))
                    if n > turns:
                        turns = n
                        shown.append((time.perf_counter() - t0) * 1e3)
                firsts.append(shown[0])
                gaps += [b - a for a, b in zip(shown, shown[1:])]
            ms = statistics.median(firsts)
            print(f"{'upload -> first turn shown (median)':<48}{ms:>10.1f}{ms / TARGET_FIRST_TURN_MS:>8.2f}")
            print(f"{'  then one turn shown every (median)':<48}{statistics.median(gaps):>10.1f}{'':>8}")

            # Opening a case with 6 tool images.
            job = ctx.runner.submit(
                samples / "astronaut_print_SIMULATED.png",
                filename="six.png",
                user="bench",
                settings=RunSettings.make("scripted", max_tool_calls=6),
            ).wait(120)
            inv = job.investigation_id
            assert job.trajectory is not None and len(job.trajectory.turns) == 8, job.error
            for f in Path(ctx.png.root).glob("*.png"):
                f.unlink()  # cold: nothing of this case in the UI cache yet
            t = time.perf_counter()
            tab_review.open_case(ctx, inv)
            cold = (time.perf_counter() - t) * 1e3
            warm = median_ms(lambda: tab_review.open_case(ctx, inv), args.repeats)
            print(f"{'open a case with 6 tool images (cold)':<48}{cold:>10.1f}{cold / TARGET_OPEN_MS:>8.2f}")
            print(f"{'open a case with 6 tool images (warm)':<48}{warm:>10.1f}{warm / TARGET_OPEN_MS:>8.2f}")
        finally:
            ctx.runner.shutdown()
            ctx.storage.close()
    with tempfile.TemporaryDirectory() as tmp:
        ctx, _ = build(tmp)
        try:
            fill(ctx.storage, args.cases)
            tab_filters = {
                "all": ([], "any", "any", "any", "any", ""),
                "model spoof + unreviewed": (["unreviewed"], "any", "any", "spoof", "any", ""),
                "disagreement": (["disagreement"], "any", "any", "any", "any", ""),
                "analyst real": ([], "any", "any", "any", "real", ""),
                "search upload_99": ([], "any", "any", "any", "any", "upload_99"),
            }
            for name, f in tab_filters.items():

                def run(f=f):
                    headers, rows = tab_queue.case_table(ctx, *f)
                    tab_queue.styled(headers, rows).to_html()  # what Gradio does with a Styler

                ms = median_ms(run, args.repeats)
                label = f"queue tab over {args.cases}: {name}"
                print(f"{label:<48}{ms:>10.1f}{ms / TARGET_QUEUE_TAB_MS:>8.2f}")
        finally:
            ctx.runner.shutdown()
            ctx.storage.close()


if __name__ == "__main__":
    sys.exit(main())

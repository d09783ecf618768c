"""Workbench query benchmark: the case queue (one SQL query per page) and the review metrics on a
SQLite store with many cases.

    .venv/bin/python benchmarks/bench_workbench.py [--cases 10000] [--repeats 7]

Fills a temporary store with ``--cases`` cases, 1.3 investigations each (every third case re-run),
two thirds of them reviewed, then times list_cases (first page of 200) with each filter, count_cases
and review_metrics. Target (issue 3): a queue page <= 50 ms median at 10,000 cases on the 2-core
machine, so the queue tab stays interactive. Prints medians and the ratio to the target (< 1.0 meets it).
Rows are inserted directly (no tool runs): this measures the queries, not the agent.
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

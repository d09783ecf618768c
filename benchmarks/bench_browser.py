"""What an analyst sees in a real browser: click "Investigate" -> first turn visible, and -> final verdict.

    .venv/bin/python benchmarks/bench_browser.py [--runs 6]

Serves a workbench on loopback, logs in with headless Debian Chromium (Playwright), and investigates the
shipped live sample ``--runs`` times, timing from the click to the fast answer appearing in the transcript
(issue 14's target: <= 0.5 s) and to the final verdict (turns are shown at least 0.3 s apart on purpose).
Needs ``chromium``; prints the figures and the ratio to the target.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the browser test's login and upload helpers

TARGET_FIRST_TURN_S = 0.5


def measure(runs: int) -> list[tuple[float, float]]:
    from app_support import SAMPLES, USERS, launched
    from playwright.sync_api import sync_playwright
    from test_browser import CHROMIUM, FLAGS, logged_in_page, upload

    tmp = Path(tempfile.mkdtemp(prefix="tarfas-bench-browser-"))
    out = []
    with sync_playwright() as p, launched(tmp / "data") as app:
        ctx = p.chromium.launch_persistent_context(
            str(tmp / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS
        )
        ctx.set_default_timeout(60_000)
        page = logged_in_page(ctx, app, *USERS[0])
        transcript = page.locator("#transcript")
        for _ in range(runs):
            upload(page, SAMPLES / "astronaut_live.png")
            page.wait_for_timeout(500)  # the upload settled: time the click only
            t0 = time.perf_counter()
            page.locator("#investigate").click()
            transcript.get_by_text("Fast answer").first.wait_for()
            first = time.perf_counter() - t0
            transcript.get_by_text("Final verdict").first.wait_for()
            out.append((first, time.perf_counter() - t0))
            page.reload()  # an empty transcript for the next run
            page.locator("#investigate").wait_for()
            page.wait_for_load_state("networkidle")
        ctx.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=6)
    args = p.parse_args(argv)
    results = measure(args.runs)
    firsts = [f for f, _ in results]
    finals = [v for _, v in results]
    for k, (f, v) in enumerate(results):
        print(f"run {k}: first turn visible {1000 * f:.0f} ms, final verdict {1000 * v:.0f} ms")
    med = statistics.median(firsts)
    print(
        f"click -> first turn visible: median {1000 * med:.0f} ms, max {1000 * max(firsts):.0f} ms "
        f"(target {1000 * TARGET_FIRST_TURN_S:.0f} ms, ratio {med / TARGET_FIRST_TURN_S:.2f} median, "
        f"{max(firsts) / TARGET_FIRST_TURN_S:.2f} max); final verdict median {1000 * statistics.median(finals):.0f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

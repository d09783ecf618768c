"""Analyst sessions in a real browser (headless Debian Chromium driven by Playwright): log in, upload a
face, wait for the streamed verdict, override it with the keyboard shortcut, export, then check the
database rows and the exported JSONL; a hostile model reply that loads nothing; calibration. Skipped when
Chromium is absent, except in CI (env CI set)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from app_support import PNG_MAGIC, SAMPLES, USERS, launched
from sqlalchemy import select

from storage.models import AuditEvent, DatasetExport, Investigation, Review

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000


@pytest.fixture
def browser_context(tmp_path):
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"Chromium not found at {CHROMIUM}; CI must install the Debian 'chromium' package")
        pytest.skip(f"Chromium not found at {CHROMIUM}")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        # A persistent context on a fresh folder is Playwright's way to give Chromium --user-data-dir.
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS
        )
        ctx.set_default_timeout(TIMEOUT_MS)
        try:
            yield ctx
        finally:
            ctx.close()


def logged_in_page(browser_context, app, user: str, password: str):
    """A new page of ``app``, logged in, with the workbench's scripts attached (a file set now is seen)."""
    page = browser_context.new_page()
    page.goto(app.url)
    page.locator("input[type=text]").fill(user)
    page.locator("input[type=password]").fill(password)
    page.get_by_role("button", name="Login").click()
    page.locator("#investigate").wait_for()
    page.wait_for_load_state("networkidle")
    return page


def upload(page, paths: Path | list[Path]) -> None:
    """Set the upload's files and wait until the component shows the last one. On a loaded machine a set
    can land before Gradio's upload handler is attached, and is then dropped: only then set them again.
    A set that is merely slow must not be repeated: the component would hold every file twice (and the
    Investigate click would run each twice)."""
    paths = paths if isinstance(paths, list) else [paths]
    shown = page.locator("#upload").get_by_text(paths[-1].stem).first
    page.locator("#upload input[type=file]").set_input_files([str(p) for p in paths])
    try:
        shown.wait_for(timeout=TIMEOUT_MS)
    except Exception:
        if page.locator("#upload").get_by_text(paths[0].stem).count():
            raise  # the upload arrived in part: a real failure, not a dropped set
        page.locator("#upload input[type=file]").set_input_files([str(p) for p in paths])
        shown.wait_for()


def test_an_analyst_logs_in_investigates_overrides_with_a_shortcut_and_exports(tmp_path, browser_context):
    user, password = USERS[0]
    with launched(tmp_path / "data") as app:
        page = logged_in_page(browser_context, app, user, password)

        # Upload a face and investigate it; the verdict streams into the chat.
        upload(page, SAMPLES / "astronaut_live.png")
        page.locator("#investigate").click()
        page.locator("#transcript").get_by_text("Final verdict").wait_for()
        assert page.locator("#transcript").get_by_text("Fast answer").count() >= 1

        # Nothing offers to share the evidence.
        assert page.locator("button[aria-label=Share]:visible, button[title=Share]:visible").count() == 0
        # Every image the browser shows for the case is served as PNG, not re-encoded to WebP.
        srcs = page.locator("#transcript img, #investigate-original img, #investigate-focus img").evaluate_all(
            "els => els.map(e => e.src)"
        )
        assert len(srcs) >= 3
        for src in srcs:
            body = page.request.get(src).body()
            assert body[:8] == PNG_MAGIC, src

        # Review: the tab opens the case just investigated; override the model's verdict with Alt+R / Alt+S.
        page.get_by_role("tab", name="Review").click()
        summary = page.locator("#review-summary")
        summary.get_by_text("Model verdict").wait_for()
        model = "real" if "Model verdict: Real" in summary.inner_text() else "spoof"
        override = "spoof" if model == "real" else "real"
        page.locator("#review-notes textarea").fill("overridden in the browser test")
        # Going to another tab and back keeps what was typed (the open case is not reloaded). The Queue
        # lists the case as soon as it is opened, without a Refresh click.
        page.get_by_role("tab", name="Queue").click()
        page.locator("#queue-count").get_by_text("1 cases").wait_for()
        page.get_by_role("tab", name="Review").click()
        page.wait_for_timeout(300)
        assert page.locator("#review-notes textarea").input_value() == "overridden in the browser test"
        # While the analyst types in Notes, Alt+S / Alt+R type; they record nothing.
        page.locator("#review-notes textarea").press("Alt+KeyS" if override == "spoof" else "Alt+KeyR")
        page.wait_for_timeout(500)
        assert page.locator("#review-saved").inner_text().strip() == ""
        page.locator("#review-summary").click()  # leave the text field: the shortcut now saves
        page.keyboard.press("?")  # the shortcut help
        assert page.locator("#tarfas-help").is_visible() and "Alt+S" in page.locator("#tarfas-help").inner_text()
        page.keyboard.press("Escape")
        assert not page.locator("#tarfas-help").is_visible()
        page.keyboard.press("Alt+KeyS" if override == "spoof" else "Alt+KeyR")
        page.locator("#review-saved").get_by_text("Saved").wait_for()

        # Export the reviewed case as a training dataset.
        page.get_by_role("tab", name="Export").click()
        page.locator("#export").click()
        page.locator("#export-info").get_by_text("Exported").wait_for()

        with app.storage.sessions() as s:
            inv = s.scalars(select(Investigation)).one()
            assert inv.status == "completed" and inv.started_by == user and inv.verdict == model
            review = s.scalars(select(Review)).one()
            assert (review.investigation_id, review.verdict, review.reviewer, review.notes) == (
                inv.id,
                override,
                user,
                "overridden in the browser test",
            )
            exp = s.scalars(select(DatasetExport)).one()
            assert exp.created_by == user and [i.investigation_id for i in exp.items] == [inv.id]
            assert {e.action for e in s.scalars(select(AuditEvent).where(AuditEvent.actor == user))} >= {
                "case.create",
                "review.create",
                "dataset_export.create",
            }
        records = [
            json.loads(line)
            for line in (Path(exp.folder) / "trajectories.jsonl").read_text().splitlines()
            if line.strip()
        ]
        assert len(records) == 1
        assert records[0]["id"] == inv.id and records[0]["label"] == override


def test_an_analyst_fits_and_activates_a_calibration_profile_and_the_next_verdict_names_it(tmp_path, browser_context):
    from workbench_support import reviewed_expert_cases

    from core.policies import load_policy
    from storage.db import open_storage
    from storage.models import CalibrationActivation

    user, password = USERS[0]
    data = tmp_path / "data"
    seeded = open_storage(data)  # 4 real + 4 spoof faces investigated by the expert policy and reviewed
    try:
        reviewed_expert_cases(seeded, load_policy("expert"), n=4, user=user, prefix="cam1/")
    finally:
        seeded.close()
    with launched(data) as app:
        page = logged_in_page(browser_context, app, user, password)

        # Fit a profile on the reviewed cases of camera 1, see before/after, activate it.
        page.get_by_role("tab", name="Calibration").click()
        page.locator("#calibration-active").get_by_text("No calibration profile is active").wait_for()
        page.locator("#calibration-source textarea, #calibration-source input").first.fill("cam1/")
        page.locator("#calibration-name textarea, #calibration-name input").first.fill("site-A")
        page.locator("#calibration-fit").click()
        info = page.locator("#calibration-fit-info")
        info.get_by_text("not active yet").wait_for()
        assert "8 reviewed cases (4 real, 4 spoof)" in info.inner_text() and "HTER" in info.inner_text()
        profile_id = page.locator("#calibration-profile-id textarea, #calibration-profile-id input").first.input_value()
        assert len(profile_id) == 12 and profile_id in info.inner_text()
        page.locator("#calibration-activate").click()
        page.locator("#calibration-status").get_by_text("Activated profile").wait_for()
        assert profile_id in page.locator("#calibration-active").inner_text()
        assert profile_id in page.locator("#calibration-history").inner_text()

        # The next investigation is decided with it, and its verdict says so.
        page.get_by_role("tab", name="Investigate").click()
        page.locator("#investigate-sample").click()
        page.locator("#transcript").get_by_text("Final verdict").wait_for()
        transcript = page.locator("#transcript").inner_text()
        assert f"Calibration profile {profile_id} 'site-A': threshold" in transcript

        with app.storage.sessions() as s:
            latest = s.scalars(select(Investigation).order_by(Investigation.started_at.desc())).first()
            assert latest.started_by == user and latest.calibration_profile_id == profile_id
            (activation,) = s.scalars(select(CalibrationActivation)).all()
            assert (activation.profile_id, activation.activated_by) == (profile_id, user)
            actions = {e.action for e in s.scalars(select(AuditEvent).where(AuditEvent.actor == user))}
            assert {"calibration_profile.create", "calibration.activate"} <= actions


class _Counting(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(PNG_MAGIC)

    def log_message(self, *args):  # quiet
        pass


def hostile_replies(base: str) -> list[str]:
    """Replies a compromised or prompt-injected model could give: every one tries to make the analyst's
    browser fetch ``base`` (HTML, Markdown image, script, javascript: link, a tool name, a broken turn)."""
    return [
        f"<Spoof><reason>Look: ![x]({base}/md-fast.png) and [click](javascript:fetch('{base}/js-link'))</reason>",
        f"<think>Checking <img src={base}/img-think.png> <script>fetch('{base}/script')</script></think>"
        '<tool_call>{"name": "FFTTool", "arguments": {}}</tool_call>',
        f'<think>Next ![]({base}/md-think.png)</think><tool_call>{{"name": "<img src={base}/tool-name.png>", '
        '"arguments": {}}</tool_call>',
        f"<img src={base}/img-error.png><svg onload=\"fetch('{base}/svg')\"></svg><iframe src={base}/iframe></iframe>",
        f"<think>Done. <a href=javascript:fetch('{base}/a')>see</a> <video src={base}/video.mp4></video></think>"
        "<answer><Spoof></answer>",
    ]


def test_a_hostile_model_reply_is_shown_as_text_and_makes_the_browser_load_nothing(tmp_path, browser_context):
    from loopback import free_port

    from core.policies.scripted import ScriptedPolicy

    user, password = USERS[0]
    port = free_port()
    _Counting.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", port), _Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    try:
        # The server's policy speaks like a hostile model (the same object serves the one investigation).
        policy = ScriptedPolicy(hostile_replies(base))
        with launched(tmp_path / "data", policy_loader=lambda name, **kw: policy) as app:
            page = logged_in_page(browser_context, app, user, password)
            upload(page, SAMPLES / "astronaut_live.png")
            page.locator("#investigate").click()
            page.locator("#transcript").get_by_text("Final verdict").wait_for()
            page.get_by_role("tab", name="Review").click()
            page.locator("#review-summary").get_by_text("Model verdict").wait_for()
            page.locator("#review-transcript").get_by_text("Final verdict").wait_for()
            page.wait_for_timeout(1500)  # time for any fetch the page was tricked into
            texts = [page.locator(w).inner_text() for w in ("#transcript", "#review-transcript")]
            links = page.locator("a[href^='javascript']").count()
            loads = page.locator(f"img[src^='{base}'], script[src^='{base}'], iframe[src^='{base}']").count()
    finally:
        server.shutdown()
        server.server_close()
    assert _Counting.hits == []  # the browser fetched nothing from the URLs in the model's text
    assert (links, loads) == (0, 0)
    for text in texts:  # the reply is there, as the characters the model wrote
        assert f"<img src={base}/img-think.png>" in text and f"![x]({base}/md-fast.png)" in text


def test_the_counting_server_counts(tmp_path):
    """The hostile-reply test can fail: a plain fetch of its URL is counted."""
    import urllib.request

    from loopback import free_port

    port = free_port()
    _Counting.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", port), _Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/md-fast.png", timeout=5).read()
    finally:
        server.shutdown()
        server.server_close()
    assert _Counting.hits == ["/md-fast.png"]


# The README's screenshots: written there only when asked (TARFAS_SCREENSHOTS=docs/screenshots), so that a
# test run never changes the checkout.
SCREENSHOTS_ENV = "TARFAS_SCREENSHOTS"
TABS = ["Investigate", "Review", "Queue", "Export", "Metrics", "Calibration"]


def batch_files(folder: Path, n: int = 10) -> list[Path]:
    """``n`` distinct face images (real photos of the samples, flipped, brightened or resized)."""
    from PIL import Image, ImageEnhance, ImageOps

    variants = [
        lambda im: im,
        ImageOps.mirror,
        lambda im: ImageEnhance.Brightness(im).enhance(1.08),
        lambda im: im.resize((im.width * 9 // 10, im.height * 9 // 10)),
    ]
    samples = sorted(SAMPLES.glob("*.png"))
    out = []
    for k in range(n):
        im = Image.open(samples[k % len(samples)]).convert("RGB")
        path = folder / f"{k:02d}_{samples[k % len(samples)].stem}.png"
        variants[k // len(samples) % len(variants)](im).save(path)
        out.append(path)
    return out


def save_screenshot(page, name: str, folder: Path) -> Path:
    """The visible page (1280x800) as a small PNG for the README (palette of 256 colours)."""
    import io

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.add_style_tag(content=".toast-wrap {display: none !important;}")  # the notifications of earlier steps
    page.wait_for_timeout(300)
    im = Image.open(io.BytesIO(page.screenshot())).convert("RGB").quantize(256)
    path = folder / f"{name}.png"
    im.save(path, optimize=True)
    return path


def card_id(page, prefix: str) -> str:
    return page.locator(f"#{prefix}-card .tf-card").get_attribute("data-investigation")


def test_an_analyst_walks_a_batch_opens_cases_zooms_compares_reviews_reruns_and_replays(tmp_path, browser_context):
    """The workbench's done-when walk: a 10-file batch; three rows opened, each showing only its own case;
    zoom, compare, review, re-run (the review is still there, asked about), replay; a screenshot per tab."""
    import io

    from PIL import Image

    user, password = USERS[0]
    files = batch_files(tmp_path)
    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path / "screenshots")
    with launched(tmp_path / "data") as app:
        page = logged_in_page(browser_context, app, user, password)
        page.set_viewport_size({"width": 1280, "height": 800})

        # A 10-file batch: every file gets a row with its own progress, then its verdict.
        upload(page, files)
        page.locator("#investigate").click()
        status = page.locator("#investigate-status")
        status.get_by_text("10 of 10 investigated").wait_for(timeout=5 * TIMEOUT_MS)
        rows = page.locator("#batch [role=row]:has([role=gridcell])")
        # The browser draws the streamed updates in order: wait until it has drawn the last one.
        page.wait_for_function(
            "() => { const r = [...document.querySelectorAll('#batch [role=row]')].filter(e => e.querySelector('[role=gridcell]'));"
            " return r.length === 10 && r.every(e => e.querySelectorAll('[role=gridcell]')[1].innerText.trim() === 'completed')"
            " && !document.querySelector('#investigate-card .generating'); }",
            timeout=5 * TIMEOUT_MS,
        )
        save_screenshot(page, "investigate", shots)

        with app.storage.sessions() as s:
            by_id = {i.id: i for i in s.scalars(select(Investigation))}
            crops = {i.id: app.storage.files.read_png(i.crop_sha256) for i in by_id.values()}
            names = {i.id: i.case.filename for i in by_id.values()}
        assert len(by_id) == 10 and all(i.status == "completed" for i in by_id.values())

        # Open three rows: every panel shows that case and no other.
        for r in (0, 4, 9):
            row = rows.nth(r)
            cells = row.locator("[role=gridcell]")
            inv_id = cells.nth(4).inner_text().strip()
            cells.first.click()
            page.wait_for_function(
                "id => document.querySelector('#investigate-card .tf-card')?.dataset.investigation === id", arg=inv_id
            )
            assert (
                page.locator("#current-investigation textarea, #current-investigation input").first.input_value()
                == inv_id
            )
            assert names[inv_id] in page.locator("#investigate-card").inner_text()
            assert names[inv_id] in page.locator("#transcript").inner_text()
            assert (
                names[inv_id] in page.locator("#investigate-caption").inner_text()
                or "Turn" in page.locator("#investigate-caption").inner_text()
            )
            # The crop in the gallery is this case's crop, pixel for pixel.
            srcs = page.locator("#investigate-gallery img").evaluate_all("els => els.map(e => e.src)")
            crop = np.asarray(Image.open(io.BytesIO(page.request.get(srcs[1]).body())).convert("RGB"))
            assert np.array_equal(crop, crops[inv_id])
            others = [k for k in crops if k != inv_id]
            assert not any(np.array_equal(crop, crops[k]) for k in others if crops[k].shape == crop.shape)

        # Review the last opened case: the Review tab opens it.
        page.get_by_role("tab", name="Review").click()
        page.wait_for_function(
            "id => document.querySelector('#review-card .tf-card')?.dataset.investigation === id", arg=inv_id
        )
        # Zoom a tool image with the wheel, to its pixels.
        focus = page.locator("#review-focus img").first
        focus.scroll_into_view_if_needed()
        box = focus.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        for _ in range(6):
            page.mouse.wheel(0, -200)
            page.wait_for_timeout(50)
        assert float(focus.get_attribute("data-zoom")) > 3 and "scale(" in (focus.get_attribute("style") or "")
        focus.dblclick()
        assert float(focus.get_attribute("data-zoom")) == 1

        # Compare two images side by side: the crop and a tool image, then the upload instead.
        page.locator("#review-compare-box").get_by_text("Compare two images side by side").click()
        slider = page.locator("#review-compare img")
        slider.first.wait_for()
        before = slider.evaluate_all("els => els.map(e => e.src)")
        assert len(set(before)) == 2
        page.locator("#review-compare-right input").click()
        page.get_by_role("option", name="Original upload").click()
        page.wait_for_function(
            "old => { const s = [...document.querySelectorAll('#review-compare img')].map(e => e.src);"
            " return s.length >= 2 && s.join() !== old; }",
            arg=",".join(before),
        )

        # Review: Spoof, saved under the login.
        page.locator("#review-spoof").click()
        page.locator("#review-saved").get_by_text("Saved").wait_for()
        save_screenshot(page, "review", shots)

        # Re-run: the new run shows the earlier review and asks whether it still holds; saving keeps it.
        page.locator("#review-rerun").click()
        earlier = page.locator("#review-earlier")
        earlier.get_by_text("Does it still hold for this run?").wait_for(timeout=2 * TIMEOUT_MS)
        assert f"judged run {inv_id}" in earlier.inner_text()
        new_id = card_id(page, "review")
        assert new_id != inv_id and page.locator("#review-verdict input[value=spoof]").is_checked()
        page.locator("#review-save").click()
        page.locator("#review-saved").get_by_text(f"for run {new_id}").wait_for()

        # Step-through replay at a chosen pace: the turns appear one by one, then the verdict.
        page.locator("#review-replay-box").get_by_text("Replay step by step").click()
        pace = page.locator("#review-pace input[type=number]")
        pace.fill("0.4")
        pace.press("Enter")
        page.locator("#review-replay").click()
        chat = page.locator("#review-transcript")
        # The transcript starts again from the upload; turns come one by one; the verdict comes last.
        page.wait_for_function(
            "() => { const t = document.querySelector('#review-transcript').innerText;"
            " return t.includes('Fast answer (turn 0)') && !t.includes('Final verdict'); }"
        )
        chat.get_by_text("Final verdict").wait_for()

        # The Queue shows the case reviewed, by the review of the new run; a screenshot per other tab.
        for tab in TABS[2:]:
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(1200)
            if tab == "Queue":
                page.locator("#queue-count").get_by_text("10 cases").wait_for()
            save_screenshot(page, tab.lower(), shots)

        with app.storage.sessions() as s:
            reviews = {r.investigation_id: r for r in s.scalars(select(Review))}
            assert set(reviews) == {inv_id, new_id} and {r.verdict for r in reviews.values()} == {"spoof"}
            assert s.get(Investigation, new_id).rerun_of == inv_id
    for name in (t.lower() for t in TABS):
        shot = shots / f"{name}.png"
        assert shot.stat().st_size < 300_000 and Image.open(shot).size == (1280, 800)

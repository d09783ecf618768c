"""One analyst session in a real browser (headless Debian Chromium driven by Playwright): log in, upload
a face, wait for the streamed verdict, override it with the keyboard shortcut, export, then check the
database rows and the exported JSONL. Skipped when Chromium is absent, except in CI (env CI set)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

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


def upload(page, path: Path, tries: int = 3) -> None:
    """Set the upload's file and wait until the component shows it. On a loaded machine the first set can
    land before Gradio's upload handler is attached, and is then dropped: set it again."""
    for attempt in range(tries):
        page.locator("#upload input[type=file]").set_input_files(str(path))
        try:
            page.locator("#upload").get_by_text(path.name).first.wait_for(timeout=TIMEOUT_MS // tries)
            return
        except Exception:
            if attempt == tries - 1:
                raise


def test_an_analyst_logs_in_investigates_overrides_with_a_shortcut_and_exports(tmp_path, browser_context):
    user, password = USERS[0]
    with launched(tmp_path / "data") as app:
        page = logged_in_page(browser_context, app, user, password)

        # Upload a face and investigate it; the verdict streams into the chat.
        upload(page, SAMPLES / "astronaut_live.png")
        page.locator("#investigate").click()
        page.locator("#transcript").get_by_text("Final verdict").wait_for()
        assert page.locator("#transcript").get_by_text("Fast answer").count() >= 1

        # Every image the browser shows for the case is served as PNG, not re-encoded to WebP.
        srcs = page.locator("#transcript img, #crop img, #tool-image img").evaluate_all("els => els.map(e => e.src)")
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
        page.locator("body").click()  # leave the text field: shortcuts never fire while typing
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

"""Crash recovery of the workbench: kill the app (SIGKILL) in the middle of an investigation, start it
again, and the case with its finished turns is there, marked interrupted, and a re-run completes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from app_support import SAMPLES, TOOLS, USERS, chat_text, chat_titles, free_port, launched
from gradio_client import Client, handle_file
from sqlalchemy import func, select

from storage.db import make_engine, session_factory
from storage.models import Investigation, Turn

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _wait(predicate, proc, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited early:\n{proc.stderr.read().decode()[-3000:]}")
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 (not up yet / schema not migrated yet)
            pass
        time.sleep(0.2)
    pytest.fail(f"{what} within {timeout:.0f} s")


def _turns(data_dir: Path) -> int:
    with session_factory(make_engine(data_dir=data_dir))() as s:
        return s.scalar(select(func.count()).select_from(Turn)) or 0


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_an_app_killed_mid_investigation_keeps_the_case_and_its_turns_and_the_restarted_app_re_runs_it(tmp_path):
    port = free_port()
    env = dict(
        os.environ,
        GRADIO_ANALYTICS_ENABLED="False",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "app_crash_worker.py"), str(tmp_path), str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait(lambda: httpx.get(url + "config", timeout=2).status_code == 200, proc, "the app did not come up")
        client = Client(url, verbose=False)
        client.submit(
            [handle_file(str(SAMPLES / "astronaut_live.png"))], "expert", "", 3, TOOLS, False, api_name="/investigate"
        )
        _wait(lambda: _turns(tmp_path) >= 2, proc, "the app did not commit 2 turns")
    finally:
        proc.kill()  # SIGKILL: no cleanup, nothing in flight is committed
        proc.wait(timeout=30)
        proc.stderr.close()

    with launched(tmp_path) as app:  # the restart
        with app.storage.sessions() as s:
            old = s.scalars(select(Investigation)).one()
            assert old.status == "interrupted" and [t.index for t in old.turns] == [0, 1]
            assert old.turns[1].tool_result.name == "ZoomInTool" and old.case.filename == "astronaut_live.png"
        assert app.runner.recovered == [old.id]
        ana = Client(app.url, auth=USERS[0], verbose=False)
        table, _ = ana.predict([], "any", "interrupted", "any", "any", "", api_name="/list_cases")
        assert [r[0] for r in table["data"]] == [old.id[:12]]  # the queue shows the short id
        chat, info, *_ = ana.predict(old.id, api_name="/open_case")
        assert "interrupted" in info and any("ZoomInTool" in t for t in chat_titles(chat))  # the finished turns replay
        chat, new_id = ana.predict(old.id, api_name="/rerun")
        assert new_id != old.id and "Final verdict" in chat_text(chat)
        with app.storage.sessions() as s:
            new = s.get(Investigation, new_id)
            assert (new.status, new.rerun_of, new.case_id, new.started_by) == ("completed", old.id, old.case_id, "ana")
            assert new.crop_sha256 == old.crop_sha256  # the same pixels, investigated again

"""Uploads are bounded per request (files, bytes) and per server (investigations waiting or running); a
refused request says why in plain words and records nothing. Files are copied into the file store in
chunks and hashed on the way: what is stored is byte for byte what was uploaded."""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import pytest
from app_support import SAMPLES, TOOLS, USERS, launched
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from sqlalchemy import func, select
from storage_support import ANSWER_SPOOF, FAST_SPOOF

from app.runner import Runner, RunSettings, UploadRefused
from core.policies import ScriptedPolicy
from storage.db import open_storage
from storage.filestore import FileStore
from storage.models import Case, Investigation, QueuedRun

LIVE, PRINT, REPLAY = (
    SAMPLES / "astronaut_live.png",
    SAMPLES / "astronaut_print_SIMULATED.png",
    SAMPLES / "astronaut_replay_SIMULATED.png",
)


class Gated(ScriptedPolicy):
    """The same scripted answer for every run, given only once the gate opens (work stays queued)."""

    gate = threading.Event()

    def next_turn(self, conversation):
        type(self).gate.wait(60)
        return self._replies[len(conversation.trajectory.turns)]


def gated(name, **kw):
    return Gated([FAST_SPOOF, ANSWER_SPOOF])


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def noise_png(path, side: int, seed: int = 0):
    """A PNG that does not compress (random pixels): about 3 bytes per pixel."""
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return path


def recorded(storage) -> tuple[int, int, int]:
    with storage.sessions() as s:
        return tuple(s.scalar(select(func.count()).select_from(t)) for t in (Case, QueuedRun, Investigation))


def stored_files(root) -> list:
    return sorted(p for p in root.rglob("*") if p.is_file())


def wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- the file store's streamed copy ----------------------------------------------------------------
def test_a_file_is_copied_into_the_store_in_chunks_and_stored_byte_for_byte(tmp_path):
    files = FileStore(tmp_path / "files")
    src = tmp_path / "big.bin"
    src.write_bytes(np.random.default_rng(1).integers(0, 256, 5 * 2**20 + 123, dtype=np.uint8).tobytes())
    staged = files.stage(src)
    assert (staged.sha256, len(staged)) == (sha(src), src.stat().st_size)
    assert files.put(staged) == sha(src)
    assert files.read(sha(src)) == src.read_bytes() and not list((tmp_path / "files").glob(".tmp-*"))
    with files.stage(src) as again:  # the same bytes again: nothing new, no debris
        assert files.put(again) == sha(src)
    with files.stage(tmp_path / "big.bin"):  # refused: leaving the block removes the copy
        pass
    assert [p.name for p in stored_files(tmp_path / "files")] == [sha(src)]


# --- the runner's bounds --------------------------------------------------------------------------
@pytest.fixture
def storage(tmp_path):
    st = open_storage(tmp_path / "data")
    yield st
    st.close()


def test_an_upload_of_too_many_files_or_bytes_is_refused_whole_and_records_nothing(storage, tmp_path):
    big = noise_png(tmp_path / "noise.png", 700)  # ~1.4 MiB, under the per-file limit
    r = Runner(storage, policy_loader=gated, max_files=2, max_request_bytes=2**20, max_bytes=4 * 2**20)
    try:
        with pytest.raises(UploadRefused) as err:
            r.submit_files([(LIVE, "a.png"), (PRINT, "b.png"), (REPLAY, "c.png")], user="ana")
        assert str(err.value) == (
            "3 images were sent at once; this workbench takes at most 2 per upload. Send them in smaller batches."
        )
        with pytest.raises(UploadRefused) as err:
            r.submit_files([(LIVE, "a.png"), (big, "noise.png")], user="ana")
        assert str(err.value) == (
            "these 2 images are 2 MiB together; this workbench takes at most 1 MiB per upload. "
            "Send them in smaller batches."
        )
        assert recorded(storage) == (0, 0, 0) and stored_files(storage.files.root) == [] and r.active == 0
    finally:
        r.shutdown()


def test_a_file_over_the_size_limit_is_refused_alone_and_the_others_are_stored_byte_for_byte(storage, tmp_path):
    big = noise_png(tmp_path / "noise.png", 700)
    Gated.gate.set()
    r = Runner(storage, policy_loader=gated, max_files=5, max_bytes=2**20)
    try:
        jobs = r.submit_files([(LIVE, "live.png"), (big, "noise.png"), (PRINT, "print.png")], user="ana")
        for j in jobs:
            j.wait(60)
        assert [j.state for j in jobs] == ["done", "error", "done"]
        assert jobs[1].error == "noise.png is 1.4 MiB; the limit is 1 MiB" and jobs[1].case_id is None
        with storage.sessions() as s:
            for job, src in ((jobs[0], LIVE), (jobs[2], PRINT)):
                case = s.get(Case, job.case_id)
                assert case.image_sha256 == sha(src) and case.byte_size == src.stat().st_size
                assert storage.files.read(case.image_sha256) == src.read_bytes()
        assert recorded(storage) == (2, 2, 2)
        assert {p.name for p in stored_files(storage.files.root)} >= {sha(LIVE), sha(PRINT)}
        assert sha(big) not in {p.name for p in stored_files(storage.files.root)}
        assert not list(storage.files.root.rglob(".tmp-*")) and r.active == 0
    finally:
        r.shutdown()


def test_the_queue_takes_at_most_max_queue_investigations_and_frees_each_place_when_it_ends(storage):
    Gated.gate.clear()
    r = Runner(storage, concurrency=1, policy_loader=gated, max_queue=2)
    try:
        held = r.submit_files([(LIVE, "a.png"), (PRINT, "b.png")], user="ana")  # one runs, one waits
        assert r.active == 2
        with pytest.raises(UploadRefused) as err:
            r.submit_files([(REPLAY, "c.png")], user="rita")
        assert str(err.value) == (
            "the workbench is busy: 2 investigations are waiting or running and it takes at most 2 at a time. "
            "Nothing was recorded; try again when some have finished."
        )
        single = r.submit(REPLAY, filename="c.png", user="rita").wait(5)  # one file, or a re-run: the same bound
        assert single.state == "error" and single.error.startswith("the workbench is busy")
        # a re-run needs the run it repeats to have started (under load the worker can still be starting)
        wait_for(lambda: recorded(storage)[2] == 1, "the first investigation to start")
        rerun = r.rerun(held[0].investigation_id, user="rita", settings=RunSettings.make("scripted")).wait(5)
        assert rerun.state == "error" and rerun.error.startswith("the workbench is busy")
        assert recorded(storage)[:2] == (2, 2)
        Gated.gate.set()
        for j in held:
            assert j.wait(60).state == "done"
        wait_for(lambda: r.active == 0, "the queue to empty")
        assert r.submit(REPLAY, filename="c.png", user="rita").wait(60).state == "done"
    finally:
        Gated.gate.set()
        r.shutdown()


# --- through the launched server -----------------------------------------------------------------
def test_the_launched_server_refuses_over_limit_uploads_in_plain_words_and_records_nothing(tmp_path):
    big = noise_png(tmp_path / "noise.png", 700)
    Gated.gate.clear()
    with launched(tmp_path / "data", policy_loader=gated, max_files=2, max_request_mb=1, max_queue=1) as app:
        ana = Client(app.url, auth=USERS[0], verbose=False)
        settings = ("expert", "", 3, TOOLS, False)
        refusals = []
        for files in ([LIVE, PRINT, REPLAY], [LIVE, big]):
            with pytest.raises(AppError) as err:
                ana.predict([handle_file(str(f)) for f in files], *settings, api_name="/investigate")
            refusals.append(str(err.value))
        assert "3 images were sent at once; this workbench takes at most 2 per upload" in refusals[0]
        assert "this workbench takes at most 1 MiB per upload" in refusals[1]
        assert recorded(app.storage) == (0, 0, 0)
        # The queue: one investigation held by the gate fills it; the next analyst is told to wait.
        first = ana.submit([handle_file(str(LIVE))], *settings, api_name="/investigate")
        wait_for(lambda: recorded(app.storage)[1] == 1, "the first upload to be queued")
        rita = Client(app.url, auth=USERS[1], verbose=False)
        with pytest.raises(AppError, match="the workbench is busy: 1 investigation is waiting or running") as err:
            rita.predict([handle_file(str(PRINT))], *settings, api_name="/investigate")
        refusals.append(str(err.value))
        assert recorded(app.storage)[:2] == (1, 1)
        Gated.gate.set()
        first.result()
        wait_for(lambda: app.runner.active == 0, "the queue to empty")
        rita.predict([handle_file(str(PRINT))], *settings, api_name="/investigate")
        with app.storage.sessions() as s:
            assert sorted(c.image_sha256 for c in s.scalars(select(Case))) == sorted([sha(LIVE), sha(PRINT)])
    assert all("--" not in text and "flag" not in text for text in refusals)  # no command-line words

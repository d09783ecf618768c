"""The background runner: investigations run in a bounded pool, every event reaches every reader, each
turn is in the database when its event arrives, and bad input is refused with nothing written."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import func, select
from storage_support import ANSWER_SPOOF, FAST_SPOOF, ZOOM, astronaut_png

from app.runner import Runner, RunSettings
from core.events import InvestigationFinished, InvestigationStarted, TurnCompleted, VerdictReached
from core.policies import ScriptedPolicy, load_policy
from storage.models import AuditEvent, Case, Investigation, Turn

torch.set_num_threads(1)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def count(storage, model) -> int:
    with storage.sessions() as s:
        return s.scalar(select(func.count()).select_from(model))


def stored_files(storage) -> list:
    return [p for p in storage.files.root.rglob("*") if p.is_file()]


@pytest.fixture
def runner(storage):
    r = Runner(storage, concurrency=2)
    yield r
    r.shutdown()


def test_an_upload_is_investigated_with_the_expert_policy_and_every_turn_is_stored_as_it_streams(runner, storage):
    job = runner.submit(astronaut_png(), filename="astronaut.png", user="ana")
    seen = []
    for event in job.stream(timeout=60):
        seen.append(type(event))
        if isinstance(event, TurnCompleted):
            # The recorder commits a turn before the event is passed on: the UI never shows unsaved work.
            # (The worker may already have committed later turns when this reader gets here.)
            with storage.sessions() as s:
                stored = s.scalar(
                    select(Turn).where(Turn.investigation_id == job.investigation_id, Turn.index == event.turn.index)
                )
                assert stored is not None and stored.text == event.turn.text
    assert seen[0] is InvestigationStarted and seen[-1] is InvestigationFinished and VerdictReached in seen
    traj = job.trajectory
    assert job.state == "done" and job.error is None and traj.status == "completed" and traj.policy == "expert"
    with storage.sessions() as s:
        inv = s.get(Investigation, job.investigation_id)
        assert (inv.status, inv.verdict, inv.started_by, inv.case.filename) == (
            "completed",
            traj.final.verdict,
            "ana",
            "astronaut.png",
        )
        assert inv.score_spoof == pytest.approx(traj.final.score_spoof)
        assert len(inv.turns) == len(traj.turns) >= 3  # fast answer, at least one tool, the answer
        assert any(
            t.tool_result is not None and t.tool_result.expert_p_spoof is not None
            for t in inv.turns
            if t.tool_result and t.tool_result.name != "ZoomInTool"
        )
    # A reader that comes late still gets the whole stream, from the first event.
    assert [type(e) for e in job.stream(timeout=1)] == seen


@pytest.mark.parametrize(
    "data, message",
    [
        (b"%PDF-1.4 not an image", "not an image"),
        (astronaut_png()[:400], "corrupt"),
        (png(np.full((300, 300, 3), 127, np.uint8)), "no face found"),
    ],
    ids=["not-an-image", "truncated-png", "no-face"],
)
def test_bad_input_ends_the_job_with_a_clear_message_and_writes_nothing(runner, storage, data, message):
    job = runner.submit(data, filename="bad.png", user="ana").wait(30)
    assert job.state == "error" and message in job.error and job.events == []
    assert count(storage, Case) == 0 and count(storage, Investigation) == 0 and stored_files(storage) == []
    if message == "no face found":
        assert "whole image" in job.error  # it says what to do about it


def test_an_upload_over_the_size_limit_is_refused(storage):
    r = Runner(storage, max_bytes=1000)
    try:
        job = r.submit(astronaut_png(), filename="big.png", user="ana").wait(30)
    finally:
        r.shutdown()
    assert job.state == "error" and job.error_type == "ImageTooLargeError" and "limit" in job.error
    assert count(storage, Case) == 0


def test_on_no_face_whole_investigates_the_whole_image(runner, storage):
    gray = png(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    job = runner.submit(gray, filename="crop.png", user="ana", settings=RunSettings.make(on_no_face="whole")).wait(60)
    assert job.state == "done" and job.trajectory.status == "completed"
    assert job.trajectory.face.face_detected is False and "whole image" in job.trajectory.face.notes[0]
    with storage.sessions() as s:
        assert s.get(Investigation, job.investigation_id).params["on_no_face"] == "whole"


class GatedPolicy(ScriptedPolicy):
    """Scripted turns; counts how many investigations are inside the policy at once."""

    lock = threading.Lock()
    inside = 0
    most = 0

    def next_turn(self, conversation):
        cls = type(self)
        with cls.lock:
            cls.inside += 1
            cls.most = max(cls.most, cls.inside)
        time.sleep(0.15)
        with cls.lock:
            cls.inside -= 1
        return self._replies[len(conversation.trajectory.turns)]


def test_at_most_concurrency_investigations_run_at_once_and_policies_are_loaded_once(storage):
    loads = []

    def loader(name, **kwargs):
        loads.append((name, kwargs))
        return GatedPolicy([FAST_SPOOF, ANSWER_SPOOF])

    r = Runner(storage, concurrency=2, policy_loader=loader)
    try:
        data = astronaut_png()
        jobs = [
            r.submit(data, filename=f"{i}.png", user="ana", settings=RunSettings.make("scripted", {"k": "v"}))
            for i in range(5)
        ]
        assert not jobs[-1].finished  # submitting returns at once; the work is queued
        for j in jobs:
            j.wait(60)
    finally:
        r.shutdown()
    assert [j.state for j in jobs] == ["done"] * 5 and all(j.trajectory.status == "completed" for j in jobs)
    assert GatedPolicy.most == 2
    assert loads == [("scripted", {"k": "v"})]
    assert count(storage, Investigation) == 5


def test_rerun_of_a_failed_investigation_uses_the_same_crop_and_points_back(storage):
    policies = iter([ScriptedPolicy([FAST_SPOOF, ZOOM]), ScriptedPolicy([FAST_SPOOF, ANSWER_SPOOF])])
    r = Runner(storage, concurrency=1, policy_loader=lambda name, **kw: next(policies))
    try:
        first = r.submit(astronaut_png(), filename="a.png", user="ana", settings=RunSettings.make("scripted")).wait(60)
        assert first.trajectory.status == "failed"  # the first policy ran out of replies mid-investigation
        again = r.rerun(first.investigation_id, user="rita", settings=RunSettings.make("scripted", {"second": 1})).wait(
            60
        )
    finally:
        r.shutdown()
    assert again.state == "done" and again.trajectory.status == "completed"
    assert np.array_equal(again.trajectory.crop, first.trajectory.crop)
    with storage.sessions() as s:
        inv = s.get(Investigation, again.investigation_id)
        assert (inv.rerun_of, inv.case_id, inv.started_by) == (first.investigation_id, first.case_id, "rita")
        assert (
            s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "investigation.start"))
            == 2
        )


def test_the_expert_policy_is_loaded_by_name_through_load_policy(runner):
    assert runner.policy(RunSettings()) is runner.policy(RunSettings.make("expert"))
    assert type(runner.policy(RunSettings())) is type(load_policy("expert"))


def test_concurrent_jobs_each_get_their_own_face_detection(storage):
    """Faces and blank images investigated side by side: every face is found and no blank image gets
    one (a CascadeClassifier shared between worker threads gets this wrong)."""
    blank = png(np.full((200, 200, 3), 90, np.uint8))
    r = Runner(storage, concurrency=2, policy_loader=lambda name, **kw: GatedPolicy([FAST_SPOOF, ANSWER_SPOOF]))
    try:
        jobs = [
            (
                i % 2 == 0,
                r.submit(
                    astronaut_png() if i % 2 == 0 else blank,
                    filename=f"{i}.png",
                    user="ana",
                    settings=RunSettings.make("scripted"),
                ),
            )
            for i in range(8)
        ]
        outcomes = [(is_face, job.wait(60).state) for is_face, job in jobs]
    finally:
        r.shutdown()
    assert outcomes == [(True, "done"), (False, "error")] * 4


def test_policy_arguments_typed_in_the_settings_keep_their_types():
    """``max_new_tokens=128`` must reach the hf loader as a number, paths and URLs as text."""
    from app.policy_catalog import parse_arguments

    got = parse_arguments(
        "model=/models/qwen, adapter=runs/fi/adapter, max_new_tokens=128,\ntemperature=0.7, base_url=http://127.0.0.1:8000/v1"
    )
    assert got == {
        "model": "/models/qwen",
        "adapter": "runs/fi/adapter",
        "max_new_tokens": 128,
        "temperature": 0.7,
        "base_url": "http://127.0.0.1:8000/v1",
    }

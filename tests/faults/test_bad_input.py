"""The bad-input corpus (:mod:`faults.corpus`) uploaded as the server does (a file copied into the store):
each file is refused with a reason (an input error, never a Python crash) and leaves no case, no stored file
and no temporary file behind, or it is investigated to the end."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.runner import Runner, RunSettings
from core.faces import sha256_bytes
from faults.corpus import build
from faults.support import FAST_TURNS, Replay, check_store, figures
from storage.db import open_storage
from storage.models import Case, Investigation

REFUSALS = {"InvalidImageError", "ImageTooLargeError", "NoFaceError"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return folder, {item.name: item for item in build(folder)}


@pytest.fixture(scope="module")
def workbench(tmp_path_factory):
    storage = open_storage(tmp_path_factory.mktemp("data"))
    runner = Runner(storage, concurrency=1, policy_loader=lambda name, **kw: Replay(FAST_TURNS))
    yield storage, runner
    runner.shutdown()
    storage.close()


@pytest.mark.parametrize(
    "name",
    [
        "empty.png",
        "truncated.jpg",
        "truncated.png",
        "bomb.png",
        "huge-header.png",
        "sliver.png",
        "sliver-whole.png",
        "gray16.png",
        "cmyk.jpg",
        "animated.gif",
        "animated.webp",
        "face.svg",
        "face.zip",
        "text-named.png",
    ],
)
def test_a_bad_file_is_refused_with_a_reason_or_investigated_never_half_stored(name, corpus, workbench):
    folder, items = corpus
    item, path = items[name], folder / name
    storage, runner = workbench
    settings = RunSettings.make("scripted", max_tool_calls=1, on_no_face=item.on_no_face)
    job = runner.submit(path, filename=name, user="ana", settings=settings).wait(60)
    check = check_store(storage)
    with storage.sessions() as s:
        cases = s.scalars(select(Case).where(Case.filename == name)).all()
        inv = s.get(Investigation, job.investigation_id) if job.investigation_id else None
    stored = sha256_bytes(path.read_bytes()) in storage.files
    wrong = list(check.wrong)
    if item.expect == "refuse":
        if cases or stored or inv is not None:
            wrong.append(f"refused {name}, yet {len(cases)} case(s), file stored: {stored}")
        outcome = (job.state, job.error_type)
        ok = job.state == "error" and job.error_type in REFUSALS and item.words in job.error
    else:
        outcome = (job.state, inv.status if inv else None, len(cases), stored)
        ok = outcome == ("done", "completed", 1, True)
    fig = figures("bad-input corpus")
    fig.rounds += 1
    fig.acknowledged += item.expect == "valid"
    fig.cases_lost += item.expect == "valid" and not ok
    fig.wrong_rows += len(wrong) + (item.expect == "refuse" and not ok)
    assert ok and wrong == [], (outcome, job.error, wrong)

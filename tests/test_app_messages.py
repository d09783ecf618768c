"""What a person is told when the input is wrong: ``tarfas investigate`` on a folder, ``tarfas eval`` with
nothing to score (and a hint at --root when no image of the manifest exists), a refused upload's status
in the workbench, and expected errors in the server log as one line without a traceback."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
from conftest import write_manifest
from PIL import Image

from app.cli import main
from app.runner import Job, Runner, RunSettings
from app.ui.errors import UserError
from app.ui.render import PngCache
from app.ui.tab_investigate import stream_jobs


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# --- the command line -----------------------------------------------------------------------------
def test_investigate_on_a_folder_says_it_is_a_directory(tmp_path, capsys):
    code, out, err = _run(["investigate", str(tmp_path)], capsys)
    assert (code, out) == (2, "")
    assert err == f"error: {tmp_path}: is a directory\n"


def test_eval_on_a_manifest_whose_images_all_are_missing_hints_at_root(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / name)
    (tmp_path / "lists").mkdir()  # the manifest beside the images' folder, not in it: --root was forgotten
    manifest = write_manifest(
        tmp_path / "lists" / "m.csv",
        [{"path": "a.png", "label": "real", "domain": "d"}, {"path": "b.png", "label": "spoof", "domain": "d"}],
    )
    code, out, err = _run(["eval", str(manifest)], capsys)
    assert (code, out) == (2, "")
    assert f"none of the 2 images of {manifest} exist" in err
    assert f"relative to {tmp_path / 'lists'}" in err and "give --root DIR" in err


def test_eval_exits_non_zero_when_no_image_could_be_read(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"not an image")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    manifest = write_manifest(
        tmp_path / "m.csv",
        [{"path": "a.png", "label": "real", "domain": "d"}, {"path": "b.png", "label": "spoof", "domain": "d"}],
    )
    code, _, err = _run(["eval", str(manifest)], capsys)
    assert code == 2
    assert "unreadable: a.png" in err and "unreadable: b.png" in err
    assert "error: none of the 2 images could be read; nothing was scored" in err


# --- the workbench ---------------------------------------------------------------------------------
def test_a_refused_upload_is_not_counted_as_investigated(storage, tmp_path):
    runner = Runner(storage, concurrency=1)
    try:
        job = runner.submit(b"%PDF-1.4 not an image", filename="bad.pdf", user="ana").wait(30)
        ctx = SimpleNamespace(png=PngCache(tmp_path / "png"), storage=storage)
        *_, last = stream_jobs(ctx, [("bad.pdf", job)])
    finally:
        runner.shutdown()
    status = last[1]
    assert status.startswith("0 of 1 investigated, 1 refused · **bad.pdf**: ") and "not an image" in status


def test_an_expected_refusal_is_one_log_line_and_a_failure_keeps_its_traceback(caplog):
    with caplog.at_level(logging.INFO, logger="tarfas"):
        Runner._fail(refused_job := _job(), ValueError("bad.png is not an image"))
        Runner._fail(_job(), RuntimeError("database gone"))
        err = UserError("upload at least one image first")
    refused, failed, ui = caplog.records
    assert (refused.levelname, refused.exc_info) == ("WARNING", None)
    assert "\n" not in refused.getMessage() and "refused: ValueError: bad.png is not an image" in refused.getMessage()
    assert refused_job.error == "bad.png is not an image"  # what the analyst sees is unchanged
    assert failed.levelname == "ERROR" and failed.exc_info[0] is RuntimeError
    assert (ui.levelname, ui.exc_info, ui.getMessage()) == ("WARNING", None, "refused: upload at least one image first")
    assert err.print_exception is False  # Gradio prints no traceback for it


def _job() -> Job:
    return Job(filename="bad.png", user="ana", settings=RunSettings())

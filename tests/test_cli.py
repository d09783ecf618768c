"""The real ``tarfas`` console script, run as a subprocess with a tiny trained expert bank.

The commands are independent, so they run a few at a time in the background (each process pays
~2-3 s of imports); every test waits only for its own command.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from conftest import synthetic_images, write_manifest
from PIL import Image

TARFAS = Path(sys.executable).parent / "tarfas"
REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Result:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.rc, self.out, self.err = proc.returncode, proc.stdout, proc.stderr

    def __repr__(self):
        return f"rc={self.rc}\n--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-3000:]}"

    def error_lines(self) -> list[str]:
        """stderr lines that are not progress bars."""
        return [
            ln
            for ln in self.err.splitlines()
            if ln.strip() and "\r" not in ln and "it/s]" not in ln and "img/s]" not in ln
        ]


class Runner:
    def __init__(self, workers: int = 3):
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.jobs: dict[str, Future] = {}
        # One thread per process: several run at once on a small machine.
        self.env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    def start(self, name: str, *args) -> None:
        if name not in self.jobs:
            cmd = [str(TARFAS), *map(str, args)]
            self.jobs[name] = self.pool.submit(
                subprocess.run, cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=300
            )

    def __getitem__(self, name: str) -> Result:
        return Result(self.jobs[name].result())


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_weights) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    f = {"dir": d, "weights": tiny_weights}
    f["astronaut"] = d / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(f["astronaut"])
    f["text"] = d / "notes.png"  # a text file with an image name
    f["text"].write_text("this is not an image\n")
    f["truncated"] = d / "truncated.png"
    data = f["astronaut"].read_bytes()
    f["truncated"].write_bytes(data[: len(data) // 3])
    f["missing"] = d / "no-such-file.png"
    f["gray"] = d / "gray.png"
    Image.fromarray(np.full((200, 260, 3), 128, np.uint8)).save(f["gray"])
    # eval manifest: 6 images in two domains, the last one corrupt
    ev = d / "evalset"
    rows = synthetic_images(ev / "img", groups=1, seed=5)
    for r, dom in zip(rows, ["alpha"] * 3 + ["beta"] * 3):
        r["path"], r["domain"], r["split"] = "img/" + r["path"], dom, "test"
    (ev / rows[-1]["path"]).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    f["eval_manifest"] = write_manifest(ev / "manifest.csv", rows)
    f["eval_corrupt"] = rows[-1]["path"]
    dev = d / "devset"
    f["dev_manifest"] = write_manifest(dev / "manifest.csv", synthetic_images(dev, groups=1, seed=9))
    f["bad_manifest"] = d / "bad.csv"
    f["bad_manifest"].write_text("path,label\nx.png,maybe\n")
    f["bad_weights"] = d / "bad_weights"
    import shutil

    shutil.copytree(tiny_weights, f["bad_weights"])
    (f["bad_weights"] / "rgb.safetensors").write_bytes(b"corrupt" * 20)
    return f


@pytest.fixture(scope="module")
def cli(files) -> Runner:
    f, w = files, ["--weights", files["weights"]]
    r = Runner()
    r.start("inv_json", "investigate", f["astronaut"], "--json", "--out-dir", f["dir"] / "inv_json", *w)
    r.start(
        "inv_text",
        "investigate",
        f["astronaut"],
        "--tools",
        "FFTTool,LBPTool",
        "--max-tool-calls",
        "1",
        "--out-dir",
        f["dir"] / "inv_text",
        *w,
    )
    r.start("bad_text", "investigate", f["text"], "--json", *w)
    r.start("bad_truncated", "investigate", f["truncated"], "--json", *w)
    r.start("bad_missing", "investigate", f["missing"], *w)
    r.start("gray", "investigate", f["gray"], "--json", *w)
    r.start(
        "gray_whole",
        "investigate",
        f["gray"],
        "--on-no-face",
        "whole",
        "--json",
        "--out-dir",
        f["dir"] / "gray_whole",
        *w,
    )
    m = f["eval_manifest"]
    r.start(
        "eval_thr",
        "eval",
        m,
        *w,
        "--scores-out",
        f["dir"] / "scores.csv",
        "--threshold",
        "0.5",
        "--json-out",
        f["dir"] / "metrics.json",
    )
    r.start("eval_dev", "eval", m, *w, "--dev-manifest", f["dev_manifest"], "--scores-out", f["dir"] / "scores_dev.csv")
    r.start("eval_default", "eval", m, *w)
    yield r
    r.pool.shutdown(wait=True)


# --- investigate --------------------------------------------------------------------------------
def test_investigate_json(cli, files):
    res = cli["inv_json"]
    assert res.rc == 0, res
    d = json.loads(res.out)  # stdout is exactly one JSON object
    assert isinstance(d, dict)
    assert d["policy"] == "expert" and d["status"] == "completed" and d["error"] is None
    assert "no language model" in d["policy_description"].lower()
    assert d["fast_answer"]["verdict"] in ("real", "spoof") and d["fast_answer"]["reason"]
    assert 1 <= len(d["tool_calls"]) <= 3
    names = [c["name"] for c in d["tool_calls"]]
    assert len(set(names)) == len(names)
    for c in d["tool_calls"]:
        assert set(c) >= {"name", "arguments", "image_path", "expert_p_spoof"}
        assert isinstance(c["arguments"], dict)
        p = Path(c["image_path"])
        assert p.is_file() and p.read_bytes()[:8] == PNG_MAGIC, p
        assert p.parent == files["dir"] / "inv_json"
        if c["name"] == "ZoomInTool":
            assert c["expert_p_spoof"] is None
        else:
            assert 0.0 <= c["expert_p_spoof"] <= 1.0
    fin = d["final"]
    assert fin["verdict"] in ("real", "spoof") and 0.0 <= fin["score_spoof"] <= 1.0
    assert (fin["verdict"] == "spoof") == (fin["score_spoof"] >= fin["threshold"])
    shipped = json.loads((files["weights"] / "experts.json").read_text())["policy"]["threshold"]
    assert fin["threshold"] == pytest.approx(shipped)
    assert isinstance(d["turns"], list) and len(d["turns"]) == len(d["tool_calls"]) + 2
    assert d["timings_ms"]["total"] > 0 and "load" in d["timings_ms"] and "face" in d["timings_ms"]
    assert d["face"]["face_detected"] is True
    traj = files["dir"] / "inv_json" / "trajectory.json"
    assert traj.is_file() and Path(d["trajectory_path"]) == traj
    saved = json.loads(traj.read_text())
    assert saved["final"]["score_spoof"] == fin["score_spoof"]
    assert Path(d["crop_path"]).read_bytes()[:8] == PNG_MAGIC
    assert Image.open(d["crop_path"]).size == (224, 224)


def test_investigate_human_output(cli, files):
    """Plain text output, with --tools FFTTool,LBPTool --max-tool-calls 1."""
    res = cli["inv_text"]
    assert res.rc == 0, res
    assert "FINAL:" in res.out
    final = next(ln for ln in res.out.splitlines() if ln.startswith("FINAL:"))
    assert ("SPOOF" in final) != ("REAL" in final)
    assert "[fast answer]" in res.out and "P(spoof)" in final
    with pytest.raises(json.JSONDecodeError):
        json.loads(res.out)
    saved = json.loads((files["dir"] / "inv_text" / "trajectory.json").read_text())
    called = [t["tool_result"]["name"] for t in saved["turns"] if t.get("tool_result")]
    assert len(called) == 1 and called[0] in ("FFTTool", "LBPTool")
    assert saved["tools"] == ["FFTTool", "LBPTool"]
    assert f"-> {called[0]}" in res.out


@pytest.mark.parametrize(
    "bad, words, as_json",
    [("text", "not an image", True), ("truncated", "truncated", True), ("missing", "no such file", False)],
)
def test_investigate_bad_input(cli, files, bad, words, as_json):
    res = cli[f"bad_{bad}"]
    assert res.rc == 2, res
    lines = res.error_lines()
    assert len(lines) == 1, res
    assert lines[0].startswith("error: ") and str(files[bad]) in lines[0] and words in lines[0], lines
    assert "Traceback" not in res.err
    if as_json:  # --json: a JSON error object on stdout
        d = json.loads(res.out)
        assert d["error"]["type"] == "InvalidImageError"
        assert words in d["error"]["message"]
        assert d["image"] == str(files[bad])
    else:
        assert res.out == ""


def test_no_face_is_an_input_error(cli):
    res = cli["gray"]
    assert res.rc == 2, res
    assert "--on-no-face" in res.err
    assert json.loads(res.out)["error"]["type"] == "NoFaceError"
    assert len(res.error_lines()) == 1


def test_no_face_analysed_whole(cli):
    res = cli["gray_whole"]
    assert res.rc == 0, res
    d = json.loads(res.out)
    assert d["face"]["face_detected"] is False
    assert any("whole image" in n for n in d["face"]["notes"])
    assert d["final"]["verdict"] in ("real", "spoof")


# --- eval -----------------------------------------------------------------------------------------
def _scores(path: Path) -> list[dict]:
    text = path.read_text()
    header = next(csv.reader(io.StringIO(text)))
    assert header == [
        "path",
        "label",
        "domain",
        "score_spoof",
        "verdict",
        "error",
        "attack_type",
        "split",
        "fast_score",
        "tool_calls",
    ]
    return list(csv.DictReader(io.StringIO(text)))


def test_eval_with_threshold(cli, files):
    res = cli["eval_thr"]
    assert res.rc == 0, res
    assert "--threshold" in res.out and "0.5000" in res.out
    table = res.out.splitlines()
    for name in ("alpha", "beta", "pooled"):
        assert any(ln.split()[:1] == [name] for ln in table), name
    pooled = next(ln for ln in table if ln.startswith("pooled")).split()
    assert pooled[1:4] == ["5", "3", "2"]  # n, real, spoof of the readable images
    assert pooled[-3:-1] == ["1", "0"]  # one unreadable image; every readable one got a verdict
    assert f"unreadable: {files['eval_corrupt']}" in res.err
    rows = _scores(files["dir"] / "scores.csv")
    assert len(rows) == 6
    by_path = {r["path"]: r for r in rows}
    bad = by_path.pop(files["eval_corrupt"])
    assert bad["score_spoof"] == "" and bad["verdict"] == "" and bad["error"]
    for r in by_path.values():
        s = float(r["score_spoof"])
        assert 0.0 <= s <= 1.0
        assert r["verdict"] == ("spoof" if s >= 0.5 else "real")
        assert r["error"] == ""
        assert r["label"] in ("real", "spoof") and r["domain"] in ("alpha", "beta")
    m = json.loads((files["dir"] / "metrics.json").read_text())
    assert m["threshold"] == 0.5 and "--threshold" in m["threshold_source"]
    assert set(m["metrics"]) == {"alpha", "beta", "pooled"}
    assert (
        m["metrics"]["pooled"]["n"] == 5
        and m["metrics"]["pooled"]["unreadable"] == 1
        and m["metrics"]["pooled"]["no_verdict"] == 0
    )
    assert 0.0 <= m["metrics"]["pooled"]["auc"] <= 1.0


def test_eval_with_dev_manifest(cli, files):
    res = cli["eval_dev"]
    assert res.rc == 0, res
    head = res.out.splitlines()[0]
    assert "EER of the reasoning scores on the source" in head and str(files["dev_manifest"]) in head
    thr = float(head.split("threshold ")[1].split()[0])
    assert 0.0 <= thr <= 1.0
    assert "pooled" in res.out
    for r in _scores(files["dir"] / "scores_dev.csv"):
        if r["score_spoof"]:
            assert r["verdict"] == ("spoof" if float(r["score_spoof"]) >= thr else "real")


def test_eval_uses_the_shipped_threshold_by_default(cli, files):
    res = cli["eval_default"]
    assert res.rc == 0, res
    shipped = json.loads((files["weights"] / "experts.json").read_text())["policy"]["threshold"]
    head = res.out.splitlines()[0]
    assert f"threshold {shipped:.4f}" in head
    assert "policy's threshold" in head
    assert "pooled" in res.out


@pytest.mark.data
def test_eval_on_fas_dev(cli, fasdev, files, tmp_path):
    cli.start(
        "fasdev",
        "eval",
        fasdev / "manifest.csv",
        "--weights",
        files["weights"],
        "--limit",
        "6",
        "--scores-out",
        tmp_path / "s.csv",
    )
    res = cli["fasdev"]
    assert res.rc == 0, res
    assert "pooled" in res.out
    rows = _scores(tmp_path / "s.csv")
    assert len(rows) == 6
    assert all(r["score_spoof"] or r["error"] for r in rows)


# --- more error paths, through app.cli.main in this process (same code as the console script, without
# paying the ~3 s start-up of a new process for each) ----------------------------------------------
def _main(argv, capsys) -> Result:
    from app.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return Result(subprocess.CompletedProcess(argv, rc, out, err))


def test_missing_weights_folder(files, tmp_path, capsys):
    res = _main(
        ["investigate", files["astronaut"], "--weights", tmp_path / "no-weights-here", "--out-dir", tmp_path / "o"],
        capsys,
    )
    assert res.rc == 2, res
    assert "experts.json" in res.err and len(res.error_lines()) == 1


def test_eval_bad_manifest(files, capsys):
    res = _main(["eval", files["bad_manifest"], "--weights", files["weights"]], capsys)
    assert res.rc == 2, res
    assert f"{files['bad_manifest']}:2" in res.err and len(res.error_lines()) == 1


def test_eval_filters_leave_nothing(files, capsys):
    res = _main(["eval", files["eval_manifest"], "--weights", files["weights"], "--domains", "gamma"], capsys)
    assert res.rc == 2, res
    assert "no rows left" in res.err


def test_unknown_tool(files, tmp_path, capsys):
    res = _main(
        [
            "investigate",
            files["astronaut"],
            "--tools",
            "FFTTool,NoSuchTool",
            "--weights",
            files["weights"],
            "--out-dir",
            tmp_path,
        ],
        capsys,
    )
    assert res.rc == 2, res
    assert "NoSuchTool" in res.err


def test_corrupt_weights_is_a_clear_error(files, tmp_path, capsys):
    res = _main(["investigate", files["astronaut"], "--weights", files["bad_weights"], "--out-dir", tmp_path], capsys)
    assert res.rc == 2, res
    assert "rgb.safetensors" in res.err


def test_eval_missing_dev_manifest(files, capsys):
    res = _main(
        ["eval", files["eval_manifest"], "--weights", files["weights"], "--dev-manifest", files["dir"] / "no-dev.csv"],
        capsys,
    )
    assert res.rc == 2, res
    assert "no-dev.csv" in res.err

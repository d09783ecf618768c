"""The trajectory dataset format: write -> read round trip, resumable appends, and tamper checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core import agent, protocol
from core.dataset import DatasetError, DatasetWriter, read_dataset
from core.policies import ScriptedPolicy
from core.protocol import ToolCall
from core.trajectory import to_messages


@pytest.fixture
def trajectory(face):
    replies = [
        protocol.format_fast_answer("spoof", "flat texture"),
        protocol.format_tool_call_turn("check the spectrum", ToolCall("FFTTool", {})),
        protocol.format_answer_turn("periodic peaks: a screen", "spoof"),
    ]
    return agent.run(face, ScriptedPolicy(replies), label="spoof")


def test_a_trajectory_reads_back_as_the_messages_the_model_saw(tmp_path, trajectory):
    with DatasetWriter(tmp_path / "ds", source="test", created_by="ana") as w:
        w.add_trajectory(trajectory, meta={"case": "c1"})
        w.add_query(trajectory.crop, "spoof", id="q1", attack_type="replay")
    ds = read_dataset(tmp_path / "ds")

    assert ds.manifest["counts"] == {"trajectories": 1, "queries": 1, "images": 2}  # crop stored once + FFT image
    [rec] = ds.trajectories
    assert rec.label == "spoof" and rec.source == "test" and rec.meta == {"case": "c1"}
    live = to_messages(trajectory, system=rec.messages[0]["content"][0]["text"])
    loaded = ds.messages(rec)
    assert [m["role"] for m in loaded] == [m["role"] for m in live]
    for got, want in zip(loaded, live):
        for g, w_ in zip(got["content"], want["content"]):
            if g["type"] == "image":
                np.testing.assert_array_equal(g["image"], w_["image"])
            else:
                assert g == w_
    [q] = ds.queries
    np.testing.assert_array_equal(ds.image(q.image), trajectory.crop)
    assert rec.messages[0]["content"][0]["text"].startswith(protocol.ROLE_AND_MISSION)


def test_a_new_export_refuses_a_non_empty_folder(tmp_path, trajectory):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "old.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        DatasetWriter(tmp_path / "ds", source="test", created_by="ana")


def test_resume_keeps_records_drops_a_torn_line_and_refuses_duplicates(tmp_path, trajectory):
    folder = tmp_path / "ds"
    w = DatasetWriter(folder, source="annotation", created_by="bot")
    w.add_query(trajectory.crop, "real", id="a")
    w.close()
    with open(folder / "queries.jsonl", "a") as f:  # a writer killed mid-line
        f.write('{"id": "b", "ima')

    w = DatasetWriter(folder, source="annotation", created_by="bot", resume=True)
    assert w.has("a") and not w.has("b")
    with pytest.raises(DatasetError, match="already"):
        w.add_query(trajectory.crop, "real", id="a")
    w.add_query(trajectory.crop, "spoof", id="b")
    w.close()
    assert [q.id for q in read_dataset(folder).queries] == ["a", "b"]

    with pytest.raises(DatasetError, match="'annotation' dataset"):
        DatasetWriter(folder, source="app-export", created_by="ana", resume=True)


def test_changed_files_and_bad_labels_are_refused(tmp_path, trajectory):
    folder = tmp_path / "ds"
    with DatasetWriter(folder, source="test", created_by="ana") as w:
        rec = w.add_query(trajectory.crop, "spoof", id="q")
        with pytest.raises(DatasetError, match="label"):
            w.add_query(trajectory.crop, "maybe", id="bad")
    with open(folder / "queries.jsonl", "a") as f:
        f.write(json.dumps({"id": "x", "image": rec.image, "label": "real"}) + "\n")
    with pytest.raises(DatasetError, match="SHA-256"):
        read_dataset(folder)

    ds = read_dataset(folder, verify=False)
    (folder / rec.image).write_bytes((folder / rec.image).read_bytes() + b"\0")
    with pytest.raises(DatasetError, match="changed"):
        ds.image(rec.image)
    with pytest.raises(DatasetError, match="outside"):
        ds.image("../manifest.json")
    with pytest.raises(DatasetError, match="no manifest"):
        read_dataset(tmp_path)


@pytest.mark.parametrize(
    "shape, dtype", [((224, 224, 3), np.uint8), ((224, 224), np.uint8), ((31, 17, 4), np.uint8), ((20, 30), np.uint16)]
)
def test_png_bytes_is_lossless_for_every_layout(shape, dtype):
    """The fast encoder (OpenCV) for gray/RGB, Pillow for the rest: pixels read back unchanged, in RGB order."""
    import io

    from PIL import Image

    from core.dataset import png_bytes

    rng = np.random.default_rng(0)
    image = rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True)
    image[0, 0] = 0  # a known pixel, so a swapped channel order cannot pass by chance
    data = png_bytes(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), image)

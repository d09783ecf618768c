"""The trajectory record: JSON + PNG persistence that loses nothing, and the chat-message rendering
(Qwen2.5-VL content parts, tool images as user turns) built only from the protocol's texts."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from core import protocol
from core.agent import AgentConfig, run
from core.policies import PolicyOutput, ScriptedPolicy
from core.protocol import FastAnswer, ToolCall
from core.registry import ToolRegistry
from core.trajectory import Final, Trajectory, prompt_after, to_messages

FAST = protocol.format_fast_answer("spoof", "Flat lighting and a faint regular grid on the skin.")
ZOOM = protocol.format_tool_call_turn(
    "Zoom on the left cheek for print dots.", ToolCall("ZoomInTool", {"bbox": [30, 100, 110, 180]})
)
FFT = protocol.format_tool_call_turn("Check the spectrum for periodic peaks.", ToolCall("FFTTool", {}))
ANSWER = protocol.format_answer_turn("Periodic peaks and flat texture: a recapture.", "spoof")


@pytest.fixture
def trajectory(face) -> Trajectory:
    policy = ScriptedPolicy([PolicyOutput(FAST, score_spoof=0.7), ZOOM, FFT, PolicyOutput(ANSWER, score_spoof=0.91)])
    traj = run(face, policy, AgentConfig(), source="astronaut.png", image_sha256="ab" * 32, label="real")
    assert traj.status == "completed", traj.error
    return traj


def _text(part):
    assert part["type"] == "text"
    return part["text"]


def test_a_scripted_run_records_every_turn(trajectory, face):
    t = trajectory
    assert [turn.kind for turn in t.turns] == ["fast", "reasoning", "reasoning", "reasoning"]
    assert [turn.index for turn in t.turns] == [0, 1, 2, 3]
    assert t.fast_answer == FastAnswer("spoof", "Flat lighting and a faint regular grid on the skin.")
    assert t.fast_score == 0.7
    assert [turn.tool_result.name for turn in t.tool_turns] == ["ZoomInTool", "FFTTool"]
    assert t.tool_calls_used == 2
    assert t.turns[1].tool_result.arguments == {"bbox": [30, 100, 110, 180]}
    assert t.turns[1].tool_result.image.shape == (224, 224, 3)
    assert t.turns[2].tool_result.image.shape == (224, 224)
    assert t.final == Final("spoof", 0.91, "answer")
    assert np.array_equal(t.crop, face.crop)
    assert t.face.face_detected and t.face.bbox == list(face.bbox)
    assert t.tools == ToolRegistry().names
    assert t.source == "astronaut.png" and t.label == "real"


def test_to_dict_is_json_serialisable_and_holds_no_arrays(trajectory):
    d = trajectory.to_dict()
    text = json.dumps(d)  # raises on ndarray / numpy scalars
    back = json.loads(text)
    assert back == d
    assert "crop" not in d
    for turn in d["turns"]:
        if turn["tool_result"]:
            assert "image" not in turn["tool_result"]
    assert d["final"] == {"verdict": "spoof", "score_spoof": 0.91, "source": "answer"}
    # to_dict must not strip the arrays from the live object
    assert trajectory.crop is not None
    assert all(turn.tool_result.image is not None for turn in trajectory.tool_turns)


def test_from_dict_rebuilds_the_dataclasses(trajectory):
    back = Trajectory.from_dict(json.loads(json.dumps(trajectory.to_dict())))
    assert back.turns[0].fast == trajectory.turns[0].fast
    assert back.turns[1].tool_call == trajectory.turns[1].tool_call
    assert back.final == trajectory.final
    assert back.face == trajectory.face
    assert back.to_dict() == trajectory.to_dict()


def test_save_and_load_round_trip(trajectory, tmp_path):
    path = trajectory.save(tmp_path / "inv")
    assert path == tmp_path / "inv" / "trajectory.json"
    assert (tmp_path / "inv" / trajectory.crop_path).is_file()
    loaded = Trajectory.load(tmp_path / "inv")

    assert loaded.to_dict() == trajectory.to_dict()
    assert loaded.id == trajectory.id and loaded.status == "completed"
    assert loaded.final == trajectory.final
    assert loaded.face == trajectory.face
    assert loaded.crop.dtype == np.uint8 and np.array_equal(loaded.crop, trajectory.crop)
    assert len(loaded.turns) == len(trajectory.turns)
    for a, b in zip(loaded.turns, trajectory.turns):
        assert (a.index, a.kind, a.text, a.fast, a.think, a.tool_call, a.answer) == (
            b.index,
            b.kind,
            b.text,
            b.fast,
            b.think,
            b.tool_call,
            b.answer,
        )
        assert (a.parse_error, a.tool_error, a.score_spoof) == (b.parse_error, b.tool_error, b.score_spoof)
        if b.tool_result is None:
            assert a.tool_result is None
            continue
        ra, rb = a.tool_result, b.tool_result
        assert (ra.name, ra.arguments, ra.stats, ra.expert_p_spoof) == (
            rb.name,
            rb.arguments,
            rb.stats,
            rb.expert_p_spoof,
        )
        assert ra.image.dtype == np.uint8 and ra.image.shape == rb.image.shape
        assert np.array_equal(ra.image, rb.image)
        assert (tmp_path / "inv" / ra.image_path).is_file()


def test_saved_json_names_each_image_file(trajectory, tmp_path):
    trajectory.save(tmp_path)
    d = json.loads((tmp_path / "trajectory.json").read_text())
    names = [t["tool_result"]["image_path"] for t in d["turns"] if t["tool_result"]]
    assert len(set(names)) == 2
    assert all((tmp_path / n).is_file() for n in names)
    assert d["crop_path"] == "crop.png"


def test_messages_follow_the_protocol_layout(trajectory):
    system = protocol.system_prompt(ToolRegistry().schemas())
    msgs = to_messages(trajectory, system=system)
    assert [m["role"] for m in msgs] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert msgs[0]["content"] == [{"type": "text", "text": system}]

    # turn 1: the face image and the first-round query
    image, query = msgs[1]["content"]
    assert image["type"] == "image" and np.array_equal(image["image"], trajectory.crop)
    assert _text(query) == protocol.FIRST_ROUND_QUERY
    assert msgs[2]["content"] == [{"type": "text", "text": FAST}]
    # turn 2: tool guidance + format declaration, text only
    assert msgs[3]["content"] == [{"type": "text", "text": protocol.second_round_prompt()}]
    assert msgs[4]["content"] == [{"type": "text", "text": ZOOM}]
    # tool results come back as user turns: the tool image, then the format declaration
    for user, turn in ((msgs[5], trajectory.turns[1]), (msgs[7], trajectory.turns[2])):
        image, text = user["content"]
        assert image["type"] == "image"
        assert np.array_equal(image["image"], turn.tool_result.image)
        assert _text(text) == protocol.FORMAT_DECLARATION
    assert msgs[6]["content"] == [{"type": "text", "text": FFT}]
    assert msgs[8]["content"] == [{"type": "text", "text": ANSWER}]


def test_every_content_part_has_the_qwen_layout(trajectory):
    for m in to_messages(trajectory, system="sys"):
        assert set(m) == {"role", "content"}
        assert isinstance(m["content"], list) and m["content"]
        for part in m["content"]:
            if part["type"] == "text":
                assert set(part) == {"type", "text"} and isinstance(part["text"], str)
            else:
                assert part["type"] == "image" and set(part) == {"type", "image", "path"}


def test_no_system_message_without_a_system_prompt(trajectory):
    msgs = to_messages(trajectory, system=None)
    assert msgs[0]["role"] == "user"
    assert len(msgs) == 8


def test_a_finished_trajectory_has_no_pending_prompt(trajectory):
    assert to_messages(trajectory, system="s", next_prompt=True) == to_messages(trajectory, system="s")
    assert prompt_after(trajectory.turns[-1]) is None


def test_next_prompt_appends_the_pending_user_turn(trajectory):
    partial = copy.copy(trajectory)
    partial.turns = trajectory.turns[:2]  # fast answer + zoom; the model must look at the zoom next
    without = to_messages(partial, system="s")
    with_next = to_messages(partial, system="s", next_prompt=True)
    assert [m["role"] for m in without] == ["system", "user", "assistant", "user", "assistant"]
    assert with_next[:-1] == without
    image, text = with_next[-1]["content"]
    assert with_next[-1]["role"] == "user"
    assert np.array_equal(image["image"], trajectory.turns[1].tool_result.image)
    assert _text(text) == protocol.FORMAT_DECLARATION

    only_fast = copy.copy(trajectory)
    only_fast.turns = trajectory.turns[:1]
    pending = to_messages(only_fast, system=None, next_prompt=True)[-1]
    assert pending == {"role": "user", "content": [{"type": "text", "text": protocol.second_round_prompt()}]}

    empty = copy.copy(trajectory)
    empty.turns = []
    assert [m["role"] for m in to_messages(empty, system="s", next_prompt=True)] == ["system", "user"]


def test_messages_of_a_loaded_trajectory_name_the_image_files(trajectory, tmp_path):
    trajectory.save(tmp_path)
    loaded = Trajectory.load(tmp_path)
    msgs = to_messages(loaded, system=None)
    assert msgs[0]["content"][0]["path"] == "crop.png"
    zoom_image = msgs[4]["content"][0]
    assert zoom_image["path"] == loaded.turns[1].tool_result.image_path
    assert np.array_equal(zoom_image["image"], trajectory.turns[1].tool_result.image)


def test_error_turns_render_as_error_feedback(face):
    bad = "<think>zoom</think><tool_call>{not json}</tool_call>"
    traj = run(face, ScriptedPolicy([FAST, bad, ANSWER]))
    msgs = to_messages(traj, system=None)
    feedback = _text(msgs[4]["content"][0])
    assert feedback == protocol.error_feedback(traj.turns[1].parse_error)
    assert feedback.startswith("Error: <tool_call> is not valid JSON")

"""The agent loop (paper Fig. 4a): fast answer, up to ``max_tool_calls`` tool turns, final answer;
streamed as events; malformed turns and invalid calls fed back as errors; nothing the policy does
crashes the loop."""

from __future__ import annotations

import numpy as np
import pytest

from core import protocol
from core.agent import AgentConfig, investigate, run
from core.events import (
    InvestigationFinished,
    InvestigationStarted,
    ToolCalled,
    ToolResultReady,
    TurnCompleted,
    TurnStarted,
    VerdictReached,
)
from core.policies import Conversation, PolicyOutput, ScriptedPolicy
from core.protocol import ToolCall
from core.registry import ToolRegistry

FAST_SPOOF = protocol.format_fast_answer("spoof", "Looks flat, maybe a print.")
FAST_REAL = protocol.format_fast_answer("real", "Natural skin and depth.")
ZOOM = protocol.format_tool_call_turn("Zoom on the eyes.", ToolCall("ZoomInTool", {"bbox": [40, 60, 180, 130]}))
FFT = protocol.format_tool_call_turn("Look for moire peaks.", ToolCall("FFTTool", {}))
LBP = protocol.format_tool_call_turn("Check the skin texture.", ToolCall("LBPTool", {}))
HOG = protocol.format_tool_call_turn("Check gradients.", ToolCall("HOGTool", {}))
ANSWER_REAL = protocol.format_answer_turn("No spoof traces in any tool.", "real")
ANSWER_SPOOF = protocol.format_answer_turn("Clear periodic peaks.", "spoof")
UNKNOWN_TOOL = protocol.format_tool_call_turn("Use magic.", ToolCall("MagicTool", {}))
BBOX_OUTSIDE = protocol.format_tool_call_turn("Zoom far away.", ToolCall("ZoomInTool", {"bbox": [300, 300, 400, 400]}))
MALFORMED = "I think it is real."


class RecordingPolicy(ScriptedPolicy):
    """Scripted replies; remembers every conversation it was shown."""

    def __init__(self, replies):
        super().__init__(replies)
        self.seen: list[Conversation] = []

    def next_turn(self, conversation: Conversation) -> PolicyOutput:
        self.seen.append(conversation)
        return super().next_turn(conversation)

    def prompt(self, call: int) -> list[dict]:
        """The user content the policy had to answer at its ``call``-th turn (0-based)."""
        last = self.seen[call].messages[-1]
        assert last["role"] == "user"
        return last["content"]

    def prompt_text(self, call: int) -> str:
        return "\n".join(p["text"] for p in self.prompt(call) if p["type"] == "text")


class MeanBrightnessExperts:
    """A deterministic stand-in for the expert bank: P(spoof) = mean brightness of the tool image."""

    def __init__(self):
        self.calls: list[str] = []

    def p_spoof(self, tool_name: str, image: np.ndarray) -> float | None:
        self.calls.append(tool_name)
        return None if tool_name == "ZoomInTool" else float(image.mean() / 255.0)


def _events(face, replies, config=None, **kwargs):
    policy = RecordingPolicy(replies)
    return policy, list(investigate(face, policy, config, **kwargs))


# --- a clean run ----------------------------------------------------------------------------------
def test_clean_run_streams_events_in_order(face):
    policy, events = _events(face, [FAST_SPOOF, ZOOM, FFT, ANSWER_SPOOF])
    assert [type(e) for e in events] == [
        InvestigationStarted,
        TurnStarted,
        TurnCompleted,  # fast answer
        TurnStarted,
        ToolCalled,
        ToolResultReady,
        TurnCompleted,  # zoom
        TurnStarted,
        ToolCalled,
        ToolResultReady,
        TurnCompleted,  # fft
        TurnStarted,
        TurnCompleted,  # answer
        VerdictReached,
        InvestigationFinished,
    ]
    started = [e for e in events if isinstance(e, TurnStarted)]
    assert [(e.index, e.kind) for e in started] == [(0, "fast"), (1, "reasoning"), (2, "reasoning"), (3, "reasoning")]
    called = [e for e in events if isinstance(e, ToolCalled)]
    assert [(e.index, e.call.name) for e in called] == [(1, "ZoomInTool"), (2, "FFTTool")]
    ready = [e for e in events if isinstance(e, ToolResultReady)]
    assert [(e.index, e.result.name) for e in ready] == [(1, "ZoomInTool"), (2, "FFTTool")]
    assert ready[0].result.image.shape == (112, 224, 3)  # 140x70 box, aspect kept

    traj = events[-1].trajectory
    assert events[0].trajectory is traj
    assert traj.status == "completed" and traj.error is None
    assert [e.turn for e in events if isinstance(e, TurnCompleted)] == traj.turns
    assert policy.calls == 4


def test_clean_run_final_verdict_without_scores_is_one_or_zero(face):
    traj = run(face, ScriptedPolicy([FAST_REAL, FFT, ANSWER_SPOOF]))
    assert traj.final.verdict == "spoof" and traj.final.score_spoof == 1.0 and traj.final.source == "answer"
    traj = run(face, ScriptedPolicy([FAST_SPOOF, LBP, ANSWER_REAL]))
    assert traj.final.verdict == "real" and traj.final.score_spoof == 0.0


def test_final_score_comes_from_the_policy_output(face):
    _, events = _events(face, [PolicyOutput(FAST_SPOOF, 0.8), HOG, PolicyOutput(ANSWER_REAL, score_spoof=0.12)])
    verdict = next(e for e in events if isinstance(e, VerdictReached)).final
    assert verdict.verdict == "real" and verdict.score_spoof == pytest.approx(0.12) and verdict.source == "answer"
    assert events[-1].trajectory.final == verdict
    assert events[-1].trajectory.fast_score == 0.8


def test_the_policy_sees_the_protocol_prompts_and_tool_images(face):
    policy, events = _events(face, [FAST_REAL, ZOOM, ANSWER_REAL])
    traj = events[-1].trajectory
    system = protocol.system_prompt(ToolRegistry().schemas())
    # first call: system + face image + first-round query
    first = policy.seen[0].messages
    assert [m["role"] for m in first] == ["system", "user"]
    assert first[0]["content"][0]["text"] == system
    assert np.array_equal(first[1]["content"][0]["image"], face.crop)
    assert policy.prompt_text(0) == protocol.FIRST_ROUND_QUERY
    # second call: the tool guidance
    assert policy.prompt_text(1) == protocol.second_round_prompt()
    # third call: the zoomed image + format declaration
    image = policy.prompt(2)[0]
    assert image["type"] == "image" and np.array_equal(image["image"], traj.turns[1].tool_result.image)
    assert policy.prompt_text(2) == protocol.FORMAT_DECLARATION
    # the structured view carries the same: crop, registry, tool budget
    assert all(np.array_equal(c.crop, face.crop) for c in policy.seen)
    assert [c.tool_calls_left for c in policy.seen] == [3, 3, 2]
    assert policy.seen[0].registry.names == ToolRegistry().names


def test_trajectory_records_face_config_and_timings(face):
    traj = run(
        face, ScriptedPolicy([FAST_REAL, ANSWER_REAL]), AgentConfig(extra={"on_no_face": "error"}), source="x.png"
    )
    assert traj.policy == "scripted" and traj.policy_version == "1"
    assert traj.params["max_tool_calls"] == 3 and traj.params["max_format_errors"] == 2
    assert traj.params["on_no_face"] == "error"
    assert traj.face.face_detected and traj.face.crop_box == list(face.crop_box)
    assert traj.source == "x.png"
    assert traj.timings_ms["total"] >= traj.timings_ms["fast"] >= 0.0


def test_experts_annotate_tool_results(face):
    experts = MeanBrightnessExperts()
    traj = run(face, ScriptedPolicy([FAST_REAL, ZOOM, FFT, ANSWER_REAL]), registry=ToolRegistry(readers=experts))
    zoom, fft = traj.tool_turns
    assert experts.calls == ["ZoomInTool", "FFTTool"]
    assert zoom.tool_result.expert_p_spoof is None
    assert fft.tool_result.expert_p_spoof == pytest.approx(fft.tool_result.image.mean() / 255.0)
    assert "experts" in traj.timings_ms


def test_without_experts_tool_results_have_no_expert_score(face):
    traj = run(face, ScriptedPolicy([FAST_REAL, FFT, ANSWER_REAL]))
    assert traj.tool_turns[0].tool_result.expert_p_spoof is None


# --- errors fed back ------------------------------------------------------------------------------
def test_bad_calls_and_malformed_text_get_error_feedback_and_the_loop_continues(face):
    policy, events = _events(
        face,
        [FAST_SPOOF, UNKNOWN_TOOL, BBOX_OUTSIDE, MALFORMED, FFT, ANSWER_SPOOF],
        AgentConfig(max_format_errors=3),
    )
    traj = events[-1].trajectory
    assert traj.status == "completed" and traj.final.source == "answer" and traj.final.verdict == "spoof"

    unknown, outside, malformed, fft = traj.turns[1:5]
    assert "unknown tool 'MagicTool'" in unknown.tool_error and "ZoomInTool" in unknown.tool_error
    assert unknown.tool_result is None and unknown.tool_call == ToolCall("MagicTool", {})
    assert "outside" in outside.tool_error and outside.tool_result is None
    assert malformed.parse_error and malformed.tool_call is None and malformed.think is None
    assert fft.error is None and fft.tool_result.name == "FFTTool"

    # each error comes back to the policy as the next user message, starting with "Error:"
    for call, turn in ((2, unknown), (3, outside), (4, malformed)):
        text = policy.prompt_text(call)
        assert text.startswith("Error:"), text
        assert turn.error in text
        assert text.endswith(protocol.FORMAT_DECLARATION)
    assert "MagicTool" in policy.prompt_text(2)
    assert "[300, 300, 400, 400]" in policy.prompt_text(3)
    assert "Error:" not in policy.prompt_text(5)  # after the good FFT call: its image
    # refused calls cost no tool budget
    assert [c.tool_calls_left for c in policy.seen[1:]] == [3, 3, 3, 3, 2]
    # a refused call still announces itself (it was well formed) but produces no result
    assert [e.call.name for e in events if isinstance(e, ToolCalled)] == ["MagicTool", "ZoomInTool", "FFTTool"]
    assert [e.result.name for e in events if isinstance(e, ToolResultReady)] == ["FFTTool"]


def test_too_many_format_errors_fall_back_to_the_fast_answer(face):
    policy, events = _events(
        face,
        [PolicyOutput(FAST_SPOOF, score_spoof=0.66), MALFORMED, UNKNOWN_TOOL, "<think>x</think>", ANSWER_REAL],
        AgentConfig(max_format_errors=2),
    )
    traj = events[-1].trajectory
    assert policy.calls == 4  # fast + 3 errors: the third one exceeds max_format_errors=2; no 5th call
    assert len(traj.turns) == 4 and all(t.error for t in traj.turns[1:])
    assert traj.final.source == "fast_answer_fallback"
    assert traj.final.verdict == "spoof" and traj.final.score_spoof == 0.66
    assert traj.status == "completed"
    assert "stopped after 3" in traj.error
    assert isinstance(events[-2], VerdictReached) and events[-2].final == traj.final


def test_fallback_score_without_a_policy_score_is_one_or_zero(face):
    traj = run(face, ScriptedPolicy([FAST_REAL, MALFORMED]), AgentConfig(max_format_errors=0))
    assert traj.final.source == "fast_answer_fallback"
    assert traj.final.verdict == "real" and traj.final.score_spoof == 0.0


def test_tool_calls_beyond_the_limit_are_refused(face):
    policy, events = _events(face, [FAST_REAL, FFT, LBP, ANSWER_REAL], AgentConfig(max_tool_calls=1))
    traj = events[-1].trajectory
    assert traj.status == "completed" and traj.final.source == "answer"
    assert traj.tool_calls_used == 1
    refused = traj.turns[2]
    assert refused.tool_call == ToolCall("LBPTool", {})
    assert refused.tool_error == protocol.TOOL_LIMIT_MESSAGE and refused.tool_result is None
    assert [e.call.name for e in events if isinstance(e, ToolCalled)] == ["FFTTool"]  # LBP never ran
    assert policy.seen[2].tool_calls_left == 0
    assert policy.prompt_text(3) == protocol.error_feedback(protocol.TOOL_LIMIT_MESSAGE)


def test_default_limit_is_three_tool_calls(face):
    traj = run(face, ScriptedPolicy([FAST_REAL, ZOOM, FFT, LBP, HOG, ANSWER_REAL]))
    assert traj.tool_calls_used == 3
    assert traj.turns[4].tool_error == protocol.TOOL_LIMIT_MESSAGE
    assert traj.final.source == "answer"


def test_max_tool_calls_zero_answers_directly(face):
    policy, events = _events(face, [FAST_SPOOF, ANSWER_SPOOF], AgentConfig(max_tool_calls=0))
    traj = events[-1].trajectory
    assert traj.status == "completed" and traj.final.verdict == "spoof" and traj.final.source == "answer"
    assert not any(isinstance(e, (ToolCalled, ToolResultReady)) for e in events)
    assert [c.tool_calls_left for c in policy.seen] == [0, 0]


def test_max_tool_calls_zero_refuses_any_call(face):
    traj = run(face, ScriptedPolicy([FAST_SPOOF, FFT, ANSWER_REAL]), AgentConfig(max_tool_calls=0))
    assert traj.turns[1].tool_error == protocol.TOOL_LIMIT_MESSAGE
    assert traj.tool_calls_used == 0
    assert traj.final.verdict == "real"


def test_allowed_tools_restrict_what_the_policy_may_call(face):
    policy, events = _events(face, [FAST_REAL, LBP, FFT, ANSWER_REAL], AgentConfig(allowed_tools=["FFTTool"]))
    traj = events[-1].trajectory
    assert traj.tools == ["FFTTool"]
    assert "unknown tool 'LBPTool'" in traj.turns[1].tool_error
    assert traj.turns[2].tool_result.name == "FFTTool"
    assert "LBPTool" not in policy.seen[0].messages[0]["content"][0]["text"]


def test_invalid_config_is_refused():
    with pytest.raises(ValueError):
        AgentConfig(max_tool_calls=-1)
    with pytest.raises(ValueError):
        AgentConfig(max_format_errors=-1)


# --- fast answer retries --------------------------------------------------------------------------
def test_a_malformed_fast_answer_is_retried(face):
    policy, events = _events(face, ["Real, definitely.", FAST_REAL, FFT, ANSWER_REAL])
    traj = events[-1].trajectory
    assert [t.kind for t in traj.turns] == ["fast", "fast", "reasoning", "reasoning"]
    assert traj.turns[0].parse_error and traj.turns[0].fast is None
    assert traj.fast_answer.verdict == "real"
    retry_prompt = policy.prompt_text(1)
    assert retry_prompt == protocol.fast_answer_feedback(traj.turns[0].parse_error)
    assert retry_prompt.startswith("Error:")
    assert policy.prompt_text(2) == protocol.second_round_prompt()
    assert traj.final.source == "answer"
    started = [(e.index, e.kind) for e in events if isinstance(e, TurnStarted)]
    assert started[:3] == [(0, "fast"), (1, "fast"), (2, "reasoning")]


# --- failures -------------------------------------------------------------------------------------
def test_a_policy_that_raises_fails_the_investigation_keeping_earlier_turns(face):
    # two replies, then the scripted policy raises RuntimeError (as a crashed model server would)
    policy, events = _events(face, [FAST_SPOOF, ZOOM])
    traj = events[-1].trajectory
    assert isinstance(events[-1], InvestigationFinished)
    assert traj.status == "failed"
    assert traj.error.startswith("RuntimeError: scripted policy ran out of replies")
    assert len(traj.turns) == 2 and traj.turns[1].tool_result.name == "ZoomInTool"
    assert traj.final is None
    assert not any(isinstance(e, VerdictReached) for e in events)
    assert "RuntimeError" in traj.error_traceback and "traceback" not in traj.params
    assert run(face, ScriptedPolicy([FAST_SPOOF, ZOOM])).status == "failed"


def test_a_policy_that_raises_at_once_fails_cleanly(face):
    class Broken:
        name, version, description = "broken", "0", "always raises"

        def next_turn(self, conversation):
            raise ConnectionError("model server unreachable")

    traj = run(face, Broken())
    assert traj.status == "failed" and traj.turns == []
    assert traj.error == "ConnectionError: model server unreachable"


def test_a_non_finite_bbox_is_fed_back_not_fatal(face):
    nan_zoom = (
        '<think>zoom</think><tool_call>{"name": "ZoomInTool", "arguments": {"bbox": [0, 0, NaN, 100]}}</tool_call>'
    )
    policy, events = _events(face, [FAST_REAL, nan_zoom, ANSWER_REAL])
    traj = events[-1].trajectory
    assert traj.status == "completed", traj.error
    assert traj.turns[1].tool_error and "bbox" in traj.turns[1].tool_error
    assert policy.prompt_text(2).startswith("Error:")


def test_when_fast_answer_retries_run_out_the_second_round_still_asks_for_reasoning(face):
    policy, events = _events(
        face, [MALFORMED, MALFORMED, MALFORMED, FFT, ANSWER_SPOOF], config=AgentConfig(max_format_errors=2)
    )
    traj = events[-1].trajectory
    assert [t.kind for t in traj.turns] == ["fast", "fast", "fast", "reasoning", "reasoning"]
    assert traj.fast_answer is None
    # the 4th prompt is the second-round prompt (tool guidance + format), prefixed by the error
    text = policy.prompt_text(3)
    assert text.startswith("Error:") and text.endswith(protocol.second_round_prompt())
    assert traj.final.verdict == "spoof" and traj.final.source == "answer"

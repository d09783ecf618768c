"""The DT-GRPO reward (eqs. 10-14) and the ST-GRPO baseline (eq. S15), computed on trajectories the real
agent loop produced from scripted replies, against values worked out by hand."""

from __future__ import annotations

import pytest

from core import protocol
from core.agent import AgentConfig, run
from core.policies import ScriptedPolicy
from core.protocol import ToolCall
from training.rewards import RewardConfig, make_reward_funcs, reward, st_grpo_reward

FAST_SPOOF = protocol.format_fast_answer("spoof", "Flat, paper-like face.")
FAST_REAL = protocol.format_fast_answer("real", "Natural skin and depth.")
FFT = protocol.format_tool_call_turn("Look for moire peaks.", ToolCall("FFTTool", {}))
LBP = protocol.format_tool_call_turn("Check the skin texture.", ToolCall("LBPTool", {}))
ZOOM = protocol.format_tool_call_turn("Zoom on the cheek.", ToolCall("ZoomInTool", {"bbox": [40, 60, 180, 130]}))
UNKNOWN = protocol.format_tool_call_turn("Use magic.", ToolCall("MagicTool", {}))
ANSWER_SPOOF = protocol.format_answer_turn("Periodic peaks: a replay.", "spoof")
ANSWER_REAL = protocol.format_answer_turn("Nothing unusual.", "real")
MALFORMED = "I think it is a spoof."


def rollout(face, *replies, max_tool_calls=3, tools=None):
    return run(face, ScriptedPolicy(replies), AgentConfig(max_tool_calls=max_tool_calls, allowed_tools=tools))


def test_right_answers_with_two_distinct_tools(face):
    traj = rollout(face, FAST_SPOOF, FFT, LBP, ANSWER_SPOOF)
    b = reward(traj, "spoof")
    # R_fast = 0 + 1 = 1; R_rsn = 0 + 1 = 1; F_tool = 0.2 + 0.2 = 0.4; R_tool = 0.4 * 1
    assert (b.fast_fmt, b.r_fast, b.rsn_fmt, b.r_rsn) == (0.0, 1.0, 0.0, 1.0)
    assert b.f_tool == pytest.approx(0.4) and b.r_tool == pytest.approx(0.4)
    assert b.total == pytest.approx(0.1 * 1 + 0.5 * 1 + 0.4 * 0.4)  # 0.76
    assert b.tool_counts == {"FFTTool": 1, "LBPTool": 1}


def test_a_repeated_tool_is_paid_once(face):
    repeated = reward(rollout(face, FAST_SPOOF, FFT, FFT, FFT, ANSWER_SPOOF), "spoof")
    distinct = reward(rollout(face, FAST_SPOOF, FFT, LBP, ZOOM, ANSWER_SPOOF), "spoof")
    assert repeated.tool_counts == {"FFTTool": 3}
    assert repeated.f_tool == pytest.approx(0.2)  # min(3, 1) * 0.2, not 3 * 0.2
    assert repeated.total == pytest.approx(0.1 + 0.5 + 0.4 * 0.2)  # 0.68
    assert distinct.f_tool == pytest.approx(0.6)
    assert distinct.total == pytest.approx(0.1 + 0.5 + 0.4 * 0.6)  # 0.84
    assert distinct.total > repeated.total


def test_wrong_final_answer_gates_the_tool_reward(face):
    b = reward(rollout(face, FAST_SPOOF, FFT, ANSWER_REAL), "spoof")
    # fast right (1), final wrong (0), tools paid only for a right answer (0)
    assert (b.r_fast, b.r_rsn, b.f_tool, b.r_tool) == (1.0, 0.0, pytest.approx(0.2), 0.0)
    assert b.total == pytest.approx(0.1)


def test_wrong_fast_answer_right_final(face):
    b = reward(rollout(face, FAST_REAL, LBP, ANSWER_SPOOF), "spoof")
    assert (b.r_fast, b.r_rsn, b.r_tool) == (0.0, 1.0, pytest.approx(0.2))
    assert b.total == pytest.approx(0.5 + 0.4 * 0.2)  # 0.58


def test_malformed_fast_answer_costs_minus_one_even_after_a_good_retry(face):
    traj = rollout(face, MALFORMED, FAST_SPOOF, ANSWER_SPOOF)
    assert traj.turns[0].parse_error and traj.fast_answer.verdict == "spoof"
    b = reward(traj, "spoof")
    # R_fast = -1 + 1[-1 > -1] * 1 = -1; reasoning fine and right with no tool: R_rsn = 1, R_tool = 0
    assert (b.fast_fmt, b.r_fast, b.r_rsn, b.r_tool) == (-1.0, -1.0, 1.0, 0.0)
    assert b.total == pytest.approx(-0.1 + 0.5)


def test_invalid_tool_call_is_a_reasoning_format_error(face):
    traj = rollout(face, FAST_SPOOF, UNKNOWN, FFT, ANSWER_SPOOF)
    assert traj.turns[1].tool_error and traj.final.verdict == "spoof"
    b = reward(traj, "spoof")
    # R_rsn = -1 + 0 (the gate closes the accuracy term); the valid FFT call still counts for R_tool
    assert (b.rsn_fmt, b.r_rsn) == (-1.0, -1.0)
    assert b.r_tool == pytest.approx(0.2)
    assert b.total == pytest.approx(0.1 * 1 + 0.5 * -1 + 0.4 * 0.2)  # -0.32


def test_malformed_reasoning_turn_and_no_final_answer(face):
    traj = rollout(face, FAST_SPOOF, MALFORMED, MALFORMED, MALFORMED)  # 3 errors > max_format_errors=2
    assert traj.final.source == "fast_answer_fallback"
    b = reward(traj, "spoof")
    # the fast-answer fallback is not a reasoning answer: no accuracy, no tool reward
    assert (b.r_fast, b.rsn_fmt, b.final_correct, b.r_rsn, b.r_tool) == (1.0, -1.0, False, -1.0, 0.0)
    assert b.total == pytest.approx(0.1 - 0.5)


def test_tool_call_past_the_limit_is_invalid(face):
    traj = rollout(face, FAST_SPOOF, FFT, LBP, ANSWER_SPOOF, max_tool_calls=1)
    assert traj.turns[2].tool_error == protocol.TOOL_LIMIT_MESSAGE
    assert reward(traj, "spoof").rsn_fmt == -1.0


def test_custom_weights_and_gamma(face):
    traj = rollout(face, FAST_SPOOF, FFT, LBP, ANSWER_SPOOF)
    cfg = RewardConfig(beta_fast=0.2, beta_rsn=0.3, beta_tool=0.5, gamma={"FFTTool": 0.5, "LBPTool": 0.1})
    b = reward(traj, "spoof", cfg)
    assert b.f_tool == pytest.approx(0.6)
    assert b.total == pytest.approx(0.2 + 0.3 + 0.5 * 0.6)
    with pytest.raises(ValueError, match="unknown tools"):
        RewardConfig(gamma={"MagicTool": 1.0})


def test_st_grpo_baseline(face):
    tools = ["ZoomInTool"]
    with_tool = rollout(face, FAST_SPOOF, ZOOM, ANSWER_SPOOF, tools=tools)
    no_tool = rollout(face, FAST_SPOOF, ANSWER_SPOOF, tools=tools)
    wrong = rollout(face, FAST_SPOOF, ZOOM, ANSWER_REAL, tools=tools)
    bad = rollout(face, FAST_SPOOF, FFT, ZOOM, ANSWER_SPOOF, tools=tools)  # FFT is not offered: invalid call
    assert st_grpo_reward(with_tool, "spoof") == 0 + 1 + 1
    assert st_grpo_reward(no_tool, "spoof") == 0 + 1 + 0
    assert st_grpo_reward(wrong, "spoof") == 0 + 0 + 0
    assert st_grpo_reward(bad, "spoof") == -1 + 1 + 1
    assert reward(with_tool, "spoof", RewardConfig(kind="st")).total == 2


def test_trl_reward_functions_reproduce_eq_14(face):
    trajs = [rollout(face, FAST_SPOOF, FFT, LBP, ANSWER_SPOOF), rollout(face, MALFORMED, FAST_REAL, ANSWER_REAL)]
    labels = ["spoof", "spoof"]
    funcs, weights = make_reward_funcs(RewardConfig())
    assert [f.__name__ for f in funcs] == ["r_fast", "r_rsn", "r_tool"] and weights == [0.1, 0.5, 0.4]
    per_func = [f(completions=[None, None], trajectory=trajs, label=labels) for f in funcs]
    totals = [sum(w * col[i] for w, col in zip(weights, per_func)) for i in range(2)]
    assert totals == [pytest.approx(reward(t, lab).total) for t, lab in zip(trajs, labels)]
    st_funcs, st_weights = make_reward_funcs(RewardConfig(kind="st"))
    assert st_weights == [1.0] and st_funcs[0](completions=[None], trajectory=trajs[:1], label=["spoof"]) == [2.0]


def test_bad_label_is_refused(face):
    with pytest.raises(ValueError, match="label"):
        reward(rollout(face, FAST_SPOOF, ANSWER_SPOOF), "Spoof")

"""Verification of annotations (paper §3.1.3), rule by rule, on crafted good and bad annotations; and
the annotation prompts of core.protocol (eqs. 4-5, Fig. S8)."""

from __future__ import annotations

import pytest

from core import protocol
from core.errors import ProtocolParseError
from core.registry import ToolRegistry
from core.trajectory import ToolResult, Trajectory, Turn
from training.annotators import Hint
from training.verify import check_correctness, check_format, check_leakage, review_flags, verify

REG = ToolRegistry()


def reply(kind: str, text: str) -> Turn:
    """An annotator reply as the agent loop records it (parsed, or with its parse error)."""
    turn = Turn(0, kind, text)
    try:
        if kind == "fast":
            turn.fast = protocol.parse_fast_answer(text)
        else:
            parsed = protocol.parse_reasoning_turn(text)
            turn.think, turn.tool_call, turn.answer = parsed.think, parsed.tool_call, parsed.answer
    except ProtocolParseError as exc:
        turn.parse_error = str(exc)
    return turn


def tool_step(crop, name: str, think: str, p: float | None, arguments: dict | None = None) -> Turn:
    args = arguments if arguments is not None else ({"bbox": [56, 72, 168, 184]} if name == "ZoomInTool" else {})
    ex = REG.execute(name, args, crop)
    step = reply("reasoning", protocol.format_tool_call_turn(think, protocol.ToolCall(name, args)))
    step.tool_result = ToolResult(ex.name, ex.arguments, ex.output.stats, p, 0.0, ex.output.image)
    return step


def answer_step(think: str, verdict: str) -> Turn:
    return reply("reasoning", protocol.format_answer_turn(think, verdict))


def fast_step(verdict: str, reason: str) -> Turn:
    return reply("fast", protocol.format_fast_answer(verdict, reason))


def make(crop, steps: list[Turn], label="spoof", attack="print", attempt=1) -> Trajectory:
    for i, t in enumerate(steps):
        t.index = i
    return Trajectory(
        policy="crafted",
        crop=crop,
        tools=REG.names,
        turns=list(steps),
        label=label,
        status="completed",
        meta={"hint": Hint(label, attack).as_meta(), "attempt": attempt},
    )


@pytest.fixture
def good(crop) -> Trajectory:
    return make(
        crop,
        [
            fast_step("spoof", "The face looks flat, with a paper-like surface."),
            tool_step(crop, "FFTTool", "I check the spectrum for periodic halftone peaks.", 0.87),
            tool_step(
                crop, "ZoomInTool", "The spectrum shows periodic peaks. I zoom into the cheeks for print dots.", None
            ),
            answer_step(
                "Print dots are visible on the cheeks and the spectrum has halftone peaks: this is a printed photo.",
                "spoof",
            ),
        ],
    )


def codes(issues) -> set[str]:
    return {f"{i.rule}:{i.code}" for i in issues}


def test_a_clean_annotation_passes_every_rule(good):
    assert verify(good) == []
    assert review_flags(good) == []


# --- correctness ----------------------------------------------------------------------------------
def test_correctness_rejects_a_final_answer_that_contradicts_the_label(crop, good):
    good.turns[-1] = answer_step("The spectrum is smooth and the skin texture looks live.", "real")
    assert codes(check_correctness(good)) == {"correctness:wrong_answer"}


def test_correctness_rejects_an_annotation_without_final_answer(crop, good):
    bad = make(crop, good.turns[:-1])  # ran out of turns after a tool call
    issues = check_correctness(bad)
    assert codes(issues) == {"correctness:no_answer"} and "turn limit" in issues[0].message


# --- format ---------------------------------------------------------------------------------------
def test_format_rejects_a_malformed_fast_answer(crop, good):
    good.turns[0] = reply("fast", "Spoof, because it looks flat.")
    assert codes(check_format(good)) == {"format:malformed_fast_answer"}


def test_format_rejects_a_reasoning_turn_without_think(crop, good):
    good.turns[1] = reply("reasoning", '<tool_call>\n{"name": "FFTTool", "arguments": {}}\n</tool_call>')
    assert codes(check_format(good)) == {"format:malformed_turn"}


def test_format_rejects_tool_calls_that_break_the_schema(crop, good):
    unknown = protocol.format_tool_call_turn("Look at colour.", protocol.ToolCall("ColorTool", {}))
    bad_args = protocol.format_tool_call_turn("Zoom.", protocol.ToolCall("ZoomInTool", {"bbox": [10, 10]}))
    extra = protocol.format_tool_call_turn("FFT.", protocol.ToolCall("FFTTool", {"scale": 2}))
    for text in (unknown, bad_args, extra):
        ann = make(crop, [good.turns[0], reply("reasoning", text), good.turns[-1]])
        assert codes(check_format(ann)) == {"format:invalid_tool_call"}, text


def test_format_rejects_an_answer_that_is_not_the_last_turn(crop, good):
    ann = make(crop, [good.turns[0], answer_step("Flat face.", "spoof"), good.turns[1], good.turns[-1]])
    assert "format:answer_not_last" in codes(check_format(ann))


def test_format_requires_the_fast_answer_first(crop, good):
    assert codes(check_format(make(crop, good.turns[1:]))) == {"format:no_fast_answer"}


# --- leakage --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "think, code",
    [
        ("The hint says this is a spoof, so I conclude spoof.", "leakage:mentions_hint"),
        ("Matching the ground truth, this is a spoof.", "leakage:mentions_hint"),
        ("I was told this is a printed photo.", "leakage:mentions_hint"),
        ("The expert predicts a spoof trace in the spectrum.", "leakage:mentions_expert"),
        ("The spectrum gives 87% spoof trace.", "leakage:mentions_expert"),
        ("The probability of a spoof is high.", "leakage:mentions_expert"),
        ("The spectrum scores 87 on the spoof side.", "leakage:expert_value"),
        ("The spectrum scores 0.87 on the spoof side.", "leakage:expert_value"),
    ],
)
def test_leakage_rejects_texts_that_mention_the_hint_or_the_experts_confidence(good, think, code):
    good.turns[-1] = answer_step(think, "spoof")
    assert code in codes(check_leakage(good))
    assert code in codes(verify(good))


def test_leakage_rejects_a_fast_reason_that_repeats_the_hint(crop, good):
    good.turns[0] = fast_step("spoof", "This is a spoof face, print attack (a printed photo), clearly.")
    assert codes(check_leakage(good)) == {"leakage:mentions_hint"}


def test_leakage_accepts_evidence_in_words(good):
    good.turns[-1] = answer_step(
        "Halftone peaks in the spectrum and print dots on the cheeks: a printed photo, not a live face.", "spoof"
    )
    assert check_leakage(good) == []


# --- flags for manual verification ----------------------------------------------------------------
def test_review_flags_mark_borderline_annotations(crop, good):
    ann = make(
        crop,
        [
            fast_step("real", "Natural shading at a glance."),
            tool_step(crop, "FFTTool", "Check the spectrum.", 0.2),
            tool_step(crop, "LBPTool", "Check the texture.", 0.3),
            tool_step(crop, "HOGTool", "Check the gradients.", 0.9),
            tool_step(crop, "EdgeDetectionTool", "Check the edges.", 0.1),
            answer_step("Blurred edges of a recapture overall: a printed photo.", "spoof"),
        ],
        attempt=2,
    )
    assert verify(ann) == []  # accepted, but a person should look at it
    assert set(review_flags(ann)) == {"re-annotated", "fast_answer_disagrees", "experts_disagree", "long_investigation"}
    no_tools = make(crop, [fast_step("spoof", "Flat face."), answer_step("A flat printed face.", "spoof")])
    assert review_flags(no_tools) == ["no_tool_used"]


# --- the annotation prompts (core.protocol) -------------------------------------------------------
def test_annotation_prompts_follow_eqs_4_and_5_and_fig_s8():
    first = protocol.annotation_first_prompt(protocol.annotation_hint("spoof", "print"))
    assert first.startswith(
        "This is the image you need to investigate. Hint: this is a spoof face, print attack (a printed photo)."
    )
    assert protocol.annotation_hint("real") == "Hint: this is a real face (bona fide)."
    assert "replay attack" in protocol.annotation_hint("spoof", "replay")
    fft = protocol.annotation_tool_prompt("FFTTool", 0.87)
    assert fft.startswith("This is the result of FFTTool. The expert predicts 87% there's spoof trace.")
    assert fft.endswith(protocol.FORMAT_DECLARATION)
    zoom = protocol.annotation_tool_prompt("ZoomInTool", None)
    assert zoom.startswith("This is the result of ZoomInTool.") and "expert" not in zoom
    system = protocol.annotator_system_prompt(REG.schemas())
    assert (
        system.startswith(protocol.ANNOTATOR_SYSTEM_PROMPT)
        and '"name": "ZoomInTool"' in system
        and "## Reply Format" in system
    )

"""The CoT-VT protocol (paper §3, App. B): prompts verbatim, strict output formats, and parsers that
refuse anything else with a ProtocolParseError the model can act on."""

from __future__ import annotations

import json
import re

import pytest

from core import protocol
from core.errors import ProtocolParseError
from core.protocol import FastAnswer, ReasoningTurn, ToolCall
from core.registry import ToolRegistry

# App. B.1, with the paper's typographic quotes written as ASCII.
PAPER_ROLE_AND_MISSION = (
    "## Role & Mission\n"
    "You are a face forensics expert. Your mission is to classify an image as either 'Real' or 'Spoof' by "
    "analyzing evidence strictly within the **facial region**, focusing only on physical presentation attack."
)
PAPER_FIRST_ROUND_QUERY = "Is this photo of a real person? (Do not use any tools)"
PAPER_TOOL_GUIDANCE = "Wait, you should re-examine the image and give the final answer (use tools if needed)."
PAPER_FORMAT_DECLARATION = (
    "Think first, call tools if needed, then answer. Format strictly as: <think></think> "
    "<tool_call></tool_call> (if tools needed) <answer>(<Spoof>/<Real>)</answer>"
)


# --- prompts --------------------------------------------------------------------------------------
def test_prompts_are_the_paper_texts():
    assert protocol.FIRST_ROUND_QUERY == PAPER_FIRST_ROUND_QUERY
    assert protocol.TOOL_GUIDANCE == PAPER_TOOL_GUIDANCE
    assert protocol.FORMAT_DECLARATION == PAPER_FORMAT_DECLARATION
    assert protocol.ROLE_AND_MISSION == PAPER_ROLE_AND_MISSION


def test_second_round_prompt_is_tool_guidance_then_format_declaration():
    assert protocol.second_round_prompt() == PAPER_TOOL_GUIDANCE + " " + PAPER_FORMAT_DECLARATION


def test_tool_result_prompt_is_the_format_declaration():
    assert protocol.tool_result_prompt("FFTTool") == PAPER_FORMAT_DECLARATION
    assert protocol.tool_result_prompt() == PAPER_FORMAT_DECLARATION


def test_system_prompt_has_role_and_every_tool_schema_in_a_tools_block():
    schemas = ToolRegistry().schemas()
    text = protocol.system_prompt(schemas)
    assert text.startswith(PAPER_ROLE_AND_MISSION)
    m = re.search(r"<tools>\n(.*?)\n</tools>", text, re.S)
    assert m, "no <tools> block"
    listed = [json.loads(line) for line in m.group(1).splitlines()]
    assert listed == schemas  # one JSON schema per line, in registry order, nothing else
    # the Hermes instruction on how to call them
    assert "<tool_call>" in text and '"name": <function-name>' in text


def test_system_prompt_lists_only_the_offered_tools():
    schemas = ToolRegistry(allowed=["FFTTool"]).schemas()
    text = protocol.system_prompt(schemas)
    block = re.search(r"<tools>\n(.*?)\n</tools>", text, re.S).group(1)
    assert [json.loads(line)["function"]["name"] for line in block.splitlines()] == ["FFTTool"]
    assert "HOGTool" not in text and "ZoomInTool" not in text


def test_system_prompt_without_tools_is_the_role_alone():
    assert protocol.system_prompt([]) == PAPER_ROLE_AND_MISSION


def test_expert_guidance_text():
    assert (
        protocol.expert_guidance("FFTTool", 0.87)
        == "This is the result of FFTTool. The expert predicts 87% there's spoof trace"
    )
    assert (
        protocol.expert_guidance("LBPTool", 0.0)
        == "This is the result of LBPTool. The expert predicts 0% there's spoof trace"
    )
    assert protocol.expert_guidance("HOGTool", 1.0).endswith("predicts 100% there's spoof trace")


def test_error_feedback_starts_with_error_and_repeats_the_format():
    text = protocol.error_feedback("<think></think> is empty")
    assert text.startswith("Error: <think></think> is empty")
    assert text.endswith(PAPER_FORMAT_DECLARATION)
    fast = protocol.fast_answer_feedback("bad")
    assert fast.startswith("Error: bad") and "<Real><reason>" in fast and "<Spoof><reason>" in fast


# --- fast answers ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, verdict, reason",
    [
        ("<Real><reason>Natural skin texture and depth.</reason>", "real", "Natural skin texture and depth."),
        ("<Spoof><reason>Visible moire on the cheeks.</reason>", "spoof", "Visible moire on the cheeks."),
        ("<real><reason>lower case class</reason>", "real", "lower case class"),
        ("<SPOOF><REASON>upper case tags</REASON>", "spoof", "upper case tags"),
        ("  \n<Spoof> <reason>  padded reason \t</reason>\n  ", "spoof", "padded reason"),
        ("<Real><reason>a 3 < 4 comparison & stuff</reason>", "real", "a 3 < 4 comparison & stuff"),
    ],
)
def test_parse_fast_answer_accepts_the_strict_format(text, verdict, reason):
    assert protocol.parse_fast_answer(text) == FastAnswer(verdict, reason)


@pytest.mark.parametrize(
    "text",
    [
        "",  # empty
        "   \n ",  # blank
        "<Real>",  # missing reason
        "<Real><reason></reason>",  # empty reason
        "<Spoof><reason>   </reason>",  # blank reason
        "Real<reason>no angle brackets</reason>",
        "<Real><reason>fine</reason> and some more text",  # trailing text
        "I think: <Real><reason>fine</reason>",  # leading text
        "<Fake><reason>not a class</reason>",  # wrong class
        "<Live><reason>not a class</reason>",
        "<Real><Spoof><reason>two classes</reason>",
        "<Real><reason>looks <think>nested</think> fine</reason>",  # nested tag
        "<Real><reason>one</reason><reason>two</reason>",  # two reasons
        "<Real><reason>never closed",
        "<think>x</think><answer><Real></answer>",  # a reasoning turn is not a fast answer
    ],
)
def test_parse_fast_answer_refuses_malformed_text(text):
    with pytest.raises(ProtocolParseError) as info:
        protocol.parse_fast_answer(text)
    assert str(info.value)  # a message the model can act on


@pytest.mark.parametrize("value", [None, 3, b"<Real><reason>bytes</reason>"])
def test_parse_fast_answer_refuses_non_strings(value):
    with pytest.raises(ProtocolParseError):
        protocol.parse_fast_answer(value)


# --- reasoning turns ------------------------------------------------------------------------------
def test_parse_reasoning_turn_with_a_tool_call():
    text = (
        "<think>Check the cheek for print dots.</think>\n"
        '<tool_call>\n{"name": "ZoomInTool", "arguments": {"bbox": [40, 90, 120, 170]}}\n</tool_call>'
    )
    turn = protocol.parse_reasoning_turn(text)
    assert turn == ReasoningTurn(
        "Check the cheek for print dots.", tool_call=ToolCall("ZoomInTool", {"bbox": [40, 90, 120, 170]})
    )
    assert turn.answer is None


def test_parse_reasoning_turn_tool_call_without_arguments_gets_an_empty_dict():
    turn = protocol.parse_reasoning_turn('<think>Spectrum.</think><tool_call>{"name": "FFTTool"}</tool_call>')
    assert turn.tool_call == ToolCall("FFTTool", {})


def test_parse_reasoning_turn_accepts_double_encoded_arguments():
    body = json.dumps({"name": "ZoomInTool", "arguments": json.dumps({"bbox": [1, 2, 30, 40]})})
    turn = protocol.parse_reasoning_turn(f"<think>zoom</think><tool_call>{body}</tool_call>")
    assert turn.tool_call == ToolCall("ZoomInTool", {"bbox": [1, 2, 30, 40]})


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("<think>No artifacts anywhere.</think>\n<answer><Real></answer>", "real"),
        ("<think>Moire confirmed.</think><answer><Spoof></answer>", "spoof"),
        ("  <THINK>case</THINK>  <ANSWER> <spoof> </ANSWER>\n", "spoof"),
    ],
)
def test_parse_reasoning_turn_with_an_answer(text, verdict):
    turn = protocol.parse_reasoning_turn(text)
    assert turn.answer == verdict
    assert turn.tool_call is None
    assert turn.think


MALFORMED_REASONING = {
    "empty": ("", "empty"),
    "no think": ("<answer><Real></answer>", "expected <think>"),
    "only think": ("<think>hmm</think>", "expected <think>"),
    "empty think": ("<think>  </think><answer><Real></answer>", "empty"),
    "two tool calls": (
        '<think>a</think><tool_call>{"name": "FFTTool"}</tool_call><tool_call>{"name": "LBPTool"}</tool_call>',
        "found <think> + <tool_call> + <tool_call>",
    ),
    "tool call and answer": (
        '<think>a</think><tool_call>{"name": "FFTTool"}</tool_call><answer><Real></answer>',
        "found <think> + <tool_call> + <answer>",
    ),
    "answer before think": ("<answer><Real></answer><think>a</think>", "expected <think>"),
    "two thinks": ("<think>a</think><think>b</think><answer><Real></answer>", "expected <think>"),
    "unclosed think": ("<think>a <answer><Real></answer>", "<think> is never closed"),
    "unclosed answer": ("<think>a</think><answer><Real>", "never closed"),
    "stray closing tag": ("</think><answer><Real></answer>", "unexpected </think>"),
    "text before": ("Sure! <think>a</think><answer><Real></answer>", "text outside the tags"),
    "text between": ("<think>a</think> so: <answer><Real></answer>", "text outside the tags"),
    "text after": ("<think>a</think><answer><Real></answer> done.", "text outside the tags"),
    "nested answer in think": ("<think>a<answer><Real></answer></think><answer><Real></answer>", "inside <think>"),
    "reason tag": ("<think>a</think><reason>b</reason>", "unexpected <reason>"),
    "invalid JSON": ("<think>a</think><tool_call>{name: FFTTool}</tool_call>", "not valid JSON"),
    "truncated JSON": ('<think>a</think><tool_call>{"name": "FFTTool"</tool_call>', "not valid JSON"),
    "JSON array": ('<think>a</think><tool_call>["FFTTool", {}]</tool_call>', "JSON object"),
    "JSON string": ('<think>a</think><tool_call>"FFTTool"</tool_call>', "JSON object"),
    "missing name": ('<think>a</think><tool_call>{"arguments": {}}</tool_call>', '"name"'),
    "empty name": ('<think>a</think><tool_call>{"name": "", "arguments": {}}</tool_call>', '"name"'),
    "name not a string": ('<think>a</think><tool_call>{"name": 7}</tool_call>', '"name"'),
    "arguments a list": (
        '<think>a</think><tool_call>{"name": "ZoomInTool", "arguments": [1, 2, 3, 4]}</tool_call>',
        '"arguments"',
    ),
    "arguments a number": ('<think>a</think><tool_call>{"name": "FFTTool", "arguments": 5}</tool_call>', '"arguments"'),
    "arguments a non-JSON string": (
        '<think>a</think><tool_call>{"name": "FFTTool", "arguments": "none"}</tool_call>',
        '"arguments"',
    ),
    "unexpected keys": (
        '<think>a</think><tool_call>{"name": "FFTTool", "arguments": {}, "id": 1}</tool_call>',
        "unexpected keys ['id']",
    ),
    "answer word without brackets": ("<think>a</think><answer>Spoof</answer>", "<Spoof> or <Real>"),
    "answer wrong class": ("<think>a</think><answer><Fake></answer>", "<Spoof> or <Real>"),
    "answer both classes": ("<think>a</think><answer><Spoof>/<Real></answer>", "<Spoof> or <Real>"),
    "empty answer": ("<think>a</think><answer></answer>", "<Spoof> or <Real>"),
    "fast answer format": ("<Real><reason>fine</reason>", ""),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_REASONING))
def test_parse_reasoning_turn_refuses_malformed_text(case):
    text, fragment = MALFORMED_REASONING[case]
    with pytest.raises(ProtocolParseError) as info:
        protocol.parse_reasoning_turn(text)
    assert fragment in str(info.value)
    assert str(info.value)


# --- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("verdict", ["real", "spoof"])
def test_fast_answer_round_trip(verdict):
    text = protocol.format_fast_answer(verdict, "Even lighting, fine pores visible.")
    assert text == f"<{verdict.capitalize()}><reason>Even lighting, fine pores visible.</reason>"
    assert protocol.parse_fast_answer(text) == FastAnswer(verdict, "Even lighting, fine pores visible.")


def test_fast_answer_reason_is_written_on_one_line():
    text = protocol.format_fast_answer("spoof", "Paper edge\n  visible\tat the chin.")
    assert "\n" not in text
    assert protocol.parse_fast_answer(text).reason == "Paper edge visible at the chin."


@pytest.mark.parametrize(
    "call",
    [
        ToolCall("ZoomInTool", {"bbox": [12, 40.5, 100, 140]}),
        ToolCall("FFTTool", {}),
        ToolCall("HOGTool"),
    ],
)
def test_tool_call_turn_round_trip(call):
    think = "Look for halftone dots on the forehead; a printed photo shows a regular grid."
    text = protocol.format_tool_call_turn(think, call)
    assert protocol.parse_reasoning_turn(text) == ReasoningTurn(think, tool_call=call)


def test_tool_call_turn_round_trip_keeps_unicode_and_multiline_think():
    think = "Line one: moiré?\nLine two: check the spectrum."
    text = protocol.format_tool_call_turn("  " + think + "\n", ToolCall("FFTTool", {}))
    assert "moiré" in text  # written as is, not \u-escaped
    assert protocol.parse_reasoning_turn(text) == ReasoningTurn(think, tool_call=ToolCall("FFTTool", {}))


@pytest.mark.parametrize("verdict", ["real", "spoof"])
def test_answer_turn_round_trip(verdict):
    text = protocol.format_answer_turn("All tools agree.", verdict)
    assert text.endswith(f"<answer><{verdict.capitalize()}></answer>")
    assert protocol.parse_reasoning_turn(text) == ReasoningTurn("All tools agree.", answer=verdict)


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("Real", "real"),
        (" <Spoof> ", "spoof"),
        ("<answer><Real></answer>", "real"),
        ("spoof", "spoof"),
        ("<think>x</think><answer><Real></answer>", None),
        ("maybe real", None),
        ("", None),
    ],
)
def test_a_bare_verdict_is_read_only_when_it_is_nothing_but_a_verdict(text, verdict):
    assert protocol.parse_bare_verdict(text) == verdict


@pytest.mark.parametrize(
    "text, offset",
    [
        ("<Spoof><reason>x</reason>", 0),
        ("  <Real><reason>x</reason>", 2),
        ("<think>t</think>\n<answer><Real></answer>", 25),
        ("<think>t</think><tool_call>{}</tool_call>", None),
        ("no verdict", None),
    ],
)
def test_the_class_tag_is_found_where_the_class_token_score_is_read(text, offset):
    assert protocol.class_tag_offset(text) == offset
    if offset is not None:
        assert text[offset:].lower().startswith(("<real>", "<spoof>"))

"""Verification of annotations (paper §3.1.3): correctness, format and leakage, plus the flags that
send an accepted annotation to manual verification.

An annotation is the :class:`core.trajectory.Trajectory` of the annotation conversation (its ``meta``
holds the hint and the attempt, see :mod:`training.annotators`). Each rule reads the annotation's raw
reply texts again with :mod:`core.protocol`'s parsers and the tool calls against the registry's JSON
Schemas, so it judges what will be trained on, not what the pipeline believed while it ran. A rule
returns a list of :class:`Issue`; no issue means it passed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core import protocol
from core.errors import ProtocolParseError, ToolCallError
from core.registry import ToolRegistry
from core.trajectory import Trajectory

from .annotators import Hint, attempt_of, final_answer, stop_reason

Rule = str  # "correctness" | "format" | "leakage"


@dataclass(frozen=True)
class Issue:
    rule: Rule
    code: str  # short machine-readable reason, counted in stats.json
    message: str  # for the person who reads the rejected cases


# References to the hint, or to an answer given rather than found.
HINT_PATTERNS = [
    re.compile(r"\bhint(s|ed)?\b", re.I),
    re.compile(r"\bground[- ]?truth\b", re.I),
    re.compile(r"\b(the|a|given|true|correct|provided) label\b|\blabell?ed as\b", re.I),
    re.compile(r"\b(i|we) (was|were|am|are|have been|had been) (told|informed|given)\b", re.I),
    re.compile(r"\b(as|since) (i was|we were)? ?told\b", re.I),
]
# References to the expert or to a confidence: the trained model has neither.
EXPERT_PATTERNS = [
    re.compile(r"\bexpert('?s)?\b", re.I),
    re.compile(r"\d+(\.\d+)?\s*(%|percent\b|per cent\b)", re.I),
    re.compile(r"\bprobabilit(y|ies)\b|\blikelihood\b|\bconfidence (score|level|value|of)\b|\bP\s*\(\s*spoof", re.I),
]


def check_correctness(ann: Trajectory) -> list[Issue]:
    """The final answer exists and matches the ground-truth label."""
    final, label = final_answer(ann), Hint.of(ann).label
    if final is None:
        why = {
            "turn_limit": "no answer within the turn limit",
            "format": "the conversation broke off at a malformed turn",
            "annotator_error": f"the annotator failed ({ann.error})",
        }.get(stop_reason(ann), "no final answer")
        return [Issue("correctness", "no_answer", why)]
    if final != label:
        return [Issue("correctness", "wrong_answer", f"final answer {final} does not match the label {label}")]
    return []


def check_format(ann: Trajectory, registry: ToolRegistry | None = None) -> list[Issue]:
    """Every reply parses (fast answer first, then think + one tool call or the answer, the answer
    last) and every tool call is valid against the tool's schema on this image."""
    registry = registry or ToolRegistry(ann.tools)
    issues: list[Issue] = []
    if not ann.turns or ann.turns[0].kind != "fast":
        return [Issue("format", "no_fast_answer", "the annotation does not start with a fast answer")]
    for i, step in enumerate(ann.turns):
        where = f"turn {i}"
        if step.kind == "fast":
            if i != 0:
                issues.append(Issue("format", "misplaced_fast_answer", f"{where}: a fast answer after the first turn"))
                continue
            try:
                protocol.parse_fast_answer(step.text)
            except ProtocolParseError as exc:
                issues.append(Issue("format", "malformed_fast_answer", f"{where}: {exc}"))
            continue
        try:
            turn = protocol.parse_reasoning_turn(step.text)
        except ProtocolParseError as exc:
            issues.append(Issue("format", "malformed_turn", f"{where}: {exc}"))
            continue
        last = i == len(ann.turns) - 1
        if turn.answer is not None and not last:
            issues.append(Issue("format", "answer_not_last", f"{where}: the conversation goes on after the answer"))
        if turn.tool_call is not None:
            try:
                registry.validate(turn.tool_call.name, turn.tool_call.arguments, ann.crop)
            except ToolCallError as exc:
                issues.append(Issue("format", "invalid_tool_call", f"{where}: {exc}"))
        if step.tool_error:
            issues.append(Issue("format", "invalid_tool_call", f"{where}: {step.tool_error}"))
    return issues


def _texts(ann: Trajectory) -> list[tuple[int, str]]:
    """The analysis texts of the annotation (fast reasons and thoughts; tool-call JSON excluded)."""
    out = []
    for i, step in enumerate(ann.turns):
        try:
            if step.kind == "fast":
                out.append((i, protocol.parse_fast_answer(step.text).reason))
            else:
                out.append((i, protocol.parse_reasoning_turn(step.text).think))
        except ProtocolParseError:
            out.append((i, step.text))  # malformed: judge the whole text
    return out


def check_leakage(ann: Trajectory) -> list[Issue]:
    """The analysis mentions neither the hint nor the expert's confidence (§3.1.3, format verification).

    Flags: words that refer to a hint or label, the hint sentence itself, any mention of an expert,
    percentages and probabilities, and the exact values the expert guidance gave (87, 0.87).
    """
    hint_text = Hint.of(ann).text.lower().removeprefix("hint:").strip().rstrip(".")
    values = set()
    for t in ann.tool_turns:
        p = t.tool_result.expert_p_spoof
        if p is not None:
            values |= {str(round(100 * p)), f"{p:.2f}", f"{p:.2f}".lstrip("0")}
    issues: list[Issue] = []
    for i, text in _texts(ann):
        for pat in HINT_PATTERNS:
            if m := pat.search(text):
                issues.append(Issue("leakage", "mentions_hint", f"turn {i}: refers to the hint ({m.group(0)!r})"))
                break
        if hint_text and hint_text in text.lower():
            issues.append(Issue("leakage", "mentions_hint", f"turn {i}: repeats the hint ({hint_text!r})"))
        for pat in EXPERT_PATTERNS:
            if m := pat.search(text):
                issues.append(
                    Issue("leakage", "mentions_expert", f"turn {i}: refers to the expert's confidence ({m.group(0)!r})")
                )
                break
        numbers = set(re.findall(r"(?<![\w.])\d*\.?\d+(?![\w.])", text))
        hit = sorted(numbers & values)
        if hit:
            issues.append(Issue("leakage", "expert_value", f"turn {i}: repeats the expert's value {hit[0]}"))
    return issues


def verify(ann: Trajectory, registry: ToolRegistry | None = None) -> list[Issue]:
    """All automatic rules; an empty list means the annotation is accepted."""
    return check_format(ann, registry) + check_correctness(ann) + check_leakage(ann)


def review_flags(ann: Trajectory, threshold: float = 0.5) -> list[str]:
    """Why an accepted annotation deserves a human look (borderline cases for manual verification):
    re-annotated, a fast answer that disagrees with the label, no tool used, or tool experts that mostly
    read the opposite of the label (the analysis may argue against its own evidence)."""
    label = Hint.of(ann).label
    flags = []
    if attempt_of(ann) > 1:
        flags.append("re-annotated")
    if ann.fast_answer is not None and ann.fast_answer.verdict != label:
        flags.append("fast_answer_disagrees")
    if not ann.tool_turns:
        flags.append("no_tool_used")
    if len(ann.tool_turns) > 3:
        flags.append("long_investigation")  # more tool calls than inference allows: the annotator searched
    ps = [t.tool_result.expert_p_spoof for t in ann.tool_turns if t.tool_result.expert_p_spoof is not None]
    if ps:
        against = sum((p >= threshold) != (label == "spoof") for p in ps)
        if against * 2 > len(ps):
            flags.append("experts_disagree")
    return flags

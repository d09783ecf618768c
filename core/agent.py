"""The agent loop of TAR-FAS inference (paper Fig. 4a): a fast intuitive answer, then up to
``max_tool_calls`` investigation turns that call visual tools and look at their images, then the
final answer.

``investigate`` is a generator of :mod:`core.events`, so a UI can stream every step and storage can
commit every turn as soon as it exists. Nothing the policy does can crash the loop: malformed text and
invalid tool calls are recorded and fed back (bounded by ``max_format_errors``); an exception inside
the policy ends the investigation as ``failed`` with the turns produced so far kept.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from . import protocol
from .errors import ProtocolParseError, ToolCallError
from .events import (
    Event,
    InvestigationFinished,
    InvestigationStarted,
    ToolCalled,
    ToolResultReady,
    TurnCompleted,
    TurnStarted,
    VerdictReached,
)
from .faces import FaceCrop
from .policies.base import Conversation, Policy
from .registry import ToolRegistry
from .trajectory import FaceInfo, Final, ToolResult, Trajectory, Turn, to_messages


@dataclass
class AgentConfig:
    max_tool_calls: int = 3  # paper's best setting (Fig. S11)
    max_format_errors: int = 2  # malformed turns / invalid calls tolerated before giving up
    allowed_tools: list[str] | None = None  # None = all six; a subset for the Table 2 ablation
    extra: dict = field(default_factory=dict)  # recorded with the trajectory (e.g. on_no_face)

    def __post_init__(self):
        if self.max_tool_calls < 0:
            raise ValueError("max_tool_calls must be >= 0")
        if self.max_format_errors < 0:
            raise ValueError("max_format_errors must be >= 0")


def investigate(
    face: FaceCrop,
    policy: Policy,
    config: AgentConfig | None = None,
    *,
    experts=None,
    source: str | None = None,
    image_sha256: str | None = None,
    label: str | None = None,
) -> Iterator[Event]:
    """Run one investigation, yielding events. The last event is always InvestigationFinished.

    ``experts``: an :class:`core.experts.ExpertBank`; when given, every tool result carries its
    expert's P(spoof trace) (shown to the analyst, used by the expert policy and the annotator).
    """
    config = config or AgentConfig()
    registry = ToolRegistry(config.allowed_tools)
    system = protocol.system_prompt(registry.schemas())
    traj = Trajectory(
        policy=policy.name,
        policy_version=getattr(policy, "version", ""),
        params={k: v for k, v in asdict(config).items() if k != "extra"} | config.extra,
        source=source,
        image_sha256=image_sha256,
        face=FaceInfo(face.face_detected, list(face.bbox) if face.bbox else None, list(face.crop_box), list(face.source_size), list(face.notes)),
        crop=face.crop,
        tools=registry.names,
        label=label,
    )
    t_start = time.perf_counter()
    yield InvestigationStarted(traj)
    try:
        yield from _loop(traj, face, policy, registry, system, config, experts)
        traj.status = "completed"
    except Exception as exc:  # the policy (model, server, weights) failed: keep what we have
        traj.status = "failed"
        traj.error = f"{type(exc).__name__}: {exc}"
        traj.error_traceback = traceback.format_exc(limit=3)
    traj.timings_ms["total"] = (time.perf_counter() - t_start) * 1e3
    yield InvestigationFinished(traj)


def run(face: FaceCrop, policy: Policy, config: AgentConfig | None = None, **kwargs) -> Trajectory:
    """Run an investigation to the end and return its trajectory."""
    for event in investigate(face, policy, config, **kwargs):
        if isinstance(event, InvestigationFinished):
            return event.trajectory
    raise AssertionError("investigate() ended without InvestigationFinished")


def _ask(traj: Trajectory, face: FaceCrop, policy: Policy, registry: ToolRegistry, system: str, calls_left: int, kind: str):
    messages = to_messages(traj, system=system, next_prompt=True, next_kind=kind)
    conv = Conversation(face.crop, traj, messages, registry, calls_left)
    t0 = time.perf_counter()
    out = policy.next_turn(conv)
    return out, (time.perf_counter() - t0) * 1e3


def _loop(traj, face, policy, registry, system, config, experts) -> Iterator[Event]:
    # Turn 1: the fast answer, no tools.
    errors = 0
    while True:
        index = len(traj.turns)
        yield TurnStarted(index, "fast")
        out, ms = _ask(traj, face, policy, registry, system, config.max_tool_calls, "fast")
        turn = Turn(index, "fast", out.text, score_spoof=out.score_spoof, elapsed_ms=ms, notes=out.notes)
        try:
            turn.fast = protocol.parse_fast_answer(out.text)
        except ProtocolParseError as exc:
            turn.parse_error = str(exc)
            errors += 1
        traj.turns.append(turn)
        traj.timings_ms["fast"] = traj.timings_ms.get("fast", 0.0) + ms
        yield TurnCompleted(turn)
        if turn.fast or errors > config.max_format_errors:
            break

    # Later turns: think, call tools, answer.
    tool_calls, errors = 0, 0
    max_turns = config.max_tool_calls + config.max_format_errors + 1
    for _ in range(max_turns):
        index = len(traj.turns)
        yield TurnStarted(index, "reasoning")
        out, ms = _ask(traj, face, policy, registry, system, config.max_tool_calls - tool_calls, "reasoning")
        turn = Turn(index, "reasoning", out.text, score_spoof=out.score_spoof, elapsed_ms=ms, notes=out.notes)
        traj.timings_ms["reasoning"] = traj.timings_ms.get("reasoning", 0.0) + ms
        try:
            parsed = protocol.parse_reasoning_turn(out.text)
        except ProtocolParseError as exc:
            turn.parse_error = str(exc)
            parsed = None
        if parsed is not None:
            turn.think, turn.tool_call, turn.answer = parsed.think, parsed.tool_call, parsed.answer
        if parsed is not None and parsed.tool_call is not None:
            if tool_calls >= config.max_tool_calls:
                turn.tool_error = protocol.TOOL_LIMIT_MESSAGE
            else:
                yield ToolCalled(index, parsed.tool_call)
                try:
                    ex = registry.execute(parsed.tool_call.name, parsed.tool_call.arguments, face.crop)
                except ToolCallError as exc:
                    turn.tool_error = str(exc)
                else:
                    tool_calls += 1
                    t0 = time.perf_counter()
                    p = experts.p_spoof(ex.name, ex.output.image) if experts is not None else None
                    expert_ms = (time.perf_counter() - t0) * 1e3
                    turn.tool_result = ToolResult(ex.name, ex.arguments, ex.output.stats, p, ex.elapsed_ms, ex.output.image)
                    traj.timings_ms["tools"] = traj.timings_ms.get("tools", 0.0) + ex.elapsed_ms
                    traj.timings_ms["experts"] = traj.timings_ms.get("experts", 0.0) + expert_ms
                    yield ToolResultReady(index, turn.tool_result)
        traj.turns.append(turn)
        yield TurnCompleted(turn)
        if turn.error:
            errors += 1
            if errors > config.max_format_errors:
                traj.error = f"stopped after {errors} malformed turns or invalid tool calls; last: {turn.error}"
                break
        if turn.answer is not None:
            score = out.score_spoof if out.score_spoof is not None else (1.0 if turn.answer == "spoof" else 0.0)
            traj.final = Final(turn.answer, float(score), "answer")
            break
    else:
        traj.error = f"no final answer within {max_turns} reasoning turns"

    if traj.final is None:
        # The reasoning never concluded: fall back to the fast answer, and say so.
        fast = traj.fast_answer
        if fast is None:
            raise ProtocolParseError(traj.error or "the policy produced neither a fast answer nor a final answer")
        score = traj.fast_score if traj.fast_score is not None else (1.0 if fast.verdict == "spoof" else 0.0)
        traj.final = Final(fast.verdict, float(score), "fast_answer_fallback")
    yield VerdictReached(traj.final)

"""The agent loop of TAR-FAS (paper Fig. 4a): a fast intuitive answer, then up to
``max_tool_calls`` investigation turns that call visual tools and look at their images, then the
final answer. It is the only place that runs a conversation: inference, evaluation, dataset building,
GRPO rollouts and annotation (paper eqs. 1-5, with :class:`core.protocol.AnnotationPrompts` and an
annotator as the policy) all go through it.

``investigate`` is a generator of :mod:`core.events`, so a UI can stream every step and storage can
commit every turn as soon as it exists. Nothing the policy does can crash the loop: malformed text and
invalid tool calls are recorded and, with the inference prompts, fed back (bounded by
``max_format_errors``); an exception inside the policy ends the investigation as ``failed`` with the
turns produced so far kept. Tools, and the expert readings of their images, come from the
:class:`~core.registry.ToolRegistry`; what the loop says around the policy's turns comes from its
:class:`~core.protocol.Prompts`.
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
    registry: ToolRegistry | None = None,
    prompts: protocol.Prompts | None = None,
    source: str | None = None,
    image_sha256: str | None = None,
    label: str | None = None,
    meta: dict | None = None,
    trajectory_id: str | None = None,
) -> Iterator[Event]:
    """Run one investigation, yielding events. The last event is always InvestigationFinished.

    ``registry``: the tools (default: all, without readers), restricted to ``config.allowed_tools``; a
    registry with readers (an expert bank) gives every tool result its expert's P(spoof trace) (shown
    to the analyst, used by the expert policy and the annotator). ``prompts``: the loop's side of the
    conversation (default: inference). ``meta`` starts the trajectory's ``meta`` (annotation: the hint).
    ``trajectory_id``: the id of the trajectory (default: a new one), e.g. a run already queued in storage.
    """
    config = config or AgentConfig()
    prompts = prompts or protocol.Prompts()
    registry = (registry or ToolRegistry()).only(config.allowed_tools)
    system = prompts.system(registry.schemas())
    traj = Trajectory(
        policy=policy.name,
        policy_version=getattr(policy, "version", ""),
        params={k: v for k, v in asdict(config).items() if k != "extra"} | config.extra,
        source=source,
        image_sha256=image_sha256,
        face=FaceInfo(
            face.face_detected,
            list(face.bbox) if face.bbox else None,
            list(face.crop_box),
            list(face.source_size),
            list(face.notes),
        ),
        crop=face.crop,
        tools=registry.names,
        label=label,
        meta=dict(meta or {}),
        **({"id": trajectory_id} if trajectory_id else {}),
    )
    profile = getattr(policy, "calibration", None)
    if profile is not None:  # the deployment's calibration profile that the verdict's score and threshold come from
        traj.meta["calibration_profile"] = profile.summary()
    t_start = time.perf_counter()
    yield InvestigationStarted(traj)
    try:
        yield from _loop(traj, face, policy, registry, system, config, prompts)
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


def _ask(
    traj: Trajectory,
    face: FaceCrop,
    policy: Policy,
    registry: ToolRegistry,
    system: str,
    prompts: protocol.Prompts,
    kind: str,
    calls_left: int,
    turns_left: int,
):
    messages = to_messages(traj, system=system, next_prompt=True, next_kind=kind, prompts=prompts)
    conv = Conversation(face.crop, traj, messages, registry, calls_left, kind, turns_left)
    t0 = time.perf_counter()
    out = policy.next_turn(conv)
    return out, (time.perf_counter() - t0) * 1e3


def _loop(traj, face, policy, registry, system, config, prompts) -> Iterator[Event]:
    max_turns = prompts.max_reasoning_turns(config.max_tool_calls, config.max_format_errors)
    # Turn 1: the fast answer, no tools.
    errors = 0
    while True:
        index = len(traj.turns)
        yield TurnStarted(index, "fast")
        out, ms = _ask(traj, face, policy, registry, system, prompts, "fast", config.max_tool_calls, max_turns)
        turn = Turn(index, "fast", out.text, score_spoof=out.score_spoof, elapsed_ms=ms, notes=out.notes)
        try:
            turn.fast = protocol.parse_fast_answer(out.text)
        except ProtocolParseError as exc:
            turn.parse_error = str(exc)
            errors += 1
        traj.turns.append(turn)
        traj.timings_ms["fast"] = traj.timings_ms.get("fast", 0.0) + ms
        yield TurnCompleted(turn)
        if turn.fast or errors > config.max_format_errors or not prompts.feeds_back_errors:
            break

    if turn.fast is None and not prompts.feeds_back_errors:
        traj.error = f"stopped at a malformed fast answer: {turn.parse_error}"  # no feedback: the conversation ends
    else:
        yield from _reasoning(traj, face, policy, registry, system, config, prompts, max_turns)

    if traj.final is None and prompts.falls_back_to_fast:
        # The reasoning never concluded: fall back to the fast answer, and say so.
        fast = traj.fast_answer
        if fast is None:
            raise ProtocolParseError(traj.error or "the policy produced neither a fast answer nor a final answer")
        score = traj.fast_score if traj.fast_score is not None else (1.0 if fast.verdict == "spoof" else 0.0)
        traj.final = Final(fast.verdict, float(score), "fast_answer_fallback")
    if traj.final is not None:
        yield VerdictReached(traj.final)


def _reasoning(traj, face, policy, registry, system, config, prompts, max_turns) -> Iterator[Event]:
    """Later turns: think, call tools, answer."""
    tool_calls, errors = 0, 0
    for i in range(max_turns):
        index = len(traj.turns)
        yield TurnStarted(index, "reasoning")
        out, ms = _ask(
            traj,
            face,
            policy,
            registry,
            system,
            prompts,
            "reasoning",
            config.max_tool_calls - tool_calls,
            max_turns - i,
        )
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
                    turn.tool_result = ToolResult(
                        ex.name, ex.arguments, ex.output.stats, ex.expert_p_spoof, ex.elapsed_ms, ex.output.image
                    )
                    traj.timings_ms["tools"] = traj.timings_ms.get("tools", 0.0) + ex.elapsed_ms
                    traj.timings_ms["experts"] = traj.timings_ms.get("experts", 0.0) + ex.reading_ms
                    guidance = prompts.guidance(ex.name, ex.expert_p_spoof)
                    if guidance is not None:
                        traj.meta.setdefault("guidance", {})[str(index)] = guidance
                    yield ToolResultReady(index, turn.tool_result)
        traj.turns.append(turn)
        yield TurnCompleted(turn)
        if turn.error:
            errors += 1
            if errors > config.max_format_errors or not prompts.feeds_back_errors:
                traj.error = f"stopped after {errors} malformed turns or invalid tool calls; last: {turn.error}"
                break
        if turn.answer is not None:
            score = out.score_spoof if out.score_spoof is not None else (1.0 if turn.answer == "spoof" else 0.0)
            traj.final = Final(turn.answer, float(score), "answer")
            break
    else:
        traj.error = f"no final answer within {max_turns} reasoning turns"

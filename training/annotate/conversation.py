"""One annotation conversation (paper §3.1.2, eqs. 1-5), run by the agent loop: the annotator is the
policy, :class:`core.protocol.AnnotationPrompts` say what the loop says around its turns (the Fig. S8
system prompt, the face with the query and the hint, each tool image with the expert guidance; the first
malformed reply ends the attempt), and the registry's readers give the expert guidance its numbers.

:func:`annotate_image` returns the conversation as a :class:`core.trajectory.Trajectory` (``meta``:
hint, attempt, guidance); :func:`training_view` turns an accepted one into the inference-format
trajectory that is trained on.
"""

from __future__ import annotations

import numpy as np

from core import agent, protocol
from core.faces import FaceCrop, crop_face
from core.policies.base import Policy
from core.protocol import AnnotationPrompts, ToolCall
from core.registry import ToolRegistry
from core.trajectory import Final, ToolResult, Trajectory, Turn, to_messages

from ..annotators import Hint, final_answer

L_MAX = 6  # paper §3.1.2: reasoning turns per annotation


def default_tool_limit(max_turns: int = L_MAX) -> int:
    """Tool calls an annotation may make by default: as many as the inference loop allows
    (core.agent.AgentConfig.max_tool_calls, 3), and at most ``max_turns - 1`` (the last turn must answer).
    Annotations that need more tool calls than the policy will ever get teach it nothing it can use."""
    return min(agent.AgentConfig().max_tool_calls, max_turns - 1)


def annotate_image(
    image: np.ndarray | FaceCrop,
    hint: Hint,
    annotator: Policy,
    *,
    registry: ToolRegistry | None = None,
    tools: list[str] | None = None,
    max_turns: int = L_MAX,
    max_tool_calls: int | None = None,
    attempt: int = 1,
    source: str | None = None,
    image_sha256: str | None = None,
) -> Trajectory:
    """Run one annotation conversation on a face (or a bare 224x224 crop) and return it, unverified.

    The conversation stops at the answer, at the first reply that breaks the protocol or calls a tool
    wrongly (verification rejects it; no error feedback, so the kept conversation is clean), after
    ``max_turns`` reasoning turns, or when the annotator fails (status "failed", see
    :func:`training.annotators.stop_reason`). ``registry``: the tools and the readers of their images
    (default: all tools, no expert guidance), restricted to ``tools``; ``max_tool_calls`` defaults to
    :func:`default_tool_limit` (the inference loop's limit, at most ``max_turns - 1``).
    """
    face = image if isinstance(image, FaceCrop) else crop_face(image)
    config = agent.AgentConfig(
        max_tool_calls=default_tool_limit(max_turns) if max_tool_calls is None else max_tool_calls,
        max_format_errors=0,
        allowed_tools=tools,
    )
    return agent.run(
        face,
        annotator,
        config,
        registry=registry,
        prompts=AnnotationPrompts(max_turns),
        label=hint.label,
        source=source,
        image_sha256=image_sha256,
        meta={"hint": hint.as_meta(), "attempt": attempt},
    )


def training_view(ann: Trajectory, params: dict) -> Trajectory:
    """The accepted annotation as the inference-format trajectory the agent would have produced: fast
    answer, think/tool_call turns with the tool results, answer. Texts are re-rendered canonically
    (normalised tool arguments); the hint, the guidance, scores, notes and timings are not part of it."""
    view = Trajectory(
        policy=f"annotation:{ann.policy}",
        policy_version=ann.policy_version,
        params=dict(params),
        id=ann.id,
        source=ann.source,
        image_sha256=ann.image_sha256,
        face=ann.face,
        crop=ann.crop,
        tools=list(ann.tools),
        label=ann.label,
    )
    for t in ann.turns:
        if t.kind == "fast":
            view.turns.append(
                Turn(
                    t.index,
                    "fast",
                    protocol.format_fast_answer(t.fast.verdict, t.fast.reason),
                    fast=t.fast,
                    elapsed_ms=t.elapsed_ms,
                )
            )
        elif t.tool_result is not None:
            r = t.tool_result
            call = ToolCall(r.name, r.arguments)
            turn = Turn(
                t.index,
                "reasoning",
                protocol.format_tool_call_turn(t.think, call),
                think=t.think,
                tool_call=call,
                elapsed_ms=t.elapsed_ms,
            )
            turn.tool_result = ToolResult(r.name, r.arguments, r.stats, r.expert_p_spoof, r.elapsed_ms, r.image)
            view.turns.append(turn)
        else:
            view.turns.append(
                Turn(
                    t.index,
                    "reasoning",
                    protocol.format_answer_turn(t.think, t.answer),
                    think=t.think,
                    answer=t.answer,
                    elapsed_ms=t.elapsed_ms,
                )
            )
    answer = final_answer(ann)
    view.final = Final(answer, 1.0 if answer == "spoof" else 0.0, "answer")
    view.status = "completed"
    return view


def annotator_messages(ann: Trajectory) -> list[dict]:
    """The annotator's own conversation (what it was told, hint and guidance included), in the
    content-part layout of :func:`core.trajectory.to_messages` with the images as arrays."""
    prompts = AnnotationPrompts()
    return to_messages(ann, system=prompts.system(ToolRegistry(ann.tools).schemas()), prompts=prompts)

"""Events the agent loop yields while it investigates, so a UI can stream each step as it happens
and storage can commit each turn as soon as it exists. Renderers read these; none parses model text."""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import ToolCall
from .trajectory import Final, ToolResult, Trajectory, Turn


@dataclass
class InvestigationStarted:
    trajectory: Trajectory  # holds the face crop, face info, policy and parameters


@dataclass
class TurnStarted:
    index: int
    kind: str  # "fast" | "reasoning"


@dataclass
class ToolCalled:
    """A well-formed tool call is about to run (shown before its image is ready)."""

    index: int
    call: ToolCall


@dataclass
class ToolResultReady:
    index: int
    result: ToolResult


@dataclass
class TurnCompleted:
    """The assistant turn is final: text, parsed fields, tool result or error. Persist it now."""

    turn: Turn


@dataclass
class VerdictReached:
    final: Final


@dataclass
class InvestigationFinished:
    trajectory: Trajectory  # status "completed" or "failed" (with .error); partial turns kept


Event = (
    InvestigationStarted
    | TurnStarted
    | ToolCalled
    | ToolResultReady
    | TurnCompleted
    | VerdictReached
    | InvestigationFinished
)

"""The policy interface: given the conversation so far, produce the next assistant turn."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..registry import ToolRegistry
from ..trajectory import Trajectory


@dataclass
class Conversation:
    """What a policy sees. Language-model policies read ``messages`` (chat format, images inline);
    the expert ensemble reads the structured ``trajectory`` (same content, no text parsing needed)."""

    crop: np.ndarray  # the 224x224 RGB face crop
    trajectory: Trajectory  # turns so far, with tool results and their images
    messages: list[dict]  # system + turns + the user prompt to answer now
    registry: ToolRegistry  # tools offered in this investigation
    tool_calls_left: int
    kind: str = "reasoning"  # the turn asked for: "fast" (turn 1, no tools) or "reasoning"
    turns_left: int | None = None  # reasoning turns left, this one included (annotation: L <= L_max)


@dataclass
class PolicyOutput:
    text: str  # the assistant turn, in the protocol's format (or not: the loop checks)
    score_spoof: float | None = None  # P(spoof) at the class token, when the policy has one
    notes: dict[str, Any] = field(default_factory=dict)  # evidence for the UI; never parsed


@runtime_checkable
class Policy(Protocol):
    name: str  # short id: "expert", "hf", "vllm", "scripted"
    version: str  # weights hash or model revision, recorded with every trajectory
    description: str  # what it really is, shown to the analyst

    def next_turn(self, conversation: Conversation) -> PolicyOutput: ...

"""A policy that replays given assistant texts: for tests, demos and replaying recorded trajectories."""

from __future__ import annotations

from collections.abc import Iterable

from .base import Conversation, PolicyOutput


class ScriptedPolicy:
    name = "scripted"
    version = "1"
    description = "Scripted replies (testing / replay): no model is involved."

    def __init__(self, replies: Iterable[str | PolicyOutput]):
        self._replies = [r if isinstance(r, PolicyOutput) else PolicyOutput(r) for r in replies]
        self.calls = 0

    def next_turn(self, conversation: Conversation) -> PolicyOutput:
        if self.calls >= len(self._replies):
            raise RuntimeError(f"scripted policy ran out of replies after {self.calls} turns")
        self.calls += 1
        return self._replies[self.calls - 1]

"""Policies that drive an investigation. ``load_policy`` picks one by name."""

from .base import Conversation, Policy, PolicyOutput
from .scripted import ScriptedPolicy

POLICY_NAMES = ["expert"]


def load_policy(name: str = "expert", **kwargs) -> Policy:
    """Build a policy by name. ``expert`` is the offline default (no language model, no download)."""
    if name == "expert":
        from .expert import ExpertPolicy

        return ExpertPolicy.load(**kwargs)
    raise ValueError(f"unknown policy {name!r}; available: {', '.join(POLICY_NAMES)}")


__all__ = ["Conversation", "Policy", "PolicyOutput", "ScriptedPolicy", "load_policy", "POLICY_NAMES"]

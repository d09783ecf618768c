"""Policies that drive an investigation. ``load_policy`` picks one by name."""

from .base import Conversation, Policy, PolicyOutput
from .scripted import ScriptedPolicy

POLICY_NAMES = ["expert", "hf", "vllm"]


def load_policy(name: str = "expert", **kwargs) -> Policy:
    """Build a policy by name. ``expert`` is the offline default (no language model, no download)."""
    if name == "expert":
        from .expert import ExpertPolicy

        return ExpertPolicy.load(**kwargs)
    if name == "hf":  # HFPolicy.load(model=DIR, adapter=None, device=None, dtype=None, max_new_tokens=512, ...)
        from .hf import HFPolicy

        return HFPolicy.load(**kwargs)
    if name == "vllm":  # OpenAIChatPolicy(base_url=URL, model=NAME, api_key_env=None, max_new_tokens=512, ...)
        from .openai_chat import OpenAIChatPolicy

        return OpenAIChatPolicy(**kwargs)
    raise ValueError(f"unknown policy {name!r}; available: {', '.join(POLICY_NAMES)}")


__all__ = ["Conversation", "Policy", "PolicyOutput", "ScriptedPolicy", "load_policy", "POLICY_NAMES"]

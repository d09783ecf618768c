"""Policies that drive an investigation. ``load_policy`` picks one by name; ``resolve`` also gives the
tool registry it investigates with (tools + the expert bank that reads their images)."""

from __future__ import annotations

import threading
from pathlib import Path

from ..registry import ToolRegistry
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


def resolve(
    name: str = "expert", *, weights: str | Path | None = None, calibration=None, **options
) -> tuple[Policy, ToolRegistry]:
    """``(policy, registry)`` for the CLI, the app and training: the policy built by :func:`load_policy`
    (``weights`` is the expert policy's weights folder) and the registry whose readers are
    :func:`readers_for` it (``weights`` names the bank for the other policies too). ``calibration``: a
    deployment's :class:`~core.calibration.CalibrationProfile` (or its JSON file) to decide with; one
    fitted for another policy or version is refused (ProfileError)."""
    policy = load_policy(name, weights=weights, **options) if name == "expert" else load_policy(name, **options)
    registry = ToolRegistry(readers=readers_for(policy, weights))
    if calibration is not None:
        from ..calibration import CalibrationProfile
        from .calibrated import calibrate

        profile = calibration if isinstance(calibration, CalibrationProfile) else CalibrationProfile.load(calibration)
        policy = calibrate(policy, profile, registry.readers)
    return policy, registry


def readers_for(policy, weights: str | Path | None = None, *, required: bool = False):
    """The expert bank that reads tool images for ``policy``: the expert policy's own bank, else the one
    at ``weights`` (default: the shipped one) if it loads, else None (tool results then carry no expert
    reading). ``required``: a bank that does not load is an error (WeightsError), e.g. for annotation,
    whose guidance is the experts' reading."""
    bank = getattr(policy, "bank", None)
    return bank if bank is not None else _bank(weights, required)


_banks: dict[str, object] = {}
_banks_lock = threading.Lock()


def _bank(weights: str | Path | None, required: bool):
    """Loaded once per folder and process (a server resolves a registry for every job)."""
    from ..errors import WeightsError
    from ..experts import DEFAULT_DIR, ExpertBank

    key = str(Path(weights or DEFAULT_DIR).resolve())
    with _banks_lock:
        if key not in _banks or (_banks[key] is None and required):
            try:
                _banks[key] = ExpertBank.load(weights)
            except WeightsError:
                if required:
                    raise
                _banks[key] = None  # remembered too: no weights installed stays no weights
        return _banks[key]


__all__ = [
    "Conversation",
    "Policy",
    "PolicyOutput",
    "ScriptedPolicy",
    "load_policy",
    "resolve",
    "readers_for",
    "POLICY_NAMES",
]

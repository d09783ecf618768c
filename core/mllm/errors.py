"""Typed errors of the MLLM policies. Raised inside ``next_turn``, they end an investigation as
``failed`` with every turn so far kept (core.agent) and the message recorded in the trajectory."""

from ..errors import TarfasError


class ContextOverflowError(TarfasError):
    """The conversation plus the turn's token budget exceeds the model's context window."""


class ModelServerError(TarfasError):
    """The OpenAI-compatible server could not be reached or refused the request."""

"""Errors the workbench shows the analyst: expected ones (bad input, nothing selected) are one log line.

Gradio prints the traceback of every ``gr.Error`` a handler raises; for a refusal that is noise in the
server log, and it hides the unexpected failures (which still print theirs).
"""

from __future__ import annotations

import logging

import gradio as gr

log = logging.getLogger("tarfas.ui")


class UserError(gr.Error):
    """An expected refusal: shown to the analyst in the browser, logged as one line without a traceback."""

    def __init__(self, message: str, **kwargs):
        kwargs.setdefault("print_exception", False)
        super().__init__(message, **kwargs)
        log.warning("refused: %s", message)

"""Untrusted text (model replies, file names, analyst notes, profile names) made inert for display.

Gradio renders Chatbot messages and ``gr.Markdown`` as Markdown, then as HTML (sanitized, but DOMPurify
keeps ``<img src=...>``): a model reply holding ``<img src=http://...>`` or ``![](http://...)`` would make
the analyst's browser fetch a URL. Every untrusted string goes through :func:`md_text` (for Markdown) or
:func:`html_text` (for HTML the workbench builds itself) before it is shown; nothing here parses it.
"""

from __future__ import annotations

import html
import re

# Markdown punctuation that can open a link, an image, emphasis, code, a heading, a table or an autolink
# scheme ("javascript:", "http:"); "<", ">" and "&" become HTML entities first, so no tag survives.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]()!#|~:{}])")


def md_text(text: object) -> str:
    """``text`` to put inside Markdown so that it shows as the same characters and renders as nothing else."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape("" if text is None else str(text), quote=False))


def html_text(text: object) -> str:
    """``text`` to put inside HTML (element content or a quoted attribute) as plain characters."""
    return html.escape("" if text is None else str(text), quote=True)

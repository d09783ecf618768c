"""Helpers for the tests that launch the workbench for real: a free port on 127.0.0.1, a server that
is always shut down, and checks on what it serves."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from loopback import free_port

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SAMPLES = Path(__file__).resolve().parents[1] / "assets" / "samples"
TOOLS = ["ZoomInTool", "FFTTool", "LBPTool", "WaveletTransformTool", "EdgeDetectionTool", "HOGTool"]
USERS = [("ana", "pw-ana-1"), ("rita", "pw-rita-2")]


@contextlib.contextmanager
def launched(data_dir, *, users=USERS, **kwargs):
    """A workbench served on 127.0.0.1 (closed on exit, also when the test fails)."""
    import torch

    from app.server import serve
    from app.ui.auth import Users

    torch.set_num_threads(1)
    wb = serve(data_dir, host="127.0.0.1", port=free_port(), users=Users(list(users)), block=False, **kwargs)
    try:
        yield wb
    finally:
        wb.close()


def is_png(path) -> bool:
    return Path(path).read_bytes()[:8] == PNG_MAGIC


def chat_files(chat: list[dict]) -> list[str]:
    """The file paths in a Chatbot value as gradio_client returns it."""
    return [
        part["file"] for m in chat for part in m["content"] if isinstance(part, dict) and part.get("type") == "file"
    ]


def chat_titles(chat: list[dict]) -> list[str]:
    return [(m.get("metadata") or {}).get("title") or "" for m in chat]


def chat_text(chat: list[dict]) -> str:
    return "\n".join(part.get("text", "") for m in chat for part in m["content"] if isinstance(part, dict))

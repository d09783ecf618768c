"""Helpers shared by the storage tests (and the crash worker): a data directory on a real SQLite file,
the astronaut photo as uploaded bytes, and scripted assistant replies."""

from __future__ import annotations

import io

import numpy as np
import skimage.data
from PIL import Image

from core import protocol
from core.protocol import ToolCall

FAST_SPOOF = protocol.format_fast_answer("spoof", "Looks flat, maybe a print.")
ZOOM = protocol.format_tool_call_turn("Zoom on the eyes.", ToolCall("ZoomInTool", {"bbox": [40, 60, 180, 130]}))
FFT = protocol.format_tool_call_turn("Look for moire peaks.", ToolCall("FFTTool", {}))
ANSWER_SPOOF = protocol.format_answer_turn("Clear periodic peaks.", "spoof")
ANSWER_REAL = protocol.format_answer_turn("No spoof traces in any tool.", "real")
MALFORMED = "I think it is real."


def astronaut_png() -> bytes:
    """The bytes an analyst would upload: the astronaut photograph as a PNG file."""
    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, format="PNG")
    return buf.getvalue()


def noise_image(seed: int = 0, shape=(32, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)

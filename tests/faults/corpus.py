"""The bad-input corpus: files an analyst (or an attacker) may upload instead of a face photo, each with
what the workbench must do with it: refuse it with a reason (``refuse``: the words the message must hold)
or investigate it (``valid``)."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image


@dataclass(frozen=True)
class Item:
    name: str
    expect: str  # "refuse" or "valid"
    words: str = ""  # what a refusal's message must say
    on_no_face: str = "error"


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels: its header, and a few bytes of image data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def build(folder: Path) -> list[Item]:
    """Write the corpus into ``folder``; returns what is expected of each file."""
    rgb = skimage.data.astronaut()
    face = Image.fromarray(rgb)
    png, jpg = _save(face, "PNG"), _save(face, "JPEG", quality=90)
    gray16 = (skimage.color.rgb2gray(rgb) * 65535).astype(np.uint16)
    frames = [face, Image.fromarray(np.ascontiguousarray(rgb[:, ::-1])), Image.fromarray(255 - rgb)]
    gif_frames = [f.quantize(method=Image.Quantize.FASTOCTREE) for f in frames]
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("face.png", png)
    files = {
        "empty.png": (b"", Item("empty.png", "refuse", "is empty")),
        "truncated.jpg": (jpg[: len(jpg) // 2], Item("truncated.jpg", "refuse", "corrupt or truncated")),
        "truncated.png": (png[: len(png) // 2], Item("truncated.png", "refuse", "corrupt or truncated")),
        # 64 MP of zeros in a few dozen KiB: refused from its header, before anything is decoded.
        "bomb.png": (_save(Image.new("1", (8000, 8000)), "PNG"), Item("bomb.png", "refuse", "the limit is")),
        "huge-header.png": (_png_header_only(65535, 65535), Item("huge-header.png", "refuse", "the limit is")),
        "sliver.png": (
            _save(Image.new("RGB", (40000, 1), (200, 150, 120)), "PNG"),
            Item("sliver.png", "refuse", "face"),
        ),
        "sliver-whole.png": (
            _save(Image.new("RGB", (1, 40000), (200, 150, 120)), "PNG"),
            Item("sliver-whole.png", "valid", on_no_face="whole"),
        ),
        "gray16.png": (_save(Image.fromarray(gray16), "PNG"), Item("gray16.png", "valid")),
        "cmyk.jpg": (_save(face.convert("CMYK"), "JPEG"), Item("cmyk.jpg", "valid")),
        "animated.gif": (
            _save(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:]),
            Item("animated.gif", "valid"),
        ),
        "animated.webp": (
            _save(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
            Item("animated.webp", "valid"),
        ),
        "face.svg": (
            b'<svg xmlns="http://www.w3.org/2000/svg" width="512" height="512"><circle cx="256" cy="256" r="200"/></svg>',
            Item("face.svg", "refuse", "not an image"),
        ),
        "face.zip": (zipped.getvalue(), Item("face.zip", "refuse", "not an image")),
        "text-named.png": (b"this is not a picture\n" * 10, Item("text-named.png", "refuse", "not an image")),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return [item for _, item in files.values()]

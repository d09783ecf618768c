"""Face preprocessing: load any image safely, find the face, crop it to the 224x224 input of the protocol.

The paper's models see "aligned face crops resized to 224x224". We detect with OpenCV's Haar cascade
(ships with opencv 4.x, no download), expand the box by a margin so that print edges and screen bezels
around the face stay visible, and resize.
"""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from .errors import ImageTooLargeError, InvalidImageError, NoFaceError

CROP_SIZE = 224
DEFAULT_MAX_PIXELS = 50_000_000  # ~ 8660 x 5770; well above any camera frame, far below a bomb
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DETECT_SIDE = 240  # detection runs on a downscaled copy: the face need not be large to be found
FACE_MARGIN = 0.25  # fraction of the detected box added on each side


@dataclass
class FaceCrop:
    """The 224x224 RGB face crop the agent investigates, and where it came from."""

    crop: np.ndarray  # (224, 224, 3) uint8 RGB
    bbox: tuple[int, int, int, int] | None  # detected face box (x1, y1, x2, y2) in source pixels
    crop_box: tuple[int, int, int, int]  # the square region of the source that was resized
    source_size: tuple[int, int]  # (width, height) of the loaded image
    face_detected: bool
    notes: list[str] = field(default_factory=list)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_image(
    source: str | Path | bytes,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> np.ndarray:
    """Load an image file (or its bytes) as an RGB uint8 array.

    Applies the EXIF orientation, converts grayscale, palette, alpha (composited on white), CMYK and
    16-bit images to 8-bit RGB, and refuses images over ``max_pixels`` before decoding them.

    Raises
    ------
    InvalidImageError
        Not an image, or a corrupt / truncated file.
    ImageTooLargeError
        More than ``max_pixels`` pixels or ``max_bytes`` bytes.
    """
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), name or "the uploaded data"
    else:
        path = Path(source)
        name = str(path)
        try:
            size = path.stat().st_size
            if size > max_bytes:
                raise ImageTooLargeError(f"{name} is {size / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB")
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidImageError(f"cannot read {name}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{name} is {len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB")
    if not data:
        raise InvalidImageError(f"{name} is empty")
    try:
        with warnings.catch_warnings():
            # PIL's own bomb check warns/raises at its global limit; ours is explicit and per call.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                im = Image.open(io.BytesIO(data))
                w, h = im.size  # header only, nothing decoded yet
                if w * h > max_pixels:
                    raise ImageTooLargeError(
                        f"{name} is {w}x{h} = {w * h / 1e6:.1f} MP; the limit is {max_pixels / 1e6:.0f} MP"
                    )
                im.load()
            finally:
                Image.MAX_IMAGE_PIXELS = saved_limit
            im = ImageOps.exif_transpose(im)
    except ImageTooLargeError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise InvalidImageError(f"{name} is not an image (no known image format)") from exc
    except Exception as exc:  # PIL raises several unrelated types for corrupt files
        raise InvalidImageError(f"{name} is corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    return _to_rgb8(im)


def _to_rgb8(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        gray = arr.round().astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


# One cascade per thread: a CascadeClassifier shared by threads returns different boxes for the same
# image when detections overlap (seen with 3 threads: 5 of 8 crops differed from a sequential run).
_CASCADES = threading.local()


def _cascade() -> cv2.CascadeClassifier:
    cascade = getattr(_CASCADES, "cascade", None)
    if cascade is None:
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_alt2.xml"
        cascade = cv2.CascadeClassifier(str(path))
        if cascade.empty():
            raise RuntimeError(f"OpenCV Haar cascade missing at {path}; install opencv-python-headless 4.x")
        _CASCADES.cascade = cascade
    return cascade


def detect_faces(rgb: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Detect frontal faces; return boxes (x1, y1, x2, y2) in source pixels, largest first.

    Viola & Jones, "Rapid object detection using a boosted cascade of simple features", CVPR 2001.
    The image is downscaled to ``DETECT_SIDE`` and padded so that tight face crops, where the face
    touches the border, are still found.
    """
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    scale = DETECT_SIDE / max(h, w)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)
    pad = int(0.25 * max(small.shape))
    padded = cv2.copyMakeBorder(small, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    min_side = max(16, int(0.12 * min(padded.shape)))
    found = _cascade().detectMultiScale(padded, scaleFactor=1.1, minNeighbors=3, minSize=(min_side, min_side))
    boxes = []
    for x, y, bw, bh in (found if len(found) else []):
        x1 = (x - pad) / scale
        y1 = (y - pad) / scale
        x2 = (x + bw - pad) / scale
        y2 = (y + bh - pad) / scale
        x1, y1 = max(0, round(x1)), max(0, round(y1))
        x2, y2 = min(w, round(x2)), min(h, round(y2))
        if x2 - x1 >= 8 and y2 - y1 >= 8:
            boxes.append((x1, y1, x2, y2))
    boxes.sort(key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)
    return boxes


def crop_square(rgb: np.ndarray, box: tuple[int, int, int, int], margin: float = FACE_MARGIN, size: int = CROP_SIZE):
    """Square crop centred on ``box`` expanded by ``margin``; out-of-image parts are filled black.

    Returns ``(crop, crop_box)`` with ``crop`` of shape (size, size, 3).
    """
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    sx1, sy1 = round(cx - side / 2), round(cy - side / 2)
    sx2, sy2 = sx1 + round(side), sy1 + round(side)
    h, w = rgb.shape[:2]
    pl, pt, pr, pb = max(0, -sx1), max(0, -sy1), max(0, sx2 - w), max(0, sy2 - h)
    region = rgb[max(0, sy1) : min(h, sy2), max(0, sx1) : min(w, sx2)]
    if pl or pt or pr or pb:
        region = cv2.copyMakeBorder(region, pt, pb, pl, pr, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    interp = cv2.INTER_AREA if region.shape[0] > size else cv2.INTER_CUBIC
    crop = cv2.resize(region, (size, size), interpolation=interp)
    return np.ascontiguousarray(crop), (sx1, sy1, sx2, sy2)


def prepare_face(rgb: np.ndarray, *, on_no_face: str = "error", margin: float = FACE_MARGIN) -> FaceCrop:
    """Detect the largest face and crop it to 224x224.

    ``on_no_face``: ``"error"`` raises :class:`NoFaceError`; ``"whole"`` analyses the whole image
    (centre square crop), recorded in ``FaceCrop.notes`` so the caller can show it.
    """
    if on_no_face not in ("error", "whole"):
        raise ValueError(f"on_no_face must be 'error' or 'whole', got {on_no_face!r}")
    h, w = rgb.shape[:2]
    boxes = detect_faces(rgb)
    if boxes:
        crop, crop_box = crop_square(rgb, boxes[0], margin)
        notes = [f"{len(boxes)} faces found; the largest was analysed"] if len(boxes) > 1 else []
        return FaceCrop(crop, boxes[0], crop_box, (w, h), True, notes)
    if on_no_face == "error":
        raise NoFaceError(
            f"no face found in the {w}x{h} image; analyse the whole image instead "
            "(--on-no-face whole in the CLI) if it is already a face crop"
        )
    side = min(h, w)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    crop, crop_box = crop_square(rgb, box, margin=0.0)
    return FaceCrop(crop, None, crop_box, (w, h), False, ["no face found: the whole image (centre square) was analysed"])

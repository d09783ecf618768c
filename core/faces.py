"""Face preprocessing: load any image safely, find the face, crop it to the 224x224 input of the protocol.

The paper's models see "aligned face crops resized to 224x224". We detect with YuNet (shipped in
``assets/yunet``, run by OpenCV's ``FaceDetectorYN``), expand its box by a margin so that print edges
and screen bezels around the face stay visible, and resize. The crop is not turned by the landmarks:
YuNet's landmarks do not follow an in-plane turn (on the astronaut turned by 25 degrees they give 4),
so levelling by them would turn crops by noise.
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

from . import ASSETS_DIR
from .errors import ImageTooLargeError, InvalidImageError, NoFaceError, WeightsError

CROP_SIZE = 224
DEFAULT_MAX_PIXELS = 50_000_000  # ~ 8660 x 5770; well above any camera frame, far below a bomb
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DETECT_SIDE = 320  # detection runs on a copy scaled to this long side (~9 ms on one thread)
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
    landmarks: list[list[float]] | None = None  # YuNet's five points (source pixels), when a face was found


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


# YuNet (Wu, Peng, Yu, MIR 2023), shipped in assets/yunet with its licence; checked by hash before use.
YUNET_PATH = ASSETS_DIR / "yunet" / "face_detection_yunet_2023mar.onnx"
YUNET_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"
SCORE_THRESHOLD = 0.6  # YuNet's face score; phone frames of real faces score 0.8-0.95
NMS_THRESHOLD = 0.3
# Detection passes (long side of the scaled copy, black border as a fraction of it), tried in order
# until one finds a face: the plain frame (~3 ms on one thread); a padded copy, for faces that fill a
# tight crop; a larger copy, for small faces in big frames. On fas-dev + fas-train, YuNet then misses
# ~2% of the images, most of them with no face in view.
DETECT_PASSES = ((DETECT_SIDE, 0.0), (240, 0.3), (640, 0.3))


@dataclass(frozen=True)
class Face:
    """One detected face, in source pixels."""

    box: tuple[int, int, int, int]  # (x1, y1, x2, y2), clipped to the image
    landmarks: tuple[
        tuple[float, float], ...
    ]  # YuNet's five: right eye, left eye, nose tip, right and left mouth corner
    score: float

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


# One detector per thread: FaceDetectorYN keeps its input size as state, so a shared one is not safe.
_DETECTORS = threading.local()


def _verified_model() -> bytes:
    try:
        data = YUNET_PATH.read_bytes()
    except OSError as exc:
        raise WeightsError(f"the YuNet face detector is missing at {YUNET_PATH} ({exc.strerror or exc})") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != YUNET_SHA256:
        raise WeightsError(
            f"{YUNET_PATH} has sha256 {digest[:16]}..., expected {YUNET_SHA256[:16]}...: the file is damaged or was replaced"
        )
    return data


_MODEL_BYTES: bytes | None = None
_MODEL_LOCK = threading.Lock()


def _detector() -> cv2.FaceDetectorYN:
    global _MODEL_BYTES
    det = getattr(_DETECTORS, "detector", None)
    if det is None:
        with _MODEL_LOCK:
            if _MODEL_BYTES is None:
                _MODEL_BYTES = _verified_model()
        buf = np.frombuffer(_MODEL_BYTES, np.uint8)
        det = cv2.FaceDetectorYN.create(
            "onnx", buf, np.empty(0, np.uint8), (DETECT_SIDE, DETECT_SIDE), SCORE_THRESHOLD, NMS_THRESHOLD, 50
        )
        _DETECTORS.detector = det
    return det


def _detect_at(rgb: np.ndarray, side: int, pad_fraction: float) -> list[Face]:
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)
    pad = int(pad_fraction * max(small.shape[:2]))
    bgr = cv2.copyMakeBorder(cv2.cvtColor(small, cv2.COLOR_RGB2BGR), pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    det = _detector()
    det.setInputSize((bgr.shape[1], bgr.shape[0]))
    _, found = det.detect(bgr)
    faces = []
    for row in found if found is not None else []:
        x, y, bw, bh = (float(v) for v in row[:4])
        if not np.isfinite(row[:15]).all():
            continue
        x1, y1 = max(0, round((x - pad) / scale)), max(0, round((y - pad) / scale))
        x2, y2 = min(w, round((x + bw - pad) / scale)), min(h, round((y + bh - pad) / scale))
        if x2 - x1 < 8 or y2 - y1 < 8:
            continue
        marks = tuple((float((row[4 + 2 * i] - pad) / scale), float((row[5 + 2 * i] - pad) / scale)) for i in range(5))
        faces.append(Face((x1, y1, x2, y2), marks, float(row[14])))
    return faces


def detect_faces(rgb: np.ndarray) -> list[Face]:
    """Detect faces with YuNet; return them largest first (source pixels, five landmarks, score).

    Wu, Peng & Yu, "YuNet: A Tiny Millisecond-level Face Detector", Machine Intelligence Research 2023.
    Detection runs on a scaled copy, in the passes of ``DETECT_PASSES`` until one finds a face.
    """
    faces: list[Face] = []
    for side, pad_fraction in DETECT_PASSES:
        faces = _detect_at(rgb, side, pad_fraction)
        if faces:
            break
    faces.sort(key=lambda f: (f.area, f.score), reverse=True)
    return faces


def face_square(
    box: tuple[int, int, int, int], image_size: tuple[int, int], margin: float = FACE_MARGIN
) -> tuple[int, int, int, int]:
    """The square region to crop around a face box: its longer side plus ``margin`` on each side,
    centred on the box, but shrunk and shifted to stay inside the picture where it can.

    The margin shows print edges and bezels; in a tight crop (the face fills the picture) it would only
    add black, so it shrinks to what the picture holds.
    """
    x1, y1, x2, y2 = box
    w, h = image_size
    long_side = max(x2 - x1, y2 - y1)
    side = round(min(long_side * (1 + 2 * margin), max(long_side, min(w, h))))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    sx1 = round(min(max(cx - side / 2, 0), w - side)) if side <= w else round((w - side) / 2)
    sy1 = round(min(max(cy - side / 2, 0), h - side)) if side <= h else round((h - side) / 2)
    return sx1, sy1, sx1 + side, sy1 + side


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


def crop_face(crop: np.ndarray) -> FaceCrop:
    """An image that already is the face crop (a dataset or benchmark crop) as the agent's input."""
    h, w = crop.shape[:2]
    return FaceCrop(crop, None, (0, 0, w, h), (w, h), True)


def prepare_face(rgb: np.ndarray, *, on_no_face: str = "error", margin: float = FACE_MARGIN) -> FaceCrop:
    """Detect the largest face and crop it to 224x224.

    ``on_no_face``: ``"error"`` raises :class:`NoFaceError`; ``"whole"`` analyses the whole image
    (centre square crop), recorded in ``FaceCrop.notes`` so the caller can show it.
    """
    if on_no_face not in ("error", "whole"):
        raise ValueError(f"on_no_face must be 'error' or 'whole', got {on_no_face!r}")
    h, w = rgb.shape[:2]
    found = detect_faces(rgb)
    if found:
        face = found[0]
        crop, crop_box = crop_square(rgb, face_square(face.box, (w, h), margin), margin=0.0)
        notes = [f"{len(found)} faces found; the largest was analysed"] if len(found) > 1 else []
        return FaceCrop(crop, face.box, crop_box, (w, h), True, notes, [list(p) for p in face.landmarks])
    if on_no_face == "error":
        raise NoFaceError(
            f"no face found in the {w}x{h} image; analyse the whole image instead "
            "(--on-no-face whole in the CLI) if it is already a face crop"
        )
    side = min(h, w)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    crop, crop_box = crop_square(rgb, box, margin=0.0)
    return FaceCrop(
        crop, None, crop_box, (w, h), False, ["no face found: the whole image (centre square) was analysed"]
    )

"""Demo images that need no dataset: scikit-image's public-domain astronaut portrait (NASA, Eileen
Collins) and clearly labelled *simulated* presentation attacks made from it.

    .venv/bin/python -m core.samples assets/samples

The simulations are for demos and smoke tests only, not for measuring anything: real prints and
replays differ in many more ways than these models capture.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np


def live_portrait() -> np.ndarray:
    """The astronaut's head and shoulders, 320x320 RGB uint8."""
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut()[0:320, 64:384])


def simulate_print(rgb: np.ndarray, cell: int = 4, angle_deg: float = 15.0) -> np.ndarray:
    """Simulated photo print: amplitude-modulated halftone (rotated dot screen per channel, as in
    offset/laser printing), paper-white lift, lowered contrast and a slight defocus of the re-capture.
    Ulichney, "Digital Halftoning", MIT Press 1987."""
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((h, w, 3), np.float32)
    for c, extra in enumerate((0.0, 30.0, 60.0)):  # a different screen angle per ink avoids one big moire
        t = np.deg2rad(angle_deg + extra)
        u = (xx * np.cos(t) + yy * np.sin(t)) * (2 * np.pi / cell)
        v = (-xx * np.sin(t) + yy * np.cos(t)) * (2 * np.pi / cell)
        screen = 0.5 + 0.25 * (np.cos(u) + np.cos(v))  # in [0, 1]
        ink = 1.0 - rgb[..., c].astype(np.float32) / 255.0
        out[..., c] = np.where(ink > screen, 0.0, 1.0)
    out = cv2.GaussianBlur(out, (0, 0), 1.0)  # the camera re-captures the dots slightly out of focus
    paper = np.array([0.96, 0.94, 0.88], np.float32)  # warm paper white
    out = 0.12 + 0.78 * out * paper
    return np.clip(out * 255.0, 0, 255).astype(np.uint8)


def simulate_replay(rgb: np.ndarray, pitch: float = 2.0, angle_deg: float = 4.0) -> np.ndarray:
    """Simulated screen replay: the image is shown on an RGB-stripe subpixel grid that the camera
    samples at a slight angle and a different pitch (aliasing -> moire), with a blue cast, lifted
    blacks and a glare gradient."""
    h, w = rgb.shape[:2]
    up = 3
    big = cv2.resize(rgb, (w * up, h * up), interpolation=cv2.INTER_NEAREST).astype(np.float32) / 255.0
    yy, xx = np.mgrid[0 : h * up, 0 : w * up].astype(np.float32)
    t = np.deg2rad(angle_deg)
    u = xx * np.cos(t) + yy * np.sin(t)
    v = -xx * np.sin(t) + yy * np.cos(t)
    phase = np.mod(u / (pitch * up / 3.0), 3.0).astype(np.int32)  # which subpixel stripe
    mask = np.zeros_like(big)
    for c in range(3):
        mask[..., c] = phase == c
    rows = (np.mod(v, pitch * up) > 0.6).astype(np.float32)  # dark gaps between pixel rows
    screen = big * (0.35 + 0.65 * mask * 3.0 / 1.6) * rows[..., None]
    out = cv2.resize(screen, (w, h), interpolation=cv2.INTER_AREA)  # the camera integrates -> moire
    out = out * np.array([0.92, 0.98, 1.1], np.float32) + 0.06
    glare = np.exp(
        -(((np.mgrid[0:h, 0:w][1] - 0.75 * w) / (0.3 * w)) ** 2 + ((np.mgrid[0:h, 0:w][0] - 0.2 * h) / (0.3 * h)) ** 2)
    )
    out = out + 0.25 * glare[..., None]
    return np.clip(out * 255.0, 0, 255).astype(np.uint8)


SAMPLES = {
    "astronaut_live.png": lambda: live_portrait(),
    "astronaut_print_SIMULATED.png": lambda: simulate_print(live_portrait()),
    "astronaut_replay_SIMULATED.png": lambda: simulate_replay(live_portrait()),
}


def write_samples(folder: str | Path) -> list[Path]:
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in SAMPLES.items():
        Image.fromarray(make()).save(folder / name)
        paths.append(folder / name)
    return paths


if __name__ == "__main__":
    for p in write_samples(sys.argv[1] if len(sys.argv) > 1 else "assets/samples"):
        print(p)

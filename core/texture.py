"""Hand-made texture features of a face crop, as pure functions (array in, array out)."""

from __future__ import annotations

import cv2
import numpy as np
from skimage.feature import local_binary_pattern

LBP_POINTS = 8


def nri_uniform_bins(points: int) -> int:
    """Number of scikit-image's "nri_uniform" LBP codes: P(P-1) + 2 uniform patterns and one for the rest."""
    return points * (points - 1) + 3


LBP_BINS = nri_uniform_bins(LBP_POINTS)


def lbp_codes(channel: np.ndarray, points: int, radius: float, method: str) -> np.ndarray:
    """scikit-image's LBP codes of a 2-D image, with the border replicated: scikit-image reads outside
    pixels as 0, which draws a false frame of codes."""
    pad = int(np.ceil(radius))
    padded = cv2.copyMakeBorder(channel, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    return local_binary_pattern(padded, points, radius, method=method)[pad:-pad, pad:-pad]


def code_histogram(codes: np.ndarray, n_codes: int) -> np.ndarray:
    """Share of the pixels with each code 0..n_codes-1."""
    return np.bincount(codes.astype(np.int64).ravel(), minlength=n_codes)[:n_codes] / codes.size


def colour_lbp_histograms(
    image: np.ndarray, size: int = 32, radii: tuple[int, ...] = (1, 2), points: int = LBP_POINTS
) -> np.ndarray:
    """Colour texture: LBP histograms of each HSV channel of an RGB face crop.

    The crop is shrunk to ``size`` x ``size`` (area averaging), converted to HSV (OpenCV's 8-bit
    scale), and each channel gets a non-rotation-invariant uniform LBP histogram per radius (``points``
    neighbours; the border replicated by :func:`lbp_codes`, as for LBPTool). Each histogram is
    normalised to sum 1 and square-rooted (the Hellinger map), so that a linear model compares
    histograms as the Hellinger kernel does.

    Boulkenafet, Komulainen and Hadid, "Face Spoofing Detection Using Colour Texture Analysis",
    IEEE TIFS 11(8), 2016: the luminance and chrominance of a recaptured face carry the recapture
    (gamut, colour cast, print and screen texture), and their LBP histograms separate it across
    cameras better than grey-level ones.

    Parameters
    ----------
    image : (H, W, 3) uint8 RGB
    size : side the crop is shrunk to before the LBP (small: the cue is the colour structure of the
        face, and the cost is ~0.1 ms per channel and radius at 32 px)
    radii : LBP radii, in pixels of the shrunk crop
    points : neighbours per LBP code

    Returns
    -------
    (3 * len(radii) * bins,) float32, channel-major (H, S, V), then radius; ``bins`` is
    ``points * (points - 1) + 3``.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got {getattr(image, 'shape', type(image))}")
    if size < 8 or not radii or min(radii) < 1 or max(radii) >= size // 2:
        raise ValueError(f"size {size} and radii {radii} do not fit: need size >= 8 and 1 <= radius < size / 2")
    interp = cv2.INTER_AREA if max(image.shape[:2]) > size else cv2.INTER_LINEAR
    small = cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=interp)
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    bins = nri_uniform_bins(points)
    out = [
        np.sqrt(code_histogram(lbp_codes(channel, points, radius, "nri_uniform"), bins))
        for channel in cv2.split(hsv)
        for radius in radii
    ]
    return np.concatenate(out).astype(np.float32)

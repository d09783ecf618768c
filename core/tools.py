"""The six visual tools of TAR-FAS (paper §3.1.1), as pure functions.

Each takes the 224x224 RGB uint8 face crop and returns a :class:`ToolOutput`: the image the model (and
the analyst) looks at, plus a few numbers that describe it. Deterministic, no state, no I/O.
The registry in :mod:`core.registry` wraps them with schemas and argument validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import pywt

from .texture import code_histogram, lbp_codes


@dataclass
class ToolOutput:
    """What a tool produces: an 8-bit image (HxW gray or HxWx3 RGB) and descriptive numbers."""

    image: np.ndarray
    stats: dict[str, float] = field(default_factory=dict)


def _check_rgb(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB array, got {getattr(image, 'shape', type(image))}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    return image


def _gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(_check_rgb(image), cv2.COLOR_RGB2GRAY)


def _to_uint8(values: np.ndarray, hi_percentile: float = 99.5) -> np.ndarray:
    """Scale non-negative values to 0..255, clipping at a high percentile so one outlier does not
    blacken the whole map."""
    hi = float(np.percentile(values, hi_percentile))
    if hi <= 0:
        return np.zeros(values.shape, np.uint8)
    return (np.clip(values / hi, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def zoom_in(image: np.ndarray, bbox: tuple[float, float, float, float], out_size: int = 224) -> ToolOutput:
    """Crop ``bbox = (x1, y1, x2, y2)`` (pixels of ``image``) and upsample it, keeping its aspect ratio,
    so that its longer side is ``out_size`` (bicubic).

    The box must already be valid (inside the image, at least 2x2); :mod:`core.registry` validates and
    clamps what a model asks for. Stats: the box, the magnification and the sharpness of the region
    (variance of the Laplacian; Pech-Pacheco et al., ICPR 2000).
    """
    _check_rgb(image)
    h, w = image.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in bbox)
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h) or x2 - x1 < 2 or y2 - y1 < 2:
        raise ValueError(f"bbox {bbox} is not a box of at least 2x2 pixels inside the {w}x{h} image")
    region = image[y1:y2, x1:x2]
    scale = out_size / max(x2 - x1, y2 - y1)
    size = (max(1, round((x2 - x1) * scale)), max(1, round((y2 - y1) * scale)))
    out = cv2.resize(region, size, interpolation=cv2.INTER_CUBIC if scale >= 1 else cv2.INTER_AREA)
    sharp = float(cv2.Laplacian(cv2.cvtColor(region, cv2.COLOR_RGB2GRAY), cv2.CV_32F).var())
    return ToolOutput(out, {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "magnification": scale, "sharpness": sharp})


def fft_spectrum(image: np.ndarray) -> ToolOutput:
    """Centred log-magnitude Fourier spectrum of the grayscale face (Hann-windowed against the
    border cross).

    Recaptured faces show periodic peaks (screen moire, print halftone) and a different high-frequency
    fall-off: Li et al., "Live face detection based on the analysis of Fourier spectra", SPIE 2004.
    Stats: ``high_freq_ratio`` (energy beyond half the Nyquist radius / total, DC excluded) and
    ``peak_ratio`` (strongest off-centre peak / median magnitude: large for periodic patterns).
    """
    gray = _gray(image).astype(np.float32)
    h, w = gray.shape
    window = np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
    spectrum = np.fft.fftshift(np.abs(np.fft.fft2((gray - gray.mean()) * window)))
    log_mag = np.log1p(spectrum)
    lo, hi = float(log_mag.min()), float(log_mag.max())
    out = ((log_mag - lo) / (hi - lo) * 255 + 0.5).astype(np.uint8) if hi > lo else np.zeros((h, w), np.uint8)
    yy, xx = np.ogrid[:h, :w]
    radius = np.hypot((yy - h // 2) / (h / 2), (xx - w // 2) / (w / 2))
    power = spectrum**2
    total = float(power[radius > 0.02].sum()) or 1.0
    high = float(power[radius > 0.5].sum())
    ring = spectrum[(radius > 0.15) & (radius < 0.95)]
    peak_ratio = float(ring.max() / (np.median(ring) + 1e-6)) if ring.size else 0.0
    return ToolOutput(out, {"high_freq_ratio": high / total, "peak_ratio": peak_ratio})


def lbp_texture(image: np.ndarray, points: int = 8, radius: float = 1.0) -> ToolOutput:
    """Uniform rotation-invariant local binary pattern map (scikit-image ``method='uniform'``).

    Ojala, Pietikainen & Maenpaa, "Multiresolution gray-scale and rotation invariant texture
    classification with local binary patterns", TPAMI 24(7), 2002, doi:10.1109/TPAMI.2002.1017623.
    Used for face anti-spoofing by Maatta et al., IJCB 2011. The P+2 codes are spread over 0..255.
    Stats: ``entropy`` of the code histogram (bits) and ``nonuniform_fraction`` (share of pixels whose
    pattern is not uniform: noisy or grainy texture).
    """
    codes = lbp_codes(_gray(image), points, radius, "uniform")
    n_codes = points + 2
    hist = code_histogram(codes, n_codes)
    nz = hist[hist > 0]
    out = (codes * (255.0 / (n_codes - 1)) + 0.5).astype(np.uint8)
    return ToolOutput(out, {"entropy": float(-(nz * np.log2(nz)).sum()), "nonuniform_fraction": float(hist[-1])})


def wavelet_detail(image: np.ndarray, wavelet: str = "haar", levels: int = 2) -> ToolOutput:
    """Multi-level 2D discrete wavelet decomposition shown as the usual sub-band mosaic.

    The approximation sits top-left; horizontal, vertical and diagonal detail bands of each level
    (absolute values, each band contrast-stretched) fill the rest. Mallat, "A theory for
    multiresolution signal decomposition: the wavelet representation", TPAMI 11(7), 1989.
    Stats: mean absolute detail per level (``detail_l1`` finest) and the finest diagonal band's energy
    share (sensor noise vs. print/screen grain).
    """
    gray = _gray(image).astype(np.float32) / 255.0
    coeffs = pywt.wavedec2(gray, wavelet, level=levels)
    arr, _ = pywt.coeffs_to_array(
        [np.abs(coeffs[0]) / (np.abs(coeffs[0]).max() + 1e-9)]
        + [tuple(np.abs(d) / (np.percentile(np.abs(d), 99.5) + 1e-9) for d in level) for level in coeffs[1:]]
    )
    out = cv2.resize(
        (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8), gray.shape[::-1], interpolation=cv2.INTER_NEAREST
    )
    stats = {}
    for i, (ch, cv, cd) in enumerate(reversed(coeffs[1:]), start=1):
        stats[f"detail_l{i}"] = float((np.abs(ch).mean() + np.abs(cv).mean() + np.abs(cd).mean()) / 3)
    ch, cv, cd = coeffs[-1]
    energy = float((ch**2).sum() + (cv**2).sum() + (cd**2).sum()) or 1.0
    stats["diagonal_share_l1"] = float((cd**2).sum()) / energy
    return ToolOutput(out, stats)


def laplacian_edges(image: np.ndarray) -> ToolOutput:
    """Magnitude of the Laplacian (3x3 aperture) of the grayscale face, contrast-stretched.

    Marr & Hildreth, "Theory of edge detection", Proc. R. Soc. Lond. B 207, 1980. Recaptures lose
    fine edges (blur) and add straight ones (paper or bezel borders). Stats: ``sharpness`` (variance of
    the Laplacian) and ``edge_density`` (share of pixels above a fixed response of 20 gray levels).
    """
    gray = _gray(image)
    lap = cv2.Laplacian(gray, cv2.CV_32F, ksize=3)
    mag = np.abs(lap)
    return ToolOutput(_to_uint8(mag), {"sharpness": float(lap.var()), "edge_density": float((mag > 20).mean())})


def _hog_glyphs(orientations: int, cell: int) -> np.ndarray:
    """One (cell x cell) line glyph per orientation bin, drawn along the edge (perpendicular to the
    gradient), as in scikit-image's HOG visualisation."""
    glyphs = np.zeros((orientations, cell, cell), np.float32)
    c, r = (cell - 1) / 2, cell / 2 - 0.5
    for k in range(orientations):
        theta = np.pi * (k + 0.5) / orientations + np.pi / 2
        dx, dy = r * np.cos(theta), r * np.sin(theta)
        p1 = (int(round((c - dx) * 16)), int(round((c - dy) * 16)))
        p2 = (int(round((c + dx) * 16)), int(round((c + dy) * 16)))
        cv2.line(glyphs[k], p1, p2, 1.0, 1, cv2.LINE_AA, shift=4)
    return glyphs


_HOG_CACHE: dict[tuple, tuple] = {}


def hog_visualization(image: np.ndarray, orientations: int = 9, cell: int = 8) -> ToolOutput:
    """Histogram-of-oriented-gradients glyph image: each cell shows its gradient-orientation histogram
    as lines along the dominant edges (the rendering of scikit-image's ``hog(..., visualize=True)``).

    Dalal & Triggs, "Histograms of oriented gradients for human detection", CVPR 2005,
    doi:10.1109/CVPR.2005.177. Histograms come from OpenCV's ``HOGDescriptor`` (one-cell blocks,
    L2-Hys), ~40x faster than scikit-image's Python visualiser; glyph brightness is the cell's
    histogram times its mean gradient magnitude. Stats: ``orientation_entropy`` (bits;
    low when one direction dominates, e.g. straight paper or screen edges) and
    ``dominant_orientation_deg`` (gradient direction of the strongest bin centre).
    """
    gray = _gray(image)
    h, w = gray.shape
    ch, cw = h // cell, w // cell
    if ch < 1 or cw < 1:
        raise ValueError(f"image {w}x{h} is smaller than one {cell}x{cell} HOG cell")
    key = (cw * cell, ch * cell, orientations, cell)
    if key not in _HOG_CACHE:
        win = (cw * cell, ch * cell)
        _HOG_CACHE[key] = (
            cv2.HOGDescriptor(win, (cell, cell), (cell, cell), (cell, cell), orientations),
            _hog_glyphs(orientations, cell),
        )
    descriptor, glyphs = _HOG_CACHE[key]
    # OpenCV walks blocks column by column: (x, y, bin) -> (y, x, bin).
    hist = descriptor.compute(gray[: ch * cell, : cw * cell]).reshape(cw, ch, orientations).transpose(1, 0, 2)
    # Per-cell normalisation makes flat skin look as busy as edges; weight glyphs by cell gradient energy.
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=1)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=1)
    energy = cv2.resize(cv2.magnitude(gx, gy)[: ch * cell, : cw * cell], (cw, ch), interpolation=cv2.INTER_AREA)
    vis = np.einsum("yxk,yx,kij->yixj", hist, energy, glyphs).reshape(ch * cell, cw * cell)
    if vis.shape != (h, w):
        vis = cv2.copyMakeBorder(vis, 0, h - vis.shape[0], 0, w - vis.shape[1], cv2.BORDER_CONSTANT, value=0)
    per_orientation = hist.reshape(-1, orientations).sum(axis=0)
    p = per_orientation / (per_orientation.sum() or 1.0)
    nz = p[p > 0]
    return ToolOutput(
        _to_uint8(vis, 99.0),
        {
            "orientation_entropy": float(-(nz * np.log2(nz)).sum()),
            "dominant_orientation_deg": float((np.argmax(p) + 0.5) * 180.0 / orientations),
        },
    )

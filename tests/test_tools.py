"""The six visual tools of TAR-FAS (paper §3.1.1): pure, deterministic functions image -> 8-bit image
plus a few numbers that describe it, responding to image content in the documented direction."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from core import tools

# name -> (function, documented stat keys); zoom_in needs a box and is tested on its own below.
WHOLE_IMAGE_TOOLS = {
    "fft_spectrum": (tools.fft_spectrum, {"high_freq_ratio", "peak_ratio"}),
    "lbp_texture": (tools.lbp_texture, {"entropy", "nonuniform_fraction"}),
    "wavelet_detail": (tools.wavelet_detail, {"detail_l1", "detail_l2", "diagonal_share_l1"}),
    "laplacian_edges": (tools.laplacian_edges, {"sharpness", "edge_density"}),
    "hog_visualization": (tools.hog_visualization, {"orientation_entropy", "dominant_orientation_deg"}),
}
ZOOM_KEYS = {"x1", "y1", "x2", "y2", "magnification", "sharpness"}

ALL_TOOLS = {name: fn for name, (fn, _) in WHOLE_IMAGE_TOOLS.items()} | {
    "zoom_in": lambda image: tools.zoom_in(image, (40, 40, 140, 140)),
}


def _stripes(vertical: bool, period: int = 8, size: int = 224) -> np.ndarray:
    """Black/white stripes: vertical stripes vary along x, horizontal ones along y."""
    on = (np.arange(size) // (period // 2)) % 2 == 0
    img = np.zeros((size, size, 3), np.uint8)
    if vertical:
        img[:, on] = 255
    else:
        img[on, :] = 255
    return img


def _with_grating(crop: np.ndarray, period: float = 4.0, amplitude: float = 30.0) -> np.ndarray:
    """Simulated screen moire: a vertical sinusoidal grating added to every channel."""
    x = np.arange(crop.shape[1])
    pattern = amplitude * np.sin(2 * np.pi * x / period)
    return np.clip(crop.astype(np.float64) + pattern[None, :, None], 0, 255).astype(np.uint8)


def _with_noise(crop: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(crop.astype(np.float64) + rng.normal(0, sigma, crop.shape), 0, 255).astype(np.uint8)


# --- common contract ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(WHOLE_IMAGE_TOOLS))
def test_whole_image_tool_returns_gray_uint8_map_of_the_crop_size(name, crop):
    fn, keys = WHOLE_IMAGE_TOOLS[name]
    out = fn(crop)
    assert isinstance(out, tools.ToolOutput)
    assert out.image.dtype == np.uint8
    assert out.image.shape == (224, 224)
    assert set(out.stats) == keys
    for key, value in out.stats.items():
        assert isinstance(value, float), f"{name}.{key} is {type(value).__name__}"
        assert math.isfinite(value), f"{name}.{key} = {value}"
    # the map shows something: not a blank image
    assert out.image.max() > out.image.min()


@pytest.mark.parametrize("name", sorted(ALL_TOOLS))
def test_tool_is_deterministic_and_leaves_its_input_untouched(name, crop):
    fn = ALL_TOOLS[name]
    before = crop.copy()
    first, second = fn(crop), fn(crop.copy())
    assert np.array_equal(crop, before), "the tool modified its input"
    assert first.image.shape == second.image.shape
    assert np.array_equal(first.image, second.image)
    assert first.stats == second.stats


@pytest.mark.parametrize("name", sorted(ALL_TOOLS))
def test_tool_rejects_a_grayscale_2d_array(name, crop):
    gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    with pytest.raises(ValueError, match="HxWx3"):
        ALL_TOOLS[name](gray)


@pytest.mark.parametrize("name", sorted(ALL_TOOLS))
def test_tool_rejects_float_pixels(name, crop):
    with pytest.raises(ValueError, match="uint8"):
        ALL_TOOLS[name](crop.astype(np.float32) / 255.0)


@pytest.mark.parametrize("name", sorted(ALL_TOOLS))
def test_tool_rejects_rgba(name, crop):
    rgba = np.dstack([crop, np.full(crop.shape[:2], 255, np.uint8)])
    with pytest.raises(ValueError):
        ALL_TOOLS[name](rgba)


# --- ZoomIn ---------------------------------------------------------------------------------------
def test_zoom_in_enlarges_the_box_keeping_its_aspect_ratio(crop):
    out = tools.zoom_in(crop, (10, 20, 110, 70))  # 100 wide, 50 high
    assert out.image.dtype == np.uint8
    assert out.image.shape == (112, 224, 3)  # longer side 224, ratio 2:1 kept
    assert set(out.stats) == ZOOM_KEYS
    assert (out.stats["x1"], out.stats["y1"], out.stats["x2"], out.stats["y2"]) == (10, 20, 110, 70)
    assert out.stats["magnification"] == pytest.approx(2.24)
    assert all(math.isfinite(float(v)) for v in out.stats.values())


def test_zoom_in_tall_box_has_height_224(crop):
    out = tools.zoom_in(crop, (100, 0, 132, 128))  # 32 x 128
    assert out.image.shape == (224, 56, 3)
    assert out.stats["magnification"] == pytest.approx(224 / 128)


def test_zoom_in_shows_the_requested_region(crop):
    box = (60, 80, 116, 136)  # 56x56 -> x4
    out = tools.zoom_in(crop, box)
    region = crop[80:136, 60:116]
    back = cv2.resize(out.image, (56, 56), interpolation=cv2.INTER_AREA)
    assert np.abs(back.astype(int) - region.astype(int)).mean() < 3.0
    # and not some other region of the face
    other = crop[0:56, 0:56]
    assert np.abs(back.astype(int) - other.astype(int)).mean() > 10.0


def test_zoom_in_of_the_whole_image_is_the_image(crop):
    out = tools.zoom_in(crop, (0, 0, 224, 224))
    assert out.stats["magnification"] == 1.0
    assert np.array_equal(out.image, crop)


def test_zoom_in_sharpness_drops_when_the_region_is_blurred(crop):
    blurred = cv2.GaussianBlur(crop, (0, 0), 2.0)
    box = (50, 50, 170, 170)
    assert tools.zoom_in(blurred, box).stats["sharpness"] < 0.5 * tools.zoom_in(crop, box).stats["sharpness"]


@pytest.mark.parametrize(
    "bbox",
    [
        (-10, 0, 100, 100),  # starts left of the image
        (0, 0, 225, 100),  # ends right of the image
        (0, 0, 100, 300),  # ends below
        (300, 300, 400, 400),  # entirely outside
        (100, 100, 50, 150),  # inverted
        (10, 10, 11, 100),  # 1 pixel wide
    ],
)
def test_zoom_in_refuses_boxes_not_inside_the_image(crop, bbox):
    with pytest.raises(ValueError, match="bbox"):
        tools.zoom_in(crop, bbox)


# --- FFT ------------------------------------------------------------------------------------------
def test_fft_peak_ratio_reveals_a_periodic_grating(crop):
    plain = tools.fft_spectrum(crop).stats
    moire = tools.fft_spectrum(_with_grating(crop)).stats
    assert moire["peak_ratio"] > 4 * plain["peak_ratio"]
    assert moire["high_freq_ratio"] > plain["high_freq_ratio"]  # period 4 px sits at half Nyquist


def test_fft_spectrum_is_centred_and_shows_the_grating_peaks(crop):
    out = tools.fft_spectrum(_with_grating(crop)).image
    # a period of 4 px along x puts peaks at +-224/4 = +-56 columns from the centre, on the centre row
    row = out[112]
    assert row[112 + 56] >= np.percentile(out, 99.9) - 1
    assert row[112 - 56] >= np.percentile(out, 99.9) - 1
    # low frequencies dominate a natural face: the centre is brighter than the corners
    assert out[104:121, 104:121].mean() > out[:16, :16].mean() + 50


def test_fft_high_freq_ratio_is_the_share_beyond_half_nyquist():
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (224, 224, 1), dtype=np.uint8).repeat(3, axis=2)
    # white noise spreads its power evenly: the share outside half the Nyquist radius is the area
    # of the square outside the circle of radius 0.5, 1 - pi/16 = 0.80
    assert tools.fft_spectrum(noise).stats["high_freq_ratio"] == pytest.approx(1 - np.pi / 16, abs=0.05)


def test_fft_high_freq_ratio_drops_after_blur(crop):
    plain = tools.fft_spectrum(crop).stats["high_freq_ratio"]
    blurred = tools.fft_spectrum(cv2.GaussianBlur(crop, (0, 0), 2.0)).stats["high_freq_ratio"]
    assert blurred < 0.2 * plain


def test_fft_of_a_flat_image_is_black_and_finite():
    out = tools.fft_spectrum(np.full((224, 224, 3), 77, np.uint8))
    assert out.image.shape == (224, 224)
    assert all(math.isfinite(v) for v in out.stats.values())


# --- LBP ------------------------------------------------------------------------------------------
def test_lbp_entropy_of_a_constant_image_is_zero():
    out = tools.lbp_texture(np.full((224, 224, 3), 128, np.uint8))
    assert out.stats["entropy"] == 0.0
    assert out.stats["nonuniform_fraction"] == 0.0
    assert out.image.min() == out.image.max()  # one code everywhere: a flat map


def test_lbp_of_a_black_image_has_one_code():
    out = tools.lbp_texture(np.zeros((224, 224, 3), np.uint8))
    assert out.stats["entropy"] == 0.0
    assert out.stats["nonuniform_fraction"] == 0.0
    assert out.image.min() == out.image.max()


def test_lbp_entropy_and_nonuniform_share_grow_with_grain(crop):
    plain = tools.lbp_texture(crop).stats
    grainy = tools.lbp_texture(_with_noise(crop, 20)).stats
    assert 0.0 < plain["entropy"] < grainy["entropy"] <= math.log2(10) + 1e-9  # P+2 = 10 codes
    assert grainy["nonuniform_fraction"] > plain["nonuniform_fraction"]
    assert 0.0 <= plain["nonuniform_fraction"] <= 1.0


def test_lbp_codes_are_spread_over_0_to_255(crop):
    values = set(np.unique(tools.lbp_texture(_with_noise(crop, 20)).image).tolist())
    # ten uniform codes 0..9 scaled by 255/9
    assert values <= {int(k * 255 / 9 + 0.5) for k in range(10)}
    assert {0, 255} <= values


# --- Wavelet --------------------------------------------------------------------------------------
def test_wavelet_detail_grows_with_added_noise(crop):
    plain = tools.wavelet_detail(crop).stats
    noisy = tools.wavelet_detail(_with_noise(crop, 10)).stats
    assert noisy["detail_l1"] > 1.3 * plain["detail_l1"]
    # white noise spreads evenly over H, V, D: the diagonal share rises towards 1/3
    assert noisy["diagonal_share_l1"] > plain["diagonal_share_l1"]
    assert 0.0 <= plain["diagonal_share_l1"] <= 1.0


def test_wavelet_finest_level_reacts_more_to_noise_than_the_coarser_one(crop):
    plain = tools.wavelet_detail(crop).stats
    noisy = tools.wavelet_detail(_with_noise(crop, 10)).stats
    assert noisy["detail_l1"] - plain["detail_l1"] > noisy["detail_l2"] - plain["detail_l2"] > 0


def test_wavelet_of_a_constant_image_has_no_detail():
    stats = tools.wavelet_detail(np.full((224, 224, 3), 90, np.uint8)).stats
    assert stats["detail_l1"] == pytest.approx(0.0, abs=1e-6)
    assert stats["detail_l2"] == pytest.approx(0.0, abs=1e-6)


def test_wavelet_mosaic_puts_the_approximation_top_left(crop):
    out = tools.wavelet_detail(crop).image
    # 2 levels: the approximation occupies the top-left quarter of the top-left quarter (56x56)
    approx = cv2.resize(out[:56, :56], (56, 56))
    small = cv2.resize(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), (56, 56), interpolation=cv2.INTER_AREA)
    assert np.corrcoef(approx.ravel().astype(float), small.ravel().astype(float))[0, 1] > 0.95


# --- Laplacian ------------------------------------------------------------------------------------
def test_laplacian_sharpness_and_edge_density_drop_after_blur(crop):
    sharp = tools.laplacian_edges(crop).stats
    blurred = tools.laplacian_edges(cv2.GaussianBlur(crop, (7, 7), 2.0)).stats
    assert blurred["sharpness"] < 0.25 * sharp["sharpness"]
    assert blurred["edge_density"] < sharp["edge_density"]
    assert 0.0 <= blurred["edge_density"] <= 1.0


def test_laplacian_of_a_constant_image_is_zero():
    out = tools.laplacian_edges(np.full((224, 224, 3), 200, np.uint8))
    assert out.stats == {"sharpness": 0.0, "edge_density": 0.0}
    assert not out.image.any()


@pytest.mark.parametrize("step, density", [(4, 0.0), (6, 2 / 224), (100, 2 / 224)])
def test_laplacian_edge_density_counts_responses_above_20_gray_levels(step, density):
    img = np.full((224, 224, 3), 100, np.uint8)
    img[:, 112:] = 100 + step
    # OpenCV's 3x3-aperture Laplacian is [[2,0,2],[0,-8,0],[2,0,2]]: a vertical step of s gray levels
    # gives a response of 4s on the two columns beside it (16 < 20 for s=4, 24 > 20 for s=6)
    stats = tools.laplacian_edges(img).stats
    assert stats["edge_density"] == pytest.approx(density)
    assert stats["sharpness"] > 0.0


def test_laplacian_map_lights_up_on_a_straight_edge():
    img = np.zeros((224, 224, 3), np.uint8)
    img[:, 112:] = 255  # a vertical border, like a paper edge
    out = tools.laplacian_edges(img).image
    assert out[:, 111:113].min() == 255
    assert out[:, :100].max() == 0 and out[:, 125:].max() == 0


# --- HOG ------------------------------------------------------------------------------------------
def _angle_between(a: float, b: float) -> float:
    d = abs(a - b) % 180.0
    return min(d, 180.0 - d)


def test_hog_dominant_orientation_differs_for_vertical_and_horizontal_stripes():
    vertical = tools.hog_visualization(_stripes(vertical=True)).stats
    horizontal = tools.hog_visualization(_stripes(vertical=False)).stats
    # gradients are across the stripes: ~0 deg for vertical stripes, ~90 deg for horizontal ones
    assert _angle_between(vertical["dominant_orientation_deg"], 0.0) <= 20.0
    assert _angle_between(horizontal["dominant_orientation_deg"], 90.0) <= 20.0
    assert _angle_between(vertical["dominant_orientation_deg"], horizontal["dominant_orientation_deg"]) >= 60.0


def test_hog_entropy_is_low_for_one_direction_and_high_for_a_face(crop):
    stripes = tools.hog_visualization(_stripes(vertical=False)).stats
    face = tools.hog_visualization(crop).stats
    assert stripes["orientation_entropy"] < 1.5
    assert face["orientation_entropy"] > 2.5
    assert face["orientation_entropy"] <= math.log2(9) + 1e-6


def test_hog_glyphs_follow_the_edges():
    # horizontal stripes have horizontal edges, so each cell's glyph is a horizontal line: the
    # brightness changes from row to row but hardly from column to column.
    vis = tools.hog_visualization(_stripes(vertical=False)).image.astype(float)
    cell = vis[8:16, 8:16]
    assert cell.max() > 0
    assert cell.mean(axis=0).std() < cell.mean(axis=1).std()


def test_hog_glyphs_appear_where_the_gradients_are():
    img = np.zeros((224, 224, 3), np.uint8)
    img[:112, 112:] = _stripes(vertical=True)[:112, 112:]  # structure only in the top-right quadrant
    vis = tools.hog_visualization(img).image.astype(float)
    top_right = vis[8:104, 120:216].mean()
    assert top_right > 20
    assert vis[120:216, 8:104].max() == 0  # bottom-left is flat: no glyphs
    assert vis[8:104, 8:104].max() == 0 and vis[120:216, 120:216].max() == 0


def test_hog_handles_sizes_that_are_not_a_multiple_of_the_cell(crop):
    img = np.ascontiguousarray(crop[:100, :100])
    out = tools.hog_visualization(img)
    assert out.image.shape == (100, 100) and out.image.dtype == np.uint8


def test_hog_refuses_an_image_smaller_than_one_cell():
    with pytest.raises(ValueError, match="HOG cell"):
        tools.hog_visualization(np.zeros((5, 5, 3), np.uint8))

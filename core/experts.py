"""The networks of the offline policy, loaded from small safetensors files in ``assets/experts``.

- The RGB network sees the face crop (or a zoomed region of it) and gives the fast answer. It is a
  linear probe on frozen ImageNet-pretrained MobileNetV2 features (:mod:`core.backbones`): networks
  trained on a few thousand faces, from scratch or fine-tuned, learn the camera, not the attack.
- One expert per visual tool (paper §3.1.2, App. A.3, Fig. S9) sees only its tool's output image (never
  the RGB face) and predicts P(spoof trace): a small CNN.

Every network outputs one logit; its Platt calibration was fitted on scores of capture domains it was
not trained on (leave-one-domain-out), so that calibrated probabilities mean the same on a new camera.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import ASSETS_DIR
from .backbones import IMAGENET_MEAN, IMAGENET_STD, MobileNetV2
from .errors import WeightsError
from .evidence import sigmoid
from .registry import SPECS

EXPERT_TOOLS = [s.name for s in SPECS if s.has_expert]  # the paper trains no ZoomIn expert
RGB = "RGB"  # key of the RGB face classifier in the bank
ZOOM = "ZoomInTool"  # evidence key of the RGB network on the zoomed region (experts.json "zoom")
DEFAULT_DIR = ASSETS_DIR / "experts"
CROP_SIZE = 224
FORMAT = 2


class ExpertCNN(nn.Module):
    """Fig. S9: conv blocks, each halving the resolution (stride or max-pool), then an MLP of two
    linear layers with a ReLU. The first conv (5x5, stride 2) reads the full-resolution tool output, so
    fine print/screen texture reaches the network, at ~2 ms per image on one CPU thread."""

    def __init__(
        self, in_channels: int = 1, widths: tuple[int, ...] = (8, 16, 32, 64), pool: int = 1, hidden: int = 64
    ):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(widths[-1] * pool * pool, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N,) spoof logits."""
        return self.mlp(self.pool(self.features(x))).squeeze(1)


class FaceNet(nn.Module):
    """The RGB network: a linear probe on frozen ImageNet features. The first ``blocks`` blocks of
    MobileNetV2 (ImageNet weights, never changed here), the mean and standard deviation over space of
    the outputs of blocks ``taps``, and one linear layer to the spoof logit.

    Why frozen: measured leave-one-domain-out on ten capture domains, fine-tuning the whole network
    learned the training cameras (mean AUC 0.83) where a linear probe on mid-level features did not
    (0.89); Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
    Out-of-Distribution", ICLR 2022."""

    def __init__(self, blocks: int = 11, taps: tuple[int, ...] = (7, 11)):
        super().__init__()
        if not taps or max(taps) > blocks:
            raise ValueError(f"taps {taps} must name blocks 1..{blocks}")
        self.trunk = MobileNetV2(blocks=blocks)
        self.trunk.classifier = nn.Identity()  # the ImageNet head is not used
        self.taps = tuple(sorted(taps))
        self.head = nn.Linear(sum(2 * _block_channels(self.trunk, t) for t in self.taps), 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W), ImageNet-normalised -> (N, D) pooled statistics of the tapped blocks."""
        pooled = []
        for i, block in enumerate(self.trunk.features, start=1):
            x = block(x)
            if i in self.taps:
                pooled += [x.mean((2, 3)), x.std((2, 3))]
            if i == self.taps[-1]:
                break
        return torch.cat(pooled, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W), ImageNet-normalised -> (N,) spoof logits."""
        return self.head(self.features(x)).squeeze(1)


def _block_channels(net: MobileNetV2, block: int) -> int:
    convs = [m for m in net.features[block - 1].modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


@dataclass(frozen=True)
class NetSpec:
    """What a network is, as recorded in experts.json: enough to rebuild it and feed it."""

    kind: str  # "mobilenet_v2" (RGB network) or "cnn" (tool expert)
    input_size: int  # side of the square input
    options: dict = field(default_factory=dict)  # FaceNet: blocks, taps; ExpertCNN: in_channels, widths, pool, hidden

    def build(self) -> nn.Module:
        if self.kind == "mobilenet_v2":
            return FaceNet(int(self.options.get("blocks", 11)), tuple(self.options.get("taps", (7, 11))))
        if self.kind == "cnn":
            opts = dict(self.options)
            if "widths" in opts:
                opts["widths"] = tuple(opts["widths"])
            return ExpertCNN(**opts)
        raise WeightsError(f"unknown network kind {self.kind!r}")

    @property
    def wants_rgb(self) -> bool:
        return self.kind == "mobilenet_v2" or self.options.get("in_channels", 1) == 3

    def tensor(self, images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
        """uint8 images (RGB crops or tool outputs, any size) -> the network's input batch."""
        batch = np.stack([self._fit(im) for im in images])
        if batch.ndim == 3:
            batch = batch[..., None]
        t = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
        if self.kind == "mobilenet_v2":
            return (t - _MEAN) / _STD
        return t.mul_(2.0).sub_(1.0)

    def _fit(self, image: np.ndarray) -> np.ndarray:
        if image.ndim == 3 and not self.wants_rgb:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if image.ndim == 2 and self.wants_rgb:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.shape[:2] != (self.input_size, self.input_size):
            interp = cv2.INTER_AREA if max(image.shape[:2]) > self.input_size else cv2.INTER_CUBIC
            image = cv2.resize(image, (self.input_size, self.input_size), interpolation=interp)
        return np.ascontiguousarray(image)


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


RGB_BLOCKS, RGB_TAPS = 11, (7, 11)  # chosen leave-one-domain-out among blocks 2..19 (README, Shipped weights)


def network_spec(key: str, rgb_size: int = 128) -> NetSpec:
    """The architecture used for each key (recorded in experts.json, so loading needs no code change)."""
    if key == RGB:
        return NetSpec("mobilenet_v2", rgb_size, {"blocks": RGB_BLOCKS, "taps": list(RGB_TAPS)})
    return NetSpec(
        "cnn",
        CROP_SIZE,
        {"in_channels": 1, "widths": [8, 16, 32, 64], "pool": 4 if key == "FFTTool" else 1, "hidden": 64},
    )


@dataclass
class Calibration:
    """Platt scaling of one network's logit, fitted on out-of-domain scores: p = sigmoid(a * logit + b).
    ``mu``/``sigma`` describe the calibrated logit per class (index 0 real, 1 spoof) and ``auc`` its
    leave-one-domain-out AUC."""

    a: float = 1.0
    b: float = 0.0
    mu: tuple[float, float] = (-2.0, 2.0)
    sigma: tuple[float, float] = (1.5, 1.5)
    auc: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(
            d.get("a", 1.0),
            d.get("b", 0.0),
            tuple(d.get("mu", (-2, 2))),
            tuple(d.get("sigma", (1.5, 1.5))),
            d.get("auc"),
        )

    def apply(self, raw: np.ndarray | float) -> np.ndarray | float:
        return self.a * raw + self.b


@dataclass
class ExpertBank:
    """The RGB network and one expert per non-zoom tool, with their out-of-domain calibration."""

    nets: dict[str, nn.Module]
    specs: dict[str, NetSpec]
    calibration: dict[str, Calibration]  # per network key, plus ZOOM: the RGB network on the zoomed region
    meta: dict = field(default_factory=dict)  # recipe, data, LODO results, evidence model, threshold
    version: str = ""

    @classmethod
    def load(cls, folder: str | Path | None = None) -> ExpertBank:
        folder = Path(folder) if folder else DEFAULT_DIR
        meta_path = folder / "experts.json"
        if not meta_path.exists():
            raise WeightsError(
                f"no expert weights at {folder} (missing experts.json); train them with `tarfas train experts`"
            )
        try:
            meta = json.loads(meta_path.read_text())
            networks = meta["networks"]
            if meta.get("format") != FORMAT:
                raise KeyError(f"format {meta.get('format')!r}, expected {FORMAT}")
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise WeightsError(f"{meta_path} is not a valid experts.json ({type(exc).__name__}: {exc})") from exc
        nets, specs, cal = {}, {}, {}
        digest = hashlib.sha256(meta_path.read_bytes())  # calibration and threshold are part of the version
        for key, entry in networks.items():
            path = folder / entry["file"]
            if not path.exists():
                raise WeightsError(f"missing weights file {path}")
            digest.update(path.read_bytes())
            try:
                spec = NetSpec(**entry["arch"])
                net = spec.build()
            except (TypeError, ValueError) as exc:
                raise WeightsError(f"experts.json describes the {key} network wrongly: {exc}") from exc
            try:
                state = load_file(str(path))
            except Exception as exc:  # safetensors raises its own SafetensorError for corrupt files
                raise WeightsError(f"{path} is not a readable safetensors file ({exc})") from exc
            try:
                net.load_state_dict(state)
            except RuntimeError as exc:
                raise WeightsError(f"{path} does not match the {key} network: {exc}") from exc
            nets[key], specs[key] = net.eval(), spec
            cal[key] = Calibration.from_dict(entry.get("calibration", {}))
        if ZOOM in meta.get("zoom", {}):
            cal[ZOOM] = Calibration.from_dict(meta["zoom"][ZOOM])
        return cls(nets, specs, cal, meta, digest.hexdigest()[:12])

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        networks = {}
        for key, net in self.nets.items():
            fname = f"{key.lower()}.safetensors"
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / fname))
            networks[key] = {
                "file": fname,
                "arch": asdict(self.specs[key]),
                "calibration": asdict(self.calibration.get(key, Calibration())),
            }
        meta = dict(self.meta, format=FORMAT, networks=networks)
        if ZOOM in self.calibration:
            meta["zoom"] = dict(meta.get("zoom", {}), **{ZOOM: asdict(self.calibration[ZOOM])})
        path = folder / "experts.json"
        path.write_text(json.dumps(meta, indent=2))
        return path

    # --- inference --------------------------------------------------------------------------------
    @torch.inference_mode()
    def raw_logits(self, key: str, images: np.ndarray | list[np.ndarray], batch: int = 64) -> np.ndarray:
        """Uncalibrated logits of one network for a batch of images (RGB crops or tool outputs)."""
        if key not in self.nets:
            raise KeyError(f"no expert for {key!r}")
        net, spec = self.nets[key], self.specs[key]
        return np.concatenate(
            [net(spec.tensor(images[i : i + batch])).numpy() for i in range(0, len(images), batch)]
        ).astype(np.float64)

    def reads(self, key: str) -> bool:
        """Whether the bank can read ``key``: a network of its own, or a view of the face (the zoomed
        region) that the RGB network reads with the view's own calibration."""
        return key in self.nets or (key in self.calibration and RGB in self.nets)

    def logit(self, key: str, image: np.ndarray) -> float:
        """Calibrated logit of P(spoof) for one image: a tool output for a tool key, the RGB crop for
        RGB, a view of the face (ZOOM: the zoomed region) for a calibrated key without a network of its
        own (the RGB network with the view's own calibration)."""
        if not self.reads(key):
            raise KeyError(f"no expert for {key!r}")
        net_key = key if key in self.nets else RGB
        return float(self.calibration[key].apply(self.raw_logits(net_key, [image])[0]))

    def view_args(self, key: str) -> dict:
        """The tool arguments a view's calibration was fitted with (the zoom box), {} for other keys."""
        zoom = self.meta.get("zoom", {})
        return {"bbox": list(zoom["bbox"])} if key == ZOOM and "bbox" in zoom else {}

    def p_spoof(self, key: str, image: np.ndarray) -> float | None:
        """Calibrated P(spoof trace) of a tool image; None for tools without an expert (ZoomInTool)."""
        if key not in self.nets:
            return None
        return sigmoid(self.logit(key, image))

    # --- what a calibration profile reads (core.calibration) ---------------------------------------
    @property
    def features_source(self) -> str:
        """Names the feature space of :meth:`features`: the RGB network of this version of the bank."""
        return f"expert-rgb@{self.version}"

    def features(self, image: np.ndarray) -> np.ndarray:
        """The RGB network's features of one 224x224 face crop: the pooled frozen ImageNet features its
        linear probe reads (float64, shape (D,))."""
        with torch.inference_mode():
            return self.nets[RGB].features(self.specs[RGB].tensor([image])).numpy()[0].astype(np.float64)

    @torch.inference_mode()
    def logit_of_features(self, features: np.ndarray) -> float:
        """The calibrated RGB logit of a crop from its :meth:`features` (the same as ``logit(RGB, crop)``:
        the network's head on those features), so a caller that needs both runs the network once."""
        x = torch.from_numpy(np.asarray(features, dtype=np.float32))[None]
        return float(self.calibration[RGB].apply(float(self.nets[RGB].head(x)[0, 0])))

"""The networks of the offline policy, loaded from small safetensors files in ``assets/experts``.

- The RGB network sees the face crop (or a zoomed region of it) and gives the fast answer. It is the
  average of three linear probes on frozen features: two ImageNet-pretrained trunks (MobileNetV2 and
  EfficientNet-Lite0, :mod:`core.backbones`; networks trained on a few thousand faces, from scratch or
  fine-tuned, learn the camera, not the attack) and colour texture (:mod:`core.texture`).
- One expert per visual tool (paper §3.1.2, App. A.3, Fig. S9) sees only its tool's output image (never
  the RGB face) and predicts P(spoof trace): a small CNN.

Every network outputs one logit; its Platt calibration was fitted on scores of capture domains it was
not trained on (leave-one-domain-out), so that calibrated probabilities mean the same on a new camera.
"""

from __future__ import annotations

import copy
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
from .backbones import IMAGENET_MEAN, IMAGENET_STD, LITE_MEAN, LITE_STD, EfficientNetLite0, MobileNetV2
from .errors import WeightsError
from .evidence import sigmoid
from .registry import SPECS
from .texture import colour_lbp_histograms

EXPERT_TOOLS = [s.name for s in SPECS if s.has_expert]  # the paper trains no ZoomIn expert
RGB = "RGB"  # key of the RGB face classifier in the bank
ZOOM = "ZoomInTool"  # evidence key of the RGB network on the zoomed region (experts.json "zoom")
DEFAULT_DIR = ASSETS_DIR / "experts"
CROP_SIZE = 224
FORMAT = 4  # 4: a trunk may be hand-made colour texture; 3: several frozen ImageNet trunks
READABLE_FORMATS = (2, 3, 4)  # 2: one MobileNetV2 trunk (state keys "trunk.*", renamed on load)
PROBE_KINDS = ("probe", "mobilenet_v2")


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


# The pretrained trunks a probe can read: builder (blocks kept) and the input scaling its weights expect.
TRUNK_ARCHS = {
    "mobilenet_v2": (lambda blocks: MobileNetV2(blocks=blocks), IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_lite0": (lambda blocks: EfficientNetLite0(blocks=blocks), LITE_MEAN, LITE_STD),
}


class FrozenTrunk(nn.Module):
    """A pretrained trunk cut after its last tapped block: RGB in [0, 1] -> the mean and standard
    deviation over space of the outputs of blocks ``taps`` (1-based), concatenated."""

    def __init__(self, arch: str, taps: tuple[int, ...]):
        super().__init__()
        if arch not in TRUNK_ARCHS:
            raise ValueError(f"unknown trunk {arch!r}; expected one of {', '.join(TRUNK_ARCHS)}")
        build, mean, std = TRUNK_ARCHS[arch]
        if not taps or min(taps) < 1:
            raise ValueError(f"taps {taps} must name blocks from 1")
        self.arch, self.taps = arch, tuple(sorted(taps))
        self.net = build(self.taps[-1])
        if isinstance(self.net, MobileNetV2):
            self.net.classifier = nn.Identity()  # the ImageNet head is not used
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.net.eval()
        with torch.no_grad():
            self.dim = self.forward(torch.zeros(1, 3, 64, 64)).shape[1]

    def train(self, mode: bool = True) -> FrozenTrunk:
        """The trunk stays in inference mode: its batch-norm statistics are ImageNet's."""
        super().train(mode)
        self.net.eval()
        return self

    def fuse(self) -> FrozenTrunk:
        """Run a copy with every batch norm folded into the convolution before it (the trunk is frozen,
        so this is exact up to rounding and saves a pass over every feature map), in channels-last
        memory (faster depthwise convolutions on a CPU: 8.2 -> 6.9 ms for Lite0 at 128 px, one thread).
        The copy is kept outside the module's state: ``state_dict()`` stays the pretrained weights."""
        fused = _fold_batch_norms(copy.deepcopy(self.net).eval()).to(memory_format=torch.channels_last)
        object.__setattr__(self, "_fused", fused)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.__dict__.get("_fused")
        if net is None:
            net = self.net
        else:
            x = x.contiguous(memory_format=torch.channels_last)
        pooled = []
        for i, out in enumerate(net.stages((x - self.mean) / self.std), start=1):
            if i in self.taps:
                pooled += [out.mean((2, 3)), out.std((2, 3))]
            if i == self.taps[-1]:
                break
        return torch.cat(pooled, 1)


class ColourTextureTrunk(nn.Module):
    """A trunk without weights: the colour LBP histograms of the face (:func:`core.texture.
    colour_lbp_histograms`), which a probe reads as it reads the ImageNet trunks' features. It errs on
    other cameras than the ImageNet trunks do (dark webcams, tight crops), so their average ranks
    held-out cameras better than either (README, How the recipe was chosen)."""

    arch = "colour_lbp"
    taps: tuple[int, ...] = ()

    def __init__(self, size: int = 64, radii: tuple[int, ...] = (1, 2)):
        super().__init__()
        self.size, self.radii = int(size), tuple(int(r) for r in radii)
        self.dim = colour_lbp_histograms(np.zeros((self.size, self.size, 3), np.uint8), self.size, self.radii).size

    def fuse(self) -> ColourTextureTrunk:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> (N, dim) histograms (the uint8 pixels the tensor was made from)."""
        images = x.detach().mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return torch.from_numpy(np.stack([colour_lbp_histograms(im, self.size, self.radii) for im in images]))


def make_trunk(spec: dict) -> nn.Module:
    """A trunk from its entry in experts.json: ``{"arch", "taps"}`` for an ImageNet trunk,
    ``{"arch": "colour_lbp", "size", "radii"}`` for colour texture."""
    arch = spec.get("arch")
    if arch == ColourTextureTrunk.arch:
        return ColourTextureTrunk(spec.get("size", 64), tuple(spec.get("radii", (1, 2))))
    if arch not in TRUNK_ARCHS:
        raise ValueError(
            f"unknown trunk {arch!r}; expected one of {', '.join([*TRUNK_ARCHS, ColourTextureTrunk.arch])}"
        )
    return FrozenTrunk(arch, tuple(spec.get("taps", ())))


def _fold_batch_norms(module: nn.Module) -> nn.Module:
    """Fold each BatchNorm2d registered right after a Conv2d into it (inference only), in place."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    previous: tuple[str, nn.Module] | None = None
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d) and previous is not None and isinstance(previous[1], nn.Conv2d):
            setattr(module, previous[0], fuse_conv_bn_eval(previous[1], child))
            setattr(module, name, nn.Identity())
        else:
            _fold_batch_norms(child)
        previous = (name, child)
    return module


class FaceNet(nn.Module):
    """The RGB network: linear probes on frozen features. Each ImageNet trunk (weights never changed
    here) gives pooled statistics of some of its blocks, the colour texture trunk LBP histograms; one
    linear layer maps all of them to the spoof logit. Training fits one probe per trunk and averages
    them into that layer.

    Why frozen: measured leave-one-domain-out on ten capture domains, fine-tuning the whole network
    learned the training cameras (mean AUC 0.83) where a linear probe on mid-level features did not
    (0.89); Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
    Out-of-Distribution", ICLR 2022. Why several trunks: probes on different features err on different
    cameras, and their average ranked better on held-out domains than any one (README)."""

    def __init__(self, trunks: list[dict]):
        super().__init__()
        if not trunks:
            raise ValueError("the RGB network needs at least one trunk")
        self.trunks = nn.ModuleList(make_trunk(t) for t in trunks)
        self.head = nn.Linear(sum(t.dim for t in self.trunks), 1)

    @property
    def slices(self) -> list[slice]:
        """Where each trunk's features sit in :meth:`features`' output."""
        edges = np.cumsum([0] + [t.dim for t in self.trunks])
        return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> (N, D) every trunk's features (pooled statistics of the ImageNet
        trunks' tapped blocks, colour texture histograms), in trunk order."""
        return torch.cat([t(x) for t in self.trunks], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> (N,) spoof logits."""
        return self.head(self.features(x)).squeeze(1)

    def fuse(self) -> FaceNet:
        """Fold the trunks' batch norms for inference (:meth:`FrozenTrunk.fuse`)."""
        for trunk in self.trunks:
            trunk.fuse()
        return self


@dataclass(frozen=True)
class NetSpec:
    """What a network is, as recorded in experts.json: enough to rebuild it and feed it."""

    kind: str  # "probe" (RGB network) or "cnn" (tool expert)
    input_size: int  # side of the square input
    options: dict = field(default_factory=dict)  # FaceNet: trunks; ExpertCNN: in_channels, widths, pool, hidden

    def build(self) -> nn.Module:
        if self.kind == "probe":
            return FaceNet(list(self.options.get("trunks", RGB_TRUNKS)))
        if self.kind == "mobilenet_v2":  # format 2: one MobileNetV2 trunk
            return FaceNet([{"arch": "mobilenet_v2", "taps": list(self.options.get("taps", (7, 11)))}])
        if self.kind == "cnn":
            opts = dict(self.options)
            if "widths" in opts:
                opts["widths"] = tuple(opts["widths"])
            return ExpertCNN(**opts)
        raise WeightsError(f"unknown network kind {self.kind!r}")

    @property
    def wants_rgb(self) -> bool:
        return self.kind in PROBE_KINDS or self.options.get("in_channels", 1) == 3

    def tensor(self, images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
        """uint8 images (RGB crops or tool outputs, any size) -> the network's input batch."""
        batch = np.stack([self._fit(im) for im in images])
        if batch.ndim == 3:
            batch = batch[..., None]
        t = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
        if self.kind in PROBE_KINDS:
            return t  # each trunk scales its input as its weights expect
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


# Chosen leave-one-domain-out: MobileNetV2 blocks 7 + 11 among blocks 2..19, EfficientNet-Lite0 block 15
# among 3..16, HSV LBP at 64 px among 32..224 px and RGB / HSV / YCbCr (README, How the recipe was chosen).
RGB_TRUNKS = (
    {"arch": "mobilenet_v2", "taps": [7, 11]},
    {"arch": "efficientnet_lite0", "taps": [15]},
    {"arch": "colour_lbp", "size": 64, "radii": [1, 2]},
)


def network_spec(key: str, rgb_size: int = 128) -> NetSpec:
    """The architecture used for each key (recorded in experts.json, so loading needs no code change)."""
    if key == RGB:
        return NetSpec("probe", rgb_size, {"trunks": [dict(t) for t in RGB_TRUNKS]})
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
            if meta.get("format") not in READABLE_FORMATS:
                raise KeyError(f"format {meta.get('format')!r}, expected one of {READABLE_FORMATS}")
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
            if spec.kind == "mobilenet_v2":
                state = {k.replace("trunk.", "trunks.0.net.", 1): v for k, v in state.items()}
            try:
                net.load_state_dict(state)
            except RuntimeError as exc:
                raise WeightsError(f"{path} does not match the {key} network: {exc}") from exc
            if isinstance(net, FaceNet):
                net.fuse()  # loaded banks only infer
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
        """The RGB network's features of one 224x224 face crop: what its linear probes read, the pooled
        frozen ImageNet features and the colour texture histograms (float64, shape (D,))."""
        with torch.inference_mode():
            return self.nets[RGB].features(self.specs[RGB].tensor([image])).numpy()[0].astype(np.float64)

    @torch.inference_mode()
    def logit_of_features(self, features: np.ndarray) -> float:
        """The calibrated RGB logit of a crop from its :meth:`features` (the same as ``logit(RGB, crop)``:
        the network's head on those features), so a caller that needs both runs the network once."""
        x = torch.from_numpy(np.asarray(features, dtype=np.float32))[None]
        return float(self.calibration[RGB].apply(float(self.nets[RGB].head(x)[0, 0])))

"""Per-tool expert networks (paper §3.1.2, App. A.3, Fig. S9) and the RGB classifier of the offline
policy, loaded from small safetensors files in ``assets/experts``.

An expert sees only its tool's output image (never the RGB face) and predicts P(spoof trace). The RGB
network sees the face crop (or a zoomed region of it) and gives the fast answer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import ASSETS_DIR
from .errors import WeightsError
from .registry import TOOL_NAMES

EXPERT_TOOLS = [n for n in TOOL_NAMES if n != "ZoomInTool"]  # the paper trains no ZoomIn expert
RGB = "RGB"  # key of the RGB face classifier in the bank
DEFAULT_DIR = ASSETS_DIR / "experts"
INPUT_SIZE = 224
# Calibrated logits are clipped to +-6 (P within 0.25%..99.75%): calibration data come from the training
# domains, and no in-domain certainty should survive a change of camera or attack.
LOGIT_CLIP = 6.0


class ExpertCNN(nn.Module):
    """Fig. S9: conv blocks, each halving the resolution (stride or max-pool), then an MLP of two
    linear layers with a ReLU. The first conv (5x5, stride 2) reads the full-resolution tool output, so
    fine print/screen texture reaches the network, at ~4 ms per image on one CPU thread."""

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (8, 16, 32, 64), pool: int = 1, hidden: int = 64):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * pool * pool, hidden), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, 224, 224) in [-1, 1] -> (N,) spoof logits."""
        return self.mlp(self.pool(self.features(x))).squeeze(1)


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """uint8 batch (N, H, W) or (N, H, W, 3) -> float tensor (N, C, H, W) in [-1, 1]."""
    if batch.ndim == 3:
        batch = batch[..., None]
    t = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
    return t.div_(127.5).sub_(1.0)


@dataclass
class Calibration:
    """Platt scaling of one network's logit, fitted on dev data: p = sigmoid(a * logit + b).
    ``mu``/``sigma`` describe the calibrated logit per class on dev (index 0 real, 1 spoof): the
    expert policy uses them to choose the most informative next tool."""

    a: float = 1.0
    b: float = 0.0
    mu: tuple[float, float] = (-2.0, 2.0)
    sigma: tuple[float, float] = (1.5, 1.5)
    dev_auc: float | None = None


@dataclass
class ExpertBank:
    """The RGB classifier and one expert per non-zoom tool, with their dev calibration."""

    nets: dict[str, ExpertCNN]
    calibration: dict[str, Calibration]
    meta: dict = field(default_factory=dict)  # recipe, data, dev metrics, fusion parameters, threshold
    version: str = ""

    @classmethod
    def load(cls, folder: str | Path | None = None) -> ExpertBank:
        folder = Path(folder) if folder else DEFAULT_DIR
        meta_path = folder / "experts.json"
        if not meta_path.exists():
            raise WeightsError(f"no expert weights at {folder} (missing experts.json); train them with `tarfas train experts`")
        try:
            meta = json.loads(meta_path.read_text())
            networks = meta["networks"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise WeightsError(f"{meta_path} is not a valid experts.json ({type(exc).__name__}: {exc})") from exc
        nets, cal = {}, {}
        digest = hashlib.sha256(meta_path.read_bytes())  # calibration and threshold are part of the version
        for key, spec in networks.items():
            path = folder / spec["file"]
            if not path.exists():
                raise WeightsError(f"missing weights file {path}")
            digest.update(path.read_bytes())
            net = ExpertCNN(**spec["arch"])
            try:
                state = load_file(str(path))
            except Exception as exc:  # safetensors raises its own SafetensorError for corrupt files
                raise WeightsError(f"{path} is not a readable safetensors file ({exc})") from exc
            try:
                net.load_state_dict(state)
            except RuntimeError as exc:
                raise WeightsError(f"{path} does not match the {key} network: {exc}") from exc
            net.arch = spec["arch"]
            nets[key] = net.eval()
            c = spec.get("calibration", {})
            cal[key] = Calibration(c.get("a", 1.0), c.get("b", 0.0), tuple(c.get("mu", (-2, 2))), tuple(c.get("sigma", (1.5, 1.5))), c.get("dev_auc"))
        return cls(nets, cal, meta, digest.hexdigest()[:12])

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        networks = {}
        for key, net in self.nets.items():
            fname = f"{key.lower()}.safetensors"
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / fname))
            c = self.calibration.get(key, Calibration())
            networks[key] = {"file": fname, "arch": getattr(net, "arch", {}), "calibration": {"a": c.a, "b": c.b, "mu": list(c.mu), "sigma": list(c.sigma), "dev_auc": c.dev_auc}}
        meta = dict(self.meta, networks=networks)
        path = folder / "experts.json"
        path.write_text(json.dumps(meta, indent=2))
        return path

    # --- inference --------------------------------------------------------------------------------
    @torch.inference_mode()
    def logit(self, key: str, image: np.ndarray, calibration: Calibration | None = None) -> float:
        """Calibrated, clipped logit of P(spoof) for one image (tool output for a tool key, RGB crop for
        RGB). ``calibration`` overrides the network's own (the policy's zoomed RGB view has its own)."""
        if key not in self.nets:
            raise KeyError(f"no expert for {key!r}")
        raw = float(self.nets[key](to_tensor(_fit(image, self.nets[key])[None]))[0])
        c = calibration or self.calibration[key]
        return float(np.clip(c.a * raw + c.b, -LOGIT_CLIP, LOGIT_CLIP))

    def p_spoof(self, key: str, image: np.ndarray) -> float | None:
        """Calibrated P(spoof trace); None for tools without an expert (ZoomInTool)."""
        if key not in self.nets:
            return None
        return float(1.0 / (1.0 + np.exp(-self.logit(key, image))))


def _fit(image: np.ndarray, net: ExpertCNN) -> np.ndarray:
    """Resize to the network's input size and match its channel count."""
    want_rgb = net.features[0].in_channels == 3
    if image.ndim == 3 and not want_rgb:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if image.ndim == 2 and want_rgb:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.shape[:2] != (INPUT_SIZE, INPUT_SIZE):
        interp = cv2.INTER_AREA if max(image.shape[:2]) > INPUT_SIZE else cv2.INTER_CUBIC
        image = cv2.resize(image, (INPUT_SIZE, INPUT_SIZE), interpolation=interp)
    return image


def build_network(key: str) -> ExpertCNN:
    """The architecture used for each key (recorded in experts.json so loading needs no code change)."""
    arch = {"in_channels": 3 if key == RGB else 1, "widths": [8, 16, 32, 64], "pool": 4 if key == "FFTTool" else 1, "hidden": 64}
    net = ExpertCNN(**{**arch, "widths": tuple(arch["widths"])})
    net.arch = arch
    return net

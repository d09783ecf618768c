"""Train the offline policy's networks: the RGB face classifier and one expert per visual tool
(paper §3.1.2, App. A.3: tool output only -> P(spoof trace); Adam, lr 1e-3, 10 epochs).

Recipe (``tarfas train experts``):
1. Read the manifest, keep the training domains/split, split by capture group (subject) into train and
   dev, so near-duplicate frames of one capture never straddle the split.
2. Detect and crop faces (224x224). Make ``views`` augmented copies of each training crop (crop scale,
   flips, light, blur, resolution loss, JPEG, noise: the nuisances that change between capture setups)
   and run every tool on every view, so each expert learns from its tool's real output.
3. Train each network; Platt-calibrate it on dev; fit the per-class logit statistics that the policy
   uses to pick informative tools.
4. Run the full expert policy on dev and fix its decision threshold at the dev EER. Save safetensors +
   ``experts.json`` (recipe, data hashes, dev metrics, threshold).
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
import re
import time
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from core import faces
from core.experts import EXPERT_TOOLS, LOGIT_CLIP, RGB, Calibration, ExpertBank, build_network, to_tensor
from core.manifest import ManifestRow, read_manifest, select
from core.registry import ToolRegistry

from .configs import ExpertTrainConfig

ZOOM_BOX = (56, 72, 168, 184)  # cheeks-nose region of the 224 crop, used by the policy's ZoomInTool


def augment(crop: np.ndarray, rng: random.Random) -> np.ndarray:
    """A random capture-condition change of a 224x224 RGB crop."""
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


def split_dev(rows: list[ManifestRow], cfg: ExpertTrainConfig) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """Train/dev split: by ``dev_pattern`` when it matches anything, else by capture groups."""
    if cfg.dev_pattern:
        pattern = re.compile(cfg.dev_pattern)
        dev = [r for r in rows if pattern.search(r.rel_path)]
        train = [r for r in rows if not pattern.search(r.rel_path)]
        if {r.y for r in dev} == {0, 1} and {r.y for r in train} == {0, 1}:
            return train, dev
        print(f"dev_pattern {cfg.dev_pattern!r} does not leave both classes on each side; holding out capture groups instead")
    return split_groups(rows, cfg.dev_fraction, cfg.seed)


def split_groups(rows: list[ManifestRow], dev_fraction: float, seed: int) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """Hold out whole capture groups; each side keeps both classes when the data allow."""
    groups = sorted({r.group for r in rows})
    rng = random.Random(seed)
    for _ in range(100):
        rng.shuffle(groups)
        n_dev = max(1, round(len(groups) * dev_fraction))
        dev_groups = set(groups[:n_dev])
        train = [r for r in rows if r.group not in dev_groups]
        dev = [r for r in rows if r.group in dev_groups]
        if {r.y for r in train} == {0, 1} and {r.y for r in dev} == {0, 1}:
            return train, dev
    raise ValueError("cannot split the training rows into train and dev with both classes on each side")


def _crops(rows: list[ManifestRow], desc: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    crops, ys, skipped = [], [], []
    for r in tqdm(rows, desc=desc, unit="img", leave=False):
        try:
            crop = faces.prepare_face(faces.load_image(r.path), on_no_face="whole").crop
        except faces.InputImageError as exc:
            skipped.append(f"{r.rel_path}: {exc}")
            continue
        crops.append(crop)
        ys.append(r.y)
    return np.stack(crops), np.asarray(ys, np.float32), skipped


def _tool_views(crops: np.ndarray, registry: ToolRegistry) -> dict[str, np.ndarray]:
    out = {RGB: crops}
    for name in EXPERT_TOOLS:
        out[name] = np.stack([registry.execute(name, {}, c).output.image for c in crops])
    return out


def _train_one(key: str, x: np.ndarray, y: np.ndarray, cfg: ExpertTrainConfig, progress: tqdm) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    net = build_network(key)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    pos_weight = torch.tensor((y == 0).sum() / max(1.0, (y == 1).sum()))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    gen = np.random.default_rng(cfg.seed)
    for epoch in range(cfg.epochs):
        net.train()
        order = gen.permutation(len(x))
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if len(idx) < 2:
                continue
            xb, yb = to_tensor(x[idx]), torch.from_numpy(y[idx])
            if key == "FFTTool":  # a spectrum is point-symmetric: a 180 degree turn is the same spectrum
                flip = torch.rand(len(idx)) < 0.5
                xb[flip] = xb[flip].flip(-1, -2)
            loss = loss_fn(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        progress.set_postfix(net=key, epoch=epoch + 1, loss=f"{total / len(x):.3f}")
    return net.eval()


@torch.inference_mode()
def _logits(net: torch.nn.Module, x: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([net(to_tensor(x[i : i + batch])).numpy() for i in range(0, len(x), batch)])


def _calibrate(raw: np.ndarray, y: np.ndarray) -> Calibration:
    """Platt scaling with Platt's smoothed targets (N+ + 1)/(N+ + 2) and 1/(N- + 2), which keep the
    slope finite when dev data are separable (Platt, "Probabilistic outputs for support vector
    machines", 1999, §2.2): each sample enters once per class, weighted by its target."""
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    target = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    x2 = np.concatenate([raw, raw])[:, None]
    y2 = np.concatenate([np.ones_like(raw), np.zeros_like(raw)])
    w2 = np.concatenate([target, 1 - target])
    lr = LogisticRegression(C=1e4).fit(x2, y2, sample_weight=w2)
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    cal = np.clip(a * raw + b, -LOGIT_CLIP, LOGIT_CLIP)
    mu = (float(cal[y == 0].mean()), float(cal[y == 1].mean()))
    sigma = (float(cal[y == 0].std() + 0.25), float(cal[y == 1].std() + 0.25))
    return Calibration(a, b, mu, sigma, float(roc_auc_score(y, raw)))


def _evidence_model(cal: dict[str, Calibration], raw: dict[str, np.ndarray], y: np.ndarray) -> dict:
    """Per-class joint Gaussian of all calibrated logits on dev (Ledoit-Wolf shrunk covariance). The
    policy conditions it on the evidence seen so far to value the next tool: a tool that would only
    repeat what is already known (e.g. ZoomIn after the RGB view) is worth little."""
    from sklearn.covariance import LedoitWolf

    keys = list(raw)
    x = np.stack([np.clip(cal[k].a * raw[k] + cal[k].b, -LOGIT_CLIP, LOGIT_CLIP) for k in keys], axis=1)
    model = {"keys": keys, "mean": [], "cov": []}
    for c in (0, 1):
        lw = LedoitWolf().fit(x[y == c])
        model["mean"].append(lw.location_.tolist())
        model["cov"].append((lw.covariance_ + 0.05 * np.eye(len(keys))).tolist())  # floor: no exact certainties
    return model


def _file_digest(rows: list[ManifestRow]) -> str:
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r.rel_path):
        h.update(r.rel_path.encode() + b"\0" + r.label.encode() + b"\n")
    return h.hexdigest()[:16]


def train_experts(cfg: ExpertTrainConfig) -> Path:
    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    rows = select(read_manifest(cfg.manifest), cfg.train_domains, cfg.train_split or None)
    if cfg.max_images and len(rows) > cfg.max_images:
        rows = random.Random(cfg.seed).sample(rows, cfg.max_images)
    if not rows:
        raise ValueError(f"no manifest rows for domains {cfg.train_domains} split {cfg.train_split!r}")
    train_rows, dev_rows = split_dev(rows, cfg)
    print(f"train: {len(train_rows)} images, dev: {len(dev_rows)} images")

    registry = ToolRegistry()
    keys = [RGB] + EXPERT_TOOLS
    dev_crops, y_dev, skipped_dev = _crops(dev_rows, "faces (dev)")
    dev_inputs = _tool_views(dev_crops, registry)
    dev_inputs["ZoomInTool"] = np.stack([registry.execute("ZoomInTool", {"bbox": list(ZOOM_BOX)}, c).output.image for c in dev_crops])
    if cfg.calibrate_only:
        previous = ExpertBank.load(cfg.out)
        nets, skipped, n_train = previous.nets, previous.meta.get("data", {}).get("skipped", []), previous.meta.get("data", {}).get("train_images")
        train_seconds = previous.meta.get("train_seconds")
        recipe = previous.meta.get("recipe", {})
    else:
        train_crops, y_train, skipped = _crops(train_rows, "faces (train)")
        n_train = len(train_crops)
        rng = random.Random(cfg.seed)
        views = [train_crops] + [np.stack([augment(c, rng) for c in train_crops]) for _ in range(cfg.views)]
        x_rgb = np.concatenate(views)
        y_all = np.tile(y_train, cfg.views + 1)
        print(f"computing tool outputs for {len(x_rgb)} training views ...")
        train_inputs = _tool_views(x_rgb, registry)
        nets = {}
        with tqdm(total=len(keys), desc="networks", unit="net") as progress:
            for key in keys:
                nets[key] = _train_one(key, train_inputs[key], y_all, cfg, progress)
                progress.update(1)
        train_seconds = round(time.time() - t0, 1)
        recipe = asdict(cfg)
    cal, dev_raw = {}, {}
    for key in keys:
        dev_raw[key] = _logits(nets[key], dev_inputs[key])
        cal[key] = _calibrate(dev_raw[key], y_dev)
        print(f"  {key:22s} dev AUC {cal[key].dev_auc:.4f}")
    # The policy's ZoomInTool evidence is the RGB network on the zoomed region: calibrate that view too.
    zoom_x = np.stack([cv2.resize(z, (224, 224), interpolation=cv2.INTER_CUBIC) for z in dev_inputs["ZoomInTool"]])
    dev_raw["ZoomInTool"] = _logits(nets[RGB], zoom_x)
    zoom_cal = _calibrate(dev_raw["ZoomInTool"], y_dev)
    print(f"  {'RGB on ZoomInTool':22s} dev AUC {zoom_cal.dev_auc:.4f}")
    evidence_model = _evidence_model({**cal, "ZoomInTool": zoom_cal}, dev_raw, y_dev)

    meta = {
        "format": 1,
        "description": "tarfas expert ensemble: RGB face classifier + one CNN per visual tool (paper Fig. S9)",
        "recipe": recipe,  # how the networks were trained
        "calibration_recipe": asdict(cfg),  # how they were calibrated (differs only after --calibrate-only)
        "data": {
            "manifest": str(cfg.manifest),
            "train_images": n_train,
            "dev_images": len(dev_crops),
            "train_digest": _file_digest(train_rows),
            "dev_digest": _file_digest(dev_rows),
            "skipped": skipped + skipped_dev,
        },
        "zoom": {"bbox": list(ZOOM_BOX), "calibration": asdict(zoom_cal)},
        "evidence_model": evidence_model,
        "environment": {"torch": torch.__version__, "python": platform.python_version()},
        "train_seconds": train_seconds,
    }
    bank = ExpertBank(nets, cal, meta)
    out = Path(cfg.out)
    bank.save(out)  # weights first: the policy is built from the saved files

    # Fix the decision threshold on dev with the whole policy (its adaptive tool choice included).
    from core.policies.expert import ExpertPolicy
    from core.metrics import eer_threshold, summarize

    policy = ExpertPolicy(ExpertBank.load(out), threshold=0.5)
    scores = np.array([policy.score_crop(c) for c in tqdm(dev_crops, desc="dev policy", leave=False)])
    thr = eer_threshold(y_dev.astype(int), scores)
    dev_metrics = summarize(y_dev.astype(int), scores, thr)
    meta["policy"] = {"threshold": thr, "threshold_source": "EER on dev (held-out capture groups of the training domains)", "dev": dev_metrics}
    bank.meta = meta
    path = bank.save(out)
    print(json.dumps({"threshold": thr, "dev": dev_metrics, "seconds": round(time.time() - t0, 1)}, indent=2))
    return path

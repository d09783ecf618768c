"""Shared fixtures: a real face (scikit-image's astronaut, Eileen Collins) and its 224x224 crop."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import skimage.data

from core.faces import FaceCrop, prepare_face

FAS_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "fas-dev"
MANIFEST_COLUMNS = ["path", "label", "attack_type", "domain", "split"]


@pytest.fixture(scope="session")
def _astronaut_face() -> tuple[np.ndarray, FaceCrop]:
    rgb = skimage.data.astronaut()
    return rgb, prepare_face(rgb)


@pytest.fixture
def face_rgb(_astronaut_face) -> np.ndarray:
    """A real photograph of a face: 512x512 RGB uint8."""
    rgb = _astronaut_face[0].copy()
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    return rgb


@pytest.fixture
def face(_astronaut_face) -> FaceCrop:
    """The FaceCrop that prepare_face makes of the astronaut (a copy: tests may not share state)."""
    fc = _astronaut_face[1]
    return FaceCrop(fc.crop.copy(), fc.bbox, fc.crop_box, fc.source_size, fc.face_detected, list(fc.notes))


@pytest.fixture
def crop(face) -> np.ndarray:
    """The protocol's input: the 224x224x3 uint8 RGB face crop."""
    assert face.crop.shape == (224, 224, 3) and face.crop.dtype == np.uint8
    return face.crop


@pytest.fixture
def fasdev() -> Path:
    """``../shared/data/fas-dev`` (the development data set); the test is skipped when it is absent."""
    if not (FAS_DEV / "manifest.csv").is_file():
        pytest.skip(f"development data not found at {FAS_DEV}")
    return FAS_DEV


# --- a tiny, really trained expert bank (no shared data set needed) ------------------------------
def write_manifest(path: Path, rows: list[dict]) -> Path:
    """Write a manifest CSV with the standard columns (missing keys are left empty)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in MANIFEST_COLUMNS})
    return path


def synthetic_images(folder: Path, groups: int = 4, per_class: int = 3, seed: int = 0, size: int = 160) -> list[dict]:
    """Natural images (scikit-image) as "real", and simulated prints/replays of the same as "spoof".

    Group ``k`` uses one source picture; each of its images is a random shifted crop with a light
    change. File names ``s{k:02d}_{i}.png`` make ``s{k:02d}`` the capture group of both classes. The
    first half of the groups is domain ``synthetic-a``, the rest ``synthetic-b`` (two "cameras", so
    leave-one-domain-out training has something to hold out). Returns manifest rows (paths relative
    to ``folder``).
    """
    import cv2
    from PIL import Image

    from core.samples import simulate_print, simulate_replay

    sources = [
        skimage.data.astronaut(),
        skimage.data.chelsea(),
        skimage.data.coffee(),
        skimage.data.rocket(),
        skimage.data.immunohistochemistry(),
    ]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(groups):
        src = sources[k % len(sources)]
        h, w = src.shape[:2]
        i = 0
        for j in range(per_class):
            side = int(min(h, w) * rng.uniform(0.6, 0.8))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            img = cv2.resize(src[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA).astype(
                np.float32
            )
            img = np.clip(img * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20), 0, 255).astype(np.uint8)
            attack = "print" if j % 2 == 0 else "replay"
            fake = simulate_print(img) if attack == "print" else simulate_replay(img)
            for label, atype, arr in (("real", "", img), ("spoof", attack, fake)):
                name = f"s{k:02d}_{i}.png"
                Image.fromarray(arr).save(folder / name)
                domain = "synthetic-a" if k < max(1, groups // 2) else "synthetic-b"
                rows.append({"path": name, "label": label, "attack_type": atype, "domain": domain, "split": "train"})
                i += 1
    return rows


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory) -> Path:
    """24 synthetic images (4 capture groups x 3 real + 3 spoof) in two domains, split "train"."""
    folder = tmp_path_factory.mktemp("tiny_data")
    rows = synthetic_images(folder)
    return write_manifest(folder / "manifest.csv", rows)


@pytest.fixture(scope="session")
def tiny_config(tiny_manifest, tmp_path_factory):
    """The ExpertTrainConfig that trained ``tiny_weights``: the real recipe (pretrained MobileNetV2 and EfficientNet-Lite0 trunks, colour texture, tool
    experts, leave-one-domain-out fitting) at toy size: two epochs of 16 samples, a 64 px RGB input."""
    from training.experts import ExpertTrainConfig

    out = tmp_path_factory.mktemp("tiny_weights")
    return ExpertTrainConfig(
        manifests=[str(tiny_manifest)],
        epochs=2,
        samples_per_epoch=16,
        batch_size=8,
        rgb_size=64,
        threads=1,
        out=str(out),
    )


@pytest.fixture(scope="session")
def tiny_weights(tiny_config) -> Path:
    """A real expert bank (RGB + five tool experts, calibrated, with a threshold from out-of-domain
    scores) trained in seconds on ``tiny_manifest``. Read-only for tests: copy it before changing anything."""
    from training.experts import train_experts

    path = train_experts(tiny_config)
    assert path.name == "experts.json" and path.is_file()
    return path.parent


@pytest.fixture
def database_url():
    """The ``url`` for ``open_storage``: None (a SQLite file in the data directory), or an empty schema,
    dropped afterwards, on the server that TARFAS_TEST_DATABASE_URL names (tests/storage_support.py)."""
    from storage_support import fresh_database

    with fresh_database() as url:
        yield url


@pytest.fixture
def storage(tmp_path, database_url):
    """A fresh, migrated store (database + file store) in a temporary data directory."""
    from storage.db import open_storage

    st = open_storage(tmp_path, url=database_url)
    yield st
    st.close()

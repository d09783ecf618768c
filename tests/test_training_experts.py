"""training.experts: leakage-free splits, augmentation, provenance in experts.json, calibrate-only."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.experts import EXPERT_TOOLS, RGB, ExpertBank
from core.manifest import ManifestRow, read_manifest
from training.experts import ExpertTrainConfig, augment, split_groups, train_experts


def _rows(n_groups: int, per_class: int = 2, domain: str = "nuaa") -> list[ManifestRow]:
    rows = []
    for g in range(n_groups):
        for i in range(2 * per_class):
            label = "spoof" if i % 2 else "real"
            rel = f"{g:04d}_{i:02d}_00_01_{i}.jpg"
            rows.append(ManifestRow(Path("/data") / rel, rel, label, "print" if label == "spoof" else "", domain, "train"))
    return rows


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n_groups, frac", [(4, 0.25), (10, 0.25), (7, 0.5)])
def test_split_groups_disjoint_with_both_classes(seed, n_groups, frac):
    rows = _rows(n_groups)
    train, dev = split_groups(rows, frac, seed)
    assert sorted(r.rel_path for r in train + dev) == sorted(r.rel_path for r in rows)  # nothing lost or doubled
    g_train, g_dev = {r.group for r in train}, {r.group for r in dev}
    assert g_train and g_dev and not (g_train & g_dev)
    assert {r.y for r in train} == {0, 1} and {r.y for r in dev} == {0, 1}
    assert len(g_dev) == max(1, round(n_groups * frac))
    assert split_groups(rows, frac, seed) == (train, dev)  # reproducible


def test_split_groups_finds_the_mixed_groups():
    # Only groups 0 and 1 have spoof images: each side must get one of them.
    rows = _rows(2) + [r for r in _rows(8) if r.label == "real" and r.group not in ("nuaa:0000", "nuaa:0001")]
    for seed in range(5):
        train, dev = split_groups(rows, 0.25, seed)
        assert {r.y for r in train} == {0, 1} and {r.y for r in dev} == {0, 1}
        assert not ({r.group for r in train} & {r.group for r in dev})


def test_split_groups_impossible():
    rows = [r for r in _rows(4) if r.label == "real" or r.group == "nuaa:0000"]  # spoofs in one group only
    with pytest.raises(ValueError, match="both classes"):
        split_groups(rows, 0.25, 0)


def test_same_subject_in_two_domains_is_two_groups():
    rows = _rows(3, domain="nuaa") + _rows(3, domain="casia")
    train, dev = split_groups(rows, 0.5, 0)
    assert not ({r.group for r in train} & {r.group for r in dev})
    assert len({r.group for r in rows}) == 6


def test_augment_shape_type_and_determinism(crop):
    before = crop.copy()
    outs = []
    for seed in range(40):  # enough seeds to take every branch
        a = augment(crop, random.Random(seed))
        b = augment(crop, random.Random(seed))
        assert a.dtype == np.uint8 and a.shape == (224, 224, 3)
        assert a.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(a, b)
        outs.append(a)
    np.testing.assert_array_equal(crop, before)  # the input is not modified
    # different seeds give different views, and views differ from the input
    assert len({o.tobytes() for o in outs}) == len(outs)
    assert sum(not np.array_equal(o, crop) for o in outs) >= 35


def test_augment_continues_the_rng_stream(crop):
    rng = random.Random(3)
    first, second = augment(crop, rng), augment(crop, rng)
    assert not np.array_equal(first, second)
    rng2 = random.Random(3)
    np.testing.assert_array_equal(augment(crop, rng2), first)
    np.testing.assert_array_equal(augment(crop, rng2), second)


def test_experts_json_records_provenance(tiny_weights, tiny_config, tiny_manifest):
    meta = json.loads((tiny_weights / "experts.json").read_text())
    # recipe: the full config that trained the networks
    assert meta["recipe"] == dataclasses.asdict(tiny_config)
    assert meta["recipe"]["epochs"] == 1 and meta["recipe"]["views"] == 0
    # data: manifest, counts and digests of the train and dev rows
    data = meta["data"]
    assert data["manifest"] == str(tiny_manifest)
    rows = read_manifest(tiny_manifest)
    assert data["train_images"] + data["dev_images"] == len(rows) == 24
    assert data["dev_images"] == 6  # one of four capture groups held out
    assert len(data["train_digest"]) == 16 and len(data["dev_digest"]) == 16
    assert data["train_digest"] != data["dev_digest"]
    assert data["skipped"] == []
    # threshold and dev metrics of the whole policy
    pol = meta["policy"]
    assert 0.0 <= pol["threshold"] <= 1.0
    assert "dev" in pol["threshold_source"].lower()
    dev = pol["dev"]
    assert dev["n"] == 6 and dev["n_real"] == 3 and dev["n_spoof"] == 3
    assert dev["threshold"] == pol["threshold"]
    for k in ("auc", "eer", "apcer", "bpcer", "hter"):
        assert 0.0 <= dev[k] <= 1.0
    # every network: file, architecture and dev calibration
    assert set(meta["networks"]) == {RGB, *EXPERT_TOOLS}
    for key, spec in meta["networks"].items():
        assert (tiny_weights / spec["file"]).is_file()
        assert spec["arch"]["in_channels"] == (3 if key == RGB else 1)
        c = spec["calibration"]
        assert 0.0 <= c["dev_auc"] <= 1.0 and len(c["mu"]) == 2 and min(c["sigma"]) > 0
    assert "bbox" in meta["zoom"] and "dev_auc" in meta["zoom"]["calibration"]
    assert meta["format"] == 1 and "torch" in meta["environment"]


def test_digests_identify_the_data(tiny_weights, tiny_manifest):
    """The same rows give the same digests; the digests change with the labels."""
    from training.experts import _file_digest

    meta = json.loads((tiny_weights / "experts.json").read_text())
    rows = read_manifest(tiny_manifest)
    train, dev = split_groups(rows, 0.25, 0)
    assert _file_digest(train) == meta["data"]["train_digest"]
    assert _file_digest(dev) == meta["data"]["dev_digest"]
    flipped = [dataclasses.replace(dev[0], label="spoof" if dev[0].label == "real" else "real")] + dev[1:]
    assert _file_digest(flipped) != _file_digest(dev)


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def recalibrated(tiny_weights, tiny_config, tmp_path_factory):
    """A copy of the tiny bank re-calibrated with ``calibrate_only`` (config otherwise the shipped
    defaults for training, which calibrate-only must not apply)."""
    out = tmp_path_factory.mktemp("recal") / "w"
    shutil.copytree(tiny_weights, out)
    before = _sha(out)
    cfg = dataclasses.replace(tiny_config, out=str(out), calibrate_only=True, epochs=10, views=3)
    train_experts(cfg)
    return out, before


def test_calibrate_only_keeps_network_weights(recalibrated, tiny_weights):
    out, before = recalibrated
    assert len(before) == 6
    assert _sha(out) == before  # byte-identical networks
    # the version covers experts.json too: a recalibrated bank is a new version, even with the same networks
    assert ExpertBank.load(out).version != ExpertBank.load(tiny_weights).version
    meta = json.loads((out / "experts.json").read_text())
    old = json.loads((tiny_weights / "experts.json").read_text())
    assert 0.0 <= meta["policy"]["threshold"] <= 1.0
    # same dev data, same networks: the same calibration and threshold come out
    assert meta["policy"]["threshold"] == pytest.approx(old["policy"]["threshold"])
    assert meta["data"]["train_images"] == old["data"]["train_images"]
    assert meta["train_seconds"] == old["train_seconds"]


def test_calibrate_only_keeps_the_training_recipe(recalibrated, tiny_config):
    """The kept networks were trained with epochs=1, views=0: experts.json must still say so, whatever
    config the calibration run was given."""
    out, _ = recalibrated
    meta = json.loads((out / "experts.json").read_text())
    assert meta["recipe"] == dataclasses.asdict(tiny_config)
    assert meta["recipe"]["calibrate_only"] is False
    if "calibration_recipe" in meta:  # how they were re-calibrated
        assert meta["calibration_recipe"]["calibrate_only"] is True


def test_calibrate_only_needs_existing_weights(tiny_config, tmp_path):
    from core.errors import WeightsError

    with pytest.raises(WeightsError):
        train_experts(dataclasses.replace(tiny_config, out=str(tmp_path / "none"), calibrate_only=True))


def test_no_rows_for_the_domain(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="no manifest rows"):
        train_experts(dataclasses.replace(tiny_config, train_domains=["nuaa"], out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def test_config_defaults_are_the_shipped_recipe():
    """`tarfas train experts` with no flags reproduces the recipe recorded with the shipped weights
    (only where it wrote its files and how many threads it used may differ)."""
    cfg = ExpertTrainConfig()
    assert cfg.lr == 1e-3  # paper App. A.3
    assert cfg.out == "assets/experts" and cfg.calibrate_only is False
    shipped = Path(__file__).resolve().parents[1] / "assets" / "experts" / "experts.json"
    if not shipped.exists():
        pytest.skip("no shipped weights")
    recipe = json.loads(shipped.read_text())["recipe"]
    ours = dataclasses.asdict(cfg)
    for key in ("out", "threads"):
        recipe.pop(key), ours.pop(key)
    assert ours == recipe

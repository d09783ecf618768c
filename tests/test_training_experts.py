"""training.experts: leave-one-domain-out training, selection and calibration, augmentation, provenance in
experts.json, calibrate-only."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.backbones import EFFICIENTNET_LITE0_IMAGENET, MOBILENET_V2_IMAGENET
from core.errors import WeightsError
from core.evaluation.metrics import domain_eer_threshold
from core.evidence import EvidenceModel
from core.experts import EXPERT_TOOLS, RGB, ZOOM, ExpertBank
from training.experts import (
    EVIDENCE_KEYS,
    ExpertTrainConfig,
    augment,
    fit_policy,
    lodo_table,
    platt,
    read_lodo_logits,
    train_experts,
)


# --- augmentation -----------------------------------------------------------------------------------
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


# --- fitting on out-of-fold logits ------------------------------------------------------------------
def _oof(seed: int = 0, n: int = 200, shift: float = 2.0):
    """Out-of-fold logits of three domains; domain c's scores are shifted up by ``shift`` (a camera that
    makes everything look more like an attack), its classes still separable."""
    rng = np.random.default_rng(seed)
    domain = np.repeat(["a", "b", "c"], n)
    y = np.tile(np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)], 3)
    base = np.where(y == 1, 1.5, -1.5) + rng.normal(0, 1.0, len(y)) + np.where(domain == "c", shift, 0.0)
    raw = {k: base * (1 + 0.1 * i) + rng.normal(0, 0.8, len(y)) for i, k in enumerate(EVIDENCE_KEYS)}
    return raw, y, domain


def test_platt_calibration_weighs_every_domain_and_class_alike():
    raw, y, domain = _oof()
    from training.experts import balanced_weights

    w = balanced_weights(y, domain)
    assert w.sum() == pytest.approx(1.0)
    for d in "abc":
        for c in (0, 1):
            assert w[(domain == d) & (y == c)].sum() == pytest.approx(1 / 6)
    cal = platt(raw[RGB], y, w)
    p = 1 / (1 + np.exp(-cal.apply(raw[RGB])))
    assert np.average(p, weights=w) == pytest.approx(0.5, abs=0.02)  # balanced: mean P(spoof) is one half
    assert cal.a > 0 and cal.mu[0] < 0 < cal.mu[1] and min(cal.sigma) > 0
    assert 0.8 < cal.auc <= 1.0


def test_domain_eer_threshold_counts_domains_not_images():
    """A big domain must not pull the threshold its way: each domain's error rates count the same."""
    rng = np.random.default_rng(0)
    y_big = np.r_[np.zeros(1000), np.ones(1000)].astype(int)
    s_big = np.r_[rng.uniform(0.0, 0.4, 1000), rng.uniform(0.4, 0.5, 1000)]
    y_small = np.r_[np.zeros(10), np.ones(10)].astype(int)
    s_small = np.r_[rng.uniform(0.5, 0.6, 10), rng.uniform(0.6, 1.0, 10)]
    y, s = np.r_[y_big, y_small], np.r_[s_big, s_small]
    d = np.r_[["big"] * 2000, ["small"] * 20]
    t = domain_eer_threshold(y, s, d)
    # anywhere between the big domain's attacks and the small domain's real faces has equal errors
    # (each domain loses half of one class); pooling images would have put it inside the big domain
    ap = np.mean([np.mean(s[(d == k) & (y == 1)] < t) for k in ("big", "small")])
    bp = np.mean([np.mean(s[(d == k) & (y == 0)] >= t) for k in ("big", "small")])
    assert ap == pytest.approx(bp, abs=0.06)


def test_threshold_comes_from_the_policy_scores_out_of_domain():
    raw, y, domain = _oof()
    fitted = fit_policy(raw, y, domain, max_calls=3)
    assert 0.0 < fitted.threshold < 1.0
    assert fitted.threshold == pytest.approx(domain_eer_threshold(y, fitted.scores, domain))
    assert isinstance(fitted.evidence, EvidenceModel) and fitted.evidence.keys == EVIDENCE_KEYS
    assert set(fitted.calibration) == set(EVIDENCE_KEYS)


def test_the_lodo_row_of_a_domain_is_fitted_without_it():
    """Each domain's threshold, calibration and fusion come from the other domains only: changing this
    domain's logits changes its scores, never its threshold."""
    raw, y, domain = _oof()
    table = lodo_table(raw, y, domain, ["a", "b", "c"], max_calls=3)
    moved = {k: np.where(domain == "c", v + 5.0, v) for k, v in raw.items()}
    again = lodo_table(moved, y, domain, ["a", "b", "c"], max_calls=3)
    row_c, row_c2 = (next(r for r in t["domains"] if r["domain"] == "c") for t in (table, again))
    assert row_c2["threshold"] == row_c["threshold"]
    assert row_c2["apcer"] <= row_c["apcer"] and row_c2["bpcer"] >= row_c["bpcer"]  # shifted up: more called spoof
    assert row_c2["auc"] == pytest.approx(row_c["auc"], abs=0.05)  # ranking within the domain barely moves
    # what each tool adds: the fused AUC without each expert is reported, next to the fused AUC of all
    assert set(table["fused_auc_without"]) == {*EXPERT_TOOLS, ZOOM}
    assert 0.5 < table["fused_auc_all"] <= 1.0
    assert table["mean"]["auc"] == pytest.approx(np.mean([r["auc"] for r in table["domains"]]))


# --- the command on the tiny data -----------------------------------------------------------------------
def test_experts_json_records_provenance(tiny_weights, tiny_config, tiny_manifest):
    meta = json.loads((tiny_weights / "experts.json").read_text())
    assert meta["format"] == 4 and "torch" in meta["environment"]
    # recipe: the full config that trained the networks
    assert meta["recipe"] == dataclasses.asdict(tiny_config)
    # data: manifests (with their sha256), counts per domain, digest of the rows
    data = meta["data"]
    assert data["manifests"] == {str(tiny_manifest): hashlib.sha256(Path(tiny_manifest).read_bytes()).hexdigest()}
    assert data["images"] == 24 and data["skipped"] == []
    assert data["domains"] == {"synthetic-a": {"real": 6, "spoof": 6}, "synthetic-b": {"real": 6, "spoof": 6}}
    assert len(data["digest"]) == 16
    # the pretrained files it started from, and the blocks each probe reads
    assert meta["pretrained"]["mobilenet_v2"]["sha256"] == MOBILENET_V2_IMAGENET.sha256
    assert meta["pretrained"]["efficientnet_lite0"]["sha256"] == EFFICIENTNET_LITE0_IMAGENET.sha256
    assert meta["pretrained"]["efficientnet_lite0"]["taps"] == [15]
    assert set(meta["pretrained"]) == {"mobilenet_v2", "efficientnet_lite0"}  # colour texture has no weights
    # LODO: one nested row per domain, and the policy's threshold from out-of-domain scores
    lodo = meta["lodo"]
    assert [r["domain"] for r in lodo["domains"]] == ["synthetic-a", "synthetic-b"]
    for r in lodo["domains"]:
        assert r["n"] == 12 and 0.0 <= r["auc"] <= 1.0 and 0.0 <= r["hter"] <= 1.0
    pol = meta["policy"]
    assert 0.0 <= pol["threshold"] <= 1.0 and "leave-one-domain-out" in pol["threshold_source"]
    # every network: file, architecture, out-of-domain calibration
    assert set(meta["networks"]) == {RGB, *EXPERT_TOOLS}
    for key, spec in meta["networks"].items():
        assert (tiny_weights / spec["file"]).is_file()
        assert spec["arch"]["kind"] == ("probe" if key == RGB else "cnn")
        c = spec["calibration"]
        assert 0.0 <= c["auc"] <= 1.0 and len(c["mu"]) == 2 and min(c["sigma"]) > 0
    assert meta["networks"][RGB]["arch"]["input_size"] == tiny_config.rgb_size
    assert "bbox" in meta["zoom"] and ZOOM in meta["zoom"]


def test_probe_strength_and_epochs_are_chosen_by_mean_lodo_auc(tiny_weights, tiny_config):
    sel = json.loads((tiny_weights / "experts.json").read_text())["selection"]
    assert set(sel["auc"][RGB]) == {str(c) for c in tiny_config.rgb_c}
    assert sel["rgb_c"] == max(tiny_config.rgb_c, key=lambda c: sel["auc"][RGB][str(c)])
    for key in EXPERT_TOOLS:
        aucs = sel["auc"][key]
        assert len(aucs) == tiny_config.epochs and sel["epochs"][key] == int(np.argmax(aucs)) + 1


def test_augmented_views_join_the_probe_fit_only(tiny_config, tiny_weights, tmp_path):
    """``augment_views`` adds camera-augmented copies to the probe's training rows: another head, the
    same trunk and the same held-out rows (scores of held-out images are never of augmented copies)."""
    out = tmp_path / "aug"
    train_experts(dataclasses.replace(tiny_config, augment_views=1, out=str(out)))
    plain, aug = ExpertBank.load(tiny_weights).nets[RGB], ExpertBank.load(out).nets[RGB]
    assert not torch.equal(plain.head.weight, aug.head.weight)
    assert all(torch.equal(a, b) for a, b in zip(plain.trunks.state_dict().values(), aug.trunks.state_dict().values()))
    ids, *_ = read_lodo_logits(out / "lodo_logits.csv")
    assert len(ids) == 24


def test_the_rgb_probe_keeps_the_imagenet_trunks(tiny_weights):
    """Only the linear head of the RGB network is trained: both ImageNet trunks are the pretrained files'
    tensors, bit for bit, and the colour texture trunk has no weights."""
    from core.backbones import load_pretrained_state

    net = ExpertBank.load(tiny_weights).nets[RGB]
    assert [t.arch for t in net.trunks] == ["mobilenet_v2", "efficientnet_lite0", "colour_lbp"]
    assert not list(net.trunks[2].state_dict())
    mobilenet, lite = (t.net.state_dict() for t in net.trunks[:2])
    pretrained = load_pretrained_state(MOBILENET_V2_IMAGENET)
    assert mobilenet and all(torch.equal(v, pretrained[k]) for k, v in mobilenet.items())
    pretrained = load_pretrained_state(EFFICIENTNET_LITE0_IMAGENET)
    assert lite and all(torch.equal(v, pretrained[k]) for k, v in lite.items())


def test_the_rgb_head_is_the_average_of_one_probe_per_trunk():
    """fit_probes fits each trunk's slice on its own and averages: the joint logit is the mean of the
    per-trunk probes' logits."""
    from training.experts import fit_probe, fit_probes

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(80, 6)), rng.integers(0, 2, 80)
    x[:, 0] += 2 * y
    w = np.ones(80) / 80
    slices = [slice(0, 4), slice(4, 6)]
    coef, bias = fit_probes(x, y, w, 0.1, slices)
    parts = [fit_probe(x[:, sl], y, w, 0.1) for sl in slices]
    expected = np.mean([x[:, sl] @ c + b for sl, (c, b) in zip(slices, parts)], axis=0)
    np.testing.assert_allclose(x @ coef + bias, expected, atol=1e-9)


def test_lodo_logits_are_kept_for_every_image(tiny_weights):
    ids, domain, y, raw = read_lodo_logits(tiny_weights / "lodo_logits.csv")
    assert len(ids) == len(set(ids)) == 24
    assert set(domain) == {"synthetic-a", "synthetic-b"} and set(y) == {0, 1}
    assert set(raw) == set(EVIDENCE_KEYS) and all(np.isfinite(v).all() for v in raw.values())


def test_scores_rank_without_ties(tiny_weights, tiny_manifest):
    """No clipping floor: distinct images get distinct scores."""
    from core.agent import run
    from core.evaluation.manifest import read_manifest
    from core.faces import load_image, prepare_face
    from core.policies.expert import ExpertPolicy
    from core.registry import ToolRegistry

    policy = ExpertPolicy.load(tiny_weights)
    scores = [
        run(
            prepare_face(load_image(r.path), on_no_face="whole"), policy, registry=ToolRegistry(readers=policy.bank)
        ).final.score_spoof
        for r in read_manifest(tiny_manifest)
    ]
    assert len(set(scores)) == len(scores)


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def recalibrated(tiny_weights, tiny_config, tmp_path_factory):
    """A copy of the tiny bank re-calibrated with ``calibrate_only`` (config otherwise the shipped
    defaults for training, which calibrate-only must not apply)."""
    out = tmp_path_factory.mktemp("recal") / "w"
    shutil.copytree(tiny_weights, out)
    before = _sha(out)
    cfg = dataclasses.replace(ExpertTrainConfig(), out=str(out), calibrate_only=True)
    train_experts(cfg)
    return out, before


def test_calibrate_only_keeps_network_weights(recalibrated, tiny_weights):
    out, before = recalibrated
    assert len(before) == 6
    assert _sha(out) == before  # byte-identical networks
    meta = json.loads((out / "experts.json").read_text())
    old = json.loads((tiny_weights / "experts.json").read_text())
    # same out-of-fold logits: the same calibration and threshold come out
    assert meta["policy"]["threshold"] == pytest.approx(old["policy"]["threshold"])
    assert meta["networks"] == old["networks"]
    assert meta["data"] == old["data"] and meta["train_seconds"] == old["train_seconds"]


def test_calibrate_only_keeps_the_training_recipe(recalibrated, tiny_config):
    """The kept networks were trained with the tiny config: experts.json must still say so, whatever
    config the calibration run was given."""
    out, _ = recalibrated
    meta = json.loads((out / "experts.json").read_text())
    assert meta["recipe"] == dataclasses.asdict(tiny_config)
    assert meta["calibration_recipe"]["calibrate_only"] is True


def test_calibrate_only_needs_existing_weights(tiny_config, tmp_path):
    from core.errors import WeightsError

    with pytest.raises(WeightsError):
        train_experts(dataclasses.replace(tiny_config, out=str(tmp_path / "none"), calibrate_only=True))


def test_no_rows_for_the_domain(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="no manifest rows"):
        train_experts(dataclasses.replace(tiny_config, domains=["nuaa"], out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def test_one_domain_cannot_be_left_out(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="at least two domains"):
        train_experts(dataclasses.replace(tiny_config, domains=["synthetic-a"], out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def test_config_defaults_are_the_shipped_recipe():
    """`tarfas train experts` with no flags reproduces the recipe recorded with the shipped weights
    (only where it wrote its files, how many threads it used and where it took tool experts from may differ)."""
    cfg = ExpertTrainConfig()
    assert cfg.out == "assets/experts" and cfg.calibrate_only is False
    assert any("fas-train" in m for m in cfg.manifests) and any("fas-dev" in m for m in cfg.manifests)
    shipped = Path(__file__).resolve().parents[1] / "assets" / "experts" / "experts.json"
    if not shipped.exists():
        pytest.skip("no shipped weights")
    recipe = json.loads(shipped.read_text())["recipe"]
    ours = dataclasses.asdict(cfg)
    for key in ("out", "threads", "reuse_tool_experts"):
        recipe.pop(key), ours.pop(key)
    assert ours == recipe


def test_the_shipped_bank_loads_the_tiny_one_too(tiny_weights):
    bank = ExpertBank.load(tiny_weights)
    assert set(bank.nets) == {RGB, *EXPERT_TOOLS}
    assert set(bank.calibration) == {RGB, *EXPERT_TOOLS, ZOOM}


def test_a_format_3_bank_with_two_imagenet_trunks_and_no_texture_still_loads(tiny_weights, tmp_path, crop):
    """Banks written before the colour texture trunk (format 3) load, and their RGB network is the two
    ImageNet probes: that part of the head, on the same features."""
    from safetensors.torch import load_file, save_file

    old = tmp_path / "format3"
    shutil.copytree(tiny_weights, old)
    meta = json.loads((old / "experts.json").read_text())
    new = ExpertBank.load(tiny_weights)
    imagenet = sum(t.dim for t in new.nets[RGB].trunks[:2])
    state = load_file(str(old / "rgb.safetensors"))
    state["head.weight"] = state["head.weight"][:, :imagenet].clone()
    save_file(state, str(old / "rgb.safetensors"))
    meta["format"] = 3
    meta["networks"][RGB]["arch"]["options"]["trunks"] = [
        t for t in meta["networks"][RGB]["arch"]["options"]["trunks"] if t["arch"] != "colour_lbp"
    ]
    (old / "experts.json").write_text(json.dumps(meta))

    bank = ExpertBank.load(old)
    assert [t.arch for t in bank.nets[RGB].trunks] == ["mobilenet_v2", "efficientnet_lite0"]
    with torch.inference_mode():
        features = new.nets[RGB].features(new.specs[RGB].tensor([crop]))[0, :imagenet]
        expected = float(features @ state["head.weight"][0] + state["head.bias"][0])
    assert bank.raw_logits(RGB, [crop])[0] == pytest.approx(expected, abs=1e-4)


def test_a_format_2_bank_with_one_mobilenet_trunk_still_loads(tiny_weights, tmp_path, crop):
    """Banks written before the RGB network had two trunks (format 2: kind "mobilenet_v2", state keys
    "trunk.*") load, and their RGB network is that one probe: the MobileNetV2 part of the head."""
    from safetensors.torch import load_file, save_file

    old = tmp_path / "format2"
    shutil.copytree(tiny_weights, old)
    meta = json.loads((old / "experts.json").read_text())
    state = load_file(str(old / "rgb.safetensors"))
    dim = ExpertBank.load(tiny_weights).nets[RGB].trunks[0].dim
    v2 = {k.replace("trunks.0.net.", "trunk.", 1): v for k, v in state.items() if k.startswith("trunks.0.")}
    v2 |= {"head.weight": state["head.weight"][:, :dim].clone(), "head.bias": state["head.bias"]}
    save_file(v2, str(old / "rgb.safetensors"))
    meta["format"] = 2
    meta["networks"][RGB]["arch"] = {
        "kind": "mobilenet_v2",
        "input_size": 64,
        "options": {"blocks": 11, "taps": [7, 11]},
    }
    (old / "experts.json").write_text(json.dumps(meta))

    bank, new = ExpertBank.load(old), ExpertBank.load(tiny_weights)
    assert [t.arch for t in bank.nets[RGB].trunks] == ["mobilenet_v2"]
    x = new.specs[RGB].tensor([crop])
    with torch.inference_mode():
        features = new.nets[RGB].trunks[0](x)
        expected = float(features @ v2["head.weight"][0] + v2["head.bias"][0])
    assert bank.raw_logits(RGB, [crop])[0] == pytest.approx(expected, abs=1e-4)
    meta["format"] = 1
    (old / "experts.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="format 1"):
        ExpertBank.load(old)


def test_reusing_tool_experts_retrains_only_the_rgb_network(tiny_config, tiny_weights, tmp_path):
    """``reuse_tool_experts``: the tool networks and their out-of-fold logits come from the earlier run
    unchanged (a full run would make the same: they are seeded), the RGB network and everything fitted
    on the logits are made anew; a folder trained on other images is refused."""
    out = tmp_path / "rgb-only"
    train_experts(dataclasses.replace(tiny_config, rgb_c=[0.5], reuse_tool_experts=str(tiny_weights), out=str(out)))
    old, new = ExpertBank.load(tiny_weights), ExpertBank.load(out)
    for key in EXPERT_TOOLS:
        assert all(
            torch.equal(a, b) for a, b in zip(old.nets[key].state_dict().values(), new.nets[key].state_dict().values())
        )
    _, _, _, raw_old = read_lodo_logits(tiny_weights / "lodo_logits.csv")
    _, _, _, raw_new = read_lodo_logits(out / "lodo_logits.csv")
    for key in EXPERT_TOOLS:
        np.testing.assert_array_equal(raw_old[key], raw_new[key])
    assert json.loads((out / "experts.json").read_text())["selection"]["rgb_c"] == 0.5
    assert not np.array_equal(raw_old[RGB], raw_new[RGB])

    other = tmp_path / "other"
    shutil.copytree(tiny_weights, other)
    meta = json.loads((other / "experts.json").read_text())
    meta["data"]["digest"] = "0" * 16
    (other / "experts.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="other images"):
        train_experts(dataclasses.replace(tiny_config, reuse_tool_experts=str(other), out=str(tmp_path / "x")))


@pytest.mark.parametrize(
    "trunk, message",
    [
        ({"arch": "resnet50", "taps": [3]}, "unknown trunk 'resnet50'; expected one of .*colour_lbp"),
        ({"arch": "mobilenet_v2"}, "taps"),
    ],
)
def test_an_experts_json_naming_a_trunk_wrongly_is_refused_clearly(tiny_weights, tmp_path, trunk, message):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_weights, bad)
    meta = json.loads((bad / "experts.json").read_text())
    meta["networks"][RGB]["arch"]["options"]["trunks"][0] = trunk
    (bad / "experts.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match=f"describes the RGB network wrongly: {message}"):
        ExpertBank.load(bad)

"""Evaluation protocol files (core.evaluation.protocols): parsing, selections, seeded per-domain samples,
and the shipped protocol files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import write_manifest

from core.evaluation.analyses import pick_rows
from core.evaluation.protocols import ProtocolError, is_protocol_file, load_protocol, manifest_protocol, parse_protocol

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def manifest(tmp_path) -> Path:
    """12 rows (no images needed for parsing): domains a (train/test), b, c."""
    rows = []
    for d, split, n in (("a", "train", 2), ("a", "test", 2), ("b", "", 2), ("c", "", 2)):
        for i in range(n):
            rows.append({"path": f"{d}{split}{i}r.png", "label": "real", "domain": d, "split": split})
            rows.append(
                {"path": f"{d}{split}{i}s.png", "label": "spoof", "attack_type": "print", "domain": d, "split": split}
            )
    return write_manifest(tmp_path / "m.csv", rows)


def _write(tmp_path: Path, spec: dict, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(spec) if name.endswith(".json") else yaml.safe_dump(spec))
    return path


def test_one_to_n_defaults_to_every_other_domain(tmp_path, manifest):
    p = load_protocol(_write(tmp_path, {"kind": "one_to_n", "manifests": ["m.csv"], "source": "a"}))
    assert p.kind == "one_to_n" and p.name == "p" and p.threshold == "source_eer"
    (fold,) = p.folds
    assert fold.source.name == "a" and [t.name for t in fold.targets] == ["b", "c"]
    picked = pick_rows(p)
    assert len(picked[fold.source]) == 8 and [len(picked[t]) for t in fold.targets] == [4, 4]


def test_one_to_n_with_splits_and_names(tmp_path, manifest):
    spec = {
        "name": "x",
        "kind": "one_to_n",
        "manifests": [str(manifest)],
        "source": {"domain": "a", "split": "train"},
        "targets": [{"domain": "a", "split": "test", "name": "a-test"}, {"domains": ["b", "c"], "name": "bc"}],
        "threshold": 0.3,
    }
    p = load_protocol(_write(tmp_path, spec, "p.json"))
    fold = p.folds[0]
    assert fold.source.name == "a-train" and [t.name for t in fold.targets] == ["a-test", "bc"]
    assert p.threshold == 0.3
    picked = pick_rows(p)
    assert {r.split for r in picked[fold.source]} == {"train"}
    assert {r.domain for r in picked[fold.targets[1]]} == {"b", "c"}


def test_leave_one_out_folds(tmp_path, manifest):
    spec = {"kind": "leave_one_out", "manifests": ["m.csv"], "domains": [{"domain": "a", "split": "test"}, "b", "c"]}
    p = load_protocol(_write(tmp_path, spec))
    assert [f.name for f in p.folds] == ["-> a-test", "-> b", "-> c"]
    assert p.folds[0].source.name == "b+c" and p.folds[1].source.name == "a-test+c"
    picked = pick_rows(p)
    src = picked[p.folds[1].source]
    assert {(r.domain, r.split) for r in src} == {("a", "test"), ("c", "")}  # a's train split is not in it


def test_per_domain_and_manifest_protocol(tmp_path, manifest):
    p = load_protocol(_write(tmp_path, {"kind": "per_domain", "manifests": ["m.csv"]}))
    assert p.threshold == "policy" and p.folds[0].source is None
    assert [t.name for t in p.folds[0].targets] == ["a", "b", "c"]
    m = manifest_protocol(manifest, threshold=0.4, domains=["a"], split="test")
    assert m.threshold == 0.4 and [t.name for t in m.folds[0].targets] == ["a-test"]
    assert len(pick_rows(m)[m.folds[0].targets[0]]) == 4
    d = manifest_protocol(manifest, dev_manifest=manifest)
    assert d.threshold == "source_eer" and d.folds[0].source.name == f"dev ({manifest})"
    # the dev selection reads the second manifest only
    assert {p.manifest for p in d.folds[0].source.parts} == {1}


def test_limit_per_domain_is_seeded_and_shared(tmp_path, manifest):
    spec = {"kind": "leave_one_out", "manifests": ["m.csv"], "domains": ["a", "b", "c"], "limit_per_domain": 3}
    p = load_protocol(_write(tmp_path, spec))
    a1, a2 = pick_rows(p, seed=1), pick_rows(p, seed=1)
    assert {s.name: [r.rel_path for r in rows] for s, rows in a1.items()} == {
        s.name: [r.rel_path for r in rows] for s, rows in a2.items()
    }
    held_a = a1[p.folds[0].targets[0]]
    assert len(held_a) == 3
    # the same sample of domain a is used where a is a source (fold -> b)
    assert {r.rel_path for r in held_a} <= {r.rel_path for r in a1[p.folds[1].source]}
    assert len(pick_rows(p, seed=1, limit_per_domain=100)[p.folds[0].targets[0]]) == 8


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"kind": "nope", "manifests": ["m.csv"]}, "kind"),
        ({"kind": "one_to_n", "manifests": ["m.csv"]}, "source"),
        ({"kind": "one_to_n"}, "manifests"),
        ({"kind": "per_domain", "manifests": ["m.csv"], "threshold": "source_eer"}, "source"),
        ({"kind": "per_domain", "manifests": ["m.csv"], "threshold": "whatever"}, "threshold"),
        ({"kind": "leave_one_out", "manifests": ["m.csv"], "domains": ["a"]}, "two"),
        ({"kind": "one_to_n", "manifests": ["m.csv"], "source": {"domian": "a"}}, "unknown keys"),
        ({"kind": "one_to_n", "manifests": ["m.csv"], "source": 3}, "selection"),
    ],
)
def test_bad_protocols(tmp_path, manifest, spec, match):
    with pytest.raises(ProtocolError, match=match):
        load_protocol(_write(tmp_path, spec))


def test_unreadable_files(tmp_path):
    with pytest.raises(ProtocolError, match="not found"):
        load_protocol(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [unclosed")
    with pytest.raises(ProtocolError, match="not valid YAML"):
        load_protocol(bad)
    with pytest.raises(ProtocolError, match="mapping"):
        parse_protocol(["a"], tmp_path)


def test_selection_that_matches_nothing(tmp_path, manifest):
    p = load_protocol(_write(tmp_path, {"kind": "one_to_n", "manifests": ["m.csv"], "source": "a", "targets": ["zzz"]}))
    with pytest.raises(ProtocolError, match="zzz"):
        pick_rows(p)


def test_is_protocol_file():
    assert is_protocol_file("x.yaml") and is_protocol_file("x.YML") and is_protocol_file("x.json")
    assert not is_protocol_file("manifest.csv")


@pytest.mark.parametrize("path", sorted((REPO / "protocols").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_protocol_files_parse(path, monkeypatch):
    monkeypatch.setenv("FAS_DATA", "/data")
    p = load_protocol(path)
    assert p.folds and p.description
    if "paper" in path.parts:
        assert all(str(m).startswith("/data/") for m, _ in p.manifests)


def test_shipped_fas_dev_protocols_select_rows(fasdev):
    for name in ("one-to-n-nuaa.yaml", "leave-one-out.yaml", "per-domain.yaml"):
        p = load_protocol(REPO / "protocols" / "fas-dev" / name)
        assert p.manifests[0][0] == (fasdev / "manifest.csv").resolve()
        picked = pick_rows(p, limit_per_domain=5)
        assert all(0 < len(rows) <= 10 for rows in picked.values())


def test_leave_one_out_with_source_and_target_splits(tmp_path, manifest):
    """ICMO style: a domain is a source through its train split and the target through its test split."""
    spec = {
        "kind": "leave_one_out",
        "manifests": ["m.csv"],
        "domains": [{"domain": "a", "name": "A", "source_split": "train", "target_split": "test"}, "b"],
    }
    p = load_protocol(_write(tmp_path, spec))
    assert [f.name for f in p.folds] == ["-> A", "-> b"]
    picked = pick_rows(p)
    assert {r.split for r in picked[p.folds[0].targets[0]]} == {"test"}
    assert {(r.domain, r.split) for r in picked[p.folds[1].source]} == {("a", "train")}
    icmo = load_protocol(REPO / "protocols" / "paper" / "icmo.yaml")
    assert [f.name for f in icmo.folds] == ["-> I", "-> C", "-> M", "-> O"]
    assert {pt.split for pt in icmo.folds[0].source.parts} == {"train"} and icmo.folds[0].targets[0].parts[
        0
    ].split == "test"

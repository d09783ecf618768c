"""core.evaluation.manifest: reading and validating manifests, capture groups, selection."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_manifest

from core.errors import TarfasError
from core.evaluation.manifest import ManifestError, ManifestRow, read_manifest, select

ROWS = [
    {"path": "images/nuaa/0001/0001_00_00_01_101.jpg", "label": "real", "domain": "nuaa", "split": "train"},
    {
        "path": "images/nuaa/0001/0001_01_00_01_101.jpg",
        "label": "spoof",
        "attack_type": "print",
        "domain": "nuaa",
        "split": "train",
    },
    {"path": "images/nuaa/0002/0002_00_00_01_101.jpg", "label": " Real ", "domain": "nuaa", "split": "test"},
    {"path": "images/replay/antoine.jpg", "label": "SPOOF", "attack_type": "Replay", "domain": "replay", "split": ""},
    {"path": "other.png", "label": "real", "domain": "", "split": "Test"},
]


@pytest.fixture
def manifest(tmp_path) -> Path:
    (tmp_path / "sub").mkdir()
    return write_manifest(tmp_path / "sub" / "manifest.csv", ROWS)


def test_read_good_manifest_relative_to_its_folder(manifest):
    rows = read_manifest(manifest)
    assert len(rows) == 5
    assert all(isinstance(r, ManifestRow) for r in rows)
    base = manifest.parent.resolve()
    assert rows[0].path == base / "images/nuaa/0001/0001_00_00_01_101.jpg"
    assert rows[0].path.is_absolute()
    assert rows[0].rel_path == "images/nuaa/0001/0001_00_00_01_101.jpg"
    assert [r.label for r in rows] == ["real", "spoof", "real", "spoof", "real"]  # stripped, lower case
    assert [r.y for r in rows] == [0, 1, 0, 1, 0]
    assert [r.attack_type for r in rows] == ["", "print", "", "replay", ""]
    assert [r.domain for r in rows] == ["nuaa", "nuaa", "nuaa", "replay", "default"]  # empty domain -> default
    assert [r.split for r in rows] == ["train", "train", "test", "", "test"]


def test_read_manifest_with_root(manifest, tmp_path):
    root = tmp_path / "elsewhere"
    rows = read_manifest(manifest, root=root)
    assert rows[0].path == (root / "images/nuaa/0001/0001_00_00_01_101.jpg").resolve()
    assert rows[4].path == (root / "other.png").resolve()
    # rel_path stays as written
    assert rows[4].rel_path == "other.png"
    # a str root works too
    assert read_manifest(str(manifest), root=str(root))[0].path == rows[0].path


def test_extra_columns_are_ignored(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("path,label,source_repo,commit\na.jpg,real,x/y,abc\n")
    (row,) = read_manifest(p)
    assert row.label == "real" and row.domain == "default" and row.split == "" and row.attack_type == ""


def test_header_only_manifest_is_empty(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("path,label,attack_type,domain,split\n")
    assert read_manifest(p) == []


@pytest.mark.parametrize("header", ["label,domain\nreal,nuaa\n", "path,domain\na.jpg,nuaa\n", ""])
def test_missing_columns(tmp_path, header):
    p = tmp_path / "m.csv"
    p.write_text(header)
    with pytest.raises(ManifestError, match="missing columns"):
        read_manifest(p)


def test_bad_label_names_the_line(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("path,label\na.jpg,real\nb.jpg,spoof\nc.jpg,fake\n")
    with pytest.raises(ManifestError) as exc:
        read_manifest(p)
    msg = str(exc.value)
    assert f"{p}:4" in msg  # the header is line 1, c.jpg is line 4
    assert "'fake'" in msg


@pytest.mark.parametrize("content, line", [("path,label\na.jpg,real\n,spoof\n", 3), ("path,label\n   ,real\n", 2)])
def test_empty_path(tmp_path, content, line):
    p = tmp_path / "m.csv"
    p.write_text(content)
    with pytest.raises(ManifestError, match=rf":{line}: empty path"):
        read_manifest(p)


def test_empty_label(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("path,label\na.jpg,\n")
    with pytest.raises(ManifestError, match=":2:"):
        read_manifest(p)


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.csv")
    with pytest.raises(ManifestError):  # a folder is not a manifest
        read_manifest(tmp_path)
    assert issubclass(ManifestError, TarfasError)


def _row(rel: str, domain: str = "nuaa", label: str = "real", split: str = "train") -> ManifestRow:
    return ManifestRow(Path("/x") / rel, rel, label, "", domain, split)


def test_group_of_nuaa_like_names():
    assert _row("images/nuaa/db/ClientRaw/0001/0001_00_00_01_101.jpg").group == "nuaa:0001"
    assert _row("images/nuaa/db/ImposterRaw/0001/0001_01_00_01_101.jpg").group == "nuaa:0001"
    assert _row("0015_00_00_01_33.jpg").group == "nuaa:0015"
    assert _row("antoine.jpg", domain="replay").group == "replay:antoine"
    # the same subject id in another domain is another group
    assert _row("0001_00.jpg", domain="casia").group != _row("0001_00.jpg").group
    # real and spoof of one subject share a group (so a split never separates them)
    assert _row("0007_00.jpg", label="real").group == _row("0007_99.jpg", label="spoof").group


def test_group_from_read_manifest(manifest):
    rows = read_manifest(manifest)
    assert [r.group for r in rows] == ["nuaa:0001", "nuaa:0001", "nuaa:0002", "replay:antoine", "default:other"]


def test_select_by_domain_and_split(manifest):
    rows = read_manifest(manifest)
    assert select(rows) == rows
    assert [r.rel_path for r in select(rows, ["nuaa"])] == [r["path"] for r in ROWS[:3]]
    assert [r.domain for r in select(rows, ["replay", "default"])] == ["replay", "default"]
    assert [r.rel_path for r in select(rows, ["nuaa"], "train")] == [r["path"] for r in ROWS[:2]]
    assert [r.rel_path for r in select(rows, None, "test")] == [ROWS[2]["path"], ROWS[4]["path"]]
    assert [r.rel_path for r in select(rows, None, "")] == [ROWS[3]["path"]]  # rows without a split
    assert select(rows, ["casia"]) == []
    assert select(rows, [], None) == []

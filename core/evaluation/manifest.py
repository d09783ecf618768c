"""Manifests: CSV files listing labelled images (the format of ``shared/data/fas-dev/manifest.csv``).

Columns: ``path,label,attack_type,domain,split`` (more are ignored). ``path`` is relative to the
manifest's folder unless a root is given.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..errors import TarfasError

REQUIRED = ("path", "label")
LABELS = ("real", "spoof")


class ManifestError(TarfasError):
    pass


@dataclass(frozen=True)
class ManifestRow:
    path: Path  # absolute path of the image
    rel_path: str  # as written in the manifest
    label: str  # "real" | "spoof"
    attack_type: str  # "print" | "replay" | "unknown" | "" for real faces
    domain: str
    split: str

    @property
    def y(self) -> int:
        """1 for spoof (the positive class of every metric), 0 for real."""
        return int(self.label == "spoof")

    @property
    def group(self) -> str:
        """Capture group for leakage-free splits: subject id = first token of the file stem
        (NUAA ``0001_00_00_01_101.jpg`` -> ``0001``; ``antoine.jpg`` -> ``antoine``)."""
        return f"{self.domain}:{Path(self.rel_path).stem.split('_')[0]}"


def read_manifest(path: str | Path, root: str | Path | None = None) -> list[ManifestRow]:
    """Read and validate a manifest. Raises ManifestError naming the line of the first problem."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found")
    base = Path(root) if root else path.parent
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a byte-order mark
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{path}: missing columns {missing}; found {reader.fieldnames}")
        for line, r in enumerate(reader, start=2):
            label = (r.get("label") or "").strip().lower()
            if label not in LABELS:
                raise ManifestError(f"{path}:{line}: label must be 'real' or 'spoof', got {r.get('label')!r}")
            rel = (r.get("path") or "").strip()
            if not rel:
                raise ManifestError(f"{path}:{line}: empty path")
            rows.append(
                ManifestRow(
                    path=(base / rel).resolve(),
                    rel_path=rel,
                    label=label,
                    attack_type=(r.get("attack_type") or "").strip().lower(),
                    domain=(r.get("domain") or "").strip() or "default",
                    split=(r.get("split") or "").strip().lower(),
                )
            )
    return rows


def select(rows: list[ManifestRow], domains: list[str] | None = None, split: str | None = None) -> list[ManifestRow]:
    """Rows of the given domains (None = all) and split (None = any; "" = rows without a split)."""
    return [r for r in rows if (domains is None or r.domain in domains) and (split is None or r.split == split)]

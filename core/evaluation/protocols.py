"""Evaluation protocols: which images calibrate the decision threshold and which are tested, driven
by manifests and a small YAML/JSON file (not to be confused with :mod:`core.protocol`, the CoT-VT
conversation protocol).

A protocol file::

    name: one-to-n-nuaa
    kind: one_to_n            # one_to_n | leave_one_out | per_domain
    description: free text
    manifests:                # paths relative to this file; $VARS and ~ are expanded
      - ../../shared/data/fas-dev/manifest.csv
      # - {path: other.csv, root: /data/other}
    source: {domain: nuaa, split: train}      # one_to_n: where the threshold is calibrated
    targets: [{domain: nuaa, split: test, name: nuaa-test}, apfol, rienheuver]  # default: every other domain
    domains: [...]            # leave_one_out: each one is held out in turn, the others are the source;
                              # an entry may give source_split / target_split (ICMO: train / test)
    threshold: source_eer     # source_eer (default with a source) | policy | a number
    limit_per_domain: 400     # optional: a seeded sample of at most N images per selection

A *selection* is a domain name, or a mapping with ``domain`` (or ``domains``), optional ``split``
(``""`` = rows without a split), optional ``manifest`` (index into ``manifests``) and ``name``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TarfasError
from .manifest import ManifestRow, read_manifest

KINDS = ("one_to_n", "leave_one_out", "per_domain")
THRESHOLD_MODES = ("source_eer", "policy")


class ProtocolError(TarfasError):
    pass


@dataclass(frozen=True)
class Part:
    domain: str | None = None  # None = any domain
    split: str | None = None  # None = any split
    manifest: int | None = None  # None = any manifest of the protocol

    def matches(self, manifest_index: int, row: ManifestRow) -> bool:
        return (
            (self.domain is None or row.domain == self.domain)
            and (self.split is None or row.split == self.split)
            and (self.manifest is None or manifest_index == self.manifest)
        )


@dataclass(frozen=True)
class Selection:
    """A named union of (domain, split, manifest) parts."""

    name: str
    parts: tuple[Part, ...]

    def pick(self, pool: list[tuple[int, ManifestRow]]) -> list[ManifestRow]:
        return [r for i, r in pool if any(p.matches(i, r) for p in self.parts)]


@dataclass
class Fold:
    """One train/calibrate -> test setting: the threshold comes from ``source`` (or is given)."""

    name: str
    source: Selection | None
    targets: list[Selection]


@dataclass
class Protocol:
    name: str
    kind: str
    folds: list[Fold]
    manifests: list[tuple[Path, Path | None]]  # (manifest, root)
    threshold: str | float = "policy"  # "source_eer" | "policy" | a fixed number
    description: str = ""
    limit_per_domain: int | None = None
    limit: int | None = None  # a seeded sample of at most N target images in all (plain `tarfas eval --limit`)
    threshold_origin: str = "protocol/--threshold"  # who gave a numeric threshold (shown with it)
    path: Path | None = None  # the protocol file, when there is one
    spec: dict = field(default_factory=dict)  # as written (recorded in reports)

    def read_pool(self) -> list[tuple[int, ManifestRow]]:
        """Every row of every manifest, tagged with its manifest's index."""
        pool = []
        for i, (m, root) in enumerate(self.manifests):
            pool += [(i, r) for r in read_manifest(m, root)]
        return pool

    def selections(self) -> list[Selection]:
        out: dict[Selection, None] = {}
        for f in self.folds:
            for s in ([f.source] if f.source else []) + f.targets:
                out[s] = None
        return list(out)

    def sample(self, rows: list[ManifestRow], seed: int, limit: int | None = None) -> list[ManifestRow]:
        """The rows of one selection, capped at ``limit`` (default: the protocol's) by a seeded sample."""
        limit = limit if limit is not None else self.limit_per_domain
        rows = sorted(rows, key=lambda r: r.rel_path)
        if limit and len(rows) > limit:
            rows = sorted(random.Random(seed).sample(rows, limit), key=lambda r: r.rel_path)
        return rows

    def file_sha256(self) -> str | None:
        return hashlib.sha256(self.path.read_bytes()).hexdigest() if self.path else None


# --- parsing -------------------------------------------------------------------------------------
def _selection(spec, where: str) -> Selection:
    if isinstance(spec, str):
        return Selection(spec, (Part(spec),))
    if not isinstance(spec, dict):
        raise ProtocolError(f"{where}: a selection is a domain name or a mapping, got {spec!r}")
    unknown = set(spec) - {"domain", "domains", "split", "manifest", "name"}
    if unknown:
        raise ProtocolError(f"{where}: unknown keys {sorted(unknown)}")
    domains = spec.get("domains") or ([spec["domain"]] if spec.get("domain") is not None else [None])
    if isinstance(domains, str):
        domains = [domains]
    split = spec.get("split")
    split = None if split is None else str(split).strip().lower()
    manifest = spec.get("manifest")
    parts = tuple(Part(d, split, manifest) for d in domains)
    default = "+".join(d or "all" for d in domains) + (f"-{split}" if split else "")
    return Selection(str(spec.get("name") or default), parts)


def _union(name: str, selections: list[Selection]) -> Selection:
    return Selection(name, tuple(p for s in selections for p in s.parts))


def _threshold(value, has_source: bool, where: str) -> str | float:
    if value is None:
        return "source_eer" if has_source else "policy"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if value not in THRESHOLD_MODES:
        raise ProtocolError(f"{where}: threshold must be a number or one of {THRESHOLD_MODES}, got {value!r}")
    if value == "source_eer" and not has_source:
        raise ProtocolError(f"{where}: threshold 'source_eer' needs a source")
    return value


def parse_protocol(spec: dict, base: Path, *, path: Path | None = None) -> Protocol:
    """Build a Protocol from its parsed YAML/JSON; manifest paths are relative to ``base``."""
    where = str(path or "protocol")
    if not isinstance(spec, dict):
        raise ProtocolError(f"{where}: expected a mapping at the top level")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ProtocolError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    manifests = []
    for m in spec.get("manifests") or ([spec["manifest"]] if spec.get("manifest") else []):
        mp, root = (m, None) if isinstance(m, str) else (m.get("path"), m.get("root"))
        if not mp:
            raise ProtocolError(f"{where}: manifest entry without a path: {m!r}")
        resolve = lambda p: (base / os.path.expanduser(os.path.expandvars(str(p)))).resolve()  # noqa: E731
        manifests.append((resolve(mp), resolve(root) if root else None))
    if not manifests:
        raise ProtocolError(f"{where}: no manifests")
    proto = Protocol(
        name=str(spec.get("name") or (path.stem if path else kind)),
        kind=kind,
        folds=[],
        manifests=manifests,
        description=str(spec.get("description") or ""),
        limit_per_domain=spec.get("limit_per_domain"),
        path=path,
        spec=spec,
    )
    if kind == "one_to_n":
        if not spec.get("source"):
            raise ProtocolError(f"{where}: one_to_n needs a source")
        source = _selection(spec["source"], f"{where}: source")
        if spec.get("targets"):
            targets = [_selection(t, f"{where}: targets") for t in spec["targets"]]
        else:  # every domain that the source does not name
            named = {p.domain for p in source.parts}
            domains = sorted({r.domain for _, r in proto.read_pool()} - named)
            targets = [Selection(d, (Part(d),)) for d in domains]
        if not targets:
            raise ProtocolError(f"{where}: no target domains")
        proto.folds = [Fold(f"{source.name} -> others", source, targets)]
    elif kind == "leave_one_out":
        entries = spec.get("domains") or []
        if len(entries) < 2:
            raise ProtocolError(f"{where}: leave_one_out needs at least two domains")
        as_target, as_source = [], []
        for d in entries:
            # source_split / target_split: e.g. ICMO, where a dataset is a source through its train
            # split and the target through its test split
            if isinstance(d, dict) and ("source_split" in d or "target_split" in d):
                base_spec = {k: v for k, v in d.items() if k not in ("source_split", "target_split")}
                t = _selection(dict(base_spec, split=d.get("target_split", d.get("split"))), f"{where}: domains")
                src = _selection(dict(base_spec, split=d.get("source_split", d.get("split"))), f"{where}: domains")
                as_target.append(t)
                as_source.append(Selection(t.name, src.parts))
            else:
                sel = _selection(d, f"{where}: domains")
                as_target.append(sel)
                as_source.append(sel)
        for i, held in enumerate(as_target):
            rest = [d for j, d in enumerate(as_source) if j != i]
            proto.folds.append(Fold(f"-> {held.name}", _union("+".join(d.name for d in rest), rest), [held]))
    else:  # per_domain: no source; the threshold is given or the policy's own
        if spec.get("targets"):
            targets = [_selection(t, f"{where}: targets") for t in spec["targets"]]
        else:
            targets = [Selection(d, (Part(d),)) for d in sorted({r.domain for _, r in proto.read_pool()})]
        source = _selection(spec["source"], f"{where}: source") if spec.get("source") else None
        proto.folds = [Fold("per domain", source, targets)]
    proto.threshold = _threshold(spec.get("threshold"), proto.folds[0].source is not None, where)
    return proto


def load_protocol(path: str | Path) -> Protocol:
    """Read a protocol file (``.yaml``/``.yml``/``.json``)."""
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"protocol {path} not found")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            spec = json.loads(text)
        else:
            import yaml

            spec = yaml.safe_load(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError: say which file
        raise ProtocolError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from exc
    return parse_protocol(spec, path.parent, path=path.resolve())


def is_protocol_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".yaml", ".yml", ".json")


def manifest_protocol(
    manifest: str | Path,
    root: str | Path | None = None,
    *,
    domains: list[str] | None = None,
    split: str | None = None,
    threshold: str | float = "policy",
    dev_manifest: str | Path | None = None,
    limit: int | None = None,
) -> Protocol:
    """The protocol that ``tarfas eval MANIFEST`` runs: every domain (or the given ones) tested at one
    threshold, fixed a priori (a number, the policy's, or the EER of ``dev_manifest``)."""
    manifests = [(Path(manifest).resolve(), Path(root).resolve() if root else None)]
    rows = read_manifest(manifest, root)
    split = None if split is None else split.strip().lower()
    present = {r.domain for r in rows if split is None or r.split == split}
    pool_domains = [d for d in (domains or sorted(present)) if d in present]
    if not pool_domains:
        raise ProtocolError(
            f"no rows left after the domain/split filters (domains {domains or 'all'}, split {split or 'any'}; "
            f"the manifest's domains: {', '.join(sorted({r.domain for r in rows}))})"
        )
    targets = [Selection(d + (f"-{split}" if split else ""), (Part(d, split, 0),)) for d in pool_domains]
    source = None
    if dev_manifest:
        manifests.append((Path(dev_manifest).resolve(), None))
        source = Selection(f"dev ({dev_manifest})", (Part(None, None, 1),))
        threshold = "source_eer"
    spec = {
        "manifest": str(manifest),
        "domains": domains,
        "split": split,
        "dev_manifest": str(dev_manifest) if dev_manifest else None,
        "threshold": threshold,
        "limit": limit,
    }
    return Protocol(
        Path(manifest).stem,
        "per_domain",
        [Fold("per domain", source, targets)],
        manifests,
        threshold,
        limit=limit,
        threshold_origin="--threshold",
        spec=spec,
    )

"""The trajectory dataset format: what the workbench exports, what the annotation pipeline writes and
what training reads. A dataset is one folder::

    manifest.json          format + version, source, who and when, counts, SHA-256 of every file
    trajectories.jsonl     one TrajectoryRecord per line: a whole investigation as chat messages
    queries.jsonl          one QueryRecord per line: a (face crop, label) pair for GRPO
    images/<sha256>.png    every image once, named by the SHA-256 of its PNG bytes

Messages keep the content-part layout of :func:`core.trajectory.to_messages`. On disk an image part
is ``{"type": "image", "path": "images/<sha>.png"}``; :meth:`Dataset.messages` adds the pixels back as
``"image"``, so training renders dataset trajectories exactly as the agent loop renders live ones.

Writing is append-only and resumable: each record is one flushed line, written after its images, so
a killed writer leaves at most a torn last line, which :class:`DatasetWriter` drops on resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from . import protocol
from .errors import TarfasError
from .protocol import Verdict
from .registry import ToolRegistry
from .trajectory import Trajectory, to_messages

FORMAT = "tarfas-trajectories"
VERSION = 1
MANIFEST = "manifest.json"
TRAJECTORIES = "trajectories.jsonl"
QUERIES = "queries.jsonl"
IMAGES = "images"
LABELS = ("real", "spoof")


class DatasetError(TarfasError):
    """A dataset folder is missing, of another format, tampered with, or would be overwritten."""


@dataclass
class TrajectoryRecord:
    """One investigation as chat messages (system, user image + query, assistant turns, tool images)."""

    id: str
    messages: list[dict]  # image parts hold "path" (relative to the folder) on disk
    label: Verdict | None  # ground truth: dataset label or the analyst's verdict
    attack_type: str | None = None
    source: str = ""  # "app-export", "annotation", "expert", ...
    meta: dict[str, Any] = field(default_factory=dict)  # provenance: case, investigation, review, flags

    @property
    def image_paths(self) -> list[str]:
        return [p["path"] for m in self.messages for p in m["content"] if p.get("type") == "image"]


@dataclass
class QueryRecord:
    """A face crop and its label: the input of a GRPO rollout."""

    id: str
    image: str  # relative path of the 224x224 crop
    label: Verdict
    attack_type: str | None = None
    domain: str | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def _check_label(label: str | None, *, required: bool) -> None:
    if label is None and not required:
        return
    if label not in LABELS:
        raise DatasetError(f"label must be one of {LABELS}, got {label!r}")


# zlib level 1 with run-length matching and the SUB row filter: lossless, about as small as PIL's
# level 1, and 2-3x faster (it was the largest cost of storing an investigation); OpenCV releases the
# GIL while it encodes, so the app's workers overlap.
_FAST_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):
    _FAST_PNG += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 gray or RGB image (other layouts go through Pillow)."""
    image = np.ascontiguousarray(image)
    if image.dtype == np.uint8 and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        ok, buf = cv2.imencode(".png", image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR), _FAST_PNG)
        if ok:
            return buf.tobytes()
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DatasetWriter:
    """Append records to a dataset folder; ``close()`` writes the manifest.

    ``resume=True`` continues a folder written before (same ``source``): records already there are
    kept, ``has(id)`` tells which, and adding one of them again raises. Without ``resume`` the folder
    must be new or empty, so an export never silently mixes with an older one.
    """

    def __init__(
        self, folder: str | Path, *, source: str, created_by: str, resume: bool = False, extra: dict | None = None
    ):
        self.folder = Path(folder)
        self.source = source
        self.created_by = created_by
        self.extra = dict(extra or {})
        existing = self.folder.exists() and any(self.folder.iterdir())
        if existing and not resume:
            raise DatasetError(
                f"{self.folder} is not empty; choose a new folder (or resume a dataset of the same source)"
            )
        (self.folder / IMAGES).mkdir(parents=True, exist_ok=True)
        self.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if existing:
            manifest = _read_manifest(self.folder, required=False)
            if manifest is not None:
                if manifest.get("source") != source:
                    raise DatasetError(f"{self.folder} holds a {manifest.get('source')!r} dataset, not {source!r}")
                self.created_at = manifest.get("created_at", self.created_at)
                self.extra = manifest.get("extra", {}) | self.extra
        self._ids = {
            TRAJECTORIES: repair_jsonl(self.folder / TRAJECTORIES),
            QUERIES: repair_jsonl(self.folder / QUERIES),
        }
        self._files = {name: open(self.folder / name, "a", encoding="utf-8") for name in (TRAJECTORIES, QUERIES)}

    # --- adding -------------------------------------------------------------------------------
    def has(self, record_id: str) -> bool:
        return record_id in self._ids[TRAJECTORIES] or record_id in self._ids[QUERIES]

    def add_image(self, image: np.ndarray) -> str:
        """Store an image (once) and return its path relative to the folder."""
        data = png_bytes(image)
        rel = f"{IMAGES}/{hashlib.sha256(data).hexdigest()}.png"
        path = self.folder / rel
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # never a half-written image under its final name
        return rel

    def add_trajectory(
        self,
        traj: Trajectory,
        *,
        id: str | None = None,
        label: Verdict | None = None,
        attack_type: str | None = None,
        meta: dict | None = None,
    ) -> TrajectoryRecord:
        """Render ``traj`` as the messages the model saw (inference system prompt and tools) and append it."""
        label = label if label is not None else traj.label
        _check_label(label, required=False)
        system = protocol.system_prompt(ToolRegistry(traj.tools or None).schemas())
        messages = []
        for m in to_messages(traj, system=system):
            content = []
            for part in m["content"]:
                if part["type"] == "image":
                    if part.get("image") is None:
                        raise DatasetError(f"trajectory {traj.id}: an image of the conversation is missing")
                    content.append({"type": "image", "path": self.add_image(part["image"])})
                else:
                    content.append(part)
            messages.append({"role": m["role"], "content": content})
        record = TrajectoryRecord(id or traj.id, messages, label, attack_type, self.source, dict(meta or {}))
        self._append(TRAJECTORIES, record.id, asdict(record))
        return record

    def add_query(
        self,
        image: np.ndarray,
        label: Verdict,
        *,
        id: str,
        attack_type: str | None = None,
        domain: str | None = None,
        meta: dict | None = None,
    ) -> QueryRecord:
        _check_label(label, required=True)
        record = QueryRecord(id, self.add_image(image), label, attack_type, domain, self.source, dict(meta or {}))
        self._append(QUERIES, record.id, asdict(record))
        return record

    def _append(self, name: str, record_id: str, obj: dict) -> None:
        if record_id in self._ids[name]:
            raise DatasetError(f"record {record_id!r} is already in {self.folder / name}")
        f = self._files[name]
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        self._ids[name].add(record_id)

    # --- finishing ----------------------------------------------------------------------------
    def close(self) -> dict:
        """Write manifest.json (counts and the SHA-256 of every file) and return it."""
        for f in self._files.values():
            f.close()
        files = {name: sha256_file(self.folder / name) for name in (TRAJECTORIES, QUERIES)}
        images = sorted(p.name for p in (self.folder / IMAGES).glob("*.png"))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "source": self.source,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "closed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "counts": {
                "trajectories": len(self._ids[TRAJECTORIES]),
                "queries": len(self._ids[QUERIES]),
                "images": len(images),
            },
            "files": files,
            "extra": self.extra,
        }
        tmp = self.folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        os.replace(tmp, self.folder / MANIFEST)
        return manifest

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def repair_jsonl(path: Path) -> set[str]:
    """Ids already in a JSONL file of records with an ``id``, for a writer that resumes it: a torn last
    line (killed writer) is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    ids, good = set(), 0
    for line in data.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("torn line")
            ids.add(json.loads(line)["id"])
        except (ValueError, KeyError):
            break
        good += len(line)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return ids


def _read_manifest(folder: Path, *, required: bool = True) -> dict | None:
    path = folder / MANIFEST
    if not path.exists():
        if required:
            raise DatasetError(f"{folder} has no {MANIFEST}: not a tarfas dataset, or its writer never finished")
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc.msg})") from None
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{folder} is a {manifest.get('format')!r} folder, not {FORMAT!r}")
    if manifest.get("version", 0) > VERSION:
        raise DatasetError(f"{folder} is format version {manifest['version']}; this tarfas reads up to {VERSION}")
    return manifest


@dataclass
class Dataset:
    folder: Path
    manifest: dict
    trajectories: list[TrajectoryRecord]
    queries: list[QueryRecord]

    def image(self, rel: str) -> np.ndarray:
        """Load an image of the dataset as stored (uint8 gray or RGB), checking its bytes match its name."""
        path = (self.folder / rel).resolve()
        if not path.is_relative_to(self.folder.resolve() / IMAGES):
            raise DatasetError(f"image path {rel!r} points outside {self.folder / IMAGES}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != path.stem:
            raise DatasetError(f"{path} does not match its SHA-256 name: the file was changed")
        return np.asarray(Image.open(io.BytesIO(data)))

    def messages(self, record: TrajectoryRecord) -> list[dict]:
        """The record's messages with each image part's pixels loaded into ``"image"``."""
        return [
            {
                "role": m["role"],
                "content": [
                    p | {"image": self.image(p["path"])} if p.get("type") == "image" else p for p in m["content"]
                ],
            }
            for m in record.messages
        ]


def read_dataset(folder: str | Path, *, verify: bool = True) -> Dataset:
    """Read a dataset folder. ``verify`` checks the JSONL files against the manifest's hashes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder")
    manifest = _read_manifest(folder)
    if verify:
        for name, sha in manifest.get("files", {}).items():
            if not (folder / name).exists() or sha256_file(folder / name) != sha:
                raise DatasetError(
                    f"{folder / name} does not match the SHA-256 in {MANIFEST}: changed after the export"
                )
    trajectories = [TrajectoryRecord(**obj) for obj in read_jsonl(folder / TRAJECTORIES)]
    queries = [QueryRecord(**obj) for obj in read_jsonl(folder / QUERIES)]
    for r in trajectories:
        _check_label(r.label, required=False)
    for q in queries:
        _check_label(q.label, required=True)
    return Dataset(folder, manifest, trajectories, queries)


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSONL file ([] when there is none); a line that is not JSON is a DatasetError."""
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{n} is not valid JSON ({exc.msg})") from None
    return out

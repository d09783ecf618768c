"""Training data for the three stages, from one loader.

Every source is a dataset folder of :mod:`core.dataset` (the app's export, the annotation pipeline's
output, or a folder this module builds). A manifest CSV (``fas-dev/manifest.csv`` format) is first
turned into such a folder by running the offline expert policy on each image
(:func:`build_from_manifest`), so there is one format to read. From the loaded folders come three views:

- **KT** (knowledge transfer, §3.2.1): system + (face, first-round query) -> the fast answer
  ``<CLS><reason>..</reason>``. The recorded fast answer when it agrees with the label, otherwise one
  written from the label with a one-line reason.
- **FI** (format injection, §3.2.2): whole multi-turn trajectories, tool images as user turns, exactly
  as the agent loop renders them. Only well-formed trajectories whose final answer is the label are kept
  (the paper's annotations always end on the label); the dropped ones are counted by reason.
- **GRPO** (§3.2.3): (face crop, label) queries; the prompt is what the agent loop shows first.

Rows are plain dicts in TRL's conversational vision format: ``messages`` (or ``prompt``) whose image
parts are ``{"type": "image"}`` placeholders, filled in order from ``images`` (file paths, decoded
lazily by :mod:`datasets`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from core import protocol
from core.dataset import Dataset, DatasetError, DatasetWriter, TrajectoryRecord, read_dataset, sha256_file
from core.errors import ProtocolParseError, TarfasError
from core.registry import ToolRegistry

# One-line reasons for fast answers written from a label (KT targets of query-only data), in the style
# of I-FAS: what a first glance at the face would say. They carry the class, not invented evidence.
LABEL_REASONS = {
    "real": "The face shows natural skin texture, depth and lighting, with no sign of a print or a screen.",
    "spoof": "The face looks like a recaptured presentation: flat texture and print or screen artifacts.",
}


class TrainingDataError(TarfasError):
    """No usable training data, or a source that is neither a dataset folder nor a manifest."""


@dataclass
class LoadedData:
    """The dataset folders behind one training run, and what each view kept or dropped."""

    datasets: list[Dataset]
    sources: list[str]  # as given (folder or manifest)
    stats: dict = field(default_factory=dict)

    def fingerprints(self) -> list[dict]:
        """What lineage records: each folder, its source kind, and the SHA-256 of its manifest file."""
        out = []
        for src, ds in zip(self.sources, self.datasets, strict=True):
            mf = ds.folder / "manifest.json"
            out.append({
                "given": src, "folder": str(ds.folder.resolve()), "source": ds.manifest.get("source"),
                "manifest_sha256": sha256_file(mf), "files": ds.manifest.get("files", {}),
                "counts": ds.manifest.get("counts", {}),
            })  # fmt: skip
        return out


# --- loading --------------------------------------------------------------------------------------------
def load_sources(
    sources: list[str],
    *,
    build_dir: str | Path,
    domains: list[str] | None = None,
    split: str | None = None,
    max_examples: int | None = None,
    seed: int = 0,
) -> LoadedData:
    """Read dataset folders and manifests (built into ``build_dir`` first) as :class:`LoadedData`."""
    if not sources:
        raise TrainingDataError("no training data given: pass --data with a dataset folder or a manifest CSV")
    datasets = []
    for src in sources:
        path = Path(src)
        if path.is_dir():
            datasets.append(read_dataset(path))
        elif path.is_file() and path.suffix.lower() == ".csv":
            key = hashlib.sha256(
                json.dumps([str(path.resolve()), domains, split, max_examples, seed]).encode()
            ).hexdigest()[:12]
            folder = build_from_manifest(
                path,
                Path(build_dir) / f"{path.stem}-{key}",
                domains=domains,
                split=split,
                limit=max_examples,
                seed=seed,
            )
            datasets.append(read_dataset(folder))
        else:
            raise TrainingDataError(f"{src} is neither a dataset folder (manifest.json inside) nor a manifest .csv")
    return LoadedData(datasets, [str(s) for s in sources])


def build_from_manifest(
    manifest: str | Path,
    out: str | Path,
    *,
    domains: list[str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    max_tool_calls: int = 3,
    weights: str | None = None,
) -> Path:
    """Turn a manifest into a dataset folder: each face's expert-policy trajectory (FI) and its (crop,
    label) query (KT, GRPO). Resumable: images already in ``out`` are skipped. Returns ``out``."""
    from core import agent
    from core.evaluation.manifest import read_manifest, select
    from core.evaluation.scoring import load_face
    from core.policies import resolve

    rows = select(read_manifest(manifest), domains or None, split)
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    if not rows:
        raise TrainingDataError(f"{manifest}: no rows left after the domain/split selection")
    out = Path(out)
    if (out / "manifest.json").exists():
        return out  # built before with the same selection (the folder name is its hash)
    policy, registry = resolve("expert", weights=weights)
    config = agent.AgentConfig(max_tool_calls=max_tool_calls, extra={"on_no_face": "whole"})
    writer = DatasetWriter(out, source="manifest-expert", created_by="tarfas train", resume=True,
                           extra={"manifest": str(manifest), "domains": domains, "split": split, "limit": limit, "seed": seed})  # fmt: skip
    skipped = Counter()
    with writer:
        for row in rows:
            rid = hashlib.sha256(row.rel_path.encode()).hexdigest()[:16]
            if writer.has(rid):
                continue
            face = load_face(row, "whole")
            if isinstance(face, str):
                skipped["unreadable"] += 1
                continue
            traj = agent.run(face, policy, config, registry=registry, source=row.rel_path, label=row.label)
            meta = {"path": row.rel_path, "domain": row.domain}
            if traj.status == "completed":
                writer.add_trajectory(traj, id=rid, label=row.label, attack_type=row.attack_type or None, meta=meta)
            writer.add_query(
                face.crop, row.label, id=rid + "-q", attack_type=row.attack_type or None, domain=row.domain, meta=meta
            )
        writer.extra["skipped"] = dict(skipped)
    return out


# --- views ----------------------------------------------------------------------------------------------
def _placeholders(messages: list[dict], folder: Path) -> tuple[list[dict], list[str]]:
    """Messages with image parts as ``{"type": "image"}`` and the images' absolute paths, in order."""
    images, out = [], []
    for m in messages:
        content = []
        for part in m["content"]:
            if part.get("type") == "image":
                rel = part["path"]
                if not (folder / rel).resolve().is_relative_to((folder / "images").resolve()):
                    raise DatasetError(f"image path {rel!r} points outside {folder / 'images'}")
                images.append(str((folder / rel).resolve()))
                content.append({"type": "image"})
            else:
                content.append({"type": "text", "text": part["text"]})
        out.append({"role": m["role"], "content": content})
    return out, images


def _first_image(record: TrajectoryRecord) -> str:
    return record.image_paths[0]


def _first_prompt(system: str, image_path: str) -> tuple[list[dict], list[str]]:
    return (
        [{"role": "system", "content": [{"type": "text", "text": system}]},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": protocol.FIRST_ROUND_QUERY}]}],
        [image_path],
    )  # fmt: skip


def kt_examples(data: LoadedData, *, max_examples: int | None = None, seed: int = 0) -> list[dict]:
    """KT rows: one per distinct face image of every folder."""
    system = protocol.system_prompt(ToolRegistry(None).schemas())
    rows, seen, stats = [], set(), Counter()
    for ds in data.datasets:
        for rec in ds.trajectories:
            if rec.label is None or len(rec.messages) < 3 or rec.messages[2]["role"] != "assistant":
                stats["kt_skipped_unlabelled_or_short"] += 1
                continue
            img = str((ds.folder / _first_image(rec)).resolve())
            if img in seen:
                continue
            seen.add(img)
            msgs, images = _placeholders(rec.messages[:3], ds.folder)
            text = rec.messages[2]["content"][0]["text"]
            try:
                fast = protocol.parse_fast_answer(text)
            except ProtocolParseError:
                fast = None
            if fast is None or fast.verdict != rec.label:
                msgs[2] = {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": protocol.format_fast_answer(rec.label, LABEL_REASONS[rec.label])}
                    ],
                }
                stats["kt_from_label"] += 1
            else:
                stats["kt_from_trajectory"] += 1
            rows.append({"messages": msgs, "images": images, "label": rec.label, "source": rec.source})
        for q in ds.queries:
            img = str((ds.folder / q.image).resolve())
            if img in seen:
                continue
            seen.add(img)
            msgs, images = _first_prompt(system, img)
            msgs.append(
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": protocol.format_fast_answer(q.label, LABEL_REASONS[q.label])}],
                }
            )
            rows.append({"messages": msgs, "images": images, "label": q.label, "source": q.source})
            stats["kt_from_label"] += 1
    data.stats.update(stats)
    return _cap(rows, max_examples, seed)


def fi_check(record: TrajectoryRecord, *, keep_mismatched: bool = False) -> str | None:
    """Why a trajectory is unfit for format injection, or None if it is fit. Uses the protocol's parsers:
    the fast answer, then think + tool call turns, ending in think + answer (= the label)."""
    msgs = record.messages
    assistant = [m["content"][0]["text"] for m in msgs if m["role"] == "assistant"]
    if record.label is None:
        return "unlabelled"
    if len(assistant) < 2:
        return "no_reasoning"
    try:
        protocol.parse_fast_answer(assistant[0])
        turns = [protocol.parse_reasoning_turn(t) for t in assistant[1:]]
    except ProtocolParseError:
        return "malformed_turn"
    if turns[-1].answer is None or any(t.answer is not None for t in turns[:-1]):
        return "no_final_answer"
    # A well-formed call the registry refused (bad bbox, unknown tool) is answered by an error text, not by
    # the tool's image: every tool call must be followed by a user turn that holds an image.
    at = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    calls = [at[j + 1] for j, t in enumerate(turns) if t.tool_call is not None]
    if any(i + 1 >= len(msgs) or not any(p.get("type") == "image" for p in msgs[i + 1]["content"]) for i in calls):
        return "refused_tool_call"
    if not keep_mismatched and turns[-1].answer != record.label:
        return "final_answer_not_label"
    return None


def fi_examples(
    data: LoadedData, *, keep_mismatched: bool = False, max_examples: int | None = None, seed: int = 0
) -> list[dict]:
    """FI rows: whole trajectories (system, face + query, fast answer, re-examine prompt, tool turns)."""
    rows, stats = [], Counter()
    for ds in data.datasets:
        for rec in ds.trajectories:
            why = fi_check(rec, keep_mismatched=keep_mismatched)
            if why is not None:
                stats[f"fi_dropped_{why}"] += 1
                continue
            msgs, images = _placeholders(rec.messages, ds.folder)
            rows.append({"messages": msgs, "images": images, "label": rec.label, "source": rec.source})
            stats["fi_kept"] += 1
    data.stats.update(stats)
    return _cap(rows, max_examples, seed)


def grpo_queries(data: LoadedData, *, max_examples: int | None = None, seed: int = 0) -> list[dict]:
    """GRPO rows: the first prompt of an investigation and its label, one per distinct face image."""
    system = protocol.system_prompt(ToolRegistry(None).schemas())
    rows, seen = [], set()
    for ds in data.datasets:
        items = [(q.id, q.image, q.label) for q in ds.queries]
        items += [(r.id, _first_image(r), r.label) for r in ds.trajectories if r.label is not None]
        for rid, rel, label in items:
            img = str((ds.folder / rel).resolve())
            if img in seen:
                continue
            seen.add(img)
            prompt, _ = _first_prompt(system, img)
            rows.append({"prompt": prompt, "image": img, "label": label, "id": rid})
    data.stats["grpo_queries"] = len(rows)
    return _cap(rows, max_examples, seed)


def _cap(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    return rows if n is None or n >= len(rows) else random.Random(seed).sample(rows, n)


def to_hf_dataset(rows: list[dict]):
    """A :class:`datasets.Dataset` whose image columns decode lazily from the file paths."""
    from datasets import Dataset as HFDataset
    from datasets import Image, Sequence

    if not rows:
        raise TrainingDataError("the selected view of the data is empty (see the kept/dropped counts above)")
    ds = HFDataset.from_list(rows)
    if "images" in ds.column_names:
        ds = ds.cast_column("images", Sequence(Image()))
    if "image" in ds.column_names:
        ds = ds.cast_column("image", Image())
    return ds

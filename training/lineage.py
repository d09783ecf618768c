"""Checkpoint lineage: what a trained adapter or model was made from, written beside it as
``tarfas_lineage.json`` (base model, its weights' SHA-256, the parent adapter's lineage, the data folders
with the SHA-256 of their manifests and files, the full config, versions, and the measured result).

The ``hf`` policy shows it when the checkpoint is picked (:mod:`core.lineage` reads it back).
"""

from __future__ import annotations

import dataclasses
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

from core.dataset import sha256_file
from core.lineage import LINEAGE_FILE, read_lineage  # the read side lives in core (the hf policy shows it)


def weights_digest(folder: str | Path) -> dict[str, str]:
    """SHA-256 of every safetensors file of a model or adapter folder."""
    folder = Path(folder)
    return {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}


def write_lineage(
    out: str | Path,
    *,
    kind: str,
    stage: str,
    config,
    base_model: str,
    parent: str | None,
    data: list[dict],
    stats: dict,
    result: dict,
) -> Path:
    """Write ``tarfas_lineage.json`` into ``out`` (an adapter or model folder) and return its path.
    ``kind``: "lora-adapter" or "full-model"; ``stage``: "kt", "fi", "grpo"."""
    import peft
    import torch
    import transformers
    import trl

    out = Path(out)
    record = {
        "format": "tarfas-lineage", "version": 1, "kind": kind, "stage": stage,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": {"path": str(Path(base_model).resolve()), "weights_sha256": weights_digest(base_model)},
        "parent_adapter": None if parent is None else {"path": str(Path(parent).resolve()), "weights_sha256": weights_digest(parent), "lineage": read_lineage(parent)},
        "data": data, "data_stats": stats,
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config),
        "result": result,
        "weights_sha256": weights_digest(out),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "peft": peft.__version__, "python": platform.python_version()},
    }  # fmt: skip
    path = out / LINEAGE_FILE
    path.write_text(json.dumps(record, indent=2, default=str))
    return path

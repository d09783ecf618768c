"""Checkpoint lineage, read side: ``tarfas_lineage.json`` beside a trained adapter or model says what it
was made from (written by :mod:`training.lineage`). The ``hf`` policy shows it to the analyst who picks
the checkpoint, so a verdict can be traced to the data and config that shaped the model."""

from __future__ import annotations

import json
from pathlib import Path

LINEAGE_FILE = "tarfas_lineage.json"


def read_lineage(folder: str | Path) -> dict | None:
    """The lineage record of a checkpoint folder, or None when it has none (e.g. downloaded weights)."""
    path = Path(folder) / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def summarize_lineage(record: dict) -> str:
    """One line for people: stage, when, from which data (source and manifest hash) and parent."""
    data = ", ".join(
        f"{d.get('source') or 'data'} {str(d.get('manifest_sha256') or '')[:12]}".strip()
        for d in record.get("data") or []
    )
    parent = record.get("parent_adapter")
    text = f"trained by tarfas: stage {record.get('stage', '?')} ({record.get('kind', '?')}), {record.get('created_at', '?')}"
    if data:
        text += f"; data: {data}"
    if parent:
        text += f"; on top of {(parent.get('lineage') or {}).get('stage', 'an adapter')} adapter {parent.get('path')}"
    return text

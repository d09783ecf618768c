"""What every tab needs: the storage, the runner, the PNG cache, limits, and who is logged in."""

from __future__ import annotations

import getpass
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from app.runner import Runner
from storage.db import Storage

from .render import PngCache

DEFAULT_MAX_FILE_MB = 20
SAMPLES = Path(__file__).resolve().parents[2] / "assets" / "samples"


@dataclass
class AppContext:
    storage: Storage
    runner: Runner
    data_dir: Path
    png: PngCache
    max_file_bytes: int = DEFAULT_MAX_FILE_MB * 2**20
    policy_names: list[str] = field(default_factory=lambda: ["expert"])
    local_user: str = field(default_factory=lambda: _local_user())

    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"

    def threshold(self) -> float | None:
        """The default policy's decision threshold on P(spoof) (what "uncertain" is measured around): the
        active calibration profile's when it applies to that policy."""
        from app.runner import RunSettings

        try:
            return getattr(self.runner.calibrated(RunSettings())[0], "threshold", None)
        except Exception:  # noqa: BLE001 (no weights installed: the queue still works)
            return None

    def user(self, request: gr.Request | None) -> str:
        """The login name (``gr.Request.username``); without auth (localhost only) the OS user."""
        name = getattr(request, "username", None) if request is not None else None
        return name or self.local_user


def _local_user() -> str:
    try:
        return f"{getpass.getuser()}@localhost"
    except Exception:  # noqa: BLE001 (no passwd entry in some containers)
        return "local@localhost"


def samples() -> dict[str, Path]:
    """The demo images shipped in assets/samples (the simulated attacks say so in their names)."""
    return {p.stem.replace("_", " "): p for p in sorted(SAMPLES.glob("*.png"))}

"""What every tab needs: the storage, the runner, the PNG cache, limits, the policies the server offers
(:attr:`AppContext.catalog`), and who is logged in.

Every analyst choice of policy and limits becomes :class:`app.runner.RunSettings` through
:meth:`AppContext.settings_for` only, and every upload request goes through :meth:`AppContext.submit_files`:
both refuse (UserError) what the server does not allow, in words for the analyst. The runner checks the
same again, for any caller.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from app.limits import DEFAULT_MAX_FILE_MB
from app.policy_catalog import DEFAULT, PolicyCatalog, PolicyRefused, parse_arguments
from app.runner import Job, Runner, RunSettings, UploadRefused
from core.registry import ToolRegistry
from storage.db import Storage

from .errors import UserError
from .render import PngCache

SAMPLES = Path(__file__).resolve().parents[2] / "assets" / "samples"
MAX_TOOL_CALLS = 6  # the settings slider's end (the paper's best: 3)


@dataclass
class AppContext:
    storage: Storage
    runner: Runner
    data_dir: Path
    png: PngCache
    max_file_bytes: int = DEFAULT_MAX_FILE_MB * 2**20
    local_user: str = field(default_factory=lambda: _local_user())
    catalog: PolicyCatalog = field(default_factory=PolicyCatalog)  # what analysts may choose

    def settings_for(
        self, policy_name: str, policy_args_text: str, *, max_tool_calls, tools, on_no_face
    ) -> RunSettings:
        """The run settings of an analyst's choices, or UserError for anything this server refuses: a
        policy it does not offer, policy arguments (unless it allows custom policies), no or unknown
        tools, a tool-call limit out of range. ``on_no_face``: "whole" or True analyses the whole image
        when no face is found; "error" or False refuses it."""
        try:
            kwargs = parse_arguments(policy_args_text)
            name = policy_name or DEFAULT
            self.catalog.check(name, kwargs)
        except PolicyRefused as exc:
            raise UserError(str(exc)) from None
        chosen = list(tools or [])
        known = ToolRegistry().names
        if not chosen:
            raise UserError("choose at least one tool")
        if unknown := [t for t in chosen if t not in known]:
            raise UserError(f"unknown tool(s): {', '.join(map(str, unknown))}; the tools are {', '.join(known)}")
        try:
            calls = int(max_tool_calls)
        except (TypeError, ValueError):
            raise UserError(f"the tool-call limit is a whole number from 0 to {MAX_TOOL_CALLS}") from None
        if not 0 <= calls <= MAX_TOOL_CALLS or calls != max_tool_calls:
            raise UserError(f"the tool-call limit is a whole number from 0 to {MAX_TOOL_CALLS}")
        if on_no_face not in (True, False, "whole", "error"):
            raise UserError("when no face is found: 'whole' (analyse the whole image) or 'error'")
        return RunSettings.make(
            name,
            kwargs,
            max_tool_calls=calls,
            tools=None if set(chosen) == set(known) else chosen,
            on_no_face="whole" if on_no_face in (True, "whole") else "error",
        )

    def submit_files(self, paths, *, user: str, settings: RunSettings) -> list[tuple[str, Job]]:
        """Queue an upload request (Gradio's temporary files): ``(file name, job)`` per file. The whole
        request is refused (UserError, nothing recorded) when it is over the server's limits."""
        files = [(p, Path(p).name) for p in paths or []]
        if not files:
            raise UserError("upload at least one image first")
        try:
            jobs = self.runner.submit_files(files, user=user, settings=settings)
        except (UploadRefused, PolicyRefused) as exc:
            raise UserError(str(exc)) from None
        return [(name, job) for (_, name), job in zip(files, jobs)]

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

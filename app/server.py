"""``tarfas app``: open the case store, start the background runner and serve the workbench.

Serving beyond localhost without logins is refused (:func:`app.ui.auth.check_exposure`), and so is
``allow_custom_policies`` beyond loopback (:func:`app.policy_catalog.check_custom_host`): analysts choose
among the policies of the server's catalog (``--policies FILE``) by name.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from app.limits import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_FILE_MB,
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_REQUEST_MB,
)
from app.policy_catalog import PolicyCatalog, check_custom_host
from app.runner import Runner, RunSettings
from core.policies import load_policy
from storage.db import Storage, open_storage

DEFAULT_DATA_DIR = Path("tarfas-data")
UI_CACHE = "ui-cache"  # under the data dir: the UI's rendered copies of images, one folder per process


def ui_cache_dir(data_dir: str | Path) -> Path:
    """A new folder for this process's rendered images under ``data_dir/ui-cache``, after deleting the
    folders of processes of this host that are gone (a crash or kill leaves its folder behind)."""
    root = Path(data_dir) / UI_CACHE
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for d in root.iterdir():
        owner_host, _, pid = d.name[:-8].rstrip("+").rpartition("+")  # "<host>+<pid>+<8 random characters>"
        if d.is_dir() and owner_host == host and not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=f"{host}+{os.getpid()}+"))


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return True  # not a folder this function made: leave it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


@dataclass
class Workbench:
    """A running workbench: close it to stop the server and the runner."""

    demo: object  # gr.Blocks
    runner: Runner
    storage: Storage
    url: str
    png_dir: Path | None = None

    def close(self) -> None:
        self.demo.close()
        self.runner.shutdown(wait=False)
        self.storage.close()
        if self.png_dir is not None:
            shutil.rmtree(self.png_dir, ignore_errors=True)  # rendered copies only; the evidence is in the store


def build(
    data_dir: str | Path = DEFAULT_DATA_DIR,
    *,
    db_url: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    max_file_mb: int = DEFAULT_MAX_FILE_MB,
    max_files: int = DEFAULT_MAX_FILES,
    max_request_mb: int = DEFAULT_MAX_REQUEST_MB,
    max_queue: int = DEFAULT_MAX_QUEUE,
    catalog: PolicyCatalog | None = None,
    policy_loader=load_policy,
):
    """The storage, runner and Blocks of a workbench, not yet serving (tests and benchmarks use it).
    ``catalog``: the policies analysts may choose (default: the built-in ``expert`` only)."""
    from app.ui import build_app
    from app.ui.context import AppContext
    from app.ui.render import PngCache

    data_dir = Path(data_dir)
    catalog = catalog or PolicyCatalog()
    storage = open_storage(data_dir, db_url)
    runner = Runner(
        storage,
        concurrency=concurrency,
        policy_loader=policy_loader,
        max_bytes=max_file_mb * 2**20,
        catalog=catalog,
        max_files=max_files,
        max_request_bytes=max_request_mb * 2**20,
        max_queue=max_queue,
    )
    try:
        runner.policy(RunSettings())  # load the default policy now, not in the first analyst's wait
    except Exception as exc:  # noqa: BLE001 (e.g. no weights installed: investigations will say so)
        print(f"warning: the default policy could not be loaded: {exc}")
    png = PngCache(ui_cache_dir(data_dir))
    ctx = AppContext(
        storage,
        runner,
        data_dir,
        png,
        max_file_bytes=max_file_mb * 2**20,
        catalog=catalog,
    )
    return ctx, build_app(ctx)


def serve(
    data_dir: str | Path = DEFAULT_DATA_DIR,
    *,
    db_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    users=None,
    concurrency: int = DEFAULT_CONCURRENCY,
    max_file_mb: int = DEFAULT_MAX_FILE_MB,
    max_files: int = DEFAULT_MAX_FILES,
    max_request_mb: int = DEFAULT_MAX_REQUEST_MB,
    max_queue: int = DEFAULT_MAX_QUEUE,
    catalog: PolicyCatalog | None = None,
    allow_custom_policies: bool = False,
    block: bool = True,
    policy_loader=load_policy,
) -> Workbench:
    """Launch the workbench. ``users``: an :class:`app.ui.auth.Users` (None or empty: no login,
    which is only allowed on localhost). ``catalog``: the policies analysts choose among (default: the
    built-in ``expert``); ``allow_custom_policies`` also lets them name a kind and give its arguments
    (only on a loopback host). ``block=False`` returns once the server is up."""
    from app.ui.auth import Users, check_exposure
    from app.ui.shortcuts import HEAD

    users = users or Users([])
    check_exposure(host, users)
    catalog = catalog or PolicyCatalog()
    if allow_custom_policies:
        catalog.allow_custom = True
    check_custom_host(host, catalog.allow_custom)
    _log_to_stderr()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    ctx, demo = build(
        data_dir,
        db_url=db_url,
        concurrency=concurrency,
        max_file_mb=max_file_mb,
        max_files=max_files,
        max_request_mb=max_request_mb,
        max_queue=max_queue,
        catalog=catalog,
        policy_loader=policy_loader,
    )
    # Gradio's own queue only waits on the runner for streaming events; the runner bounds the work.
    demo.queue(default_concurrency_limit=8)
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        auth=users.check if users else None,
        auth_message="tarfas workbench: log in with your analyst account",
        max_file_size=f"{max_file_mb}mb",
        allowed_paths=[str(ctx.png.root), str(Path(data_dir).resolve() / "reports"), str(ctx.exports_dir.resolve())],
        head=HEAD,
        prevent_thread_lock=not block,
        quiet=True,
        show_error=True,
        ssr_mode=False,
    )
    wb = Workbench(demo, ctx.runner, ctx.storage, url, ctx.png.root)
    if block:
        wb.close()
    return wb


def _log_to_stderr() -> None:
    """One line per record for tarfas's loggers (refusals as warnings, failures with their traceback),
    unless the embedding program configured logging itself."""
    logger = logging.getLogger("tarfas")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

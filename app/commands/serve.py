"""``tarfas app``: serve the analyst workbench (Gradio)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from app.limits import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_FILE_MB,
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_REQUEST_MB,
)

from .flags import add_config_args, config_from_args

HELP = "serve the analyst workbench (Gradio): investigate, review, queue, export, metrics"


@dataclass
class ServeOptions:
    data_dir: str = field(
        default="tarfas-data", metadata={"help": "case store folder: tarfas.db and the evidence files"}
    )
    db: str | None = field(default=None, metadata={"help": "SQLAlchemy database URL instead of <data-dir>/tarfas.db"})
    host: str = field(
        default="127.0.0.1", metadata={"help": "address to serve on (beyond localhost needs --auth or --users-file)"}
    )
    port: int = field(default=7860, metadata={"help": "port to serve on"})
    auth: list[str] = field(default_factory=list, metadata={"help": "analyst logins, USER:PASS, comma-separated"})
    users_file: str | None = field(default=None, metadata={"help": "file of user:password lines (chmod 600)"})
    concurrency: int = field(default=DEFAULT_CONCURRENCY, metadata={"help": "investigations run at once"})
    max_file_mb: int = field(default=DEFAULT_MAX_FILE_MB, metadata={"help": "upload size limit in MiB, per file"})
    max_files: int = field(default=DEFAULT_MAX_FILES, metadata={"help": "most images in one upload request"})
    max_request_mb: int = field(
        default=DEFAULT_MAX_REQUEST_MB, metadata={"help": "most MiB in one upload request, all files together"}
    )
    max_queue: int = field(
        default=DEFAULT_MAX_QUEUE, metadata={"help": "most investigations waiting or running at once, the whole server"}
    )
    policies: str | None = field(
        default=None,
        metadata={
            "help": "TOML (or YAML) file of the policies analysts may choose, by name, with their endpoints, models, "
            "adapters and the environment variables of their keys (default: the offline expert only)"
        },
    )
    allow_custom_policies: bool = field(
        default=False,
        metadata={
            "help": "let analysts name any policy kind with their own arguments (URLs, model paths, key variables); "
            "only on a loopback --host"
        },
    )

    def __post_init__(self):
        for flag in ("concurrency", "max_file_mb", "max_files", "max_request_mb", "max_queue"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, ServeOptions, exclude=("auth",))
    # Repeatable, since a password may hold a comma.
    p.add_argument("--auth", action="append", default=[], metavar="USER:PASS", help="an analyst login (repeatable)")


def run(args) -> int:
    from app.policy_catalog import PolicyCatalog, check_custom_host
    from app.server import serve
    from app.ui.auth import load_users

    opts = config_from_args(ServeOptions, args)
    users = load_users(opts.auth, opts.users_file)
    # Both checked before anything is opened: a bad policy file stops the server with the entry at fault.
    check_custom_host(opts.host, opts.allow_custom_policies)
    catalog = PolicyCatalog.load(opts.policies, allow_custom=opts.allow_custom_policies)
    serve(
        opts.data_dir,
        db_url=opts.db,
        host=opts.host,
        port=opts.port,
        users=users,
        concurrency=opts.concurrency,
        max_file_mb=opts.max_file_mb,
        max_files=opts.max_files,
        max_request_mb=opts.max_request_mb,
        max_queue=opts.max_queue,
        catalog=catalog,
    )
    return 0

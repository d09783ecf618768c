"""``tarfas app``: serve the analyst workbench (Gradio)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

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
    concurrency: int = field(default=2, metadata={"help": "investigations run at once"})
    max_file_mb: int = field(default=20, metadata={"help": "upload size limit in MiB"})

    def __post_init__(self):
        if self.concurrency < 1 or self.max_file_mb < 1:
            raise ValueError("--concurrency and --max-file-mb must be >= 1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, ServeOptions, exclude=("auth",))
    # Repeatable, since a password may hold a comma.
    p.add_argument("--auth", action="append", default=[], metavar="USER:PASS", help="an analyst login (repeatable)")


def run(args) -> int:
    from app.server import serve
    from app.ui.auth import load_users

    opts = config_from_args(ServeOptions, args)
    users = load_users(opts.auth, opts.users_file)
    serve(
        opts.data_dir,
        db_url=opts.db,
        host=opts.host,
        port=opts.port,
        users=users,
        concurrency=opts.concurrency,
        max_file_mb=opts.max_file_mb,
    )
    return 0

"""Defaults of the workbench's bounds, in one place: the ``tarfas app`` flags (app/commands/serve.py),
:func:`app.server.serve` and the runner read them. No heavy imports, so that the CLI starts fast."""

DEFAULT_CONCURRENCY = 2  # investigations at once; one per core on the reference machine
DEFAULT_MAX_FILE_MB = 20  # per uploaded file
DEFAULT_MAX_FILES = 100  # per upload request
DEFAULT_MAX_REQUEST_MB = 1024  # per upload request, all files together
DEFAULT_MAX_QUEUE = 500  # investigations waiting or running, the whole server

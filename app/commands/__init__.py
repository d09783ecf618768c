"""One module per ``tarfas`` verb. Each has ``HELP`` (and optionally ``DESCRIPTION``),
``add_arguments(parser)`` and ``run(args) -> exit status``; ``app.cli`` dispatches to them."""

EXIT_INPUT = 2  # bad input (unreadable image, no face, bad manifest, invalid flags)
EXIT_FAILED = 1  # the investigation (or an annotation) itself failed

VERBS = {  # verb -> module under app.commands
    "investigate": "investigate",
    "eval": "eval",
    "calibrate": "calibrate",
    "app": "serve",
    "annotate": "annotate",
    "train": "train",
    "model": "model",
    "audit": "audit",
}

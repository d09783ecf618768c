"""Runnable pipelines built on the ``tarfas`` commands (``python -m training.cli.<name>``), kept out of
the library modules of :mod:`training`."""

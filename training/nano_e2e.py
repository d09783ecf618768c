"""``python -m training.nano_e2e``: the same as ``python -m training.cli.nano_e2e`` (the CPU pipeline)."""

from training.cli.nano_e2e import main, pipeline

__all__ = ["main", "pipeline"]

if __name__ == "__main__":
    import sys

    sys.exit(main())

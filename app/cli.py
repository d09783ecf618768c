"""The ``tarfas`` command line: a dispatcher. Each verb lives in its own module under ``app.commands``
(flags generated from its options dataclass), and every expected error ends here as one line.

  tarfas investigate IMAGE [--policy expert] [--max-tool-calls N] [--json] [--out-dir DIR]
      --policy hf --model DIR [--adapter DIR] | --policy vllm --base-url URL --model NAME [--api-key-env VAR]
  tarfas eval MANIFEST [--root DIR] [--policy expert] [--scores-out FILE.csv] [--threshold T | --dev-manifest M]
  tarfas eval MANIFEST|PROTOCOL.yaml --report DIR [--analyses fast,tools,tool-use,max-calls|all] [--bootstrap N]
  tarfas calibrate MANIFEST --out PROFILE.json [--target eer|apcer=R|bpcer=R]; then --calibration PROFILE.json
  tarfas app [--data-dir DIR] [--db URL] [--host H] [--port P] [--auth USER:PASS ...] [--users-file F]
  tarfas annotate MANIFEST --out DIR [--annotator expert|openai --model M --base-url URL] [--queue-into DATA_DIR]
  tarfas train experts [--manifests fas-dev,fas-train] [--domains ...] [--epochs 3] [--out assets/experts] [--calibrate-only]
  tarfas train sft --stage kt|fi --model DIR --data EXPORT_DIR[,MANIFEST.csv] [--adapter DIR] --out OUT
  tarfas train rs --model DIR --manifest MANIFEST.csv --out OUT [--exclude DIR,...] [--limit N]
  tarfas train grpo --model DIR [--adapter DIR] --data EXPORT_DIR --out OUT [--reward dt|st]
  tarfas model init-nano OUT [--size nano|micro] [--arch qwen2_5_vl|internvl] [--seed 0]
  tarfas audit verify [--data-dir DIR] [--db URL]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from app.commands import EXIT_INPUT, VERBS

# Verbs that run per-image networks: one torch thread is fastest for them (see _single_thread_inference).
INFERENCE_VERBS = ("investigate", "eval", "calibrate", "app", "annotate")


def _module(verb: str):
    return importlib.import_module(f"app.commands.{VERBS[verb]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tarfas", description="Forensic face anti-spoofing with tool-augmented reasoning (TAR-FAS)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        module = _module(verb)
        module.add_arguments(sub.add_parser(verb, help=module.HELP, description=getattr(module, "DESCRIPTION", None)))
    return parser


def _single_thread_inference() -> None:
    """Per-image networks are tiny: one thread is fastest, and on a busy machine torch's default
    (one thread per core) oversubscribes and runs ~50x slower. TARFAS_THREADS overrides."""
    import torch

    torch.set_num_threads(int(os.environ.get("TARFAS_THREADS", "1")))


def main(argv: list[str] | None = None) -> int:
    from core.errors import TarfasError

    try:
        args = build_parser().parse_args(argv)
    except (
        SystemExit
    ) as exc:  # --help, or a flag argparse refused (it has printed why): an exit status, as every verb returns
        return exc.code if isinstance(exc.code, int) else EXIT_INPUT
    if args.command in INFERENCE_VERBS:
        _single_thread_inference()
    try:
        return _module(args.command).run(args)
    except (TarfasError, ValueError) as exc:  # expected user errors: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())

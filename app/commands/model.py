"""``tarfas model init-nano OUT``: model folders for the hf / vllm policies."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Literal

from .flags import add_config_args, config_from_args

HELP = "model folders for the hf / vllm policies"


@dataclass
class InitNanoOptions:
    out: str = field(default="", metadata={"help": "folder to write the model into"})
    arch: Literal["qwen2_5_vl", "internvl"] = field(default="qwen2_5_vl", metadata={"help": "architecture"})
    size: Literal["nano", "micro"] = field(
        default="nano",
        metadata={"help": "nano: ~1M parameters, for tests; micro: ~4.7M, the CPU recipe's size (docs/training.md)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the random weights"})


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True)
    nano = sub.add_parser(
        "init-nano",
        help="build a tiny (--size nano) or small (--size micro) offline Qwen2.5-VL or InternVL3 (real architecture, local tokenizer) into OUT",
    )
    add_config_args(nano, InitNanoOptions, positional=("out",))


def run(args) -> int:
    from core.mllm.nano import build_nano, spec_for

    opts = config_from_args(InitNanoOptions, args)
    t0 = time.perf_counter()
    out = build_nano(opts.out, opts.arch, spec_for(opts.size, opts.seed))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"{opts.size} {opts.arch} model written to {out} ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)")
    return 0

"""``tarfas annotate MANIFEST --out DIR``: the tool-augmented annotation pipeline (training/annotate)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

from . import EXIT_FAILED
from .flags import add_config_args, config_from_args

HELP = "build a ToolFAS-style trajectory dataset from a manifest with an annotator guided by the tool experts"
DESCRIPTION = (
    "Multi-turn tool-augmented annotation (TAR-FAS §3.1): verified, re-annotated once on failure, "
    "resumable. Writes a dataset folder that `tarfas train sft` reads. See docs/annotation.md."
)


@dataclass
class AnnotateOptions:
    manifest: str = field(default="", metadata={"help": "manifest CSV (path,label,attack_type,domain,split)"})
    out: str = field(
        default="", metadata={"help": "dataset folder (created, or resumed if it holds an earlier annotation run)"}
    )
    annotator: Literal["expert", "openai"] = field(
        default="expert",
        metadata={"help": "expert (offline, the expert ensemble) or openai (an OpenAI-compatible endpoint)"},
    )
    model: str | None = field(default=None, metadata={"help": "model name served by the endpoint (--annotator openai)"})
    base_url: str | None = field(
        default=None, metadata={"help": "endpoint base URL, e.g. http://127.0.0.1:8000/v1 (--annotator openai)"}
    )
    api_key_env: str | None = field(
        default=None, metadata={"help": "environment variable holding the API key (none: a local server without one)"}
    )
    structured: Literal["auto", "on", "off"] = field(
        default="auto", metadata={"help": "JSON-schema replies: auto = when the endpoint accepts them"}
    )
    timeout: float = field(default=120.0, metadata={"help": "seconds per request"})
    retries: int = field(default=3, metadata={"help": "retries per request on timeouts, 5xx/429 and malformed replies"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of the annotator"})
    concurrency: int | None = field(
        default=None, metadata={"help": "annotations in flight (default: 1 for expert, 4 for openai)"}
    )
    weights: str | None = field(
        default=None, metadata={"help": "expert weights folder for the guidance (default: the shipped assets/experts)"}
    )
    root: str | None = field(
        default=None, metadata={"help": "folder the manifest paths are relative to (default: the manifest's folder)"}
    )
    domains: list[str] | None = field(default=None, metadata={"help": "comma-separated domains to keep"})
    split: str | None = field(default=None, metadata={"help": "keep rows of this split only"})
    limit: int | None = field(default=None, metadata={"help": "annotate a seeded random sample of N rows"})
    seed: int = field(default=0, metadata={"help": "seed of the sample"})
    queue_into: str | None = field(
        default=None, metadata={"help": "afterwards, import the review queue into this workbench case store (DATA_DIR)"}
    )

    def __post_init__(self):
        if not self.out:
            raise ValueError("--out DIR is required")
        if self.annotator == "openai" and (not self.model or not self.base_url):
            raise ValueError("--annotator openai needs --model and --base-url")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from training.annotate import AnnotateConfig

    add_config_args(p, AnnotateOptions, positional=("manifest",))
    add_config_args(p, AnnotateConfig, exclude=("concurrency",))


def run(args) -> int:
    from training.annotate import AnnotateConfig, describe, load_rows, resolve_annotator, run_annotation

    opts = config_from_args(AnnotateOptions, args)
    config = config_from_args(
        AnnotateConfig, args, concurrency=opts.concurrency or (1 if opts.annotator == "expert" else 4)
    )
    rows = load_rows(
        opts.manifest, root=opts.root, domains=opts.domains, split=opts.split, limit=opts.limit, seed=opts.seed
    )
    endpoint = {} if opts.annotator == "expert" else {
        "model": opts.model, "base_url": opts.base_url, "api_key_env": opts.api_key_env, "timeout": opts.timeout,
        "retries": opts.retries, "structured": opts.structured, "temperature": opts.temperature,
    }  # fmt: skip
    annotator, registry = resolve_annotator(opts.annotator, weights=opts.weights, **endpoint)
    summary = run_annotation(rows, annotator, opts.out, registry=registry, config=config)
    print(describe(summary))
    if opts.queue_into:
        from app.review_queue import import_review_queue
        from storage.db import open_storage

        storage = open_storage(opts.queue_into)
        try:
            ids = import_review_queue(opts.out, storage)
        finally:
            storage.close()
        print(f"review queue: {len(ids)} new investigations in {opts.queue_into}")
    return EXIT_FAILED if summary.failed else 0

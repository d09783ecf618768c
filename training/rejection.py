"""Rejection sampling (``tarfas train rs``): investigations sampled from a trained checkpoint on labelled
faces, kept when they follow the protocol from the fast answer to ``<answer>`` and reach the label.

The kept investigations are a dataset folder (source ``rejection-sampling``) that ``tarfas train sft
--stage fi`` reads like an annotation folder: fine-tuning on a model's own valid samples (rejection-sampling
fine-tuning: Zelikman et al., "STaR: Bootstrapping Reasoning With Reasoning", NeurIPS 2022; Yuan et al.,
"Scaling Relationship on Learning Mathematical Reasoning with Large Language Models", 2023) lowers the
probability of malformed turns in the states the model's own samples reach, which teacher forcing on
annotations never visits. Each investigation runs through the real agent loop, tools and parsers, sampled in lockstep
batches as in training/policy_eval.py. Measured on the CPU pipeline: docs/training.md, "Fifth round".
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from core.dataset import DatasetWriter, read_dataset

from .configs import RejectionSamplingConfig
from .datasets import TrainingDataError
from .policy_eval import investigate_batches, investigation_error
from .rewards import final_answer

SOURCE = "rejection-sampling"
CHUNK = 256  # faces loaded at a time


def rejection_reason(traj, label: str, *, keep: str = "correct", max_tool_calls: int = 3) -> str | None:
    """Why a sampled investigation is not kept (None: it is): ``"format: ..."`` (the protocol error) or
    ``"wrong_verdict"``. ``keep="correct"`` requires the final answer to be the label; ``"valid"`` keeps every
    investigation that follows the protocol."""
    error = investigation_error(traj, max_tool_calls=max_tool_calls)
    if error is not None:
        return f"format: {error}"
    if keep == "correct" and final_answer(traj) != label:
        return "wrong_verdict"
    return None


def keep_or_reject(writer: DatasetWriter, traj, row, k: int, cfg: RejectionSamplingConfig) -> str | None:
    """Write ``traj``, the ``k``-th investigation sampled on ``row``'s face, into ``writer`` if it is kept
    (named by the row's manifest path, as annotation names it); otherwise return why it is not."""
    reason = rejection_reason(traj, row.label, keep=cfg.keep, max_tool_calls=cfg.max_tool_calls)
    if reason is None:
        rid = row.rel_path if cfg.samples_per_face == 1 else f"{row.rel_path}#{k}"
        meta = {"rel_path": row.rel_path, "domain": row.domain, "split": row.split, "sample": k}
        writer.add_trajectory(traj, id=rid, label=row.label, attack_type=row.attack_type or None, meta=meta)
    return reason


def excluded_ids(folders: list[str]) -> set[str]:
    """Face ids (manifest paths) already in these dataset folders: annotation records are named by the row's
    manifest path, and this module's records by the path and ``#k`` for the k-th sample."""
    ids: set[str] = set()
    for folder in folders:
        ids |= {r.id.split("#")[0] for r in read_dataset(folder, verify=False).trajectories}
    return ids


def select_rows(cfg: RejectionSamplingConfig) -> list:
    """The manifest rows to sample: the domain/split selection without the excluded faces, then a seeded
    sample of ``limit`` of them, then this process's shard (every ``num_shards``-th row)."""
    import random

    from core.evaluation.manifest import read_manifest, select

    rows = select(read_manifest(cfg.manifest, cfg.root), cfg.domains or None, cfg.split)
    skip = excluded_ids(cfg.exclude)
    rows = [r for r in rows if r.rel_path not in skip]
    if cfg.limit is not None and cfg.limit < len(rows):
        rows = random.Random(cfg.seed).sample(rows, cfg.limit)
    rows = rows[cfg.shard :: cfg.num_shards]
    if not rows:
        raise TrainingDataError(f"{cfg.manifest}: no faces left after the domain/split selection and --exclude")
    return rows


def rejection_sample(cfg: RejectionSamplingConfig) -> Path:
    """Sample ``cfg.samples_per_face`` investigations per selected face, write the kept ones into
    ``cfg.out`` and return it. The counts (sampled, kept, rejected by reason) are in its manifest.json."""
    import torch

    from core.evaluation.scoring import load_face
    from core.mllm.processor import load_model_and_processor

    if not cfg.model:
        raise ValueError("--model is required: the checkpoint folder to sample (e.g. the FI model)")
    if not cfg.manifest:
        raise ValueError("--manifest is required: a manifest CSV of labelled faces")
    torch.set_num_threads(cfg.threads)
    rows = select_rows(cfg)
    lm = load_model_and_processor(cfg.model)
    extra = {"model": str(Path(cfg.model).resolve()), "manifest": str(cfg.manifest), "config": asdict(cfg)}
    stats = Counter(
        dict.fromkeys(("sampled", "kept", "kept_real", "kept_spoof", "format", "wrong_verdict", "unreadable"), 0)
    )
    errors: Counter = Counter()
    t0 = time.perf_counter()
    with DatasetWriter(cfg.out, source=SOURCE, created_by="tarfas train rs", extra=extra) as writer:
        for c, start in enumerate(range(0, len(rows), CHUNK)):
            items, crops = [], []
            for row in rows[start : start + CHUNK]:
                face = load_face(row, "whole")
                if isinstance(face, str):
                    stats["unreadable"] += 1
                    continue
                for k in range(cfg.samples_per_face):
                    items.append((row, k))
                    crops.append(face.crop)
            runs = investigate_batches(lm.model, lm.processor, crops, temperature=cfg.temperature,
                                       max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                       max_tool_calls=cfg.max_tool_calls, seed=cfg.seed * 1000 + c)  # fmt: skip
            for (traj, _), (row, k) in zip(runs, items, strict=True):
                stats["sampled"] += 1
                reason = keep_or_reject(writer, traj, row, k, cfg)
                kind, _, detail = (reason or "kept").partition(": ")
                stats[kind] += 1
                if reason is None:  # the kept labels' balance: a model right on one class mostly keeps that one
                    stats[f"kept_{row.label}"] += 1
                if detail:
                    errors[detail[:60]] += 1
        writer.extra["stats"] = {"faces": len(rows), **stats, "seconds": round(time.perf_counter() - t0, 1)}
        writer.extra["format_errors"] = dict(errors.most_common(20))
    print(f"[rs] {json.dumps(writer.extra['stats'])}", flush=True)
    return Path(cfg.out)

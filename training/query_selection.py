"""Which faces DT-GRPO trains on: those whose verdict the starting model is still unsure of.

GRPO learns only from a group whose rollouts earned different rewards (each advantage is a reward minus its
group's mean). A model that is sure of a face, right or wrong, gives G identical verdicts and no gradient:
on the CPU recipe's SFT model most groups of randomly drawn queries are unanimous (docs/training.md, sixth
round). Before training, every candidate query's fast-answer P(spoof) is read from one forward pass of the
starting model (the class-token probability the hf policy reports, batched over the prompt prefix every
query shares), and GRPO keeps the queries whose P(spoof) lies inside ``[band, 1 - band]``. Pre-filtering by
the starting model's uncertainty is the offline form of DAPO's dynamic sampling (Yu et al., "DAPO: An
Open-Source LLM Reinforcement Learning System at Scale", 2025: drop groups whose rollouts all score alike)
and of online difficulty filtering (Bae et al., "Online Difficulty Filtering for Reasoning Oriented
Reinforcement Learning", 2025), at the cost of one forward pass per candidate instead of G rollouts.
"""

from __future__ import annotations

from collections import Counter

import torch

from core.mllm.messages import collate_left, to_processor_inputs
from core.mllm.scoring import class_score_inputs

from .shared_prefix import prefill_shared_prefix


def _inputs(row: dict, processor):
    """The processor inputs of a GRPO row: its first prompt with the row's face image in the image part."""
    messages = []
    for m in row["prompt"]:
        content = [{"type": "image", "path": row["image"]} if p.get("type") == "image" else p for p in m["content"]]
        messages.append({"role": m["role"], "content": content})
    return to_processor_inputs(messages, processor)


def fast_answer_p_spoof(model, processor, rows: list[dict], *, batch_size: int = 16) -> list[float]:
    """P(spoof) of each GRPO row's fast answer: :func:`core.mllm.scoring.class_token_score` with an empty
    assistant prefix, for ``batch_size`` rows at a time (those of a batch with the same length together), the
    prefix they share (system prompt, up to the face) computed once a batch; only one batch's images are in
    memory at a time."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    p_spoof: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(rows), batch_size):
            by_length: dict[int, list[tuple[int, object]]] = {}
            for i, row in enumerate(rows[b : b + batch_size]):
                inp = _inputs(row, processor)
                # the class tokens depend only on the text before the tag: the same for every row
                enc, (_, spoof_token, real_token) = class_score_inputs(processor, inp.text, inp.images, "")
                by_length.setdefault(enc["input_ids"].shape[1], []).append((i, enc))
            scores = [0.0] * min(batch_size, len(rows) - b)
            for members in by_length.values():
                batch = collate_left([enc for _, enc in members], processor.tokenizer.pad_token_id)
                batch = dict(batch.to(device).to(dtype))  # (BatchFeature casts floating tensors only)
                batch["labels"] = torch.full_like(batch["input_ids"], -100)  # nothing supervised: all shareable
                with torch.no_grad():
                    suffix, _ = prefill_shared_prefix(model, batch)
                    suffix.pop("labels")
                    logits = model(**suffix, logits_to_keep=1).logits[:, -1, [spoof_token, real_token]].float()
                for (i, _), p in zip(members, torch.softmax(logits, dim=-1)[:, 0].tolist(), strict=True):
                    scores[i] = p
            p_spoof += scores
    finally:
        model.train(was_training)
    return p_spoof


def check_band(band: float) -> None:
    if not 0.0 <= band < 0.5:
        raise ValueError(f"the uncertainty band (--select-band) must be in [0, 0.5), got {band}")


def select_uncertain(rows: list[dict], p_spoof: list[float], band: float) -> tuple[list[dict], dict]:
    """The rows whose fast-answer P(spoof) lies in ``[band, 1 - band]``, and what the selection did
    (candidates, kept, kept per label, the P(spoof) range kept)."""
    check_band(band)
    kept = [(r, p) for r, p in zip(rows, p_spoof, strict=True) if band <= p <= 1.0 - band]
    stats = {
        "band": band,
        "candidates": len(rows),
        "kept": len(kept),
        "kept_labels": dict(Counter(r["label"] for r, _ in kept)),
        "candidate_labels": dict(Counter(r["label"] for r in rows)),
        "kept_p_spoof": [round(min(p for _, p in kept), 4), round(max(p for _, p in kept), 4)] if kept else None,
    }
    return [r for r, _ in kept], stats

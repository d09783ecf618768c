"""Batched evaluation of a trained checkpoint on labelled face crops, through the real agent loop.

Each image is one investigation run by :func:`core.agent.run` (inference prompts, the real tools, errors fed
back as at inference), and the turns of all investigations of a batch are sampled in lockstep with one
batched ``generate`` call per turn (training/rollout.py's sampler, the same one DT-GRPO uses). What is
measured per image:

- ``format_ok``: the investigation follows the protocol from the fast answer to ``<answer>``
  (:func:`core.protocol.investigation_error`, the inference parsers; an executed-but-refused tool call
  counts as invalid too);
- the verdict (the final answer, or the fast-answer fallback as at inference) and its score, the
  class-token probability P(spoof) from :func:`core.mllm.scoring.class_token_score` (the hf policy's score);
- the number of valid tool calls.

Sampling is greedy with ``temperature=0`` (as ``tarfas investigate/eval --policy hf``) or at the given
temperature (the format rate of sampled turns). This exists beside ``tarfas eval`` because the hf policy
runs one investigation at a time, which is too slow for the CPU pipeline's budget (training/cli/nano_e2e.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from core import protocol
from core.agent import AgentConfig
from core.mllm.messages import to_processor_inputs
from core.mllm.processor import vision_token_ids
from core.protocol import STOP_STRINGS
from core.registry import ToolRegistry

from .rewards import reward
from .rollout import TokenPolicy, face_from_image, run_rollouts


@dataclass
class ImageResult:
    label: str
    verdict: str | None
    score: float | None  # P(spoof) of the deciding turn's class token
    format_ok: bool
    format_error: str | None
    source: str | None  # "answer", "fast_answer_fallback" or None (no verdict)
    tool_calls: int
    turns: list[str] = field(default_factory=list)
    reward: float | None = None  # DT-GRPO's reward of the investigation (training/rewards.py, the paper's weights)


class _RecordingPolicy(TokenPolicy):
    """TokenPolicy that also keeps each turn's conversation (for the class-token score afterwards)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conversations: list[list[dict]] = []

    def next_turn(self, conversation):
        self.conversations.append(conversation.messages)
        return super().next_turn(conversation)


def batched_generate(model, processor, *, temperature: float, max_new_tokens: int):
    """A ``generate_batch(ids, images, fields)`` for :class:`training.rollout.LockstepSampler`: left-padded
    ids, the rollouts' image tensors concatenated in order, vision tokens suppressed, stopping at the
    protocol's stop strings (as the hf policy does)."""
    import torch

    tok = processor.tokenizer
    pad_id = tok.pad_token_id
    ends = {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    image_pad = getattr(processor, "image_token_id", None)
    suppress = vision_token_ids(tok) or None

    def generate_batch(ids_list, images_list, fields_list):
        n = max(len(x) for x in ids_list)
        input_ids = torch.full((len(ids_list), n), pad_id, dtype=torch.long)
        attention = torch.zeros((len(ids_list), n), dtype=torch.long)
        for i, ids in enumerate(ids_list):
            input_ids[i, n - len(ids) :] = torch.tensor(ids)
            attention[i, n - len(ids) :] = 1
        inputs = {"input_ids": input_ids, "attention_mask": attention}
        for key in ("pixel_values", "image_grid_thw"):
            parts = [f[key] for f in fields_list if key in f]
            if parts:
                inputs[key] = torch.cat(parts, dim=0)
        if "image_grid_thw" in inputs and image_pad is not None:
            inputs["mm_token_type_ids"] = (input_ids == image_pad).long()
        sample = temperature > 0
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else None,
                top_p=None, top_k=None, stop_strings=list(STOP_STRINGS), tokenizer=tok, suppress_tokens=suppress,
                pad_token_id=pad_id,
            )  # fmt: skip
        results = []
        for row in out[:, n:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in ends), len(row))
            results.append((row[:cut], None))
        return results

    return generate_batch


def investigation_error(traj, *, max_tool_calls: int) -> str | None:
    """Why ``traj`` does not follow the protocol from the fast answer to ``<answer>`` (None: it does). An
    executed-but-refused tool call counts as a format error too."""
    error = protocol.investigation_error(
        [t.text for t in traj.turns], max_tool_calls=max_tool_calls, tool_names=ToolRegistry(None).names
    )
    refused = next((t.tool_error for t in traj.turns if t.tool_error), None)
    return f"refused tool call: {refused}" if error is None and refused else error


def investigate_batches(
    model,
    processor,
    crops: list,
    *,
    temperature: float = 0.0,
    max_new_tokens: int = 160,
    batch_size: int = 16,
    max_tool_calls: int = 3,
    seed: int = 0,
):
    """Run one investigation per crop (RGB arrays or PIL images, 224x224 faces), ``batch_size`` at a time
    with their turns sampled in lockstep; yields ``(trajectory, policy)`` per crop, in order (the policy
    keeps each turn's conversation, for scoring)."""
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    was_training = model.training
    model.eval()
    config = AgentConfig(max_tool_calls=max_tool_calls)
    generate = batched_generate(model, processor, temperature=temperature, max_new_tokens=max_new_tokens)
    budget = (max_tool_calls + config.max_format_errors + 2) * (max_new_tokens + 400)  # never binding
    try:
        for start in range(0, len(crops), batch_size):
            faces = [face_from_image(c) for c in crops[start : start + batch_size]]
            policies: list[_RecordingPolicy] = []

            def make(gen, policies=policies):
                policies.append(_RecordingPolicy(gen, processor, budget))
                return policies[-1]

            rollouts, _ = run_rollouts(faces, make, generate, config)  # policies[i] ran faces[i]
            yield from zip((r.trajectory for r in rollouts), policies, strict=True)
    finally:
        if was_training:
            model.train()


def evaluate_policy(
    model,
    processor,
    crops: list,
    labels: list[str],
    *,
    temperature: float = 0.0,
    max_new_tokens: int = 160,
    batch_size: int = 16,
    max_tool_calls: int = 3,
    seed: int = 0,
) -> list[ImageResult]:
    """Investigate every crop (RGB arrays or PIL images, 224x224 faces) with ``model``; one result per crop."""
    from core.mllm.scoring import class_token_score

    results: list[ImageResult] = []
    runs = investigate_batches(model, processor, crops, temperature=temperature, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, max_tool_calls=max_tool_calls, seed=seed)  # fmt: skip
    for (traj, policy), label in zip(runs, labels, strict=True):
        error = investigation_error(traj, max_tool_calls=max_tool_calls)
        verdict = traj.final.verdict if traj.final else None
        source = traj.final.source if traj.final else None
        score = None
        if verdict is not None:
            if source == "answer":
                k = len(traj.turns) - 1
            else:  # the fast-answer fallback: the last well-formed fast answer decides
                k = max(i for i, t in enumerate(traj.turns) if t.fast is not None)
            text = traj.turns[k].text
            pos = protocol.class_tag_offset(text)
            if pos is not None:
                inp = to_processor_inputs(policy.conversations[k], processor)
                score = class_token_score(model, processor, inp.text, inp.images, text[:pos]).p_spoof
        results.append(ImageResult(label, verdict, score, error is None, error, source, len(traj.tool_turns),
                                   [t.text for t in traj.turns], reward(traj, label).total))  # fmt: skip
    return results


# --- metrics --------------------------------------------------------------------------------------------
def metrics(results: list[ImageResult]) -> dict:
    """Accuracy (no verdict = wrong), AUC of the scores (images without a score count as 0.5), format rate,
    and APCER / BPCER of the verdicts (attacks not called spoof, real faces not called real: a face without a
    verdict is an error of its class), which show a verdict threshold that the AUC alone hides."""
    from sklearn.metrics import roc_auc_score

    y = np.array([r.label == "spoof" for r in results], dtype=int)
    correct = np.array([r.verdict == r.label for r in results], dtype=float)
    apcer = float(1 - correct[y == 1].mean()) if y.any() else None
    bpcer = float(1 - correct[y == 0].mean()) if (y == 0).any() else None
    scores = np.array([0.5 if r.score is None else r.score for r in results])
    auc = float(roc_auc_score(y, scores)) if 0 < y.sum() < len(y) else None
    return {
        "n": len(results),
        "accuracy": float(correct.mean()) if len(results) else None,
        "auc": auc,
        "apcer": apcer,
        "bpcer": bpcer,
        "format_ok": float(np.mean([r.format_ok for r in results])) if results else None,
        "no_verdict": sum(r.verdict is None for r in results),
        "answered": sum(r.source == "answer" for r in results),
        "tool_calls_per_image": float(np.mean([r.tool_calls for r in results])) if results else None,
        "mean_reward": float(np.mean([r.reward for r in results]))
        if results and all(r.reward is not None for r in results)
        else None,
    }


def paired_bootstrap(a: list[ImageResult], b: list[ImageResult], *, n: int = 2000, seed: int = 0) -> dict:
    """95% percentile intervals of (b - a) in accuracy, AUC and mean reward, resampling the same images for
    both."""
    from sklearn.metrics import roc_auc_score

    if len(a) != len(b) or any(x.label != y.label for x, y in zip(a, b, strict=True)):
        raise ValueError("paired bootstrap needs results on the same images in the same order")
    y = np.array([r.label == "spoof" for r in a], dtype=int)
    ca = np.array([r.verdict == r.label for r in a], dtype=float)
    cb = np.array([r.verdict == r.label for r in b], dtype=float)
    sa = np.array([0.5 if r.score is None else r.score for r in a])
    sb = np.array([0.5 if r.score is None else r.score for r in b])
    rewarded = all(r.reward is not None for r in a + b)
    ra, rb = (np.array([r.reward for r in x], dtype=float) if rewarded else None for x in (a, b))
    rng = np.random.default_rng(seed)
    d_acc, d_auc, d_reward = [], [], []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        d_acc.append(cb[i].mean() - ca[i].mean())
        if rewarded:
            d_reward.append(rb[i].mean() - ra[i].mean())
        if 0 < y[i].sum() < len(i):
            d_auc.append(roc_auc_score(y[i], sb[i]) - roc_auc_score(y[i], sa[i]))

    def ci(v):
        return [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)] if v else None

    return {"delta_acc_ci95": ci(d_acc), "delta_auc_ci95": ci(d_auc), "delta_reward_ci95": ci(d_reward),
            "bootstrap": n}  # fmt: skip


def draws_bootstrap(a: list[list[ImageResult]], b: list[list[ImageResult]], *, n: int = 4000, seed: int = 0) -> dict:
    """Several sampled draws of two models on the same images (``a[d][i]``: draw d, image i): each model's
    valid-format rate, mean reward and accuracy, and 95% intervals of (b - a) from a paired bootstrap over
    images of each image's mean over its draws (so the interval holds the draws' noise as well)."""
    if not a or not b or any(len(d) != len(a[0]) for d in a + b):
        raise ValueError("draws_bootstrap needs at least one draw of each model, all on the same images")
    if any(x.label != y.label for d in a + b for x, y in zip(a[0], d, strict=True)):
        raise ValueError("draws_bootstrap needs every draw on the same images in the same order")

    def per_image(draws, key):
        return np.array([[key(r) for r in d] for d in draws], dtype=float).mean(0)

    keys = {
        "format_ok": lambda r: r.format_ok,
        "mean_reward": lambda r: r.reward,
        "accuracy": lambda r: r.verdict == r.label,
    }
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a[0]), (n, len(a[0])))
    out = {"images": len(a[0]), "draws": [len(a), len(b)], "bootstrap": n}
    for name, key in keys.items():
        pa, pb = per_image(a, key), per_image(b, key)
        delta = pb[idx].mean(1) - pa[idx].mean(1)
        out[name] = [round(float(pa.mean()), 4), round(float(pb.mean()), 4)]
        out[f"delta_{name}"] = round(float(pb.mean() - pa.mean()), 4)
        out[f"delta_{name}_ci95"] = [round(float(np.percentile(delta, q)), 4) for q in (2.5, 97.5)]
    return out

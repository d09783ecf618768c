"""Helpers for the MLLM policy tests: the reference scores the hf policy's fast paths are checked against."""

from __future__ import annotations

import torch

from core.mllm.messages import to_processor_inputs
from core.policies.hf import HFPolicy


def direct_p_spoof(policy: HFPolicy, messages: list[dict], assistant_prefix: str) -> float:
    """P(spoof) by hand: one full forward pass over prompt + prefix + "<Spoof>", read at the first
    token where the <Spoof> and <Real> continuations differ."""
    inp = to_processor_inputs(messages, policy.processor)
    enc = {
        c: policy.processor(text=[inp.text + assistant_prefix + s], images=inp.images, return_tensors="pt")
        for c, s in (("s", "<Spoof>"), ("r", "<Real>"))
    }
    ids_s, ids_r = enc["s"]["input_ids"][0], enc["r"]["input_ids"][0]
    k = next(i for i in range(len(ids_s)) if ids_s[i] != ids_r[i])
    with torch.no_grad():
        logits = policy.model(**enc["s"]).logits[0, k - 1]
    return torch.softmax(torch.stack([logits[ids_s[k]], logits[ids_r[k]]]), 0)[0].item()

"""One forward pass for the prompt every example of a batch starts with.

Every SFT example opens with the same tokens: the system prompt (the role and the tools' JSON schemas, ~570
tokens with the nano/micro tokenizer) and the start of the first user turn, up to the face image. On a small
model that prefix is most of the compute (a KT example is ~680 tokens of which ~45 are supervised), and a
batch of B examples computes it B times. Here it is computed once: the prefix runs with batch 1 into a KV
cache, the cache is repeated B times, and the rest of each example runs on top of it. Autograd sums the B
rows' gradients into the one prefix pass, so loss and gradients are those of the plain forward (up to float
rounding; tests/test_training_shared_prefix.py compares them).

The prefix ends before the first image token (image features differ between examples) and before the first
supervised label, so every supervised position stays in the suffix that the loss reads.
"""

from __future__ import annotations

import torch

MIN_PREFIX = 16  # below this the extra pass costs more than it saves


def shared_prefix_length(input_ids: torch.Tensor, labels: torch.Tensor, stop_token_ids: list[int]) -> int:
    """Length of the prefix all rows of ``input_ids`` share that holds no token of ``stop_token_ids`` and whose
    next-token targets are all unsupervised (``labels == -100`` up to and including the position after it)."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0)
    stop = torch.isin(input_ids[0], torch.tensor(stop_token_ids, dtype=input_ids.dtype))
    supervised = (labels != -100).any(dim=0)
    # the logits at the prefix's last position predict the suffix's first token: that target must be ignored
    blocked = ~same | stop | torch.nn.functional.pad(supervised[1:], (0, 1), value=True)
    first = torch.nonzero(blocked)
    return int(first[0]) if len(first) else input_ids.shape[1]


def _cache_kwarg(model) -> str:
    """The forward's name for the KV cache: ``cache`` in recent transformers 5 releases, ``past_key_values`` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _rope_owner(model):
    """The module that computes Qwen2-VL-style 3D rotary positions (``get_rope_index``), or None (1D positions)."""
    return next((m for m in model.modules() if hasattr(m, "get_rope_index")), None)


def prefill_shared_prefix(model, inputs: dict) -> tuple[dict, int]:
    """Run the batch's shared prefix once and return ``(suffix_inputs, P)``: the same batch with ``input_ids``,
    ``labels`` (and ``mm_token_type_ids``) cut to the positions from ``P`` on, the prefix's KV cache repeated
    for every row, and the full ``attention_mask``. ``P == 0`` (inputs returned unchanged) when there is no
    prefix worth sharing. Positions: Qwen2.5-VL's 3D rotary positions are computed for the whole sequence and
    cut; models with 1D positions continue from the cache length."""
    ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs.get("attention_mask")
    config = model.config
    stop = [
        t
        for t in (getattr(config, "image_token_id", None), getattr(config, "vision_start_token_id", None))
        if t is not None
    ]
    p = shared_prefix_length(ids, labels, stop)
    if p < MIN_PREFIX or p >= ids.shape[1] or (mask is not None and not bool(mask[:, :p].all())):
        return inputs, 0
    b = ids.shape[0]
    position_ids = None
    owner = _rope_owner(model)
    if owner is not None:
        rope_kwargs = {k: inputs[k] for k in ("image_grid_thw", "mm_token_type_ids") if k in inputs}
        position_ids, _ = owner.get_rope_index(ids, attention_mask=mask, **rope_kwargs)
    prefix = model(
        input_ids=ids[:1, :p],
        attention_mask=None if mask is None else mask[:1, :p],
        position_ids=None if position_ids is None else position_ids[:, :1, :p],
        use_cache=True,
        logits_to_keep=1,
    )
    cache = getattr(prefix, "cache", None)
    if cache is None:  # transformers releases before the ``cache`` rename
        cache = prefix.past_key_values
    cache.batch_repeat_interleave(b)
    suffix = dict(inputs)
    suffix["input_ids"], suffix["labels"] = ids[:, p:], labels[:, p:]
    if "mm_token_type_ids" in inputs:
        suffix["mm_token_type_ids"] = inputs["mm_token_type_ids"][:, p:]
    if position_ids is not None:
        suffix["position_ids"] = position_ids[:, :, p:]
    suffix[_cache_kwarg(model)] = cache
    return suffix, p

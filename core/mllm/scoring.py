"""The class-token score of TAR-FAS: "we preserve the original logits of the classification token in
the final answer". P(spoof) is the softmax over the two logits of the first token where the answer
``<Spoof>`` and ``<Real>`` differ, at the answer position (works with any tokenizer: with Qwen's,
both class strings are several tokens). Computed from a forward pass, never from sampled text.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..protocol import class_tag_offset

CLASS_STRINGS = {"spoof": "<Spoof>", "real": "<Real>"}


@dataclass
class ClassTokenScore:
    p_spoof: float
    position: int  # index in the input ids of the first token where the class strings differ
    spoof_token: int
    real_token: int
    logits: tuple[float, float]  # (spoof, real) raw logits


def split_point(ids_spoof: list[int], ids_real: list[int]) -> int:
    """Index of the first token where the two tokenizations differ."""
    for k, (a, b) in enumerate(zip(ids_spoof, ids_real)):
        if a != b:
            return k
    raise ValueError("the <Spoof> and <Real> continuations tokenize identically")


def class_score_inputs(processor, prompt_text: str, images, assistant_prefix: str):
    """The processor inputs of ``prompt_text + assistant_prefix`` followed by the class string, cut before the
    first token where ``<Spoof>`` and ``<Real>`` differ (the logits at the last position score the class), and
    ``(position, spoof_token, real_token)`` of that token. With a tokenizer that spells the tags in several
    tokens (Qwen's), the tokens both tags start with stay in the inputs."""
    import torch
    from transformers import BatchFeature

    def enc(cls):
        return processor(
            text=[prompt_text + assistant_prefix + CLASS_STRINGS[cls]], images=images or None, return_tensors="pt"
        )

    es, er = enc("spoof"), enc("real")
    ids_s, ids_r = es["input_ids"][0].tolist(), er["input_ids"][0].tolist()
    k = split_point(ids_s, ids_r)
    n = len(ids_s)
    inputs = BatchFeature({
        key: (v[:, :k] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == (1, n) else v) for key, v in es.items()
    })  # fmt: skip
    return inputs, (k, ids_s[k], ids_r[k])


def class_token_score(model, processor, prompt_text: str, images, assistant_prefix: str) -> ClassTokenScore:
    """P(spoof) at the class position after ``prompt_text + assistant_prefix`` (one forward pass over
    the shared prefix, images included)."""
    import torch

    inputs, (k, spoof_token, real_token) = class_score_inputs(processor, prompt_text, images, assistant_prefix)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {
        key: (
            v.to(device, dtype)
            if torch.is_tensor(v) and v.is_floating_point()
            else v.to(device)
            if torch.is_tensor(v)
            else v
        )
        for key, v in inputs.items()
    }
    with torch.no_grad():
        logits = model(**inputs, logits_to_keep=1).logits[0, -1].float()
    pair = torch.stack([logits[spoof_token], logits[real_token]])
    p = torch.softmax(pair, dim=0)[0].item()
    return ClassTokenScore(p, k, spoof_token, real_token, (pair[0].item(), pair[1].item()))


# Texts that come right before a class tag in protocol turns: a fast answer starts with it, an answer
# turn has it after <answer>. The tokens where <Spoof> and <Real> split after them are the candidates
# whose logits generation records (core.policies.hf), so that the score needs no second forward pass.
_CLASS_CONTEXTS = (
    "",
    "<answer>",
    "\n<answer>",
    "</think>\n<answer>",
    "</think><answer>",
    "<answer> ",
    "<answer>\n",
    " ",
)


def class_candidate_ids(tokenizer) -> list[int]:
    """Token ids that start the class at the split point after the usual contexts (both classes)."""
    ids: set[int] = set()
    for ctx in _CLASS_CONTEXTS:
        s = tokenizer.encode(ctx + CLASS_STRINGS["spoof"], add_special_tokens=False)
        r = tokenizer.encode(ctx + CLASS_STRINGS["real"], add_special_tokens=False)
        k = split_point(s, r)
        ids.update((s[k], r[k]))
    return sorted(ids)


def generated_class_score(
    tokenizer, prefix: str, new_ids: list[int], logit_at: Callable[[int, int], float | None]
) -> ClassTokenScore | None:
    """P(spoof) from the logits that generation computed anyway: ``prefix`` is the generated text before
    the class tag, ``new_ids`` the generated tokens, ``logit_at(step, token_id)`` the raw logit of a token
    at the decoding step that produced token ``step`` (None when it was not recorded).

    Equal to :func:`class_token_score` when the model generated the same tokens that the forward pass
    would read (the tokenization of ``prefix`` + class string up to the split point); None otherwise, and
    the caller does the forward pass. ``position`` is the index in the generated tokens."""
    if prefix[:1].isspace():  # may merge with the prompt's last token in a joint tokenization
        return None
    ids_s = tokenizer.encode(prefix + CLASS_STRINGS["spoof"], add_special_tokens=False)
    ids_r = tokenizer.encode(prefix + CLASS_STRINGS["real"], add_special_tokens=False)
    k = split_point(ids_s, ids_r)
    if k >= len(new_ids) or list(new_ids[:k]) != ids_s[:k]:
        return None
    ls, lr = logit_at(k, ids_s[k]), logit_at(k, ids_r[k])
    if ls is None or lr is None:
        return None
    p_spoof = 1.0 / (1.0 + math.exp(lr - ls))  # softmax over the pair
    return ClassTokenScore(p_spoof, k, ids_s[k], ids_r[k], (ls, lr))


def score_from_top_logprobs(text: str, tokens: list[dict]) -> tuple[float | None, str]:
    """P(spoof) from an OpenAI-style ``logprobs.content`` list (``token``, ``logprob``,
    ``top_logprobs``) of the generated ``text``: at the token that covers the first character where
    ``<Spoof>`` and ``<Real>`` differ, sum the probabilities of the top alternatives consistent with
    each class. Returns (score or None, how it was obtained)."""
    pos = class_tag_offset(text)
    if pos is None:
        return None, "no class token in the turn"
    diff = pos + 1  # "<S..." vs "<R...": they differ right after "<"
    offset = 0
    for entry in tokens:
        tok = entry.get("token") or ""
        if offset + len(tok) > diff:
            lead = text[offset:pos]  # part of this token before the class tag (e.g. ">" merged with "<")
            mass = {"spoof": 0.0, "real": 0.0}
            for alt in entry.get("top_logprobs") or []:
                t = alt.get("token") or ""
                if len(t) <= diff - offset:
                    continue  # ends before the differing character: says nothing about the class
                for cls, s in CLASS_STRINGS.items():
                    full = lead + s[max(0, offset - pos) :]  # this class's text from the token's start
                    if full.startswith(t) or t.startswith(full):
                        mass[cls] += math.exp(alt["logprob"])
            total = mass["spoof"] + mass["real"]
            if total == 0.0:
                return None, "class tokens not among the returned top_logprobs"
            how = "class_token_logprobs"
            if mass["spoof"] == 0.0 or mass["real"] == 0.0:
                how += " (one class below the returned top_logprobs)"
            return mass["spoof"] / total, how
        offset += len(tok)
    return None, "logprobs do not cover the class token"

"""DT-GRPO rollouts: the project's own agent loop (core.agent) driven by the model being trained.

A rollout is one investigation: the fast answer, the re-examine prompt, tool calls whose images really come
from core.tools, then the final answer. :class:`TokenPolicy` is a :class:`core.policies.Policy` that samples
each assistant turn from the model and keeps the conversation as token ids, so the loss is computed on
exactly the tokens that were sampled (never re-tokenized text):

    prompt_ids      system + face image + first-round query + "<|im_start|>assistant\\n"
    completion_ids  turn 1 | re-examine prompt | turn 2 | tool image + format declaration | turn 3 | ...
    mask            1 on sampled tokens, 0 on what the environment added (prompts, tool images, errors)

The environment's segments are rendered by the same chat template as inference (core/mllm) and joined at
the end-of-turn token, so the ids equal what rendering the final conversation would give.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from core.errors import TarfasError
from core.faces import FaceCrop
from core.mllm.messages import to_processor_inputs
from core.policies.base import Conversation, PolicyOutput
from core.protocol import STOP_STRINGS
from core.trajectory import Trajectory


class RolloutBudgetError(TarfasError):
    """The rollout would exceed its completion budget; the agent loop ends it as failed (format reward -1)."""


# generate(ids, images, fields) -> (sampled ids, their sampling log-probs or None)
GenerateFn = Callable[[list[int], list[Image.Image], dict], tuple[list[int], list[float] | None]]


@dataclass
class Rollout:
    trajectory: Trajectory
    prompt_ids: list[int]
    completion_ids: list[int]
    mask: list[int]  # 1 = sampled by the policy, 0 = added by the environment
    logprobs: list[float] | None  # sampling log-probs (vLLM) aligned with completion_ids, 0 on env tokens
    images: list[Image.Image]  # every image in order: the face crop, then each tool image
    texts: list[str]  # the assistant turns as decoded
    generate_s: float = 0.0
    tool_s: float = 0.0

    @property
    def tool_images(self) -> list[Image.Image]:
        return self.images[1:]


def face_from_image(image) -> FaceCrop:
    """The rollout input: a dataset crop (already the 224x224 face) as the agent's FaceCrop."""
    crop = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if crop.ndim != 3 or crop.shape[2] != 3:
        raise ValueError(f"expected an RGB face crop, got shape {crop.shape}")
    h, w = crop.shape[:2]
    return FaceCrop(np.ascontiguousarray(crop), None, (0, 0, w, h), (w, h), False, ["dataset crop"])


@dataclass
class TokenPolicy:
    """The model under training as an agent policy (sampling), recording the token-level rollout."""

    generate: GenerateFn
    processor: object
    max_completion_tokens: int
    name: str = "grpo-rollout"
    version: str = "training"
    description: str = "The policy being trained by DT-GRPO (sampling)."
    prompt_ids: list[int] | None = None
    completion_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] | None = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    _fields: list[dict] = field(default_factory=list)
    _seen: int = 0  # messages already tokenized (through our last assistant turn)
    generate_s: float = 0.0  # from asking for a turn to getting it (in lockstep: includes waiting for the batch)

    def __post_init__(self):
        tok = self.processor.tokenizer
        self._eos = tok.convert_tokens_to_ids("<|im_end|>")
        self._eos_text = "<|im_end|>"

    # --- the Policy interface -------------------------------------------------------------------------
    def next_turn(self, conversation: Conversation) -> PolicyOutput:
        msgs = conversation.messages
        if self.prompt_ids is None:
            inp = to_processor_inputs(msgs, self.processor, add_generation_prompt=True)
            enc = self.processor(text=[inp.text], images=inp.images or None, return_tensors="pt")
            self.prompt_ids = enc["input_ids"][0].tolist()
            self.images = list(inp.images)
            self._fields.append(_image_fields(enc))
        else:
            self._append_environment(msgs)
        ids = self.prompt_ids + self.completion_ids
        if len(self.completion_ids) >= self.max_completion_tokens:
            raise RolloutBudgetError(
                f"the rollout reached its budget of {self.max_completion_tokens} completion tokens"
            )
        t0 = time.perf_counter()
        sampled, lps = self.generate(ids, self.images, _concat_fields(self._fields))
        self.generate_s += time.perf_counter() - t0
        room = self.max_completion_tokens - len(self.completion_ids)
        sampled = list(sampled)[:room]
        sampled = sampled[: stop_length(sampled, self.processor.tokenizer, self._eos)]
        self._extend(sampled, 1, lps[: len(sampled)] if lps is not None else None)
        if not sampled or sampled[-1] != self._eos:  # cut by a stop string or max_new_tokens: close the turn
            self._extend([self._eos], 0, None)
        text = self.processor.tokenizer.decode(sampled, skip_special_tokens=True)
        self.texts.append(text)
        self._seen = len(msgs) + 1  # the conversation now includes this assistant turn
        return PolicyOutput(text)

    # --- internals ----------------------------------------------------------------------------------
    def _extend(self, ids: list[int], flag: int, lps: list[float] | None) -> None:
        self.completion_ids += ids
        self.mask += [flag] * len(ids)
        if self.logprobs is not None:
            if flag and lps is None:
                self.logprobs = None  # no sampling log-probs from this backend (transformers generate)
            else:
                self.logprobs += list(lps) if flag else [0.0] * len(ids)

    def _append_environment(self, msgs: list[dict]) -> None:
        """Tokenize what the environment said since our last turn (prompts, tool images, error feedback)."""
        new = msgs[self._seen :]
        if not new or any(m["role"] == "assistant" for m in new):
            raise RuntimeError("the agent loop's messages do not continue this rollout")
        before = to_processor_inputs(msgs[: self._seen], self.processor, add_generation_prompt=False)
        full = to_processor_inputs(msgs, self.processor, add_generation_prompt=True)
        cut = before.text.rfind(self._eos_text)
        prefix = before.text[: cut + len(self._eos_text)]
        if cut < 0 or not full.text.startswith(prefix):
            raise RuntimeError("the chat template is not prefix-preserving; rollouts need it to be")
        suffix = full.text[len(prefix) :]
        new_images = full.images[len(before.images) :]
        enc = self.processor(text=[suffix], images=new_images or None, return_tensors="pt")
        self._extend(enc["input_ids"][0].tolist(), 0, None)
        self.images += new_images
        if new_images:
            self._fields.append(_image_fields(enc))

    def rollout(self, trajectory: Trajectory) -> Rollout:
        if self.prompt_ids is None:
            raise RuntimeError(f"the rollout never reached the model: {trajectory.error}")
        tool_s = trajectory.timings_ms.get("tools", 0.0) / 1e3
        return Rollout(trajectory, self.prompt_ids, self.completion_ids, self.mask, self.logprobs, self.images, self.texts,
                       self.generate_s, tool_s)  # fmt: skip


def stop_length(ids: list[int], tokenizer, eos: int | None = None, stops=STOP_STRINGS) -> int:
    """How many of the sampled ``ids`` make the turn: up to the token that completes the first stop string
    (core.protocol.STOP_STRINGS, where inference ends a turn), plus the end-of-turn token ``eos`` if it was
    sampled right after; all of them when no stop string occurs. vLLM already stops there; transformers
    ``generate`` in TRL cannot (stop strings need the tokenizer passed to it), and cutting its sample at the
    same token gives the same turns as stopping there."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if not any(s in text for s in stops):
        return len(ids)
    for n in range(1, len(ids) + 1):
        if any(s in tokenizer.decode(ids[:n], skip_special_tokens=False) for s in stops):
            return n + 1 if n < len(ids) and ids[n] == eos else n
    return len(ids)


class LockstepSampler:
    """Samples the next turn of many rollouts with one batched call. Each rollout runs the agent loop in its
    own thread; its policy submits the conversation so far and waits. When every rollout still running has
    submitted, the last one in runs ``generate_batch`` for all of them (left-padded, as TRL batches), so a
    GRPO step makes one call per turn instead of one per turn and completion."""

    def __init__(
        self, generate_batch: Callable[[list, list, list], list[tuple[list[int], list[float] | None]]], rollouts: int
    ):
        self._generate_batch = generate_batch
        self._live = rollouts
        self._cond = threading.Condition()
        self._pending: dict[int, tuple] = {}
        self._results: dict[int, object] = {}
        self.calls = 0
        self.generate_s = 0.0

    def for_rollout(self, index: int) -> GenerateFn:
        return lambda ids, images, fields: self._submit(index, ids, images, fields)

    def finished(self) -> None:
        """A rollout ended (answer, failure or budget): the others no longer wait for it."""
        with self._cond:
            self._live -= 1
            self._run_if_ready()

    def _submit(self, index, ids, images, fields):
        with self._cond:
            self._pending[index] = (ids, images, fields)
            self._run_if_ready()
            while index not in self._results:
                self._cond.wait()
            out = self._results.pop(index)
        if isinstance(out, BaseException):
            raise out
        return out

    def _run_if_ready(self) -> None:  # called with the lock held
        if not self._pending or len(self._pending) < self._live:
            return
        keys = sorted(self._pending)
        batch = [self._pending.pop(k) for k in keys]
        t0 = time.perf_counter()
        try:
            outs = self._generate_batch(*map(list, zip(*batch, strict=True)))
        except Exception as exc:  # every waiting rollout fails with it (the agent loop records it)
            outs = [exc] * len(keys)
        self.generate_s += time.perf_counter() - t0
        self.calls += 1
        self._results.update(zip(keys, outs, strict=True))
        self._cond.notify_all()


def run_rollouts(
    faces: list[FaceCrop], make_policy: Callable[[GenerateFn], TokenPolicy], generate_batch, config
) -> tuple[list[Rollout], LockstepSampler]:
    """Run one agent loop per face concurrently, sampling their turns in lockstep batches."""
    from concurrent.futures import ThreadPoolExecutor

    from core.agent import run

    sampler = LockstepSampler(generate_batch, len(faces))
    policies = [make_policy(sampler.for_rollout(i)) for i in range(len(faces))]

    def work(i: int) -> Trajectory:
        try:
            return run(faces[i], policies[i], config)
        finally:
            sampler.finished()

    with ThreadPoolExecutor(max_workers=max(1, len(faces)), thread_name_prefix="rollout") as pool:
        trajectories = list(pool.map(work, range(len(faces))))
    return [p.rollout(t) for p, t in zip(policies, trajectories, strict=True)], sampler


def _image_fields(enc) -> dict:
    return {k: v for k, v in enc.items() if k in ("pixel_values", "image_grid_thw")}


def _concat_fields(fields: list[dict]) -> dict:
    import torch

    out = {}
    for key in ("pixel_values", "image_grid_thw"):
        parts = [f[key] for f in fields if key in f]
        if parts:
            out[key] = torch.cat(parts, dim=0)
    return out

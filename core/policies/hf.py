"""The ``hf`` policy: a Qwen2.5-VL or InternVL3 checkpoint (optionally + a PEFT LoRA adapter) run with
transformers, turn by turn. Generation stops at ``</tool_call>``, ``</answer>`` or ``</reason>`` (or
the end-of-turn token, or ``max_new_tokens``); the score is the class-token probability (core.mllm.scoring),
never parsed from sampled text.

Concurrent investigations (threads: ``tarfas eval --concurrency N``, the app's jobs) share one model:
their turns are generated together in left-padded batches (core.mllm.batching), each image is processed
once (:class:`~core.mllm.processor.CachedImageProcessor`), and when the model itself generates the class
token the score is read from the logits of that decoding step instead of a second forward pass.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..lineage import read_lineage, summarize_lineage
from ..mllm.batching import RequestBatcher
from ..mllm.errors import ContextOverflowError
from ..mllm.messages import collate_left, encode, to_processor_inputs
from ..mllm.processor import CachedImageProcessor, LoadedModel, load_model_and_processor, vision_token_ids
from ..mllm.scoring import class_candidate_ids, class_token_score, generated_class_score
from ..protocol import STOP_STRINGS, class_tag_offset
from .base import Conversation, PolicyOutput

_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class Generated:
    """One row of a batched generate: its new tokens (up to where it stopped), the raw logits of the
    class candidate tokens at each decoding step, and the batch it ran in."""

    new_ids: list[int]
    class_logits: object | None  # tensor (steps, candidates), CPU float32
    seconds: float
    batch_size: int


class HFPolicy:
    name = "hf"

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        model_dir: str | Path | None = None,
        max_new_tokens: int = 512,
        max_context: int | None = None,
        temperature: float = 0.0,
        scripted_prefix: Sequence[str | None] = (),
        image_root: str | Path | None = None,
        max_batch: int = 16,
        generation_kwargs: dict | None = None,
        score_from_generation: bool = True,
        prefix_cache: bool | None = None,
    ):
        """``scripted_prefix[i]`` (when not None) is forced as the start of assistant turn ``i`` and the
        model continues from it (nothing is generated if it already ends with a stop string); the
        class score is always computed by the model. For tests and demos of untrained models.
        ``max_batch``: most turns generated together. ``generation_kwargs``: more ``generate()`` options
        (e.g. ``repetition_penalty``, a ``logits_processor`` list). ``score_from_generation=False``: always a
        separate forward pass for the class score (the pre-batching behaviour, for comparisons).
        ``prefix_cache``: reuse the KV of the text every conversation starts with (None: on for Qwen2.5-VL,
        the architecture whose generate continues a cache across new image tokens; the weights must not
        change under the policy)."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.lm = loaded
        self.model, self.processor = loaded.model, loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.scripted_prefix = list(scripted_prefix)
        self.image_root = image_root
        config = getattr(self.model, "config", None)
        text_config = config.get_text_config() if config is not None else None
        self.max_context = max_context or getattr(text_config, "max_position_embeddings", None) or 32768
        self.model_dir = Path(model_dir) if model_dir else None
        self.version = _version(self.model_dir, loaded.adapter)
        n_params = sum(p.numel() for p in self.model.parameters())
        # What the analyst needs to trace a verdict to its training: the adapter's lineage, else the model's.
        self.lineage = read_lineage(loaded.adapter) if loaded.adapter else None
        self.lineage = self.lineage or (read_lineage(self.model_dir) if self.model_dir else None)
        nano = self.model_dir is not None and (self.model_dir / "tarfas_nano.json").is_file()
        self.description = (
            f"{('Nano (built locally' + ('' if self.lineage else ', untrained') + ') ') if nano else ''}{loaded.arch} MLLM, {n_params / 1e6:.1f}M parameters, "
            f"from {self.model_dir or 'memory'}{' + LoRA adapter ' + loaded.adapter if loaded.adapter else ''}; "
            f"transformers on {loaded.device} ({loaded.dtype}); score = class-token probability"
        )
        if self.lineage:
            self.description += f". Lineage: {summarize_lineage(self.lineage)}"
        self._suppress = vision_token_ids(self.tokenizer)
        self.generation_kwargs = dict(generation_kwargs or {})
        self.score_from_generation = score_from_generation
        if not isinstance(self.processor.image_processor, CachedImageProcessor):
            self.processor.image_processor = CachedImageProcessor(self.processor.image_processor)
        self._candidates = class_candidate_ids(self.tokenizer)
        self._column = {t: i for i, t in enumerate(self._candidates)}
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self._eos = set(eos) | {self.tokenizer.convert_tokens_to_ids(t) for t in _END_TOKENS} - {None}
        self._model_lock = threading.RLock()  # generate and the score's forward pass: one at a time
        self._tok_lock = threading.RLock()  # fast tokenizers refuse concurrent use ("Already borrowed")
        self._batcher = RequestBatcher(self._generate_batch, max_batch=max_batch)
        # KV of the text every conversation starts with (system prompt, tool schemas, up to the face image):
        # computed once, shared by every row of every batch (Qwen2.5-VL, whose generate continues a cache
        # across new image tokens).
        self.prefix_cache = loaded.arch == "qwen2_5_vl" if prefix_cache is None else prefix_cache
        self._prefixes: OrderedDict[bytes, object] = OrderedDict()
        self._first_vision = set(self._suppress)

    @classmethod
    def load(
        cls,
        model: str | Path,
        adapter: str | Path | None = None,
        device: str | None = None,
        dtype: str | None = None,
        attn_implementation: str | None = None,
        **kwargs,
    ) -> HFPolicy:
        loaded = load_model_and_processor(
            model, adapter=adapter, device=device, dtype=dtype, attn_implementation=attn_implementation
        )
        return cls(loaded, model_dir=model, **kwargs)

    # ------------------------------------------------------------------------------------------------
    def stream(self):
        """``with policy.stream():`` around a thread's run of investigations: concurrent streams have
        their turns generated in one batch (see core.mllm.batching)."""
        return self._batcher.stream()

    @property
    def batch_sizes(self) -> list[int]:
        """Sizes of the generate batches run so far."""
        return self._batcher.batch_sizes

    def next_turn(self, conversation: Conversation) -> PolicyOutput:
        index = len(conversation.trajectory.turns)
        forced = self.scripted_prefix[index] if index < len(self.scripted_prefix) else None
        forced = forced or ""
        with self._tok_lock:
            inputs = to_processor_inputs(conversation.messages, self.processor, image_root=self.image_root)
            batch = encode(self.processor, inputs, forced)
        n_prompt = batch["input_ids"].shape[1]
        if n_prompt + self.max_new_tokens > self.max_context:
            raise ContextOverflowError(
                f"turn {index}: the conversation is {n_prompt} tokens and the turn may add {self.max_new_tokens}, "
                f"beyond the model's context of {self.max_context} tokens"
            )
        notes: dict = {"prompt_tokens": int(n_prompt), "forced_prefix": bool(forced)}
        text_new, stopped_by, gen = "", "scripted", None
        if not forced.rstrip().endswith(STOP_STRINGS):
            gen = self._batcher.submit(batch)
            n_new = len(gen.new_ids)
            with self._tok_lock:
                text_new, stopped_by = self._decode(gen.new_ids)
            notes.update(
                new_tokens=n_new,
                generate_ms=round(gen.seconds * 1e3, 1),
                tokens_per_s=round(n_new / gen.seconds, 1) if gen.seconds > 0 else None,
                batch_size=gen.batch_size,
            )
        notes["stopped_by"] = stopped_by
        text = forced + text_new
        score = None
        pos = class_tag_offset(text)
        if pos is not None:
            s, where = None, "forward"
            if gen is not None and not forced and self.score_from_generation:
                with self._tok_lock:
                    s = generated_class_score(self.tokenizer, text[:pos], gen.new_ids, self._logit_reader(gen))
                where = "generation" if s is not None else where
            if s is None:  # the class token was forced, or not generated as the forward pass would read it
                with self._model_lock, self._tok_lock:
                    s = class_token_score(self.model, self.processor, inputs.text, inputs.images, text[:pos])
            score = s.p_spoof
            notes.update(
                score_source="class_token_logits",
                score_pass=where,
                class_logits={"spoof": round(s.logits[0], 4), "real": round(s.logits[1], 4)},
            )
        return PolicyOutput(text, score, notes)

    def generate_kwargs(self, batch) -> dict:
        """Every argument of the ``generate`` call for a (collated) batch."""
        return dict(
            **batch,
            max_new_tokens=self.max_new_tokens,
            do_sample=self.temperature > 0,
            temperature=self.temperature if self.temperature > 0 else None,
            top_p=None, top_k=None,
            stop_strings=list(STOP_STRINGS),
            tokenizer=self.tokenizer,
            suppress_tokens=self._suppress or None,
            pad_token_id=self.tokenizer.pad_token_id,
            **self.generation_kwargs,
        )  # fmt: skip

    def _generate_batch(self, rows: list) -> list[Generated]:
        """Generate the next turn of several conversations at once (the batcher's worker runs this)."""
        import torch

        with self._model_lock:
            shared, cache = self._shared_prefix(rows)
            batch = collate_left(rows, self.tokenizer.pad_token_id, at=shared).to(self.lm.device)
            width = batch["input_ids"].shape[1]
            steps: list = []
            columns = torch.tensor(self._candidates, device=batch["input_ids"].device)

            def record(_module, _args, logits):  # the lm head's raw output at the step's last position
                steps.append(logits[:, -1].index_select(-1, columns).float())

            kwargs = self.generate_kwargs(batch)
            if cache is not None:
                kwargs["cache"] = cache
            hook = self.model.get_output_embeddings().register_forward_hook(record)
            try:
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = self.model.generate(**kwargs)
                seconds = time.perf_counter() - t0
            finally:
                hook.remove()
        logits = torch.stack(steps).cpu() if steps else None  # (steps, rows, candidates)
        results = []
        for i, ids in enumerate(out[:, width:].tolist()):
            with self._tok_lock:
                ids = ids[: self._row_length(ids)]
            results.append(Generated(ids, logits[:, i] if logits is not None else None, seconds, len(rows)))
        return results

    def _shared_prefix(self, rows: list) -> tuple[int, object | None]:
        """The length of the text prefix all rows share (before any image token, at least one token short of
        the shortest row), and a fresh copy of its KV cache for the batch (computed on first use, then kept
        in a small LRU). (0, None) when the prefix cache is off or nothing is shared."""
        import torch

        if not self.prefix_cache:
            return 0, None
        ids = [r["input_ids"][0] for r in rows]
        n = min(len(x) for x in ids) - 1
        first = ids[0][:n].tolist()
        cut = next((j for j, t in enumerate(first) if t in self._first_vision), n)
        for x in ids[1:]:
            diff = (x[:cut] != ids[0][:cut]).nonzero()
            cut = int(diff[0]) if len(diff) else cut
        if cut < 16:  # not worth a cache
            return 0, None
        key = ids[0][:cut].numpy().tobytes()
        if key not in self._prefixes:
            with torch.no_grad():
                prefix = ids[0][:cut].unsqueeze(0).to(self.lm.device)
                self._prefixes[key] = self.model(input_ids=prefix, use_cache=True).cache
            while len(self._prefixes) > 8:
                self._prefixes.popitem(last=False)
        self._prefixes.move_to_end(key)
        cache = copy.deepcopy(self._prefixes[key])  # generate appends to it
        if len(rows) > 1:
            cache.batch_repeat_interleave(len(rows))
        return cut, cache

    def _row_length(self, ids: list[int]) -> int:
        """How many of a row's new tokens it generated before it stopped (the rest is batch padding):
        up to its first end-of-turn token, or the token that completed its first stop string."""
        n = next((j + 1 for j, t in enumerate(ids) if t in self._eos), len(ids))
        if not any(s in self.tokenizer.decode(ids[:n], skip_special_tokens=False) for s in STOP_STRINGS):
            return n
        lo, hi = 1, n  # the shortest prefix whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            text = self.tokenizer.decode(ids[:mid], skip_special_tokens=False)
            lo, hi = (lo, mid) if any(s in text for s in STOP_STRINGS) else (mid + 1, hi)
        return lo

    def _logit_reader(self, gen: Generated):
        def logit_at(step: int, token: int) -> float | None:
            col = self._column.get(token)
            if col is None or gen.class_logits is None or step >= gen.class_logits.shape[0]:
                return None
            return float(gen.class_logits[step, col])

        return logit_at

    def _decode(self, ids: list[int]) -> tuple[str, str]:
        """Text of the new tokens up to (and including) the first stop string; why generation ended."""
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        cut = min(((text.find(s) + len(s), s) for s in STOP_STRINGS if s in text), default=None)
        if cut is not None:
            return text[: cut[0]], "stop_string"
        for end in _END_TOKENS:
            if end in text:
                return text[: text.find(end)], "eos"
        return text, "max_new_tokens"


def _version(model_dir: Path | None, adapter: str | None) -> str:
    """A short id of the weights: content hash for small checkpoints (nano), else config + file sizes
    (hashing 16 GB of a 7B model per load would be slow)."""
    if model_dir is None:
        return "in-memory"
    h = hashlib.sha256()
    for folder in [model_dir] + ([Path(adapter)] if adapter else []):
        for f in sorted(folder.glob("*")):
            if f.suffix in (".json", ".safetensors") and f.is_file():
                h.update(f.name.encode())
                if f.suffix == ".json" or f.stat().st_size < 64 << 20:
                    h.update(f.read_bytes())
                else:
                    h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:12]

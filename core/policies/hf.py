"""The ``hf`` policy: a Qwen2.5-VL or InternVL3 checkpoint (optionally + a PEFT LoRA adapter) run with
transformers, turn by turn. Generation stops at ``</tool_call>``, ``</answer>`` or ``</reason>`` (or
the end-of-turn token, or ``max_new_tokens``); the score is the class-token probability from a forward
pass (core.mllm.scoring), never parsed from sampled text.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ..lineage import read_lineage, summarize_lineage
from ..mllm.errors import ContextOverflowError
from ..mllm.messages import encode, to_processor_inputs
from ..mllm.processor import LoadedModel, load_model_and_processor, vision_token_ids
from ..mllm.scoring import class_token_score
from ..protocol import STOP_STRINGS, class_tag_offset
from .base import Conversation, PolicyOutput

_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


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
    ):
        """``scripted_prefix[i]`` (when not None) is forced as the start of assistant turn ``i`` and the
        model continues from it (nothing is generated if it already ends with a stop string); the
        class score is always computed by the model. For tests and demos of untrained models."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
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
        self._lock = threading.Lock()  # one model, several investigations (the app runs them in threads)

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
    def next_turn(self, conversation: Conversation) -> PolicyOutput:
        with self._lock:
            return self._next_turn(conversation)

    def _next_turn(self, conversation: Conversation) -> PolicyOutput:
        import torch

        index = len(conversation.trajectory.turns)
        forced = self.scripted_prefix[index] if index < len(self.scripted_prefix) else None
        forced = forced or ""
        inputs = to_processor_inputs(conversation.messages, self.processor, image_root=self.image_root)
        batch = encode(self.processor, inputs, forced)
        n_prompt = batch["input_ids"].shape[1]
        if n_prompt + self.max_new_tokens > self.max_context:
            raise ContextOverflowError(
                f"turn {index}: the conversation is {n_prompt} tokens and the turn may add {self.max_new_tokens}, "
                f"beyond the model's context of {self.max_context} tokens"
            )
        notes: dict = {"prompt_tokens": int(n_prompt), "forced_prefix": bool(forced)}
        text_new, stopped_by, n_new, gen_s = "", "scripted", 0, 0.0
        if not forced.rstrip().endswith(STOP_STRINGS):
            batch = batch.to(self.lm.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = self.model.generate(
                    **batch,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=self.temperature > 0,
                    temperature=self.temperature if self.temperature > 0 else None,
                    top_p=None, top_k=None,
                    stop_strings=list(STOP_STRINGS),
                    tokenizer=self.tokenizer,
                    suppress_tokens=self._suppress or None,
                    pad_token_id=self.tokenizer.pad_token_id,
                )  # fmt: skip
            gen_s = time.perf_counter() - t0
            new_ids = out[0, n_prompt:].tolist()
            n_new = len(new_ids)
            text_new, stopped_by = self._decode(new_ids)
            notes.update(
                new_tokens=n_new,
                generate_ms=round(gen_s * 1e3, 1),
                tokens_per_s=round(n_new / gen_s, 1) if gen_s > 0 else None,
            )
        notes["stopped_by"] = stopped_by
        text = forced + text_new
        score = None
        pos = class_tag_offset(text)
        if pos is not None:
            s = class_token_score(self.model, self.processor, inputs.text, inputs.images, text[:pos])
            score = s.p_spoof
            notes.update(
                score_source="class_token_logits",
                class_logits={"spoof": round(s.logits[0], 4), "real": round(s.logits[1], 4)},
            )
        return PolicyOutput(text, score, notes)

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

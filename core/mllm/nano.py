"""Nano models: the real Qwen2.5-VL / InternVL3 architectures at toy size, built offline in seconds.

``build_nano(out, arch)`` writes a folder that loads exactly like a downloaded checkpoint
(``config.json`` + ``model.safetensors`` + tokenizer + processor + chat template), so the hf policy,
``transformers serve`` and the training pipeline run the real code paths on CPU. The tokenizer is a
byte-level BPE with Qwen2's pre-tokenizer and the special tokens of the real model family, trained
locally on the protocol's own texts so that protocol strings tokenize compactly. Everything is seeded:
the same call writes the same weights and vocabulary.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .processor import install_remote_code
from .template import ARCHS, attach_chat_template

# Special tokens of the Qwen2.5 family (same order as the real vocabulary's added tokens).
QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
# Added but not special in the real tokenizers (they survive skip_special_tokens in decoding).
QWEN_ADDED = ["<tool_call>", "</tool_call>"]
# The protocol's fixed pieces as single (added, not special) tokens of the nano vocabulary, as Qwen3 has
# <think>/</think> and Qwen2.5 <tool_call>. A ~5M model spelled them in 2-4 pieces, and the pieces repeat
# (`":` follows both JSON keys, `</` opens every closing tag), so the next piece depended on a lookup two or
# three tokens back, which is where sampled turns went wrong: after `"arguments":` the FI model put 17% on
# ` "` (the continuation after `"name":`) on spoof trajectories (docs/training.md). As one token each, every
# continuation is a bigram. The model still samples from the whole vocabulary and can spell them in pieces.
NANO_PROTOCOL_TOKENS = [
    "<think>", "</think>", "<answer>", "</answer>", "<reason>", "</reason>", "<Real>", "<Spoof>",
    '\n{"name": "', '", "arguments": ',
]  # fmt: skip
# InternVL3-hf adds these on top of the Qwen2.5 vocabulary.
INTERNVL_SPECIAL = [
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<video>",
]

NANO_VOCAB = 4096  # learned BPE tokens (specials come on top)
NANO_IMAGE_SIDE = 224  # the face crop side; InternVL's tile size is set to it


@dataclass(frozen=True)
class NanoSpec:
    """Sizes of a nano model (defaults: ~1-2M parameters, a few MB)."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    max_positions: int = 8192
    seed: int = 0


# The sizes `tarfas model init-nano --size` builds. "nano" (~1M parameters) is for fast unit tests: it runs
# every code path but does not learn the protocol. "micro" (~4.8M, head dim 64 as in the real 7-8B models)
# is the CPU recipe's size: what the 15-minute, 2-core budget of training/cli/nano_e2e.py affords
# (docs/training.md; a 13M size, hidden 384 x 6 layers, costs 2.5x as much per step).
SIZES = {
    "nano": NanoSpec(),
    "micro": NanoSpec(
        hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vision_hidden=128, vision_layers=2, vision_heads=2
    ),
}


def spec_for(size: str, seed: int = 0) -> NanoSpec:
    """The :class:`NanoSpec` of a named size ("nano" or "micro") with the given seed."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    from dataclasses import replace

    return replace(SIZES[size], seed=seed)


def build_nano(out: str | Path, arch: str = "qwen2_5_vl", spec: NanoSpec | None = None) -> Path:
    """Build a nano model of ``arch`` ("qwen2_5_vl" or "internvl") into folder ``out`` and return it.

    The folder holds the model (safetensors), tokenizer, processor (torchvision-free image processor)
    and the tarfas chat template; :func:`core.mllm.processor.load_model_and_processor` reloads it offline.
    """
    import torch

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    spec = spec or NanoSpec()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(arch)
    config = _config(arch, tokenizer, spec)
    torch.manual_seed(spec.seed)
    model_cls = _model_class(arch)
    model = model_cls(config).eval()
    processor = _processor(arch, tokenizer, config)
    attach_chat_template(processor, arch)
    model.generation_config.eos_token_id = [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    processor.save_pretrained(out)
    install_remote_code(out, arch)
    (out / "tarfas_nano.json").write_text(
        json.dumps({"arch": arch, "spec": spec.__dict__, "vocab": len(tokenizer)}, indent=2)
    )
    return out


# --- tokenizer --------------------------------------------------------------------------------------
def training_corpus() -> list[str]:
    """Texts the nano tokenizer is trained on: every prompt and format of core.protocol, the tool
    schemas, and protocol turns like those the expert policy writes."""
    from .. import protocol
    from ..registry import ToolRegistry, tool_spec

    reg = ToolRegistry(None)
    texts = [
        protocol.system_prompt(reg.schemas()),
        protocol.ROLE_AND_MISSION,
        protocol.FIRST_ROUND_QUERY,
        protocol.second_round_prompt(),
        protocol.ANNOTATOR_SYSTEM_PROMPT,
        protocol.TOOL_LIMIT_MESSAGE,
        protocol.fast_answer_feedback("fast answer must be exactly <Real><reason>...</reason>"),
        protocol.error_feedback(
            "expected <think></think> followed by one <tool_call></tool_call> or one <answer></answer>"
        ),
        "You are a helpful assistant.",
    ]
    observations = [
        "the skin texture looks natural with fine pores", "the face looks flat with a paper border",
        "moire stripes suggest a screen replay", "edges are blurred like a recaptured print",
        "the expert reads {p}% spoof trace", "the evidence so far leans {v} (P(spoof) = 0.{p})",
        "orientation entropy 3.14 bits, sharpness 3379, edge density 9.5%",
    ]  # fmt: skip
    for i, name in enumerate(reg.names):
        for verdict in ("real", "spoof"):
            p = 10 + 13 * i
            obs = " ".join(o.format(p=p, v=verdict) for o in observations)
            texts.append(protocol.format_fast_answer(verdict, f"At a glance {obs}."))
            texts.append(
                protocol.format_tool_call_turn(f"Next I use {name} to check: {obs}.", protocol.ToolCall(name, {}))
            )
            texts.append(protocol.format_answer_turn(f"{name} result: {obs}. This is a {verdict} face.", verdict))
            texts.append(protocol.expert_guidance(name, p / 100))
    # The words the tools' outputs are described in and the forensic English of the annotator's turns
    # (training/annotators.py writes sentences like these), so that reasoning text tokenizes into words
    # as with a real vocabulary: spelled in 1-2 letter pieces, sampled text at T = 1 drifted into
    # non-words that derailed the turn (docs/training.md).
    for name in reg.names:
        spec = tool_spec(name)
        texts.append(f"Next I use {name} {spec.purpose}.")
        for seen in spec.seen:
            texts += [f"{name} {s} {seen}." for s in ("clearly shows", "shows", "faintly shows")]
    texts += [
        "My first impression needs checking against finer visual evidence.",
        "This fits what I have seen so far; I want one more independent check.",
        "The evidence so far is mixed, so I look further. Taken together: it fits. Against this, which I weigh less.",
        "The face is a printed photo, a face replayed on a screen, a recaptured face, not a live person: "
        "this is a presentation attack.", "I find no trace of a print or screen recapture: this is a live face.",
        "The face looks flat, with a paper-like surface and dull, uneven skin tones.",
        "The face looks flat and slightly washed out, with a glossy, screen-like sheen.",
        "The face looks flat and lacks the depth and shading of a live face.",
        "The face looks plausible at a glance, but its surface seems slightly flat and needs a closer look.",
        "The face shows natural 3D shading, skin texture and highlights.",
        "Some regions look a little flat, but the shading and skin texture look natural overall.",
    ]  # fmt: skip
    texts.append(json.dumps({"name": "ZoomInTool", "arguments": {"bbox": [0, 0, 112, 112]}}))
    texts.append("0123456789 " * 4)
    return texts


def build_tokenizer(arch: str = "qwen2_5_vl", vocab_size: int = NANO_VOCAB):
    """A Qwen2-style byte-level BPE (same pre-tokenizer and special tokens as the real family)
    trained on :func:`training_corpus`. Deterministic for a given corpus."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    specials = QWEN_SPECIAL + (INTERNVL_SPECIAL if arch == "internvl" else [])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    # The added tokens are matched before the BPE runs, so it learns the text between them.
    added = re.compile("|".join(re.escape(t) for t in QWEN_ADDED + NANO_PROTOCOL_TOKENS))
    bpe.train_from_iterator([p for t in training_corpus() for p in added.split(t) if p] * 2, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    kwargs = {}
    if arch == "internvl":  # what InternVLProcessor reads from the tokenizer
        kwargs["extra_special_tokens"] = {
            "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>",
        }  # fmt: skip
    tok = Qwen2Tokenizer(
        vocab=state["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>", **kwargs
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED + NANO_PROTOCOL_TOKENS])
    tok.model_max_length = 32768
    return tok


# --- configs ----------------------------------------------------------------------------------------
def _config(arch: str, tok, spec: NanoSpec):
    head_dim = spec.hidden // spec.heads
    text = dict(
        vocab_size=len(tok), hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_positions,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        quarter = head_dim // 2  # M-RoPE sections (temporal, height, width) sum to head_dim / 2 as in the real 7B
        section = [quarter - 2 * (3 * quarter // 8), 3 * quarter // 8, 3 * quarter // 8]
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section}
        vision = dict(
            depth=spec.vision_layers, hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
            num_heads=spec.vision_heads, out_hidden_size=spec.hidden, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=112, fullatt_block_indexes=[spec.vision_layers - 1],
        )  # fmt: skip
        return Qwen2_5_VLConfig(
            text_config=text, vision_config=vision,
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"), vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        )  # fmt: skip
    from transformers import InternVLConfig

    text["model_type"] = "qwen2"
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    vision = dict(
        hidden_size=spec.vision_hidden, num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        intermediate_size=2 * spec.vision_hidden, image_size=[NANO_IMAGE_SIDE, NANO_IMAGE_SIDE], patch_size=[14, 14],
    )  # fmt: skip
    seq = (NANO_IMAGE_SIDE // 14) ** 2 // 4  # pixel shuffle with downsample_ratio 0.5
    return InternVLConfig(
        text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=seq, downsample_ratio=0.5, tie_word_embeddings=False,
    )  # fmt: skip


def _model_class(arch: str):
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration


def _processor(arch: str, tokenizer, config):
    from .processor import make_processor

    if arch == "qwen2_5_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        image_processor = Qwen2VLImageProcessorPil()
    else:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        image_processor = GotOcr2ImageProcessorPil(
            size={"height": NANO_IMAGE_SIDE, "width": NANO_IMAGE_SIDE}, crop_to_patches=False, min_patches=1, max_patches=12,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        )  # fmt: skip
    return make_processor(arch, image_processor, tokenizer, image_seq_length=getattr(config, "image_seq_length", None))

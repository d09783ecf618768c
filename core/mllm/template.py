"""The chat template of tarfas models (one file for Qwen2.5-VL and InternVL3), and its parser.

The template renders exactly what the agent loop produces (:func:`core.trajectory.to_messages`):
system prompt verbatim (it already holds the Hermes tool block), the face image and each tool image as
image placeholders inside user turns, assistant text wrapped in ``{% generation %}`` markers so that
TRL's ``assistant_only_loss`` trains only on the model's own turns. Inference (hf policy, ``vllm serve
--chat-template``) and training use the same file, so they see the same tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TEMPLATE_FILE = Path(__file__).with_name("templates") / "tarfas_chatml.jinja"

# What one image becomes in the rendered text; the processor expands it to the image's tokens.
IMAGE_PLACEHOLDERS = {
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "internvl": "<IMG_CONTEXT>\n",
}
ARCHS = tuple(IMAGE_PLACEHOLDERS)


def chat_template(arch: str = "qwen2_5_vl") -> str:
    """The template text for ``arch`` ("qwen2_5_vl" or "internvl"): the shared file with the arch's
    image placeholder fixed at the top (vLLM and transformers take a self-contained template)."""
    if arch not in IMAGE_PLACEHOLDERS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    body = TEMPLATE_FILE.read_text()
    placeholder = IMAGE_PLACEHOLDERS[arch].replace("\n", "\\n")
    return "{%- set image_placeholder = '" + placeholder + "' -%}\n" + body


def write_chat_template(arch: str, path: str | Path) -> Path:
    """Write the self-contained template for ``arch`` to ``path`` (for ``vllm serve --chat-template``)."""
    path = Path(path)
    path.write_text(chat_template(arch))
    return path


def attach_chat_template(processor, arch: str) -> None:
    """Set the tarfas template on a processor and on its tokenizer (``save_pretrained`` then writes it
    as ``chat_template.jinja``, which transformers, TRL and vLLM pick up)."""
    text = chat_template(arch)
    processor.chat_template = text
    processor.tokenizer.chat_template = text


@dataclass
class RenderedTurn:
    role: str  # "system" | "user" | "assistant"
    text: str  # the turn's text with each image as "<image>"
    images: int  # number of images in the turn


_TURN_RE = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)(?:<\|im_end\|>\n?|$)", re.S)


def parse_rendered(text: str, arch: str = "qwen2_5_vl") -> list[RenderedTurn]:
    """Split a rendered conversation back into turns (images counted and shown as ``<image>``).
    Used by the round-trip test: render -> parse -> core.protocol parsers -> the same turns."""
    placeholder = IMAGE_PLACEHOLDERS[arch]
    turns = []
    for m in _TURN_RE.finditer(text):
        body = m.group(2)
        turns.append(RenderedTurn(m.group(1), body.replace(placeholder, "<image>"), body.count(placeholder)))
    return turns

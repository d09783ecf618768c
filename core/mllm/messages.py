"""Convert agent messages (:func:`core.trajectory.to_messages`) into what a model consumes:

* :func:`to_processor_inputs`: the rendered prompt text + PIL images for a transformers processor;
* :func:`to_openai_messages`: OpenAI Chat Completions messages with PNG data-URI ``image_url`` parts
  (vLLM, ``transformers serve``).

Image parts are ``{"type": "image", "image": ndarray|PIL|None, "path": str|None}``; a part without
pixels is read from ``path`` (relative to ``image_root``, e.g. a saved trajectory's folder).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InvalidImageError


@dataclass
class ProcessorInputs:
    text: str  # the conversation rendered by the chat template (with the generation prompt if asked)
    images: list[Image.Image]  # RGB, in the order their placeholders appear in ``text``


def part_image(part: dict, image_root: str | Path | None = None) -> Image.Image:
    """The RGB PIL image of an image part (gray tool images become 3-channel)."""
    img = part.get("image")
    if img is None and part.get("path"):
        path = Path(part["path"])
        if not path.is_absolute() and image_root is not None:
            path = Path(image_root) / path
        try:
            img = Image.open(path)
            img.load()
        except (OSError, ValueError) as exc:
            raise InvalidImageError(f"cannot read the image of a message part: {path}: {exc}") from exc
    if img is None:
        raise InvalidImageError("a message image part has neither pixels nor a readable path")
    if isinstance(img, np.ndarray):
        img = Image.fromarray(np.ascontiguousarray(img))
    return img.convert("RGB")


def text_only_messages(messages: list[dict]) -> tuple[list[dict], list[Image.Image]]:
    """The same messages with image parts reduced to ``{"type": "image"}`` (what chat templates read),
    and the images pulled out in order."""
    return _split(messages, None)


def _split(messages, image_root):
    out, images = [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        parts = []
        for p in content:
            if p.get("type") == "image":
                images.append(part_image(p, image_root))
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": p["text"]})
        out.append({"role": m["role"], "content": parts})
    return out, images


def to_processor_inputs(
    messages: list[dict], processor, *, add_generation_prompt: bool = True, image_root: str | Path | None = None
) -> ProcessorInputs:
    """Render agent messages with the processor's chat template and collect their images.

    Feed the result as ``processor(text=[r.text], images=r.images or None, return_tensors="pt")``."""
    plain, images = _split(messages, image_root)
    text = processor.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)
    return ProcessorInputs(text, images)


def encode(processor, inputs: ProcessorInputs, extra_text: str = ""):
    """Tokenize ``inputs.text + extra_text`` with its images (a BatchFeature of torch tensors)."""
    return processor(text=[inputs.text + extra_text], images=inputs.images or None, return_tensors="pt")


def collate_left(features: list, pad_token_id: int, at: int = 0):
    """One batch of several :func:`encode` results (one row each), padded as batched ``generate`` needs:
    token-level tensors (``input_ids``, ``attention_mask``, ``mm_token_type_ids``: shape (1, n)) get their
    padding inserted at column ``at`` (0: left padding; the length of a prefix all rows share: after it, so
    that the prefix sits in the same columns of every row and its KV cache can be shared); ``input_ids`` are
    padded with ``pad_token_id``, the others with 0, so padding is masked out. Image tensors
    (``pixel_values``, ``image_grid_thw``, ...) are concatenated in row order, which is the order in which
    the model fills the rows' image tokens. A single row is returned as it is."""
    import torch
    from transformers import BatchFeature

    if len(features) == 1:
        return features[0]
    lengths = [f["input_ids"].shape[1] for f in features]
    width = max(lengths)
    out = {}
    for key in features[0].keys():
        values = [f[key] for f in features]
        if all(torch.is_tensor(v) and v.dim() == 2 and v.shape == (1, n) for v, n in zip(values, lengths)):
            fill = pad_token_id if key == "input_ids" else 0
            out[key] = torch.cat(
                [
                    torch.cat([v[:, :at], torch.full((1, width - v.shape[1]), fill, dtype=v.dtype), v[:, at:]], 1)
                    for v in values
                ],
                dim=0,
            )
        elif all(torch.is_tensor(v) for v in values):
            out[key] = torch.cat(values, dim=0)
        else:
            raise ValueError(f"cannot batch the processor output {key!r}")
    return BatchFeature(out)


def png_data_uri(image: Image.Image) -> str:
    """Lossless PNG as a data URI (forensic images must not be re-encoded lossily)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_openai_messages(messages: list[dict], image_root: str | Path | None = None) -> list[dict]:
    """OpenAI Chat Completions messages: system/assistant content as strings, user turns as content
    parts with PNG data-URI ``image_url`` parts in place."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        has_image = any(p.get("type") == "image" for p in content)
        if m["role"] == "user" or has_image:
            parts = []
            for p in content:
                if p.get("type") == "image":
                    parts.append({"type": "image_url", "image_url": {"url": png_data_uri(part_image(p, image_root))}})
                else:
                    parts.append({"type": "text", "text": p["text"]})
            out.append({"role": m["role"], "content": parts})
        else:
            out.append({"role": m["role"], "content": "".join(p["text"] for p in content if p.get("type") == "text")})
    return out

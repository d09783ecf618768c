"""Load a Qwen2.5-VL or InternVL3 checkpoint folder (real or nano) with a processor that needs no
torchvision, and the tarfas chat template attached."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..errors import WeightsError
from .processing_tarfas import TarfasInternVLProcessor, TarfasQwen2_5_VLProcessor
from .template import attach_chat_template

# Vision placeholders of Qwen2.5-VL and InternVL: the processor inserts them, a model must never sample them.
VISION_TOKENS = (
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<IMG_CONTEXT>",
    "<img>",
    "</img>",
    "<video>",
)


def vision_token_ids(tokenizer) -> list[int]:
    """Ids of :data:`VISION_TOKENS` in ``tokenizer`` (for ``generate(suppress_tokens=...)``)."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in VISION_TOKENS if t in vocab]


_PROCESSORS = {"qwen2_5_vl": TarfasQwen2_5_VLProcessor, "internvl": TarfasInternVLProcessor}
_MODEL_TYPES = {"qwen2_5_vl": "qwen2_5_vl", "internvl": "internvl"}


def make_processor(arch: str, image_processor, tokenizer, image_seq_length: int | None = None):
    """Assemble the torchvision-free processor of ``arch`` from its image processor and tokenizer."""
    if arch == "internvl":
        return TarfasInternVLProcessor(image_processor, tokenizer, image_seq_length=image_seq_length or 256)
    return TarfasQwen2_5_VLProcessor(image_processor, tokenizer)


def detect_arch(model_dir: str | Path) -> str:
    """ "qwen2_5_vl" or "internvl", from the folder's config.json."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise WeightsError(f"{model_dir} is not a model folder (no config.json)")
    model_type = json.loads(path.read_text()).get("model_type")
    for arch, mt in _MODEL_TYPES.items():
        if model_type == mt:
            return arch
    raise WeightsError(
        f"{model_dir}: model_type {model_type!r} is not supported; expected Qwen2.5-VL (qwen2_5_vl) or InternVL3 in "
        "transformers format (internvl, e.g. OpenGVLab/InternVL3-8B-hf)"
    )


def load_processor(model_dir: str | Path, arch: str | None = None, *, chat_template: bool = True):
    """The image-only processor of a checkpoint folder. Sub-components load from the folder's own
    files (tokenizer, preprocessor_config.json); without torchvision, transformers picks the PIL image
    processor. ``chat_template=True`` attaches the tarfas template (what training and the policies use)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    model_dir = Path(model_dir)
    arch = arch or detect_arch(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    seq = None
    if arch == "internvl":
        cfg = json.loads((model_dir / "config.json").read_text())
        seq = cfg.get("image_seq_length", 256)
    processor = make_processor(arch, image_processor, tokenizer, image_seq_length=seq)
    if chat_template:
        attach_chat_template(processor, arch)
    return processor


@dataclass
class LoadedModel:
    model: object  # a transformers *ForConditionalGeneration in eval mode
    processor: object
    arch: str
    device: str
    dtype: str
    adapter: str | None = None


def pick_device_dtype(device: str | None = None, dtype: str | None = None) -> tuple[str, str]:
    """CUDA when present; bfloat16 on GPUs that support it, float32 on CPU (CPU bf16 matmuls are slow
    and lose the precision the class-token score needs)."""
    import torch

    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None or dtype == "auto":
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    return device, dtype


def load_model_and_processor(
    model_dir: str | Path,
    *,
    adapter: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a Qwen2.5-VL / InternVL3 (transformers format) folder offline, optionally with a PEFT LoRA
    adapter folder, on ``device`` (default: CUDA if available, else CPU). ``attn_implementation``:
    "eager", "sdpa" or "flash_attention_2" (None: transformers' default, sdpa where supported)."""
    import torch

    model_dir = Path(model_dir)
    arch = detect_arch(model_dir)
    device, dtype = pick_device_dtype(device, dtype)
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration as cls
    else:
        from transformers import InternVLForConditionalGeneration as cls
    try:
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = cls.from_pretrained(model_dir, dtype=getattr(torch, dtype), local_files_only=True, **extra)
    except OSError as exc:
        raise WeightsError(f"cannot load model weights from {model_dir}: {exc}") from exc
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise WeightsError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(adapter))
    model.to(device).eval()
    return LoadedModel(model, load_processor(model_dir, arch), arch, device, dtype, str(adapter) if adapter else None)


class CachedImageProcessor:
    """An image processor that processes each distinct image once: an investigation sends the face (and
    every tool image so far) again with every turn, and concurrent investigations share the policy's
    processor. Outputs are per image and concatenated in order, as the wrapped processor's own are
    (``pixel_values`` / ``image_grid_thw`` / ``num_patches`` rows follow the images). A bounded LRU keyed by
    the pixels and the call's options; thread-safe."""

    def __init__(self, inner, max_images: int = 256):
        self.inner, self.max_images = inner, max_images
        self._cache: OrderedDict[tuple, dict] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __getattr__(self, name):  # merge_size, patch_size, ...: the wrapped processor's
        return getattr(self.inner, name)

    def __call__(self, images=None, **kwargs):
        from transformers import BatchFeature

        images = images if isinstance(images, (list, tuple)) else [images]
        options = repr(sorted((k, repr(v)) for k, v in kwargs.items()))
        parts = [self._one(img, options, kwargs) for img in images]
        merged = {}
        for key in parts[0]:
            merged[key] = _concat([p[key] for p in parts])
        return BatchFeature(merged)

    def _one(self, image, options: str, kwargs: dict) -> dict:
        key = (hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest(), image.size, image.mode, options)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.hits += 1
                return self._cache[key]
        out = dict(self.inner([image], **kwargs))
        with self._lock:
            self.misses += 1
            self._cache[key] = out
            while len(self._cache) > self.max_images:
                self._cache.popitem(last=False)
        return out


def _concat(values: list):
    import numpy as np
    import torch

    if torch.is_tensor(values[0]):
        return torch.cat(values, dim=0)
    if isinstance(values[0], np.ndarray):
        return np.concatenate(values, axis=0)
    return [x for v in values for x in v]


def install_remote_code(model_dir: str | Path, arch: str) -> None:
    """Copy the image-only processor into ``model_dir`` and point ``auto_map`` at it, so that
    ``AutoProcessor.from_pretrained(DIR, trust_remote_code=True)`` and ``transformers serve
    --trust-remote-code`` build a processor that handles images without torchvision."""
    model_dir = Path(model_dir)
    shutil.copyfile(Path(__file__).with_name("processing_tarfas.py"), model_dir / "processing_tarfas.py")
    path = model_dir / "processor_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    cls = _PROCESSORS[arch].__name__
    cfg["processor_class"] = cls
    cfg["auto_map"] = {"AutoProcessor": f"processing_tarfas.{cls}"}
    path.write_text(json.dumps(cfg, indent=2))

"""Image-only processors for Qwen2.5-VL and InternVL that need no torchvision.

The stock processors have a video-processor slot whose classes import torchvision; tarfas only sends
images, so these subclasses drop the slot and keep everything else (image-token expansion, M-RoPE
inputs). This module imports only transformers: ``build_nano`` copies it into model folders, where
``AutoProcessor.from_pretrained(DIR, trust_remote_code=True)`` and ``transformers serve
--trust-remote-code`` load it through ``auto_map``.
"""

import re

from transformers import ProcessorMixin
from transformers.models.internvl.processing_internvl import InternVLProcessor
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor


class _TokenizerViews:
    """`transformers serve` hands the processor to generate() as the tokenizer of its stop strings;
    StopStringCriteria calls these tokenizer methods, and calls it like a tokenizer (text first)."""

    def __call__(self, *args, **kwargs):
        if args and isinstance(args[0], str) and "text" not in kwargs and "images" not in kwargs:
            return self.tokenizer(*args, **kwargs)  # tokenizer-style call: processor(text) has images first
        return super().__call__(*args, **kwargs)

    def get_vocab(self):
        return self.tokenizer.get_vocab()

    def _convert_id_to_token(self, index):
        return self.tokenizer._convert_id_to_token(index)

    def convert_tokens_to_string(self, tokens):
        return self.tokenizer.convert_tokens_to_string(tokens)


class TarfasQwen2_5_VLProcessor(_TokenizerViews, Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class TarfasInternVLProcessor(_TokenizerViews, InternVLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.image_seq_length = image_seq_length
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token = tokenizer.context_image_token
        self.video_token = tokenizer.video_token
        self.image_token_id = tokenizer.context_image_token_id
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
        )

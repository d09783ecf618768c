"""Nano models: real Qwen2.5-VL / InternVL3 architectures built offline, deterministic, reloadable
without torchvision, with a tokenizer that knows the protocol."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from app.cli import main as cli_main
from core import protocol
from core.mllm.nano import NanoSpec, build_nano
from core.mllm.processor import detect_arch, load_model_and_processor, load_processor

ARCHS = ["qwen2_5_vl", "internvl"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _digest(folder) -> dict[str, str]:
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.iterdir())
        if f.suffix in (".safetensors", ".json")
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_nano_is_the_real_architecture_small_and_deterministic(arch, tmp_path):
    a = build_nano(tmp_path / "a", arch)
    b = build_nano(tmp_path / "b", arch)
    assert _digest(a) == _digest(b)  # seeded: same weights, same vocabulary
    assert (
        _digest(build_nano(tmp_path / "c", arch, NanoSpec(seed=1)))["model.safetensors"]
        != _digest(a)["model.safetensors"]
    )
    lm = load_model_and_processor(a)
    expected = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "internvl": "InternVLForConditionalGeneration"}[
        arch
    ]
    assert type(lm.model).__name__ == expected and lm.arch == arch == detect_arch(a)
    assert sum(p.numel() for p in lm.model.parameters()) < 3_000_000
    assert lm.device == "cpu" and lm.dtype == "float32"


@pytest.mark.parametrize("arch", ARCHS)
def test_nano_processor_handles_images_without_torchvision(arch, tmp_path, crop):
    from PIL import Image
    from transformers import AutoProcessor

    folder = build_nano(tmp_path / "m", arch)
    with pytest.raises(ModuleNotFoundError):
        import torchvision  # noqa: F401  (the point: none of this needs it)
    for processor in (load_processor(folder), AutoProcessor.from_pretrained(folder, trust_remote_code=True)):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": protocol.FIRST_ROUND_QUERY}]}]
        text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        batch = processor(text=[text], images=[Image.fromarray(crop)], return_tensors="pt")
        image_id = processor.image_token_id
        assert (batch["input_ids"] == image_id).sum().item() == 64  # 224x224 face -> 64 image tokens
        assert "pixel_values" in batch


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_has_the_family_special_tokens_and_compact_protocol_strings(arch, tmp_path):
    tok = load_processor(build_nano(tmp_path / "m", arch)).tokenizer
    for t in [
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|image_pad|>",
        "<|video_pad|>",
        "<tool_call>",
        "</tool_call>",
    ]:
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    if arch == "internvl":
        assert tok.context_image_token == "<IMG_CONTEXT>" and tok.start_image_token == "<img>"
    turn = protocol.format_answer_turn("The expert reads 87% spoof trace on FFTTool.", "spoof")
    assert len(tok.encode(turn, add_special_tokens=False)) < len(turn) / 2.5
    assert tok.decode(tok.encode(turn, add_special_tokens=False)) == turn
    # <tool_call> survives skip_special_tokens, as in the real Qwen2.5 tokenizer
    ids = tok.encode('<tool_call>\n{"name": "FFTTool"}\n</tool_call><|im_end|>', add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == '<tool_call>\n{"name": "FFTTool"}\n</tool_call>'


def test_the_protocols_fixed_pieces_are_single_tokens_and_reasoning_text_is_words(tmp_path):
    from core.mllm.nano import NANO_PROTOCOL_TOKENS

    tok = load_processor(build_nano(tmp_path / "m")).tokenizer
    for t in NANO_PROTOCOL_TOKENS:
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    call = protocol.format_tool_call_turn("Next I use HOGTool.", protocol.ToolCall("HOGTool", {}))
    ids = tok.encode(call, add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    # the JSON of a call: the name is the only free choice between fixed pieces
    assert pieces[-6:] == ["<tool_call>", '\n{"name": "', "HOGTool", '", "arguments": ', "{}}\n", "</tool_call>"]
    assert pieces[:2] == ["<think>", "Next"] and "</think>" in pieces
    # plain text, decoded (skip_special_tokens too: they are added, not special), is the text
    for text in (call, protocol.format_fast_answer("spoof", "The face looks flat."), protocol.FORMAT_DECLARATION):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text and tok.decode(ids, skip_special_tokens=True) == text
    # the annotator's English is words, not letters
    words = "My first impression needs checking against finer visual evidence."
    assert len(tok.encode(words, add_special_tokens=False)) <= 11
    # a ZoomInTool call's arguments still spell out
    zoom = protocol.format_tool_call_turn("Zoom.", protocol.ToolCall("ZoomInTool", {"bbox": [0, 0, 112, 112]}))
    assert tok.decode(tok.encode(zoom, add_special_tokens=False)) == zoom


@pytest.mark.parametrize("arch", ARCHS)
def test_the_micro_size_is_the_same_architecture_with_head_dim_64_and_about_5m_parameters(arch, tmp_path):
    from core.mllm.nano import SIZES, spec_for

    assert spec_for("micro", seed=3) == dataclasses.replace(SIZES["micro"], seed=3)
    with pytest.raises(ValueError, match="unknown size"):
        spec_for("huge")
    assert cli_main(["model", "init-nano", str(tmp_path / "m"), "--size", "micro", "--arch", arch]) == 0
    lm = load_model_and_processor(tmp_path / "m")
    n = sum(p.numel() for p in lm.model.parameters())
    text = lm.model.config.get_text_config()
    assert 4_000_000 < n < 6_000_000, n
    assert (text.hidden_size, text.num_hidden_layers, text.hidden_size // text.num_attention_heads) == (256, 4, 64)
    assert lm.arch == arch and detect_arch(tmp_path / "m") == arch
    assert json.loads((tmp_path / "m" / "tarfas_nano.json").read_text())["spec"]["hidden"] == 256


def test_cli_model_init_nano(tmp_path, capsys):
    assert cli_main(["model", "init-nano", str(tmp_path / "nano"), "--arch", "internvl"]) == 0
    assert "nano internvl model written" in capsys.readouterr().out
    assert detect_arch(tmp_path / "nano") == "internvl"


@pytest.mark.parametrize(
    "arch,fast_name", [("qwen2_5_vl", "Qwen2VLImageProcessorFast"), ("internvl", "GotOcr2ImageProcessorFast")]
)
def test_a_checkpoint_laid_out_like_the_hub_loads_without_torchvision(arch, fast_name, tmp_path):
    """Real checkpoints ship preprocessor_config.json naming the torchvision ("Fast") image processor
    and the stock processor class; load_processor still builds a working image-only processor."""
    import json

    folder = build_nano(tmp_path / "m", arch)
    cfg = json.loads((folder / "processor_config.json").read_text())
    image_cfg = cfg.pop("image_processor") | {"image_processor_type": fast_name}
    (folder / "preprocessor_config.json").write_text(json.dumps(image_cfg | {"processor_class": "X"}))
    (folder / "processor_config.json").unlink()
    (folder / "processing_tarfas.py").unlink()
    processor = load_processor(folder)
    assert type(processor.image_processor).__name__.endswith("Pil")
    assert "<|im_start|>assistant" in processor.apply_chat_template(
        [{"role": "user", "content": "q"}], tokenize=False, add_generation_prompt=True
    )

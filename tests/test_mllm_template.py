"""The tarfas chat template renders exactly the agent's conversation (tool results as user turns with
their image), round-trips through core.protocol, and marks the assistant text for training."""

from __future__ import annotations

import pytest
import torch

from core import agent, protocol
from core.mllm.messages import text_only_messages, to_openai_messages, to_processor_inputs
from core.mllm.nano import build_nano
from core.mllm.processor import load_processor
from core.mllm.template import chat_template, parse_rendered, write_chat_template
from core.policies import ScriptedPolicy
from core.registry import ToolRegistry
from core.trajectory import to_messages

ARCHS = ["qwen2_5_vl", "internvl"]
SCRIPT = [
    protocol.format_fast_answer("spoof", "The face looks flat."),
    "<think>no tags closed",  # malformed: fed back as an error turn
    protocol.format_tool_call_turn("Check for moire.", protocol.ToolCall("FFTTool", {})),
    protocol.format_tool_call_turn("Zoom on the cheek.", protocol.ToolCall("ZoomInTool", {"bbox": [40, 60, 120, 140]})),
    protocol.format_answer_turn("Periodic peaks: a screen.", "spoof"),
]


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("nano")
    return {arch: load_processor(build_nano(root / arch, arch)) for arch in ARCHS}


@pytest.fixture
def trajectory(face):
    traj = agent.run(face, ScriptedPolicy(SCRIPT))
    assert traj.status == "completed" and traj.tool_calls_used == 2
    return traj


def _system():
    return protocol.system_prompt(ToolRegistry(None).schemas())


@pytest.mark.parametrize("arch", ARCHS)
def test_render_parse_round_trip_gives_the_same_turns(arch, processors, trajectory):
    processor = processors[arch]
    msgs = to_messages(trajectory, system=_system())
    inp = to_processor_inputs(msgs, processor, add_generation_prompt=False)
    assert len(inp.images) == 3  # the face + two tool images, in order
    assert inp.images[1].size == (224, 224)
    turns = parse_rendered(inp.text, arch)
    assert [t.role for t in turns] == [m["role"] for m in msgs]
    assert turns[0].text == _system()  # verbatim: it already holds the Hermes <tools> block
    assert turns[1].images == 1 and turns[1].text.endswith(protocol.FIRST_ROUND_QUERY)
    assistant = [t.text for t in turns if t.role == "assistant"]
    assert assistant == [t.text for t in trajectory.turns]
    assert protocol.parse_fast_answer(assistant[0]) == trajectory.turns[0].fast
    for rendered, turn in zip(assistant[1:], trajectory.turns[1:]):
        if turn.parse_error:
            with pytest.raises(protocol.ProtocolParseError):
                protocol.parse_reasoning_turn(rendered)
        else:
            parsed = protocol.parse_reasoning_turn(rendered)
            assert (parsed.think, parsed.tool_call, parsed.answer) == (turn.think, turn.tool_call, turn.answer)
    tool_results = [t for t in turns if t.role == "user" and t.images == 1][1:]
    assert len(tool_results) == 2 and all(t.text == "<image>" + protocol.tool_result_prompt() for t in tool_results)


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_markers_cover_exactly_the_assistant_turns(arch, processors, trajectory):
    processor = processors[arch]
    plain, images = text_only_messages(to_messages(trajectory, system=_system()))
    out = processor.apply_chat_template(plain, images=None, tokenize=False)
    assert out.count("<|im_start|>assistant\n") == len(trajectory.turns)
    enc = processor.tokenizer.apply_chat_template(
        plain, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    learned = processor.tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "".join(t.text + "<|im_end|>" for t in trajectory.turns)


def test_generation_prompt_tools_and_tool_role(processors):
    processor = processors["qwen2_5_vl"]
    schema = ToolRegistry(["FFTTool"]).schemas()
    msgs = [
        {"role": "system", "content": protocol.ROLE_AND_MISSION},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
        {
            "role": "assistant",
            "content": "<think>t</think>",
            "tool_calls": [{"type": "function", "function": {"name": "FFTTool", "arguments": {}}}],
        },
        {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": protocol.FORMAT_DECLARATION}]},
    ]
    text = processor.apply_chat_template(msgs, tools=schema, tokenize=False, add_generation_prompt=True)
    assert text.startswith(
        "<|im_start|>system\n" + protocol.ROLE_AND_MISSION + "\n\n# Tools"
    )  # stock Qwen2.5 block from tools=
    assert '<think>t</think>\n<tool_call>\n{"name": "FFTTool", "arguments": {}}\n</tool_call><|im_end|>' in text
    assert (
        text.count("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>") == 2
    )  # the tool result is a user turn
    assert text.endswith("<|im_start|>assistant\n")
    turn = protocol.parse_reasoning_turn(parse_rendered(text)[2].text)
    assert turn.tool_call == protocol.ToolCall("FFTTool", {})


def test_template_files(tmp_path):
    assert "<IMG_CONTEXT>" in chat_template("internvl") and "<|image_pad|>" in chat_template("qwen2_5_vl")
    assert write_chat_template("internvl", tmp_path / "t.jinja").read_text() == chat_template("internvl")
    with pytest.raises(ValueError):
        chat_template("llava")


def test_openai_messages_carry_lossless_png_images(trajectory):
    import base64
    import io

    import numpy as np
    from PIL import Image

    msgs = to_openai_messages(to_messages(trajectory, system=_system(), next_prompt=True))
    assert msgs[0] == {"role": "system", "content": _system()}
    assert all(isinstance(m["content"], str) for m in msgs if m["role"] == "assistant")
    urls = [
        p["image_url"]["url"] for m in msgs if m["role"] == "user" for p in m["content"] if p["type"] == "image_url"
    ]
    assert len(urls) == 3 and all(u.startswith("data:image/png;base64,") for u in urls)
    face = np.asarray(Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1]))))
    assert np.array_equal(face, trajectory.crop)  # PNG: bit-exact


def test_saved_trajectory_images_are_read_from_disk(trajectory, tmp_path, processors):
    from core.trajectory import Trajectory

    trajectory.save(tmp_path)
    loaded = Trajectory.load(tmp_path)
    for t in loaded.turns:
        if t.tool_result:
            t.tool_result.image = None  # only the path is left
    inp = to_processor_inputs(to_messages(loaded, system=_system()), processors["qwen2_5_vl"], image_root=tmp_path)
    assert len(inp.images) == 3

"""The hf policy on nano models of both architectures: a full investigation through the agent loop,
class-token scores equal to a direct forward pass, LoRA adapters, and limits that stop a bad model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from mllm_support import direct_p_spoof
from PIL import Image

from app.cli import main as cli_main
from core import agent, protocol
from core.agent import AgentConfig
from core.mllm.nano import build_nano
from core.policies import load_policy
from core.policies.base import Conversation
from core.policies.hf import HFPolicy
from core.registry import ToolRegistry
from core.trajectory import Trajectory, to_messages

ARCHS = ["qwen2_5_vl", "internvl"]
FAST = protocol.format_fast_answer("spoof", "The face looks flat.")
CALL = protocol.format_tool_call_turn("Check for moire.", protocol.ToolCall("FFTTool", {}))
ANSWER = protocol.format_answer_turn("Periodic peaks: a screen.", "spoof")


@pytest.fixture(scope="module")
def nano_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nano")
    return {arch: build_nano(root / arch, arch) for arch in ARCHS}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("arch", ARCHS)
def test_full_investigation_with_a_scripted_prefix(arch, nano_dirs, face):
    # turn 2 is generated freely by the untrained model (garbage, fed back as an error); the others are forced
    policy = load_policy("hf", model=nano_dirs[arch], max_new_tokens=12, scripted_prefix=[FAST, CALL, None, ANSWER])
    traj = agent.run(face, policy)
    assert traj.status == "completed" and traj.error is None
    assert [t.kind for t in traj.turns] == ["fast", "reasoning", "reasoning", "reasoning"]
    assert traj.turns[1].tool_result is not None and traj.turns[1].tool_result.name == "FFTTool"
    free = traj.turns[2]
    assert free.notes["forced_prefix"] is False and free.notes["new_tokens"] <= 12
    assert free.notes["stopped_by"] in ("max_new_tokens", "eos", "stop_string")
    assert free.error is not None  # untrained text breaks the protocol and is fed back, not crashed on
    assert traj.final.source == "answer" and traj.final.verdict == "spoof"
    assert 0.0 < traj.final.score_spoof < 1.0  # a class-token probability, not the 1.0 of the verdict text
    assert traj.turns[-1].notes["score_source"] == "class_token_logits"
    assert traj.turns[-1].notes["score_pass"] == "forward"  # the class token was forced, not generated
    assert 0.0 < traj.fast_score < 1.0
    assert traj.policy == "hf" and traj.policy_version == policy.version
    assert "Nano" in policy.description and arch in policy.description


@pytest.mark.parametrize("arch", ARCHS)
def test_class_token_score_equals_a_direct_forward_pass(arch, nano_dirs, face):
    policy = HFPolicy.load(nano_dirs[arch], max_new_tokens=4, scripted_prefix=[FAST, CALL, ANSWER])
    traj = agent.run(face, policy)
    assert traj.final.source == "answer"
    system = protocol.system_prompt(ToolRegistry(None).schemas())
    before = copy.copy(traj)
    before.turns = traj.turns[:-1]  # the conversation the policy saw when it gave the answer
    messages = to_messages(before, system=system, next_prompt=True)
    prefix = ANSWER[: ANSWER.index("<Spoof>")]
    assert traj.final.score_spoof == pytest.approx(direct_p_spoof(policy, messages, prefix), abs=1e-5)
    fast_messages = to_messages(
        Trajectory(policy="hf", crop=traj.crop), system=system, next_prompt=True, next_kind="fast"
    )
    assert traj.fast_score == pytest.approx(direct_p_spoof(policy, fast_messages, ""), abs=1e-5)


def test_lora_adapter_is_loaded_and_changes_the_score(nano_dirs, face, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = HFPolicy.load(nano_dirs["qwen2_5_vl"], scripted_prefix=[FAST])
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False
    )
    peft_model = get_peft_model(copy.deepcopy(base.model), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    tuned = HFPolicy.load(nano_dirs["qwen2_5_vl"], adapter=tmp_path / "adapter", scripted_prefix=[FAST])
    assert "LoRA" in tuned.description and tuned.version != base.version
    conv = _first_conversation(face)
    s_base, s_tuned = base.next_turn(conv).score_spoof, tuned.next_turn(conv).score_spoof
    assert s_tuned != pytest.approx(s_base, abs=1e-4)
    assert s_tuned == pytest.approx(direct_p_spoof(tuned, conv.messages, ""), abs=1e-5)


def _first_conversation(face):
    traj = Trajectory(policy="hf", crop=face.crop)
    reg = ToolRegistry(None)
    return Conversation(
        face.crop,
        traj,
        to_messages(traj, system=protocol.system_prompt(reg.schemas()), next_prompt=True, next_kind="fast"),
        reg,
        3,
    )


def test_context_overflow_fails_the_investigation_and_keeps_the_turns(nano_dirs, face):
    policy = HFPolicy.load(nano_dirs["qwen2_5_vl"], max_new_tokens=8, max_context=720, scripted_prefix=[FAST, CALL])
    traj = agent.run(face, policy)
    assert traj.status == "failed" and traj.error.startswith("ContextOverflowError")
    assert "context of 720 tokens" in traj.error
    assert len(traj.turns) >= 1 and traj.turns[0].fast is not None  # what was done is kept


def test_a_model_that_never_answers_is_stopped_by_the_limits(nano_dirs, face):
    policy = HFPolicy.load(nano_dirs["internvl"], max_new_tokens=6)
    traj = agent.run(face, policy, AgentConfig(max_tool_calls=1, max_format_errors=1))
    assert traj.status == "failed"  # neither a fast nor a final answer: recorded, not hung
    assert len(traj.turns) == 2 + 2  # max_format_errors + 1 fast tries, then as many reasoning tries
    assert "stopped after 2 malformed turns" in traj.error
    assert all(t.notes["new_tokens"] <= 6 for t in traj.turns)


def test_cli_investigate_with_the_hf_policy(nano_dirs, face, tmp_path, capsys):
    image = tmp_path / "face.png"
    Image.fromarray(face.crop).save(image)
    rc = cli_main(["investigate", str(image), "--policy", "hf", "--model", str(nano_dirs["qwen2_5_vl"]), "--max-new-tokens", "4",
                   "--on-no-face", "whole", "--json", "--out-dir", str(tmp_path / "run")])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == "hf" and rc in (0, 1)
    assert (tmp_path / "run" / "trajectory.json").is_file()
    assert cli_main(["investigate", str(image), "--policy", "hf"]) == 2  # --model missing: a clear input error


def test_unknown_tool_is_fed_back_and_the_investigation_goes_on(nano_dirs, face):
    bogus = protocol.format_tool_call_turn("Try a tool that does not exist.", protocol.ToolCall("XRayTool", {}))
    policy = HFPolicy.load(nano_dirs["qwen2_5_vl"], max_new_tokens=4, scripted_prefix=[FAST, bogus, ANSWER])
    traj = agent.run(face, policy)
    assert traj.turns[1].tool_error and "XRayTool" in traj.turns[1].tool_error
    assert traj.status == "completed" and traj.final.source == "answer" and 0 < traj.final.score_spoof < 1

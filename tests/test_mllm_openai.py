"""The vllm policy (OpenAI Chat Completions client) against a real OpenAI-compatible server on
loopback: `transformers serve` running the nano Qwen2.5-VL. vLLM itself needs a GPU; the client is
protocol-level, so the same requests go to `vllm serve` (docs/models.md). `tarfas eval --concurrency N`
is checked against a slow OpenAI-compatible HTTP server (FastAPI + uvicorn) that counts requests in flight."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request  # module level: FastAPI resolves the handler's annotations here
from loopback import free_port, transformers_serve
from PIL import Image

from core import agent, protocol
from core.mllm.messages import encode, to_processor_inputs
from core.mllm.nano import build_nano
from core.mllm.processor import load_processor
from core.mllm.scoring import score_from_top_logprobs
from core.policies import ScriptedPolicy, load_policy
from core.policies.openai_chat import OpenAIChatPolicy, _with_closing_tag
from core.registry import ToolRegistry
from core.trajectory import to_messages

FAST = protocol.format_fast_answer("real", "Natural skin.")
CALL = protocol.format_tool_call_turn("Check for moire.", protocol.ToolCall("FFTTool", {}))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`transformers serve` on 127.0.0.1:<free port> with the nano model, offline; always stopped."""
    torch.set_num_threads(1)
    model_dir = build_nano(tmp_path_factory.mktemp("nano") / "qwen", "qwen2_5_vl")
    with transformers_serve(model_dir, tmp_path_factory.mktemp("serve")) as url:
        yield {"url": url, "model": str(model_dir), "dir": model_dir}


class ScriptThen:
    """Forced turns first (an untrained model never calls a tool), then the real client."""

    def __init__(self, script, policy):
        self.script, self.policy = ScriptedPolicy(script), policy
        self.name, self.version, self.description = policy.name, policy.version, policy.description

    def next_turn(self, conversation):
        if self.script.calls < len(self.script._replies):
            return self.script.next_turn(conversation)
        return self.policy.next_turn(conversation)


def test_investigation_through_a_real_openai_compatible_server(server, face):
    client = load_policy("vllm", base_url=server["url"], model=server["model"], max_new_tokens=8)
    traj = agent.run(face, ScriptThen([FAST, CALL], client))
    assert traj.turns[1].tool_result is not None  # the FFT image went to the server as an image_url part
    served = traj.turns[2:]
    assert served and all(t.notes["finish_reason"] in ("length", "stop") for t in served)
    assert all(t.notes["new_tokens"] <= 8 for t in served)
    # no logprobs from this server: the score is left to the verdict text, and the notes say so
    assert all(
        t.notes["score_source"] == "verdict text (the server returned no logprobs)" and t.score_spoof is None
        for t in served
    )
    # the server saw both images: its prompt token count equals the local processor's, image tokens included
    system = protocol.system_prompt(ToolRegistry(None).schemas())
    before = type(traj)(policy="vllm", crop=traj.crop)
    before.turns = traj.turns[:2]
    local = encode(
        load_processor(server["dir"]),
        to_processor_inputs(to_messages(before, system=system, next_prompt=True), load_processor(server["dir"])),
    )
    assert served[0].notes["prompt_tokens"] == local["input_ids"].shape[1]
    assert (local["input_ids"] == load_processor(server["dir"]).image_token_id).sum().item() == 128
    assert traj.status in ("completed", "failed") and traj.turns  # untrained text is recorded, never crashes the loop


def test_unreachable_server_fails_the_investigation_with_a_clear_error(face):
    policy = OpenAIChatPolicy(f"http://127.0.0.1:{free_port()}/v1", "nano", timeout_s=5)
    traj = agent.run(face, policy)
    assert traj.status == "failed" and traj.error.startswith("ModelServerError: cannot reach")


def test_missing_api_key_env_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TARFAS_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="TARFAS_TEST_KEY"):
        OpenAIChatPolicy("http://127.0.0.1:1/v1", "m", api_key_env="TARFAS_TEST_KEY")


def test_score_from_vllm_style_top_logprobs():
    import math

    text = "<think>flat</think>\n<answer><Spoof></answer>"
    toks = ["<think>", "flat", "</think>", "\n", "<answer>", "<", "Sp", "oof", "></", "answer", ">"]
    entries = [{"token": t, "logprob": -0.1, "top_logprobs": [{"token": t, "logprob": -0.1}]} for t in toks]
    entries[6]["top_logprobs"] = [
        {"token": "Sp", "logprob": math.log(0.6)},
        {"token": "Real", "logprob": math.log(0.3)},
        {"token": "x", "logprob": math.log(0.1)},
    ]
    score, how = score_from_top_logprobs(text, entries)
    assert score == pytest.approx(0.6 / 0.9) and how == "class_token_logprobs"
    # a tokenizer that merges "<" into the class token: "<Real" vs "<Sp"
    toks2 = ["<think>", "flat", "</think>", "\n", "<answer>", "<Sp", "oof", "></answer>"]
    entries2 = [{"token": t, "logprob": 0.0, "top_logprobs": []} for t in toks2]
    entries2[5]["top_logprobs"] = [
        {"token": "<Sp", "logprob": math.log(0.2)},
        {"token": "<Real", "logprob": math.log(0.8)},
    ]
    assert score_from_top_logprobs(text, entries2)[0] == pytest.approx(0.2)
    assert score_from_top_logprobs("<think>x</think><tool_call>{}</tool_call>", entries)[0] is None


def test_stop_string_dropped_by_the_server_is_restored():
    assert (
        _with_closing_tag("<think>a</think>\n<answer><Real>", "stop", "</answer>")
        == "<think>a</think>\n<answer><Real></answer>"
    )
    assert _with_closing_tag('<think>a</think>\n<tool_call>\n{"name": "FFTTool"}\n', "stop", None).endswith(
        "</tool_call>"
    )
    assert _with_closing_tag("<think>a</think>\n<answer><Real>", "length", None) == "<think>a</think>\n<answer><Real>"


class SlowServer:
    """/v1/chat/completions that answers each conversation by where it stands (a fast answer, then the
    final answer) after ``delay_s``, and records the most requests it held at once."""

    def __init__(self, delay_s: float):
        self.in_flight = self.max_in_flight = self.requests = 0
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(delay_s)
            finally:
                self.in_flight -= 1
            answered = sum(m["role"] == "assistant" for m in body["messages"])
            content = FAST if answered == 0 else protocol.format_answer_turn("Natural skin.", "real")
            return {
                "id": "chatcmpl-slow", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }  # fmt: skip

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_eval_concurrency_sends_that_many_requests_at_a_time(face, tmp_path):
    from conftest import write_manifest

    from core.evaluation.manifest import read_manifest
    from core.evaluation.scoring import FaceCache, Variant, score_variant

    paths = []
    for i in range(8):
        paths.append(tmp_path / f"f{i}.png")
        Image.fromarray(face.crop).save(paths[-1])
    rows = read_manifest(
        write_manifest(tmp_path / "m.csv", [{"path": str(p), "label": "real", "domain": "d"} for p in paths])
    )
    with SlowServer(delay_s=0.25) as server:
        policy = OpenAIChatPolicy(f"http://127.0.0.1:{server.port}/v1", "slow", timeout_s=30)
        main = Variant("main", None, 3)
        one = score_variant(rows, FaceCache(), policy, main, progress=False)
        assert server.max_in_flight == 1 and server.requests == 16
        server.max_in_flight = 0
        many = score_variant(rows, FaceCache(), policy, main, progress=False, concurrency=4)
        assert server.max_in_flight == 4 and server.requests == 32  # requests overlapped, four at a time
    assert list(many) == list(one) == [r.path for r in rows]
    assert all(s.score_spoof == 0.0 and s.error is None for s in [*one.values(), *many.values()])

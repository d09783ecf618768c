"""The OpenAI-compatible annotator against real HTTP servers on 127.0.0.1:

- a scripted OpenAI-compatible server (FastAPI + uvicorn) that replays annotator replies, sleeps past
  the client's timeout, answers 5xx, empty or non-JSON replies, or refuses ``response_format``;
- ``transformers serve`` with the nano Qwen2.5-VL (an untrained model: its garbage replies are the real
  malformed-reply case, which verification rejects after one re-annotation).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import torch
import uvicorn
from fastapi import (  # module level: FastAPI resolves the handler's annotations here
    FastAPI,
    Request,
)
from fastapi.responses import JSONResponse
from loopback import free_port, transformers_serve
from PIL import Image

from core import protocol
from core.dataset import read_dataset
from core.experts import ExpertBank
from core.policies import Conversation
from core.protocol import AnnotationPrompts, render_structured
from core.registry import ToolRegistry
from core.trajectory import Trajectory, to_messages
from training.annotate import (
    REJECTED,
    AnnotateConfig,
    annotate_image,
    load_rows,
    run_annotation,
)
from training.annotators import (
    AnnotatorError,
    Hint,
    OpenAIAnnotator,
    final_answer,
    stop_reason,
)

torch.set_num_threads(1)
QUIET = dict(progress=False)


class ScriptedServer:
    """An OpenAI-compatible /v1/chat/completions that plays a script, one entry per request:
    {"content": str} | {"status": int, "error": str} | {"sleep": seconds, ...}. Records every body."""

    def __init__(self):
        self.script: list[dict] = []
        self.responder = None  # body -> step, used instead of the script when set
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                step = (
                    self.responder(body)
                    if self.responder
                    else (self.script.pop(0) if self.script else {"status": 500, "error": "script exhausted"})
                )
                if step.get("sleep"):
                    await asyncio.sleep(step["sleep"])
            finally:
                self.in_flight -= 1
            if "status" in step:
                return JSONResponse(
                    {"error": {"message": step["error"], "type": "invalid_request_error"}}, status_code=step["status"]
                )
            return {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": step["content"]}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "scripted server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def server():
    with ScriptedServer() as s:
        yield s


@pytest.fixture(scope="module")
def bank() -> ExpertBank:
    return ExpertBank.load()


@pytest.fixture(scope="module")
def tools(bank) -> ToolRegistry:
    """The tools, read by the shipped experts for the guidance."""
    return ToolRegistry(readers=bank)


FAST = "<Spoof><reason>The face looks flat, with a paper-like surface.</reason>"
CALL_FFT = protocol.format_tool_call_turn(
    "I look for halftone peaks in the spectrum.", protocol.ToolCall("FFTTool", {})
)
ANSWER = protocol.format_answer_turn("The spectrum shows periodic peaks of a print: a printed photo.", "spoof")


def text_script() -> list[dict]:
    return [{"content": FAST}, {"content": CALL_FFT}, {"content": ANSWER}]


def request_texts(body: dict) -> list[str]:
    out = []
    for m in body["messages"]:
        c = m["content"]
        out += [c] if isinstance(c, str) else [p["text"] for p in c if p["type"] == "text"]
    return out


def request_images(body: dict) -> list[np.ndarray]:
    imgs = []
    for m in body["messages"]:
        if isinstance(m["content"], list):
            for p in m["content"]:
                if p["type"] == "image_url":
                    url = p["image_url"]["url"]
                    assert url.startswith("data:image/png;base64,")  # lossless
                    imgs.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))))
    return imgs


def spoof_rows(tiny_manifest, n=1):
    return [r for r in load_rows(tiny_manifest) if r.label == "spoof"][:n]


def test_text_annotation_through_a_real_http_server(server, tiny_manifest, bank, tools, tmp_path):
    server.script = text_script()
    ann = OpenAIAnnotator("scripted", server.url, structured="off", timeout=10, retries=0)
    summary = run_annotation(
        spoof_rows(tiny_manifest), ann, tmp_path / "ds", registry=tools, config=AnnotateConfig(**QUIET)
    )
    assert summary.accepted == 1 and ann.calls == 3
    first, second, third = server.requests
    # eq. 4: the face image + query + hint; Fig. S8 system prompt; the image as a PNG data URI
    assert first["messages"][0]["content"].startswith(protocol.ANNOTATOR_SYSTEM_PROMPT)
    assert any(t.startswith(protocol.ANNOTATION_QUERY + " Hint: this is a spoof face") for t in request_texts(first))
    assert [i.shape for i in request_images(first)] == [(224, 224, 3)]
    assert "response_format" not in first
    # eq. 5: the tool image + the expert guidance
    p = bank.p_spoof("FFTTool", request_images(third)[1])
    assert any(
        t.startswith(f"This is the result of FFTTool. The expert predicts {round(100 * p)}% there's spoof trace")
        for t in request_texts(third)
    )
    assert len(request_images(second)) == 1 and len(request_images(third)) == 2
    rec = read_dataset(tmp_path / "ds").trajectories[0]
    assert [m["content"][0]["text"] for m in rec.messages if m["role"] == "assistant"] == [FAST, CALL_FFT, ANSWER]
    assert rec.meta["annotation"]["annotator"] == "openai:scripted"


def test_concurrency_limits_the_requests_in_flight(server, tiny_manifest, bank, tools, tmp_path):
    def respond(body):  # answer each conversation by where it stands, whatever the interleaving
        last = request_texts(body)[-1]
        content = (
            FAST if protocol.ANNOTATION_QUERY in last else (CALL_FFT if protocol.TOOL_GUIDANCE in last else ANSWER)
        )
        return {"sleep": 0.2, "content": content}

    server.responder = respond
    rows = load_rows(tiny_manifest)[:5]
    ann = OpenAIAnnotator("scripted", server.url, structured="off", timeout=10, retries=0)
    summary = run_annotation(rows, ann, tmp_path / "ds", registry=tools, config=AnnotateConfig(concurrency=2, **QUIET))
    assert summary.accepted + summary.rejected == 5 and summary.failed == 0
    assert server.max_in_flight == 2
    # the scripted annotator always says spoof: real faces fail, are re-annotated once, and are rejected
    n_real = sum(r.label == "real" for r in rows)
    assert 0 < n_real < 5 and (summary.accepted, summary.rejected) == (5 - n_real, n_real)
    assert len(server.requests) == 3 * (5 + n_real)
    assert summary.stats["rejection_reasons"] == {"correctness:wrong_answer": n_real}


def test_structured_output_is_requested_and_rendered_in_the_protocol_format(server, crop, bank, tools):
    server.script = [
        {"content": json.dumps({"verdict": "Spoof", "reason": "Flat, paper-like face."})},
        {
            "content": json.dumps(
                {
                    "think": "Zoom into the cheeks.",
                    "action": "tool_call",
                    "tool_name": "ZoomInTool",
                    "arguments": {"bbox": [60, 80, 160, 180]},
                }
            )
        },
        {
            "content": "```json\n"
            + json.dumps({"think": "Print dots on the cheeks.", "action": "answer", "answer": "Spoof"})
            + "\n```"
        },
    ]
    ann = OpenAIAnnotator("scripted", server.url, structured="auto", timeout=10, retries=0)
    result = annotate_image(crop, Hint("spoof", "print"), ann, registry=tools)
    assert (
        stop_reason(result) == "answered"
        and final_answer(result) == "spoof"
        and result.tool_turns[0].tool_result.name == "ZoomInTool"
    )
    assert result.turns[1].text == protocol.format_tool_call_turn(
        "Zoom into the cheeks.", protocol.ToolCall("ZoomInTool", {"bbox": [60, 80, 160, 180]})
    )
    rf = server.requests[1]["response_format"]
    assert (
        rf["type"] == "json_schema"
        and rf["json_schema"]["schema"]["properties"]["tool_name"]["enum"] == ToolRegistry().names
    )
    assert request_texts(server.requests[0])[-1] == protocol.ANNOTATION_JSON_FAST


def test_an_endpoint_that_refuses_structured_output_gets_text(server, crop, bank, tools):
    server.script = [{"status": 400, "error": "response_format is not supported"}, *text_script()]
    ann = OpenAIAnnotator("scripted", server.url, structured="auto", timeout=10, retries=0)
    result = annotate_image(crop, Hint("spoof", "print"), ann, registry=tools)
    assert final_answer(result) == "spoof" and ann.structured == "off" and ann.retried == {"no_structured_output": 1}
    assert "response_format" in server.requests[0] and all("response_format" not in r for r in server.requests[1:])


def test_timeouts_and_server_errors_are_retried_with_backoff(server, crop, bank, tools):
    server.script = [
        {"sleep": 1.5, "content": FAST},
        {"status": 503, "error": "overloaded"},
        {"status": 500, "error": "boom"},
        {"content": FAST},
        {"content": ""},
        {"content": CALL_FFT},
        {"content": ANSWER},
    ]
    ann = OpenAIAnnotator("scripted", server.url, structured="off", timeout=0.5, retries=3, backoff=0.05)
    t0 = time.perf_counter()
    result = annotate_image(crop, Hint("spoof", "print"), ann, registry=tools)
    assert stop_reason(result) == "answered" and final_answer(result) == "spoof"
    assert ann.retried == {"timeout": 1, "InternalServerError": 2, "empty_reply": 1}
    assert time.perf_counter() - t0 >= 0.5 + 0.05 + 0.1 + 0.2  # timeout + three backoffs


def test_an_annotator_that_never_answers_fails_the_sample_for_the_next_run(
    server, tiny_manifest, bank, tools, tmp_path
):
    rows = spoof_rows(tiny_manifest)
    server.script = [{"status": 502, "error": "bad gateway"}] * 2
    ann = OpenAIAnnotator("scripted", server.url, structured="off", timeout=5, retries=1, backoff=0.01)
    summary = run_annotation(rows, ann, tmp_path / "ds", registry=tools, config=AnnotateConfig(**QUIET))
    assert (summary.accepted, summary.rejected, summary.failed) == (0, 0, 1)
    assert "no usable reply after 2 tries" in summary.failures[0]
    server.script = text_script()  # the endpoint is back: the next run annotates the sample
    again = run_annotation(rows, ann, tmp_path / "ds", registry=tools, config=AnnotateConfig(**QUIET))
    assert again.todo == 1 and again.accepted == 1


def test_malformed_structured_replies_are_retried_then_fail(server, crop, bank):
    server.script = [{"content": '{"verdict": "Maybe"}'}, {"content": "{not json"}]
    ann = OpenAIAnnotator("scripted", server.url, structured="on", timeout=5, retries=1, backoff=0.01)
    so_far = Trajectory(policy="x", crop=crop, tools=ToolRegistry().names, meta={"hint": Hint("spoof").as_meta()})
    prompts = AnnotationPrompts()
    messages = to_messages(
        so_far, system=prompts.system(ToolRegistry().schemas()), next_prompt=True, next_kind="fast", prompts=prompts
    )
    with pytest.raises(AnnotatorError, match="malformed structured reply"):
        ann.next_turn(Conversation(crop, so_far, messages, ToolRegistry(), 5, "fast", 6))
    assert ann.retried == {"malformed_reply": 2}
    with pytest.raises(Exception, match='"action" must be'):
        render_structured("reasoning", '{"think": "x", "action": "dance"}')


def test_authentication_errors_are_not_retried(server, crop, bank, tools, monkeypatch):
    server.script = [{"status": 401, "error": "invalid api key"}]
    monkeypatch.setenv("TARFAS_TEST_NO_SUCH_KEY", "a key the server does not know")
    ann = OpenAIAnnotator("scripted", server.url, api_key_env="TARFAS_TEST_NO_SUCH_KEY", structured="off", retries=3)
    result = annotate_image(crop, Hint("real"), ann, registry=tools)
    assert stop_reason(result) == "annotator_error" and "$TARFAS_TEST_NO_SUCH_KEY" in result.error and ann.calls == 1
    # a key variable that is named but not set is a clear error before any request (the vllm policy's rule)
    monkeypatch.delenv("TARFAS_TEST_NO_SUCH_KEY")
    with pytest.raises(ValueError, match="TARFAS_TEST_NO_SUCH_KEY"):
        OpenAIAnnotator("scripted", server.url, api_key_env="TARFAS_TEST_NO_SUCH_KEY")


def test_protocol_breaking_replies_are_re_annotated_once_then_rejected(server, tiny_manifest, bank, tools, tmp_path):
    server.script = [
        {"content": "Spoof. It looks flat."},
        {"content": FAST},
        {"content": "I would call the FFT tool now."},
    ]
    ann = OpenAIAnnotator("scripted", server.url, structured="off", timeout=5, retries=0)
    summary = run_annotation(
        spoof_rows(tiny_manifest), ann, tmp_path / "ds", registry=tools, config=AnnotateConfig(**QUIET)
    )
    assert summary.rejected == 1
    bad = json.loads((tmp_path / "ds" / REJECTED).read_text())
    assert [a["issues"][0]["code"] for a in bad["attempts"]] == ["malformed_fast_answer", "malformed_turn"]
    assert bad["reasons"] == ["correctness:no_answer", "format:malformed_turn"]


# --- transformers serve with the nano model -------------------------------------------------------
@pytest.fixture(scope="module")
def nano_server(tmp_path_factory):
    """``transformers serve`` of the nano Qwen2.5-VL on 127.0.0.1 (offline), always shut down."""
    from core.mllm.nano import build_nano

    root = tmp_path_factory.mktemp("nano_serve")
    model = build_nano(root / "nano", "qwen2_5_vl")
    with transformers_serve(model, root) as url:
        yield url, str(model)


def test_transformers_serve_nano_model_garbage_is_rejected_as_malformed(
    nano_server, tiny_manifest, bank, tools, tmp_path
):
    url, model = nano_server
    ann = OpenAIAnnotator(
        model, url, structured="auto", timeout=60, retries=1, backoff=0.1, max_tokens=24, temperature=0.0
    )
    summary = run_annotation(
        spoof_rows(tiny_manifest), ann, tmp_path / "ds", registry=tools, config=AnnotateConfig(**QUIET)
    )
    assert (summary.accepted, summary.rejected, summary.failed) == (0, 1, 0)
    # transformers serve ignores response_format (a warning, no error): detected, text from then on
    assert ann.structured == "off" and ann.retried.get("no_structured_output") == 1
    bad = json.loads((tmp_path / "ds" / REJECTED).read_text())
    assert len(bad["attempts"]) == 2 and all(a["issues"][0]["code"] == "malformed_fast_answer" for a in bad["attempts"])
    reply = bad["attempts"][0]["conversation"][2]["content"][0]["text"]
    assert reply.strip() and not reply.startswith("<Real>") and not reply.startswith("<Spoof>")


def test_transformers_serve_unknown_model_is_a_clear_error(nano_server, crop, bank, tools):
    url, _ = nano_server
    ann = OpenAIAnnotator("no-such-model", url, structured="off", timeout=30, retries=0)
    result = annotate_image(crop, Hint("real"), ann, registry=tools)
    assert (
        stop_reason(result) == "annotator_error" and "refused the request" in result.error and ann.calls == 1
    )  # not retried

"""The model server of the ``vllm`` policy misbehaves in the middle of an investigation (a real HTTP server
on loopback, :mod:`faults.model_server`): it hangs past the client's timeout, answers garbage or an HTML
error page, fails with HTTP 500, or the model writes text outside the protocol. The run ends (failed, with a
message that names what the server did; never a Python error's name), the turns before the fault are kept
and the next upload runs normally."""

from __future__ import annotations

import time

import pytest
from storage_support import FAST_SPOOF, MALFORMED, astronaut_png

from app.runner import Runner, RunSettings
from core.policies.openai_chat import OpenAIChatPolicy
from faults.model_server import ModelServer
from faults.support import check_store, figures
from storage.models import Investigation

TIMEOUT_S = 1.0
NOT_JSON = ("body", "application/json", b'{"choices": [ {not json')
FAULTS = {
    # name: (replies, status, words the error must hold, turns kept)
    "hang": ([("text", FAST_SPOOF), ("hang", 60)], "failed", f"did not answer within {TIMEOUT_S:g} s", 1),
    "garbage JSON": ([("text", FAST_SPOOF), NOT_JSON], "failed", "not JSON", 1),
    "HTML error page": (
        [("text", FAST_SPOOF), ("body", "text/html", b"<html>502 Bad Gateway</html>")],
        "failed",
        "no chat completion",
        1,
    ),
    "no choices": ([("text", FAST_SPOOF), ("body", "application/json", b'{"choices": []}')], "failed", "no chat", 1),
    "HTTP 500": ([("text", FAST_SPOOF), ("status", 500)], "failed", "(HTTP 500)", 1),
    "malformed model text": ([("text", MALFORMED)], "failed", "malformed turns", 3),
}


@pytest.fixture(scope="module")
def model_server():
    with ModelServer() as srv:
        yield srv


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_misbehaving_model_server_fails_the_run_clearly_and_keeps_its_turns(fault, model_server, storage):
    replies, status, words, kept = FAULTS[fault]
    model_server.script(*replies)
    policy = OpenAIChatPolicy(model_server.url, "tiny", timeout_s=TIMEOUT_S)
    runner = Runner(storage, concurrency=1, policy_loader=lambda name, **kw: policy)
    settings = RunSettings.make("vllm", max_tool_calls=2)
    try:
        t0 = time.monotonic()
        job = runner.submit(astronaut_png(), filename="suspect.png", user="ana", settings=settings).wait(60)
        took = time.monotonic() - t0
        model_server.script(("text", FAST_SPOOF), ("text", "<answer><Spoof></answer>"))  # the server recovers
        after = runner.submit(astronaut_png(), filename="next.png", user="ana", settings=settings).wait(60)
    finally:
        runner.shutdown()
    check = check_store(storage)
    with storage.sessions() as s:
        inv = s.get(Investigation, job.investigation_id)
        nxt = s.get(Investigation, after.investigation_id)
        got = (inv.status, len(inv.turns), inv.turns[0].text if inv.turns else None)
        next_status = nxt.status
    fig = figures("model server hangs / garbage")
    fig.rounds += 1
    fig.acknowledged += 2
    fig.turns_lost += max(0, kept - got[1])
    fig.wrong_rows += len(check.wrong) + (got[0] != status)
    assert got[0] == status and got[1] >= kept and words in inv.error, (got, inv.error)
    assert not any(name in inv.error for name in ("AttributeError", "IndexError", "JSONDecodeError", "KeyError"))
    assert got[2] == replies[0][1]  # the turn before the fault, as the server sent it
    assert job.state == "done" and next_status == "completed" and check.wrong == []
    assert took < 30  # the client gave up after its timeout; the server would have hung for a minute

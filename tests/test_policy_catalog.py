"""Policies are configured by whoever starts the server: ``tarfas app --policies FILE`` names them; analysts
choose among them by name. A bad file stops the server with the file and entry at fault; browser-supplied
arguments and names the server does not offer are refused (by the runner, whatever the UI sent), unless
the server runs with ``--allow-custom-policies`` on loopback; and no refusal tells the analyst what the
server has (which variables are set, which paths exist)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest
from sqlalchemy import func, select
from storage_support import ANSWER_SPOOF, FAST_SPOOF, astronaut_png

from app.cli import main
from app.policy_catalog import CatalogError, PolicyCatalog, PolicyRefused, check_custom_host, parse_arguments
from app.runner import Runner, RunSettings
from app.ui.context import AppContext
from app.ui.errors import UserError
from core.policies import ScriptedPolicy, load_policy
from storage.cases import create_case
from storage.db import open_storage
from storage.investigations import queue_run
from storage.models import Case, Investigation, QueuedRun

TOOLS = ["ZoomInTool", "FFTTool", "LBPTool", "WaveletTransformTool", "EdgeDetectionTool", "HOGTool"]
LAB = """
[policies.qwen-lab]
kind = "vllm"
base_url = "http://10.0.0.5:8000/v1"
model = "tarfas-qwen7b"
api_key_env = "TARFAS_TEST_LAB_KEY"
timeout_s = 120
description = "Qwen2.5-VL on the lab server"

[policies.nano-sft]
kind = "hf"
model = "/models/nano"
adapter = "/runs/sft/adapter"
"""


def write(tmp_path, text: str, name: str = "policies.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- the file -------------------------------------------------------------------------------------
def test_without_a_file_analysts_get_the_offline_expert_only():
    catalog = PolicyCatalog.load(None)
    assert catalog.names() == ["expert"] and not catalog.allow_custom
    assert catalog.resolve("expert") == ("expert", {})


def test_a_toml_file_names_the_policies_with_their_endpoints_models_and_key_variables(tmp_path):
    catalog = PolicyCatalog.load(write(tmp_path, LAB), environ={"TARFAS_TEST_LAB_KEY": "sk-1"})
    assert catalog.names() == ["expert", "nano-sft", "qwen-lab"]  # the built-in expert always, first
    assert catalog.resolve("qwen-lab") == (
        "vllm",
        {
            "base_url": "http://10.0.0.5:8000/v1",
            "model": "tarfas-qwen7b",
            "timeout_s": 120,
            "api_key_env": "TARFAS_TEST_LAB_KEY",  # the name: the key itself is read when the policy loads
        },
    )
    assert catalog.resolve("nano-sft") == ("hf", {"adapter": "/runs/sft/adapter", "model": "/models/nano"})
    assert catalog.entries["qwen-lab"].description == "Qwen2.5-VL on the lab server"


def test_a_yaml_file_says_the_same(tmp_path):
    pytest.importorskip("yaml")
    text = """
policies:
  qwen-lab:
    kind: vllm
    base_url: http://10.0.0.5:8000/v1
    model: tarfas-qwen7b
    api_key_env: TARFAS_TEST_LAB_KEY
  expert:
    kind: expert
    threshold: 0.4
"""
    catalog = PolicyCatalog.load(write(tmp_path, text, "policies.yaml"), environ={"TARFAS_TEST_LAB_KEY": "k"})
    assert catalog.names() == ["expert", "qwen-lab"]
    assert catalog.resolve("expert") == ("expert", {"threshold": 0.4})  # the file may set the expert's options
    assert catalog.resolve("qwen-lab")[1]["api_key_env"] == "TARFAS_TEST_LAB_KEY"


@pytest.mark.parametrize(
    "text, words",
    [
        ('[policies.x]\nkind = "gpt"\n', ["policy 'x'", "kind must be one of expert, hf, vllm", "'gpt'"]),
        ('[policies.x]\nkind = "vllm"\nbase_url = "http://h/v1"\n', ["policy 'x'", "kind vllm needs model"]),
        (
            '[policies.x]\nkind = "hf"\nmodel = "/m"\nbase_url = "http://h"\n',
            ["unknown option(s) base_url for kind hf"],
        ),
        ('[policies.x]\nkind = "expert"\napi_key_env = "K"\n', ["kind expert takes no API key"]),
        (
            '[policies.x]\nkind = "vllm"\nbase_url = "http://h/v1"\nmodel = "m"\napi_key_env = "TARFAS_TEST_UNSET_KEY"\n',
            ["policy 'x'", "environment variable TARFAS_TEST_UNSET_KEY (its API key) is not set"],
        ),
        ('[policies.hf]\nkind = "vllm"\nbase_url = "http://h/v1"\nmodel = "m"\n', ["the name 'hf' is a policy kind"]),
        ("[other]\nx = 1\n", ["expected a 'policies' table", "unknown top-level keys: other"]),
        ("[policies\n", ["not valid TOML"]),
    ],
)
def test_a_bad_file_is_refused_at_start_naming_the_file_and_the_entry(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(CatalogError) as err:
        PolicyCatalog.load(path, environ={})
    assert str(path) in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_the_server_does_not_start_on_a_bad_policy_file_and_opens_nothing(tmp_path, capsys):
    path = write(tmp_path, '[policies.qwen]\nkind = "vllm"\nbase_url = "http://h/v1"\n')
    data = tmp_path / "data"
    assert main(["app", "--policies", str(path), "--data-dir", str(data), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{path}, policy 'qwen': kind vllm needs model" in err and "Traceback" not in err
    assert not data.exists()
    assert main(["app", "--policies", str(tmp_path / "missing.toml"), "--data-dir", str(data)]) == 2
    assert "cannot read the policy file" in capsys.readouterr().err and not data.exists()


# --- custom policies: loopback only -----------------------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_custom_policies_are_allowed_on_loopback(host):
    check_custom_host(host, True)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "example.org"])
def test_custom_policies_are_refused_beyond_loopback(host, tmp_path, capsys):
    with pytest.raises(CatalogError, match=f"refusing --allow-custom-policies on {host}"):
        check_custom_host(host, True)
    check_custom_host(host, False)  # without the flag: any host (logins are checked elsewhere)
    code = main(
        ["app", "--host", host, "--auth", "ana:pw", "--allow-custom-policies", "--data-dir", str(tmp_path / "d")]
    )
    assert code == 2 and "refusing --allow-custom-policies" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


# --- what analysts may choose -----------------------------------------------------------------------
def test_a_name_the_server_does_not_offer_and_any_browser_argument_are_refused(tmp_path):
    catalog = PolicyCatalog.load(write(tmp_path, LAB), environ={"TARFAS_TEST_LAB_KEY": "k"})
    with pytest.raises(PolicyRefused, match="policy 'vllm' is not offered on this workbench; choose one of: expert"):
        catalog.resolve("vllm", {"base_url": "http://attacker.example/v1", "model": "m"})
    for kwargs in ({"base_url": "http://attacker.example/v1"}, {"api_key_env": "HOME"}, {"model": "/etc"}, {"x": 1}):
        with pytest.raises(PolicyRefused, match="does not take policy arguments from the browser") as err:
            catalog.resolve("qwen-lab", kwargs)
        assert "HOME" not in str(err.value) and "/etc" not in str(err.value)
    assert parse_arguments("base_url=http://h:8000/v1, max_new_tokens=64") == {
        "base_url": "http://h:8000/v1",
        "max_new_tokens": 64,
    }
    with pytest.raises(PolicyRefused, match="expected key=value"):
        parse_arguments("just-a-path")


def test_with_custom_policies_analysts_name_a_kind_and_give_its_arguments(tmp_path):
    catalog = PolicyCatalog.load(write(tmp_path, LAB), allow_custom=True, environ={"TARFAS_TEST_LAB_KEY": "k"})
    assert catalog.names() == ["expert", "nano-sft", "qwen-lab", "hf", "vllm"]
    assert catalog.resolve("vllm", {"base_url": "http://127.0.0.1:8000/v1", "model": "m"}) == (
        "vllm",
        {"base_url": "http://127.0.0.1:8000/v1", "model": "m"},
    )
    assert catalog.resolve("qwen-lab", {"model": "other"})[1]["model"] == "other"  # the analyst's argument wins
    with pytest.raises(PolicyRefused):
        catalog.resolve("gpt")


def test_settings_for_is_the_only_way_from_the_form_to_run_settings(tmp_path):
    storage = open_storage(tmp_path)
    try:
        catalog = PolicyCatalog.load(write(tmp_path, LAB), environ={"TARFAS_TEST_LAB_KEY": "k"})
        ctx = AppContext(storage, Runner(storage, catalog=catalog), tmp_path, None, catalog=catalog)
        s = ctx.settings_for("qwen-lab", "", max_tool_calls=2, tools=TOOLS[:2], on_no_face=True)
        assert (s.policy, s.policy_kwargs, s.max_tool_calls, s.tools, s.on_no_face) == (
            "qwen-lab",
            (),
            2,
            tuple(TOOLS[:2]),
            "whole",
        )
        assert ctx.settings_for("", "  ", max_tool_calls=3, tools=TOOLS, on_no_face="error").tools is None
        for name, args, kw, words in [
            ("vllm", "", {}, "not offered"),
            ("qwen-lab", "base_url=http://attacker.example/v1", {}, "does not take policy arguments"),
            ("expert", "", {"tools": []}, "choose at least one tool"),
            ("expert", "", {"tools": ["rm -rf"]}, "unknown tool(s): rm -rf"),
            ("expert", "", {"max_tool_calls": 99}, "from 0 to 6"),
            ("expert", "", {"on_no_face": "maybe"}, "when no face is found"),
        ]:
            kw = {"max_tool_calls": 3, "tools": TOOLS, "on_no_face": "error"} | kw
            with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
                ctx.settings_for(name, args, **kw)
        ctx.runner.shutdown()
    finally:
        storage.close()


# --- the runner enforces it, whatever called it -----------------------------------------------------
class Replay(ScriptedPolicy):
    def next_turn(self, conversation):
        return self._replies[len(conversation.trajectory.turns)]


def scripted(name, **kw):
    return Replay([FAST_SPOOF, ANSWER_SPOOF])


def counts(storage) -> tuple[int, int, int]:
    with storage.sessions() as s:
        return tuple(s.scalar(select(func.count()).select_from(t)) for t in (Case, QueuedRun, Investigation))


def test_the_runner_refuses_what_the_catalog_does_not_offer_and_records_nothing(tmp_path):
    storage = open_storage(tmp_path)
    r = Runner(storage, concurrency=1, policy_loader=scripted, catalog=PolicyCatalog())
    try:
        for settings in (
            RunSettings.make("vllm", {"base_url": "http://attacker.example/v1", "model": "m"}),
            RunSettings.make("expert", {"weights": "/etc"}),
        ):
            job = r.submit(astronaut_png(), filename="a.png", user="ana", settings=settings).wait(30)
            assert job.state == "error" and job.investigation_id is None
        assert "not offered" in job.error or "does not take policy arguments" in job.error
        assert counts(storage) == (0, 0, 0)
        assert r.active == 0  # refused work holds no place in the queue
        ok = r.submit(astronaut_png(), filename="a.png", user="ana").wait(60)
        assert ok.state == "done"
        again = r.rerun(ok.investigation_id, user="rita", settings=RunSettings.make("hf", {"model": "/etc"})).wait(30)
        assert again.state == "error" and "not offered" in again.error and counts(storage) == (1, 1, 1)
        default = r.rerun(ok.investigation_id, user="rita").wait(60)  # by the name it was queued under
        assert default.state == "done" and counts(storage) == (1, 2, 2)
    finally:
        r.shutdown()
        storage.close()


def dead_runner() -> str:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return f"{socket.gethostname()}:{p.pid}"


def test_a_queued_run_whose_policy_is_no_longer_offered_is_recorded_interrupted_at_restart(tmp_path):
    storage = open_storage(tmp_path)
    try:
        with storage.sessions.begin() as s:
            case = create_case(s, storage.files, astronaut_png(), filename="a.png", user="ana")
            gone = queue_run(s, case.id, policy="qwen-lab", settings=RunSettings().to_stored(), user="ana")
            kept = queue_run(s, case.id, policy="expert", settings=RunSettings().to_stored(), user="ana")
            for run in (gone, kept):
                run.runner = dead_runner()  # a dead process left them queued
            gone_id, kept_id = gone.id, kept.id
        r = Runner(storage, concurrency=1, policy_loader=scripted, catalog=PolicyCatalog())
        try:
            assert r.requeued == [kept_id]
            deadline = threading.Event()
            for _ in range(300):
                with storage.sessions() as s:
                    done = s.get(Investigation, kept_id)
                    if done is not None and done.status == "completed":
                        break
                deadline.wait(0.1)
            with storage.sessions() as s:
                inv = s.get(Investigation, gone_id)
                assert inv.status == "interrupted" and inv.policy == "qwen-lab"
                assert "policy 'qwen-lab' is not offered on this workbench" in inv.error
                assert s.get(Investigation, kept_id).status == "completed"
        finally:
            r.shutdown()
    finally:
        storage.close()


# --- no refusal tells what the server has ------------------------------------------------------------
def test_a_policy_that_fails_to_load_says_so_without_the_servers_paths_or_variables(tmp_path, caplog):
    storage = open_storage(tmp_path)
    r = Runner(storage, concurrency=1, policy_loader=load_policy, catalog=PolicyCatalog(allow_custom=True))
    existing = next(iter(os.environ))  # a variable that is set
    try:
        errors = []
        for settings in (
            RunSettings.make("hf", {"model": "/etc"}),  # exists, not a model
            RunSettings.make("hf", {"model": "/no/such/dir"}),
            RunSettings.make(
                "vllm", {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "TARFAS_NO_SUCH_VAR"}
            ),
            RunSettings.make("expert", {"weights": str(tmp_path)}),
        ):
            job = r.submit(astronaut_png(), filename="a.png", user="ana", settings=settings).wait(120)
            assert job.state == "error"
            errors.append(job.error)
        assert errors[0].replace("'hf'", "") == errors[1].replace("'hf'", "")  # /etc and a missing path look alike
        for e in errors:
            assert "could not be loaded on this server" in e
            for secret in ("/etc", "/no/such", "config.json", "TARFAS_NO_SUCH_VAR", "not set", str(tmp_path), existing):
                assert secret not in e
        # Whoever runs the server reads why in its log.
        assert "TARFAS_NO_SUCH_VAR" in caplog.text and "/no/such/dir" in caplog.text
    finally:
        r.shutdown()
        storage.close()

"""The workbench launched for real on 127.0.0.1 with logins, driven with gradio_client as an analyst
would drive it: investigate (streamed), batch with bad files, review, run a tool by hand, the queue,
export, metrics and the case report; every check ends in the SQLite rows."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
from app_support import SAMPLES, TOOLS, USERS, chat_files, chat_text, chat_titles, is_png, launched
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from sqlalchemy import select

from app.cli import main
from app.policy_catalog import PolicyCatalog, PolicyEntry
from core.policies import load_policy
from storage.models import AnalystAction, AuditEvent, Case, DatasetExport, Export, Investigation, Review

SETTINGS = ("expert", "", 3, TOOLS, False)  # policy, policy arguments, max tool calls, tools, whole image


def _path(image) -> str:
    """A gallery image as gradio_client returns it: a path, or a dict with one."""
    return image["path"] if isinstance(image, dict) else image


class Paced:
    """A policy that takes ``delay`` seconds per turn, like a language model would: the stream then
    shows each step on its own. Built through the app's name -> keyword-arguments plumbing: the server's
    catalog offers it as ``paced`` (the expert with ``delay``), so the browser sends no arguments."""

    def __init__(self, policy, delay: float):
        self.policy, self.delay = policy, delay
        self.name, self.version, self.description = policy.name, policy.version, policy.description
        self.bank, self.threshold = policy.bank, policy.threshold

    def next_turn(self, conversation):
        time.sleep(self.delay)
        return self.policy.next_turn(conversation)


def loader(name, **kwargs):
    delay = kwargs.pop("delay", None)
    policy = load_policy(name, **kwargs)
    return Paced(policy, float(delay)) if delay else policy


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data = tmp_path_factory.mktemp("workbench")
    catalog = PolicyCatalog(
        {"expert": PolicyEntry("expert", "expert"), "paced": PolicyEntry("paced", "expert", (("delay", 0.3),))}
    )
    with launched(data, policy_loader=loader, catalog=catalog) as wb:
        yield wb


@pytest.fixture(scope="module")
def ana(app):
    return Client(app.url, auth=USERS[0], verbose=False)


@pytest.fixture(scope="module")
def investigated(ana, tmp_path_factory):
    """One streamed investigation of the simulated print sample: (every streamed output, the last)."""
    job = ana.submit(
        [handle_file(str(SAMPLES / "astronaut_print_SIMULATED.png"))],
        "paced",
        "",
        3,
        TOOLS,
        False,
        api_name="/investigate",
    )
    outputs = list(job)
    return outputs, job.result()


def test_nothing_is_served_without_a_login(app):
    assert httpx.get(app.url + "config").status_code == 401
    with pytest.raises(Exception):
        Client(app.url, auth=("ana", "wrong"), verbose=False)


def test_an_upload_streams_each_turn_then_the_verdict_and_is_stored_under_the_login(app, investigated):
    outputs, (chat, status, inv_id, batch, card, original, focus, caption, timeline, gallery, *_) = investigated
    assert "Queued" in chat_text(outputs[0][0])  # the upload is acknowledged at once
    # The chat grew step by step: the fast answer, then each turn, each while the next was pending.
    steps = [
        sum(t.startswith(("⚡ Fast answer (turn", "💭 Thought", "🛠 Tool call")) for t in chat_titles(out[0]))
        for out in outputs
    ]
    assert len(set(steps)) >= 4 and steps == sorted(steps)
    assert any("pending" == (m.get("metadata") or {}).get("status") for out in outputs[:-1] for m in out[0])
    titles = chat_titles(chat)
    assert titles[0] == "" and any(t.startswith("⚡ Fast answer") for t in titles)
    assert any(t.startswith("💭 Thought") for t in titles) and any(t.startswith("🛠 Tool call") for t in titles)
    assert "Final verdict" in chat_text(chat) and "P(spoof)" in chat_text(chat)
    # Every forensic image served as PNG (lossless), in the chat and beside it.
    files = chat_files(chat)
    assert len(files) >= 2 and all(is_png(f) for f in files)
    assert is_png(original) and is_png(focus) and all(is_png(_path(g["image"])) for g in gallery)
    # The case view shows this run: its verdict card, the upload, and every tool image with its caption.
    assert f'data-investigation="{inv_id}"' in card and ("SPOOF" in card or "REAL" in card)
    assert [g["caption"] for g in gallery][:2] == ["Original upload", "Face crop"]
    shown = timeline["value"]  # the timeline's pick: the latest tool image, shown large with its caption
    assert shown.startswith("Turn ") and caption.startswith(f"**{shown}**") and "Expert reading" in caption
    assert batch["data"][0][:2] == ["astronaut_print_SIMULATED.png", "completed"]
    with app.storage.sessions() as s:
        inv = s.get(Investigation, inv_id)
        assert inv.status == "completed" and inv.started_by == "ana" and inv.case.created_by == "ana"
        assert inv.verdict == batch["data"][0][2] and len(inv.turns) == sum(
            t.startswith("⚡") or t.startswith("💭") for t in chat_titles(chat)
        )


def test_a_batch_with_bad_files_investigates_the_good_ones_and_says_why_the_others_were_refused(app, ana, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes((SAMPLES / "astronaut_live.png").read_bytes()[:300])
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((200, 200, 3), 90, np.uint8)).save(blank)
    with app.storage.sessions() as s:
        before = len(s.scalars(select(Case)).all())
    chat, status, inv_id, batch, *_ = ana.predict(
        [handle_file(str(SAMPLES / "astronaut_live.png")), handle_file(str(corrupt)), handle_file(str(blank))],
        *SETTINGS,
        api_name="/investigate",
    )
    rows = {r[0]: r for r in batch["data"]}
    assert rows["astronaut_live.png"][1] == "completed"
    assert rows["corrupt.png"][1] == "refused" and "corrupt" in rows["corrupt.png"][5]
    assert rows["blank.png"][1] == "refused" and "no face found" in rows["blank.png"][5]
    assert "--" not in rows["blank.png"][5] and "analyse the whole image" in rows["blank.png"][5]  # no CLI flags
    with app.storage.sessions() as s:
        assert len(s.scalars(select(Case)).all()) == before + 1  # nothing half-written for the bad files
    # The analyst can investigate the no-face image anyway, as a whole.
    _, _, _, batch, *_ = ana.predict([handle_file(str(blank))], "expert", "", 3, TOOLS, True, api_name="/investigate")
    assert batch["data"][0][1] == "completed"
    # The same bytes again: a new case, and the chat says the image was examined before.
    chat, *_ = ana.predict([handle_file(str(blank))], "expert", "", 3, TOOLS, True, api_name="/investigate")
    assert "already examined in 1 earlier case" in chat_text(chat)


# Gradio's dropdown refuses a name it does not list before the handler runs; the runner would too.
NOT_OFFERED = r"not in the list of choices|is not offered on this workbench"


def test_a_raw_api_call_cannot_aim_the_server_at_another_policy_endpoint_or_path(app, ana):
    """The browser (or anyone calling Gradio's API directly) chooses among the server's policies by name;
    endpoints, model paths and key variables are the server's, and a refusal records nothing."""
    with app.storage.sessions() as s:
        before = (len(s.scalars(select(Case)).all()), len(s.scalars(select(AuditEvent)).all()))
    sample = handle_file(str(SAMPLES / "astronaut_live.png"))
    for policy, args, words in [
        ("vllm", "base_url=http://attacker.example/v1, model=m, api_key_env=HOME", NOT_OFFERED),
        ("expert", "base_url=http://attacker.example/v1", "does not take policy arguments from the browser"),
        ("paced", "weights=/etc", "does not take policy arguments from the browser"),
        ("hf", "model=/etc", NOT_OFFERED),
    ]:
        with pytest.raises(AppError, match=words) as err:
            ana.predict([sample], policy, args, 3, TOOLS, False, api_name="/investigate")
        assert "HOME" not in str(err.value) and "/etc" not in str(err.value)
        with pytest.raises(AppError, match=words):
            ana.predict("astronaut live", policy, args, 3, TOOLS, False, api_name="/investigate_sample")
    with app.storage.sessions() as s:
        assert (len(s.scalars(select(Case)).all()), len(s.scalars(select(AuditEvent)).all())) == before
    assert app.runner.active == 0


def test_review_override_records_the_login_and_a_stale_save_is_refused_without_overwriting(app, ana, investigated):
    inv_id = investigated[1][2]
    chat, info, verdict, notes, corrected, flags, version, attack, *_ = ana.predict(inv_id, api_name="/open_case")
    assert any("turn 1: good_step" in str(c) for c in flags["choices"])  # every turn can be flagged
    assert "Final verdict" in chat_text(chat) and version == 0 and verdict is None
    model = "real" if "Model verdict**: Real" in info else "spoof"
    override = "spoof" if model == "real" else "real"
    out = ana.predict(
        inv_id, override, "halftone dots under zoom", "", ["turn 1: good_step"], 0, "print", api_name="/save_review"
    )
    assert out[0] == override and out[2] == 1 and "overrides the model" in out[3]
    rita = Client(app.url, auth=USERS[1], verbose=False)
    rita.predict(inv_id, "", "", [], 1, "print", api_name="/review_unsure")  # the keyboard shortcut's button
    with pytest.raises(AppError, match="changed by rita"):
        ana.predict(inv_id, override, "my stale form", "", [], 1, "print", api_name="/save_review")
    with app.storage.sessions() as s:
        review = s.scalars(select(Review).where(Review.investigation_id == inv_id)).one()
        assert (review.verdict, review.reviewer, review.version) == ("unsure", "rita", 2)
        actors = [e.actor for e in s.scalars(select(AuditEvent).where(AuditEvent.entity == "review"))]
        assert actors == ["ana", "rita"]
        assert s.get(Investigation, inv_id).case.attack_type == "print"


def test_the_analyst_runs_a_tool_by_hand_and_it_is_in_the_audit_log(app, ana, investigated):
    inv_id = investigated[1][2]
    info, card, original, image, caption, timeline, *_ = ana.predict(
        inv_id, "ZoomInTool", "40, 60, 180, 130", api_name="/run_tool"
    )
    # Shown at once as the analyst's action on the case, apart from the agent's turns.
    assert timeline["value"] == "Analyst #1 · ZoomInTool (ana)" and "not part of the agent's run" in caption
    assert is_png(image) and "ZoomInTool" in info
    with pytest.raises(AppError, match="four numbers"):
        ana.predict(inv_id, "ZoomInTool", "a, b", api_name="/run_tool")
    with app.storage.sessions() as s:
        ev = s.scalars(select(AuditEvent).where(AuditEvent.action == "tool.manual_run")).one()
        assert ev.actor == "ana" and ev.after["arguments"] == {"bbox": [40, 60, 180, 130]}
        # Stored as the analyst's action on the case, never as a turn of the agent's run.
        action = s.scalars(select(AnalystAction)).one()
        assert (action.investigation_id, action.actor, action.tool) == (inv_id, "ana", "ZoomInTool")
        assert all(
            t.tool_result is None or t.tool_result.image_sha256 != action.image_sha256
            for t in s.get(Investigation, inv_id).turns
        )
    # What the analyst saw is exactly what was kept as evidence (lossless, pixel for pixel).
    assert np.array_equal(np.asarray(Image.open(image)), app.storage.files.read_png(ev.after["image_sha256"]))


def test_the_queue_filters_and_searches_cases_and_opens_any_case_by_its_short_id(app, ana, investigated):
    reviewed = investigated[1][2]

    def cases(checked=(), attack="any", status="any", verdict="any", analyst="any", text=""):
        table, count = ana.predict(list(checked), attack, status, verdict, analyst, text, api_name="/list_cases")
        return table, count

    table, count = cases()
    assert table["headers"][:2] == ["run", "file"] and int(count.split()[0]) >= 2
    ids = [r[0] for r in cases(["unreviewed"])[0]["data"]]
    assert reviewed[:12] not in ids and ids
    assert [r[0] for r in cases(attack="print")[0]["data"]] == [reviewed[:12]]  # the short id shown
    with app.storage.sessions() as s:
        model = s.get(Investigation, reviewed).verdict
    other = "real" if model == "spoof" else "spoof"
    assert reviewed[:12] in [r[0] for r in cases(verdict=model)[0]["data"]]
    assert reviewed[:12] not in [r[0] for r in cases(verdict=other)[0]["data"]]
    assert [r[0] for r in cases(text="PRINT_simulated")[0]["data"]] == [reviewed[:12]]  # file name, any case
    with app.storage.sessions() as s:
        sha = s.get(Investigation, reviewed).case.image_sha256
    assert reviewed[:12] in [r[0] for r in cases(text=sha[:10])[0]["data"]]
    chat, *_ = ana.predict(ids[0], api_name="/open_case")  # replay of a past case, by its short id
    assert "Final verdict" in chat_text(chat) and all(is_png(f) for f in chat_files(chat))
    with pytest.raises(AppError, match="not an investigation or case id"):
        ana.predict("not-an-id", api_name="/open_case")


def test_export_case_report_and_metrics(app, ana, investigated):
    inv_id = investigated[1][2]
    ana.predict(inv_id, "", "", [], 2, "print", api_name="/review_spoof")
    with pytest.raises(AppError, match="not an investigation id .*'1234'"):  # a typo never widens the export
        ana.predict(f"{inv_id}, 1234", api_name="/export_dataset")
    info, archive = ana.predict("", api_name="/export_dataset")
    assert "Exported" in info and archive.endswith(".zip")
    import zipfile

    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        assert "trajectories.jsonl" in names and "manifest.json" in names
        records = [json.loads(line) for line in z.read("trajectories.jsonl").decode().splitlines() if line.strip()]
    assert inv_id in json.dumps(records)
    report = ana.predict(inv_id, api_name="/case_report")
    html = open(report, encoding="utf-8").read()
    assert "<html" in html.lower() and inv_id in html
    with app.storage.sessions() as s:
        exp = s.scalars(select(DatasetExport)).one()
        assert (
            exp.created_by == "ana"
            and [i.investigation_id for i in exp.items] == [inv_id]
            and exp.items[0].label == "spoof"
        )
        assert (
            s.scalars(select(Export).where(Export.investigation_id == inv_id)).one().created_by == "ana"
        )  # the report
    text, roc, confusion = ana.predict(None, api_name="/review_metrics")
    assert "Agreement" in text and roc["type"] == "matplotlib" and confusion["type"] == "matplotlib"


def test_serving_beyond_localhost_without_logins_is_refused(tmp_path, capsys):
    assert main(["app", "--host", "0.0.0.0", "--data-dir", str(tmp_path), "--port", "1"]) == 2
    assert "refusing to serve on 0.0.0.0 without authentication" in capsys.readouterr().err
    assert main(["app", "--host", "0.0.0.0", "--auth", "nocolon", "--data-dir", str(tmp_path)]) == 2
    assert not (tmp_path / "tarfas.db").exists()  # refused before anything was opened

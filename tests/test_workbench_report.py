"""The case report: one self-contained HTML file (inline images and CSS, no script, no external URL)
with the evidence, every turn, the verdict, the review and the audit trail; all text escaped, because
model output is untrusted. Handing it out is recorded as an export."""

from __future__ import annotations

import base64
import shutil
from html.parser import HTMLParser

import pytest
import torch
from sqlalchemy import select
from storage_support import MALFORMED
from workbench_support import answer, fast, review, run_case, tool

from app.case_report import case_report_html, export_case_report
from core.experts import ExpertBank
from storage.errors import NotFoundError
from storage.models import AuditEvent, Export, Investigation, ToolResult, Turn

torch.set_num_threads(1)

EVIL = '<script>window.pwned = 1</script><img src="https://evil.example/x.png">'


@pytest.fixture(scope="module")
def experts():
    return ExpertBank.load()  # the shipped expert CNNs: real P(spoof trace) for every tool image


@pytest.fixture
def reviewed(storage, face, experts):
    """A run with a malformed turn, two tool calls (real expert scores) and model text holding markup;
    reviewed with flags, notes and a corrected answer."""
    replies = [
        fast("spoof", 0.8, reason="Looks flat " + EVIL),
        MALFORMED,
        tool("FFTTool", "Look for moire peaks. " + EVIL),
        tool("ZoomInTool", "Zoom on the eyes.", bbox=[40, 60, 180, 130]),
        answer("spoof", 0.83, "Periodic peaks in the spectrum."),
    ]
    case_id, inv = run_case(storage, face, replies, filename="suspect<b>.png", attack_type="print", experts=experts)
    review(
        storage,
        inv,
        "real",
        notes="Live person. " + EVIL,
        flags={2: ["wrong_tool", "wrong_reasoning"], 3: "good_step"},
        corrected_answer="<think>Pores are visible.</think><answer><Real></answer>",
    )
    return case_id, inv


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]


def test_the_report_holds_the_evidence_every_turn_the_verdict_and_the_review(storage, reviewed):
    case_id, inv_id = reviewed
    html = case_report_html(storage, inv_id, generated_by="ana")
    with storage.sessions() as s:
        inv = s.get(Investigation, inv_id)
        turns = s.scalars(select(Turn).where(Turn.investigation_id == inv_id).order_by(Turn.index)).all()
        results = s.scalars(
            select(ToolResult).join(Turn).where(Turn.investigation_id == inv_id).order_by(Turn.index)
        ).all()
        sha, face, crop_sha = inv.case.image_sha256, inv.face, inv.crop_sha256
    assert sha in html and crop_sha in html
    x1, y1, x2, y2 = face["bbox"]
    assert f"x1={x1}, y1={y1}, x2={x2}, y2={y2} ({x2 - x1}x{y2 - y1} px)" in html
    assert "scripted" in html and inv.policy_version in html and "print" in html
    # every turn: the fast answer, the malformed turn and its error, the tool calls with arguments, the answer
    assert [f'id="turn-{t.index}"' in html for t in turns] == [True] * 5
    assert "Looks flat" in html and "Format error fed back to the model" in html and "I think it is real." in html
    assert "Zoom on the eyes." in html and "ZoomInTool" in html and "[40, 60, 180, 130]" in html
    assert "Periodic peaks in the spectrum." in html and "0.830" in html  # final P(spoof)
    # every tool image, inline and byte-identical to the stored evidence, with its expert's P(spoof trace)
    for r in results:
        assert "data:image/png;base64," + base64.b64encode(storage.files.read(r.image_sha256)).decode() in html
    fft = next(r for r in results if r.name == "FFTTool")
    assert fft.expert_p_spoof is not None and f"{fft.expert_p_spoof:.3f}" in html
    # the review: verdict, reviewer, flags, notes, corrected answer
    assert "by rita" in html and "wrong_tool" in html and "wrong_reasoning" in html and "good_step" in html
    assert (
        "Live person." in html
        and "&lt;think&gt;Pores are visible.&lt;/think&gt;&lt;answer&gt;&lt;Real&gt;&lt;/answer&gt;" in html
    )
    # the audit trail, from intake to review
    for action in (
        "case.create",
        "case.set_attack_type",
        "investigation.start",
        "turn.record",
        "investigation.finish",
        "review.create",
    ):
        assert f"<td>{action}</td>" in html
    assert "turn 0 (row " in html  # audit rows name turns by the numbers shown above
    assert "Generated" in html and "by ana" in html


def test_model_and_analyst_text_is_escaped_and_the_file_is_self_contained(storage, reviewed):
    html = case_report_html(storage, reviewed[1])
    assert "<script" not in html.lower() and 'evil.example/x.png">' not in html
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in html
    assert "suspect&lt;b&gt;.png" in html
    parsed = _Tags()
    parsed.feed(html)
    assert not {"script", "link", "iframe", "object", "embed", "base"} & set(parsed.tags)
    for tag, attr, value in parsed.attrs:
        if attr == "src":
            assert value.startswith("data:image/png;base64,"), (tag, value[:40])
        if attr == "href":
            assert value.startswith("#"), value
        assert not attr.startswith("on"), attr  # no event handlers
    assert "http://" not in html and "https://" not in html.replace("https://evil.example", "")
    assert html.count("<style>") == 1


def test_an_unreviewed_or_failed_run_still_reports_what_happened(storage, face):
    _, inv = run_case(storage, face, [fast("spoof", 0.9), tool("HOGTool")])  # the policy crashes before answering
    html = case_report_html(storage, inv)
    assert "not been reviewed" in html and "failed" in html and "ran out of replies" in html and "HOGTool" in html
    with pytest.raises(NotFoundError):
        case_report_html(storage, "nope")


def test_exporting_the_report_records_who_took_which_bytes(storage, reviewed, tmp_path):
    case_id, inv_id = reviewed
    rep = export_case_report(storage, inv_id, "ana", out_dir=tmp_path)
    assert rep.path == tmp_path / rep.filename and rep.path.read_text() == rep.html
    assert rep.filename == f"tarfas-case-{case_id[:8]}-{inv_id[:8]}.html"
    with storage.sessions() as s:
        exp = s.get(Export, rep.export_id)
        ev = s.scalars(select(AuditEvent).where(AuditEvent.action == "export.create")).one()
    assert (exp.investigation_id, exp.format, exp.filename, exp.created_by) == (inv_id, "html", rep.filename, "ana")
    assert storage.files.read(exp.file_sha256) == rep.html.encode() and exp.file_sha256 == rep.file_sha256
    assert (ev.actor, ev.after["file_sha256"]) == ("ana", rep.file_sha256)
    # the next report shows the export of this one in its audit trail
    assert "export.create" in case_report_html(storage, inv_id)


def test_the_report_renders_in_a_browser_without_network_or_script(storage, reviewed, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine")
    rep = export_case_report(storage, reviewed[1], "ana", out_dir=tmp_path)
    requests = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto(rep.path.as_uri())
            loaded = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
            pwned = page.evaluate("window.pwned === undefined")
            text = page.inner_text("body")
        finally:
            browser.close()
    assert loaded and all(loaded) and len(loaded) >= 4  # uploaded image, crop, two tool images
    assert pwned  # the injected script did not run ...
    assert "<script>window.pwned = 1</script>" in text  # ... it is shown as text
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []

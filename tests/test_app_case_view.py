"""The case view and the review form, without a browser: every panel built from one stored run, untrusted
text made inert, flags that fit each turn, refusals in plain words, hand-run tools kept apart from the
agent's turns (in the timeline, the report and the case history), and the export's id check."""

from __future__ import annotations

import types

import pytest
import torch
from workbench_support import answer, fast, review, run_case, tool

from app.case_report import case_report_html
from app.runner import Job, Runner, RunSettings
from app.ui import case_view, tab_review
from app.ui.errors import UserError
from app.ui.render import PngCache, trajectory_messages
from app.ui.safe import html_text, md_text
from app.ui.tab_export import parse_ids
from app.ui.tab_investigate import refusal_text
from storage.investigations import load_trajectory

torch.set_num_threads(1)
HOSTILE = "<img src=http://127.0.0.1:9/x> ![m](http://127.0.0.1:9/y) [a](javascript:alert(1)) <script>x()</script>"


@pytest.fixture
def ctx(storage, tmp_path):
    runner = Runner(storage, concurrency=1)
    yield types.SimpleNamespace(
        storage=storage, runner=runner, png=PngCache(tmp_path / "png"), threshold=lambda: None, user=lambda r: "ana"
    )
    runner.shutdown()


@pytest.fixture
def case(storage, face):
    """A reviewed run with two tool calls, whose reasoning is hostile text."""
    return run_case(
        storage,
        face,
        [fast("spoof", 0.8, reason=HOSTILE), tool("FFTTool", think=HOSTILE), tool("LBPTool"), answer("spoof", 0.9)],
        filename="<b>suspect</b>.png",
    )


def test_untrusted_text_becomes_characters_that_render_as_nothing_else():
    shown = md_text(HOSTILE)
    assert "<" not in shown and "](" not in shown and "javascript:" not in shown
    assert html_text('"><img src=x>') == "&quot;&gt;&lt;img src=x&gt;"


def test_every_panel_of_the_view_comes_from_the_one_run_opened(ctx, case):
    case_id, inv_id = case
    snap = case_view.load_snapshot(ctx, inv_id)
    card, original, focus, caption, timeline, gallery, left, right, compare, state = case_view.view_values(ctx, snap)
    assert f'data-investigation="{inv_id}"' in card and "SPOOF" in card and "&lt;b&gt;suspect" in card
    labels = [label for _, label in gallery]
    assert labels == ["Original upload", "Face crop", "Turn 1 · FFTTool", "Turn 2 · LBPTool"]
    assert timeline["choices"] == ["Original upload", "Face crop", *[e.label for e in case_view.entries(ctx, snap)[2:]]]
    assert timeline["value"] == "Turn 2 · LBPTool" and focus == gallery[3][0]  # the latest tool image, large
    assert compare == (gallery[1][0], gallery[3][0])  # the crop beside it
    fft = state["Turn 1 · FFTTool"][1]
    assert "<img" not in fft and "Thought: &lt;img" in fft  # the caption quotes the thought, as text
    with ctx.storage.sessions() as s:
        traj = load_trajectory(s, ctx.storage.files, inv_id)
    for m in trajectory_messages(traj, ctx.png):
        assert "<img" not in str(m.content) and "](http" not in str(m.content)


def test_flags_fit_each_turn(storage, face):
    _, inv_id = run_case(storage, face, [fast("real", 0.2), tool("FFTTool"), answer("real", 0.1)])
    with storage.sessions() as s:
        turns = load_trajectory(s, storage.files, inv_id).turns
    values = [v for _, v in tab_review.flag_choices(turns)]
    assert "turn 0: wrong_tool" not in values and "turn 2: wrong_tool" not in values  # no tool there
    assert {"turn 1: wrong_tool", "turn 1: good_step", "turn 0: good_step", "turn 2: wrong_reasoning"} <= set(values)


def test_a_re_run_shows_the_earlier_review_and_asks_whether_it_still_holds(ctx, storage, face, case):
    case_id, first = case
    review(storage, first, "spoof", notes="moire under FFT")
    _, second = run_case(storage, face, [fast("spoof", 0.7), answer("spoof", 0.75)], case_id=case_id)
    out = tab_review.open_case(ctx, case_id)  # a case id opens its latest run
    chat, info, verdict, notes, corrected, flags, version, attack, opened, *view, banner, history = out
    assert opened == second and (verdict, notes, version) == ("spoof", "moire under FFT", 0)
    assert "Does it still hold for this run?" in banner and f"judged run {first}" in banner
    tab_review.save(ctx, second, verdict, notes, corrected, [], version, "ana")
    assert tab_review.earlier_review(ctx, second) == ("", None)  # answered: this run has its own review now
    with pytest.raises(UserError, match="not an investigation or case id"):
        tab_review.open_case(ctx, "zz-not-an-id")


def test_a_tool_run_by_hand_is_an_analyst_action_shown_apart_from_the_agents_turns(ctx, storage, case):
    case_id, inv_id = case
    info, card, original, focus, caption, timeline, *_ = case_view.run_manual_tool(
        ctx, inv_id, "ZoomInTool", "40, 60, 180, 130", "ana"
    )
    assert timeline["value"] == "Analyst #1 · ZoomInTool (ana)" and "not part of the agent's run" in caption
    with storage.sessions() as s:
        traj = load_trajectory(s, storage.files, inv_id)
    assert [t.tool_result.name for t in traj.turns if t.tool_result] == ["FFTTool", "LBPTool"]  # unchanged
    html = case_report_html(storage, inv_id)
    assert "Analyst action #1: ZoomInTool by ana" in html
    history = tab_review.history_table(ctx, inv_id)
    assert {"case.create", "tool.manual_run"} <= set(history["what"])
    with pytest.raises(UserError, match="four numbers"):
        case_view.run_manual_tool(ctx, inv_id, "ZoomInTool", "a, b", "ana")


def test_a_step_through_replay_adds_one_turn_at_a_time(ctx, case):
    _, inv_id = case
    steps = list(case_view.replay_case(ctx, inv_id, 0.05))
    assert len(steps) == 1 + 4 + 1  # the opening, each of the 4 turns, the verdict
    sizes = [len(s[0]) for s in steps]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    shown = [s[1 + 4]["value"] for s in steps[1:-1]]  # the timeline follows the turn just shown
    assert shown == ["Turn 0 · fast answer: Spoof", "Turn 1 · FFTTool", "Turn 2 · LBPTool", "Turn 3 · answer: Spoof"]
    assert "Final verdict" in str(steps[-1][0][-1].content) and "Final verdict" not in str(steps[-2][0])


def test_refusals_and_export_ids_are_said_in_plain_words():
    job = Job(filename="blank.png", user="ana", settings=RunSettings())
    job.error = "no face found in the 200x200 image; analyse the whole image instead (--on-no-face whole in the CLI) if it is already a face crop"
    assert "--" not in refusal_text(job) and "no face found" in refusal_text(job)
    assert parse_ids("") is None and parse_ids(f"{'a' * 32},{'a' * 32}") == ["a" * 32]
    with pytest.raises(UserError, match="'1234'"):
        parse_ids(f"{'a' * 32} 1234")

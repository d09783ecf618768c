"""Calibration in the workbench, with the real expert policy on real faces: a profile fitted on the
reviewed cases in storage (filtered by date, uploader and source; unsure reviews and other policies left
out), applied by the runner to every new investigation once active (its score, its threshold in the
reasoning text, the verdict card and the case report, the profile id on the run), refused with a note when
it was fitted for another policy or version, rolled back, and old cases re-scored as a view only."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pytest
import torch
from sqlalchemy import func, select
from storage_support import ANSWER_SPOOF, FAST_SPOOF, astronaut_png
from workbench_support import expert_case, face_images, review, reviewed_expert_cases

from app.calibration import CalibrationInputError, fit_from_reviews, rescore
from app.case_report import case_report_html
from app.runner import Runner, RunSettings
from app.ui.render import trajectory_messages, verdict_message
from app.ui.safe import md_text
from core.calibration import CalibrationProfile, ScoreModel, logit, sigmoid
from core.policies import ScriptedPolicy, load_policy, readers_for
from core.policies.calibrated import calibrate
from storage import calibration as cal
from storage.investigations import load_trajectory
from storage.models import AuditEvent, Investigation
from storage.queries import RunFilter, list_cases, list_runs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def expert():
    return load_policy("expert")


def shifting(expert, *, b=2.0, threshold=0.9, version=None, name="site-A") -> CalibrationProfile:
    """A profile that moves every score up by ``b`` in logit and decides at ``threshold``."""
    return CalibrationProfile(
        policy="expert",
        policy_version=expert.version if version is None else version,
        model=ScoreModel(a=1.0, b=b),
        threshold=threshold,
        target="eer",
        prior_strength=1.0,
        n_reviews=8,
        n_real=4,
        n_spoof=4,
        name=name,
    )


def activated(storage, profile, user="ana"):
    with storage.sessions.begin() as s:
        cal.save_profile(s, profile, user=user)
        cal.activate(s, profile.id, user=user)
    return profile


@pytest.fixture
def runner(storage, expert):
    def loader(name, **kwargs):
        if name == "expert":
            return expert
        return ScriptedPolicy([FAST_SPOOF, ANSWER_SPOOF])

    r = Runner(storage, concurrency=1, policy_loader=loader)
    yield r
    r.shutdown()


def run(runner, settings=None):
    job = runner.submit(astronaut_png(), filename="astronaut.png", user="ana", settings=settings).wait(60)
    assert job.state == "done", job.error
    return job.trajectory


# --- fitting -----------------------------------------------------------------------------------------
def test_a_profile_is_fitted_on_the_reviewed_cases_their_labels_and_the_faces_features(storage, expert):
    runs = reviewed_expert_cases(storage, expert, n=4, user="ana", prefix="cam1/")
    _, unsure = expert_case(storage, expert, face_images(1)[0][1], filename="cam1/blurry.png", user="ana")
    review(storage, unsure, "unsure")
    _, elsewhere = expert_case(storage, expert, face_images(1)[1][1], filename="cam2/x.png", user="bob")
    review(storage, elsewhere, "spoof")
    expert_case(storage, expert, face_images(1)[0][1], filename="cam1/unreviewed.png", user="ana")

    fit = fit_from_reviews(
        storage,
        expert,
        filters=RunFilter(uploader="ana", source="CAM1"),
        bank=readers_for(expert),
        name="site-A",
        user="rita",
        prior_strength=10.0,
    )
    p = fit.profile
    assert (p.policy, p.policy_version, p.name, p.created_by) == ("expert", expert.version, "site-A", "rita")
    assert (p.n_reviews, p.n_real, p.n_spoof) == (8, 4, 4)
    assert [r.investigation_id for r in fit.runs] == [inv for inv, _ in runs]  # bob's case and cam2 are filtered out
    assert fit.y.tolist() == [label == "spoof" for _, label in runs]
    assert fit.left_out == {"reviewed as unsure": 1}
    with storage.sessions() as s:
        stored = {r.investigation_id: r for r in list_runs(s)}
        assert p.review_sha256 == sorted(stored[inv].image_sha256 for inv, _ in runs)
        assert fit.scores.tolist() == [stored[inv].score_spoof for inv, _ in runs]  # the stored final P(spoof)
    # The features are the expert bank's reading of each stored crop.
    assert p.features == readers_for(expert).features_source and len(p.model.delta) == len(p.model.mean) > 0
    first = fit.runs[0]
    x = readers_for(expert).features(storage.files.read_png(first.crop_sha256))
    assert p.model.mean == pytest.approx(
        np.mean([readers_for(expert).features(storage.files.read_png(r.crop_sha256)) for r in fit.runs], 0)
    )
    assert 0.0 <= p.p_spoof(first.policy_score, x) <= 1.0
    # Before: the policy at its own threshold; after: nested cross-validation; both on these 8 cases.
    assert p.metrics["before"]["threshold"] == expert.threshold and p.metrics["after"]["n"] == 8
    assert sum(map(sum, fit.confusion_before)) == sum(map(sum, fit.confusion_after)) == 8
    assert fit.roc_before.n_real == fit.roc_after.n_spoof == 4 and len(fit.point_after) == 2


def test_too_few_reviews_after_the_filters_are_refused_with_what_was_found(storage, expert):
    reviewed_expert_cases(storage, expert, n=4)
    tomorrow = date.today() + timedelta(days=1)
    with pytest.raises(CalibrationInputError, match="the filters give 0 real and 0 spoof"):
        fit_from_reviews(storage, expert, filters=RunFilter(since=tomorrow), bank=readers_for(expert))
    with pytest.raises(CalibrationInputError, match="give 0 real and 0 spoof"):
        fit_from_reviews(storage, expert, filters=RunFilter(uploader="nobody"), bank=readers_for(expert))
    with pytest.raises(ValueError, match="date range is empty"):
        RunFilter(since=tomorrow, until=date.today())
    scripted = ScriptedPolicy([FAST_SPOOF, ANSWER_SPOOF])  # reviews of expert runs do not fit another policy
    with pytest.raises(CalibrationInputError, match=r"left out: 8 run by another policy or version"):
        fit_from_reviews(storage, scripted, features=False)


def test_a_calibrated_run_is_refitted_on_the_policys_own_score_not_the_calibrated_one(storage, expert):
    profile = activated(storage, shifting(expert))
    _, inv = expert_case(storage, calibrate(expert, profile), face_images(1)[1][1], filename="cam1/late.png")
    review(storage, inv, "spoof")
    with storage.sessions() as s:
        (row,) = list_runs(s)
        answer = load_trajectory(s, storage.files, inv).turns[-1]
    assert row.calibration_profile_id == profile.id
    assert row.policy_score == answer.notes["p_spoof_uncalibrated"] != pytest.approx(row.score_spoof)
    assert row.score_spoof == pytest.approx(profile.p_spoof(row.policy_score))


# --- applying ----------------------------------------------------------------------------------------
def test_an_active_profile_changes_the_score_and_threshold_of_the_next_run_and_is_recorded(storage, runner, expert):
    before = run(runner)
    assert before.meta == {} and f"decision threshold {expert.threshold:.2f}:" in before.turns[-1].think
    profile = activated(storage, shifting(expert, b=2.0, threshold=0.9))

    after = run(runner)
    assert after.final.score_spoof == pytest.approx(float(sigmoid(logit(before.final.score_spoof) + 2.0)))
    assert after.meta["calibration_profile"] == profile.summary()
    # The reasoning text states the profile's threshold, and says whose it is.
    assert f"decision threshold 0.90 of calibration profile {profile.id}" in after.turns[-1].think
    assert after.final.verdict == ("spoof" if after.final.score_spoof >= 0.9 else "real")
    with storage.sessions() as s:
        inv = s.get(Investigation, after.id)
        assert (inv.calibration_profile_id, inv.calibration_note) == (profile.id, None)
        assert s.get(Investigation, before.id).calibration_profile_id is None
        start = s.scalars(
            select(AuditEvent).where(AuditEvent.action == "investigation.start", AuditEvent.entity_id == after.id)
        ).one()
        assert start.after["calibration_profile"] == profile.id
        stored = load_trajectory(s, storage.files, after.id)
        queue = {r.investigation_id: r.calibration_profile_id for r in list_cases(s)}
    assert queue == {after.id: profile.id, before.id: None}  # the queue shows it too
    # The verdict card, live and replayed, names the profile and its threshold.
    for card in (verdict_message(after.final, after.meta), trajectory_messages(stored, runner_png(storage))[-1]):
        assert f"Calibration profile `{profile.id}` 'site-A': threshold **0.900**" in card.content
    # The case report compares with the profile's threshold and shows who activated it.
    html = case_report_html(storage, after.id)
    assert "0.900 of calibration profile" in html and profile.id in html and "calibration.activate" in html
    assert "the policy's own (no calibration profile was applied)" in case_report_html(storage, before.id)


def runner_png(storage):
    from app.ui.render import PngCache

    return PngCache(storage.files.root.parent / "png")


def test_a_profile_fitted_for_another_policy_version_is_not_applied_and_the_run_says_so(storage, runner, expert):
    plain = run(runner)
    stale = activated(storage, shifting(expert, version="an-older-bank"))
    after = run(runner)
    assert after.final.score_spoof == pytest.approx(plain.final.score_spoof)  # the policy's own score
    assert "calibration_profile" not in after.meta
    note = after.meta["calibration_note"]
    assert f"calibration profile {stale.id} ('site-A') was not applied" in note
    assert f"fitted for policy expert [an-older-bank], not expert [{expert.version}]" in note
    assert f"policy's own threshold {expert.threshold:.3f}" in note
    with storage.sessions() as s:
        inv = s.get(Investigation, after.id)
        assert (inv.calibration_profile_id, inv.calibration_note) == (None, note)
        stored = load_trajectory(s, storage.files, after.id)
    messages = trajectory_messages(stored, runner_png(storage))
    shown = md_text(note)  # the profile's name is the analyst's text: shown as text, never as Markdown
    assert any(m.metadata and m.metadata.get("title") == "⚠️ not calibrated" and m.content == shown for m in messages)
    assert f"Not calibrated: {shown}" in messages[-1].content
    # Another policy's run under an active expert profile says so too.
    good = activated(storage, shifting(expert))
    other = run(runner, RunSettings.make("scripted"))
    assert f"calibration profile {good.id} ('site-A') was not applied" in other.meta["calibration_note"]


def test_rolling_back_makes_the_next_run_use_the_earlier_profile(storage, runner, expert):
    a = activated(storage, shifting(expert, b=1.0, threshold=0.8, name="first"))
    b = activated(storage, shifting(expert, b=-1.0, threshold=0.3, name="second"))
    assert run(runner).meta["calibration_profile"]["id"] == b.id
    with storage.sessions.begin() as s:
        assert cal.activate(s, a.id, user="rita").action == "rollback"
    traj = run(runner)
    assert traj.meta["calibration_profile"] == a.summary() and "decision threshold 0.80" in traj.turns[-1].think
    with storage.sessions.begin() as s:
        cal.deactivate(s, user="rita")
    assert run(runner).meta == {}


def test_rescoring_old_cases_under_a_profile_is_a_view_that_writes_nothing(storage, expert):
    runs = reviewed_expert_cases(storage, expert, n=3)
    profile = shifting(expert, b=3.0, threshold=0.5)
    with storage.sessions() as s:
        recorded = {r.investigation_id: (r.verdict, r.score_spoof) for r in list_runs(s)}
        n_events = s.scalar(select(func.count()).select_from(AuditEvent))
    rows = rescore(storage, profile, bank=readers_for(expert))
    assert [r.run.investigation_id for r in rows] == [inv for inv, _ in runs]
    for r in rows:
        assert r.p_spoof == pytest.approx(float(sigmoid(logit(r.run.score_spoof) + 3.0)))
        assert r.verdict == ("spoof" if r.p_spoof >= 0.5 else "real") and r.changed == (r.verdict != r.run.verdict)
    assert any(r.changed for r in rows)  # a shift of 3 in logit turns some real verdicts into spoof
    other = rescore(storage, shifting(expert, version="another"), bank=readers_for(expert))
    assert {r.note for r in other} == {f"run by expert [{expert.version}]"} and all(r.p_spoof is None for r in other)
    with storage.sessions() as s:
        assert {r.investigation_id: (r.verdict, r.score_spoof) for r in list_runs(s)} == recorded
        assert s.scalar(select(func.count()).select_from(AuditEvent)) == n_events


# --- the Calibration tab -----------------------------------------------------------------------------
def test_the_calibration_tab_fits_activates_rolls_back_switches_off_and_rescores(tmp_path, database_url, expert):
    import shutil

    import gradio as gr

    from app.server import build
    from app.ui import tab_calibration as tab
    from app.ui import tab_review

    ctx, _ = build(tmp_path, db_url=database_url, policy_loader=lambda name, **kw: expert)
    try:
        reviewed_expert_cases(ctx.storage, expert, n=3, user="ana", prefix="cam1/")
        assert tab.overview(ctx)[0].startswith("**No calibration profile is active**")
        text, roc, before, after, first, profiles = tab.fit(
            ctx, "", "", tab.ANY, "cam1", "expert", "", "eer", "site-A", True, "rita"
        )
        assert f"**Profile `{first}`** 'site-A'" in text and "6** reviewed cases (3 real, 3 spoof)" in text
        assert "| policy as shipped |" in text and "nested cross-validation" in text
        assert len(roc.axes[0].lines) == 5  # chance, two curves, and the old and the new operating point
        assert list(profiles["profile"]) == [first] and list(profiles["active"]) == [""]
        message, active, _, history = tab.set_active(ctx, first, "rita")
        assert message.startswith(f"Activated profile `{first}`") and f"`{first}` 'site-A'" in active
        job = ctx.runner.submit(astronaut_png(), filename="next.png", user="ana").wait(60)  # the Review tab names it
        assert f"Calibration profile `{first}` 'site-A': threshold" in tab_review.summary(ctx, job.investigation_id)
        _, _, _, _, second, _ = tab.fit(
            ctx, "", "", "ana", "", "expert", "", "bpcer=0.05", "site-A, stricter", False, "rita"
        )
        tab.set_active(ctx, second, "rita")
        message, active, profiles, history = tab.set_active(ctx, first, "ana")
        assert message.startswith(f"Rolled back to profile `{first}`") and "(rollback by ana)" in active
        assert list(history["action"]) == ["rollback", "activate", "activate"]
        assert dict(zip(profiles["profile"], profiles["active"])) == {first: "yes", second: ""}
        message, active, _, history = tab.set_active(ctx, None, "ana")
        assert message.startswith("Calibration switched off") and active.startswith("**No calibration profile")
        info, rescored = tab.rescore_table(ctx, second, "", "", tab.ANY, "", True)
        assert info.startswith(f"6 of 6 cases re-scored under profile `{second}`") and len(rescored) == 6
        with pytest.raises(gr.Error, match="YYYY-MM-DD"):
            tab.fit(ctx, "last week", "", tab.ANY, "", "expert", "", "eer", "", True, "rita")
        with pytest.raises(gr.Error, match="target must be"):
            tab.fit(ctx, "", "", tab.ANY, "", "expert", "", "hter=0.1", "", True, "rita")
        with pytest.raises(gr.Error, match="at least 3 reviewed real faces"):
            tab.fit(ctx, "", "", "nobody", "", "expert", "", "eer", "", True, "rita")
    finally:
        ctx.runner.shutdown()
        ctx.storage.close()
        shutil.rmtree(ctx.png.root, ignore_errors=True)

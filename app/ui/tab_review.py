"""Review tab: replay a case turn by turn, override the verdict, write notes, flag turns, correct the
final answer, re-run an interrupted or failed investigation, and export the case report.

Saving goes through :func:`storage.reviews.submit_review` with the version the analyst loaded, so two
analysts never overwrite each other: a conflict is shown, nothing is lost. The reviewer is the login.
"""

from __future__ import annotations

from datetime import datetime, timezone

import gradio as gr

from storage import cases, models
from storage.errors import ConcurrentReviewError, InvalidReviewError, NotFoundError
from storage.investigations import calibration_meta, get_investigation, load_trajectory
from storage.models import TURN_FLAGS
from storage.reviews import NO_REVIEW, load_review, submit_review

from .context import AppContext
from .errors import UserError
from .render import Transcript, calibration_line, trajectory_messages, verdict_label
from .reports import write_case_report

VERDICTS = ["real", "spoof", "unsure"]


def flag_choice(index: int, flag: str) -> str:
    return f"turn {index}: {flag}"


def parse_flag_choices(values: list[str]) -> dict[int, list[str]]:
    flags: dict[int, list[str]] = {}
    for v in values or []:
        head, _, flag = v.partition(": ")
        flags.setdefault(int(head.split()[1]), []).append(flag)
    return flags


def summary(ctx: AppContext, inv_id: str) -> str:
    with ctx.storage.sessions() as s:
        inv = get_investigation(s, inv_id)
        case = inv.case
        review = load_review(s, inv_id)
        lines = [
            f"**Case** `{case.id}` · file {case.filename or '—'} · image SHA-256 `{case.image_sha256}` · uploaded by {case.created_by}"
            + (f" · attack type {case.attack_type}" if getattr(case, "attack_type", None) else ""),
            f"**Investigation** `{inv.id}` · policy `{inv.policy}` · status **{inv.status}**"
            + (f" · re-run of `{inv.rerun_of}`" if inv.rerun_of else "")
            + f" · started by {inv.started_by}",
            f"**Model verdict**: {verdict_label(inv.verdict)}"
            + (f" · P(spoof) = {inv.score_spoof:.3f}" if inv.score_spoof is not None else ""),
        ]
        calibration = calibration_line(calibration_meta(s, inv))
        if calibration:
            lines.append(calibration)
        if review:
            agree = (
                ""
                if review.verdict == "unsure" or inv.verdict is None
                else (" · agrees with the model" if review.verdict == inv.verdict else " · **overrides the model**")
            )
            lines.append(
                f"**Analyst verdict**: {verdict_label(review.verdict)} by {review.reviewer} (version {review.version}){agree}"
            )
        else:
            lines.append("**Analyst verdict**: not reviewed yet")
        if inv.status in ("interrupted", "failed"):
            lines.append(f"⚠️ {inv.error or ''} — use **Re-run** to investigate the same crop again.")
    return "\n\n".join(lines)


def open_case(ctx: AppContext, inv_id: str):
    """(chat, summary, verdict, notes, corrected answer, flag choices, version, attack type) of an investigation."""
    inv_id = (inv_id or "").strip()
    if not inv_id:
        raise UserError("give an investigation id (or pick a case in the Queue tab)")
    try:
        with ctx.storage.sessions() as s:
            traj = load_trajectory(s, ctx.storage.files, inv_id)
            review = load_review(s, inv_id)
            attack = getattr(get_investigation(s, inv_id).case, "attack_type", None) or ""
    except NotFoundError as exc:
        raise UserError(str(exc)) from None
    choices = [flag_choice(t.index, f) for t in traj.turns for f in TURN_FLAGS]
    if review:
        selected = [flag_choice(i, f) for i, fs in sorted(review.flags.items()) for f in fs]
        verdict, notes, corrected, version = review.verdict, review.notes, review.corrected_answer or "", review.version
    else:
        selected, verdict, notes, corrected, version = [], None, "", "", NO_REVIEW
    return (
        trajectory_messages(traj, ctx.png),
        summary(ctx, inv_id),
        verdict,
        notes,
        corrected,
        gr.update(choices=choices, value=selected),
        version,
        attack,
    )


def save(
    ctx: AppContext,
    inv_id: str,
    verdict: str | None,
    notes: str,
    corrected: str,
    flags: list[str],
    version: int,
    user: str,
    attack: str | None = None,
):
    inv_id = (inv_id or "").strip()
    if not inv_id:
        raise UserError("open a case first")
    if verdict not in VERDICTS:
        raise UserError("choose a verdict: real, spoof or unsure")
    try:
        with ctx.storage.sessions.begin() as s:
            state = submit_review(
                s,
                inv_id,
                reviewer=user,
                verdict=verdict,
                expected_version=int(version or 0),
                notes=notes or "",
                flags=parse_flag_choices(flags),
                corrected_answer=(corrected or "").strip() or None,
            )
            if attack is not None:
                # Same transaction: the verdict and the attack type are saved together or not at all.
                cases.set_attack_type(s, get_investigation(s, inv_id).case_id, attack or None, user=user)
    except (ConcurrentReviewError, InvalidReviewError, NotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    when = datetime.now(timezone.utc).strftime("%H:%M:%S UTC")
    gr.Info(f"review saved: {verdict_label(state.verdict)} (version {state.version})")
    return (
        state.verdict,
        f"Saved **{verdict_label(state.verdict)}** as {state.reviewer} at {when} (version {state.version}).",
        state.version,
        summary(ctx, inv_id),
    )


def build(ctx: AppContext, current: gr.Textbox):
    with gr.Row():
        inv_box = gr.Textbox(label="Investigation id", scale=4, elem_id="review-id")
        open_btn = gr.Button("Open", scale=1, elem_id="review-open")
        from_current = gr.Button("Open the current case", scale=1, elem_id="review-current")
    info = gr.Markdown(elem_id="review-summary")
    with gr.Row():
        with gr.Column(scale=3):
            chat = gr.Chatbot(label="Replay", height=520, elem_id="review-transcript")
        with gr.Column(scale=2):
            verdict = gr.Radio(VERDICTS, label="Analyst verdict", elem_id="review-verdict")
            with gr.Row():
                quick = {
                    v: gr.Button(f"{v.capitalize()} (Alt+{v[0].upper()})", elem_id=f"review-{v}", size="sm")
                    for v in VERDICTS
                }
            notes = gr.Textbox(label="Notes", lines=4, elem_id="review-notes")
            corrected = gr.Textbox(
                label="Corrected final answer (optional: the reasoning you would have written)", lines=3
            )
            attack = gr.Dropdown(
                ["", *models.ATTACK_TYPES], value="", label="Attack type of this case (empty: not set)"
            )
            flags = gr.CheckboxGroup([], label="Flag turns")
            version = gr.Number(value=NO_REVIEW, label="Review version you loaded", interactive=False, precision=0)
            save_btn = gr.Button("Save review (Alt+Enter)", variant="primary", elem_id="review-save")
            saved = gr.Markdown(elem_id="review-saved")
            with gr.Row():
                rerun_btn = gr.Button("Re-run this investigation", elem_id="review-rerun")
                report_btn = gr.Button("Case report (HTML)", elem_id="review-report")
            report_file = gr.File(label="Case report", interactive=False, elem_id="review-report-file")

    open_outputs = [chat, info, verdict, notes, corrected, flags, version, attack]

    def do_open(inv_id):
        return open_case(ctx, inv_id)

    def do_save(inv_id, verdict, notes, corrected, flags, version, attack, request: gr.Request):
        return save(ctx, inv_id, verdict, notes, corrected, flags, version, ctx.user(request), attack)

    def quick_save(v):
        def fn(inv_id, notes, corrected, flags, version, attack, request: gr.Request):
            return save(ctx, inv_id, v, notes, corrected, flags, version, ctx.user(request), attack)

        return fn

    def do_rerun(inv_id, request: gr.Request):
        inv_id = (inv_id or "").strip()
        try:
            job = ctx.runner.rerun(inv_id, user=ctx.user(request))
        except NotFoundError as exc:
            raise UserError(str(exc)) from None
        transcript = Transcript(ctx.png, [gr.ChatMessage(role="user", content=f"Re-run of `{inv_id}`")])
        for batch in job.stream_batches(timeout=600):
            for event in batch:
                transcript.on(event)
            yield transcript.messages(), job.investigation_id or inv_id
        job.wait(60)
        if job.error:
            raise UserError(f"re-run failed: {job.error}")

    def do_report(inv_id, request: gr.Request):
        return write_case_report(ctx, (inv_id or "").strip(), ctx.user(request))

    open_btn.click(do_open, inv_box, open_outputs, api_name="open_case")
    inv_box.submit(do_open, inv_box, open_outputs, api_name=False)
    from_current.click(lambda c: c, current, inv_box, api_name=False).then(
        do_open, inv_box, open_outputs, api_name=False
    )
    save_btn.click(
        do_save,
        [inv_box, verdict, notes, corrected, flags, version, attack],
        [verdict, saved, version, info],
        api_name="save_review",
    )
    for v, btn in quick.items():
        btn.click(
            quick_save(v),
            [inv_box, notes, corrected, flags, version, attack],
            [verdict, saved, version, info],
            api_name=f"review_{v}",
        )
    rerun_btn.click(do_rerun, inv_box, [chat, inv_box], api_name="rerun", concurrency_limit=None).then(
        do_open, inv_box, open_outputs, api_name=False
    )
    report_btn.click(do_report, inv_box, report_file, api_name="case_report")
    return inv_box, open_outputs, do_open

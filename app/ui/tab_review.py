"""Review tab: open a case (by investigation or case id, or from the Queue), see it in the shared case
view, override the verdict, write notes, flag turns, correct the final answer, re-run the investigation,
replay it step by step, read the case's history and export the case report.

A review belongs to the case and names the run it judged. Opening a run that has no review of its own
(e.g. a re-run) shows the case's latest review of an earlier run and asks whether it still holds; saving
it keeps it for this run. Saving goes through :func:`storage.reviews.submit_review` with the version the
analyst loaded (kept out of sight), so two analysts never overwrite each other: a conflict is shown,
nothing is lost. The reviewer is the login.
"""

from __future__ import annotations

from datetime import datetime, timezone

import gradio as gr
import pandas as pd

from app.case_report import change_text
from core.trajectory import Turn
from storage import cases, models
from storage.errors import ConcurrentReviewError, InvalidReviewError, NotFoundError
from storage.investigations import calibration_meta, get_investigation, load_trajectory
from storage.queries import case_history, latest_case_review, resolve_investigation
from storage.reviews import NO_REVIEW, load_review, submit_review

from .case_view import CaseView, load_snapshot, transcript, view_values
from .context import AppContext
from .errors import UserError
from .render import Transcript, calibration_line, trajectory_messages, verdict_label
from .reports import write_case_report
from .safe import md_text

VERDICTS = ["real", "spoof", "unsure"]
FLAG_WORDS = {"wrong_tool": "wrong tool", "wrong_reasoning": "wrong reasoning", "good_step": "good step"}
HISTORY_COLUMNS = ["when (UTC)", "who", "what", "about", "details"]


def flag_choice(index: int, flag: str) -> str:
    return f"turn {index}: {flag}"


def parse_flag_choices(values: list[str]) -> dict[int, list[str]]:
    flags: dict[int, list[str]] = {}
    for v in values or []:
        head, _, flag = v.partition(": ")
        flags.setdefault(int(head.split()[1]), []).append(flag)
    return flags


def flags_for(turn: Turn) -> list[str]:
    """The flags that fit a turn: "wrong tool" only where a tool was called."""
    if turn.tool_call is not None:
        return ["wrong_tool", "wrong_reasoning", "good_step"]
    if turn.parse_error and turn.fast is None and turn.think is None:
        return ["wrong_reasoning"]
    return ["wrong_reasoning", "good_step"]


def flag_choices(turns: list[Turn]) -> list[tuple[str, str]]:
    """(label, value) per flag of each turn; the value is what :func:`parse_flag_choices` reads."""
    out = []
    for t in turns:
        what = (
            "fast answer"
            if t.kind == "fast"
            else t.tool_call.name
            if t.tool_call is not None
            else "answer"
            if t.answer is not None
            else "error"
        )
        out += [(f"Turn {t.index} ({md_text(what)}): {FLAG_WORDS[f]}", flag_choice(t.index, f)) for f in flags_for(t)]
    return out


def summary(ctx: AppContext, inv_id: str) -> str:
    with ctx.storage.sessions() as s:
        inv = get_investigation(s, inv_id)
        case = inv.case
        review = load_review(s, inv_id)
        lines = [
            f"**Case** {case.id} · file {md_text(case.filename or '—')} · image SHA-256 {case.image_sha256} · "
            f"uploaded by {md_text(case.created_by)}"
            + (f" · attack type {case.attack_type}" if getattr(case, "attack_type", None) else ""),
            f"**Investigation** {inv.id} · policy {md_text(inv.policy)} · status **{inv.status}**"
            + (f" · re-run of {inv.rerun_of}" if inv.rerun_of else "")
            + f" · started by {md_text(inv.started_by)}",
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
                f"**Analyst verdict** of this run: {verdict_label(review.verdict)} by {md_text(review.reviewer)}{agree}"
            )
        else:
            lines.append("**Analyst verdict** of this run: not reviewed yet")
        if inv.status in ("interrupted", "failed"):
            lines.append(f"⚠️ {md_text(inv.error or '')} — use **Re-run** to investigate the same crop again.")
    return "\n\n".join(lines)


def earlier_review(ctx: AppContext, inv_id: str):
    """(banner, the earlier review) when this run has no review but another run of its case has."""
    with ctx.storage.sessions() as s:
        if load_review(s, inv_id) is not None:
            return "", None
        case_id = get_investigation(s, inv_id).case_id
        r = latest_case_review(s, case_id, exclude=inv_id)
    if r is None:
        return "", None
    banner = (
        f"⚠️ **This run has no review yet.** The case's review by {md_text(r.reviewer)} "
        f"({r.updated_at:%Y-%m-%d %H:%M} UTC) judged run {r.investigation_id} "
        f"(model said {verdict_label(r.model_verdict)}) and said **{verdict_label(r.verdict).upper()}**"
        + (f": {md_text(r.notes)}" if r.notes else "")
        + ". **Does it still hold for this run?** It is filled in below: save it to keep it for this run, "
        "or change it first."
    )
    return banner, r


def history_table(ctx: AppContext, inv_id: str) -> pd.DataFrame:
    """The case's history from the audit log: upload, runs, reviews, hand-run tools, reports, exports."""
    with ctx.storage.sessions() as s:
        rows = case_history(s, get_investigation(s, inv_id).case_id)
    data = [
        [
            f"{r.at:%Y-%m-%d %H:%M:%S}",
            r.actor,
            r.action,
            r.about,
            change_text(None, {k: v for k, v in (r.after or {}).items() if k not in ("version", "image_sha256")})[:300],
        ]
        for r in rows
    ]
    return pd.DataFrame(data, columns=HISTORY_COLUMNS)


def open_case(ctx: AppContext, inv_id: str):
    """(chat, summary, verdict, notes, corrected answer, flag choices, version, attack type, *case view,
    earlier-review banner, history) of an investigation (or of a case's latest run)."""
    inv_id = (inv_id or "").strip()
    if not inv_id:
        raise UserError("give an investigation or case id (or pick a case in the Queue tab)")
    try:
        with ctx.storage.sessions() as s:
            inv_id = resolve_investigation(s, inv_id)
            traj = load_trajectory(s, ctx.storage.files, inv_id)
            review = load_review(s, inv_id)
            attack = getattr(get_investigation(s, inv_id).case, "attack_type", None) or ""
    except NotFoundError as exc:
        raise UserError(str(exc)) from None
    banner, earlier = earlier_review(ctx, inv_id)
    if review:
        selected = [flag_choice(i, f) for i, fs in sorted(review.flags.items()) for f in fs]
        verdict, notes, corrected, version = review.verdict, review.notes, review.corrected_answer or "", review.version
    elif earlier is not None:  # asked whether it still holds: the earlier review, ready to save for this run
        selected, verdict, notes, corrected = [], earlier.verdict, earlier.notes, earlier.corrected_answer or ""
        version = NO_REVIEW
    else:
        selected, verdict, notes, corrected, version = [], None, "", "", NO_REVIEW
    return (
        trajectory_messages(traj, ctx.png),
        summary(ctx, inv_id),
        verdict,
        notes,
        corrected,
        gr.update(choices=flag_choices(traj.turns), value=selected),
        version,
        attack,
        inv_id,
        *view_values(ctx, load_snapshot(ctx, inv_id)),
        banner,
        history_table(ctx, inv_id),
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
            inv_id = resolve_investigation(s, inv_id)
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
    gr.Info(f"review saved: {verdict_label(state.verdict)}")
    return (
        state.verdict,
        f"Saved **{verdict_label(state.verdict)}** as {md_text(state.reviewer)} at {when}, for run {inv_id}.",
        state.version,
        summary(ctx, inv_id),
        "",  # the earlier-review question is answered
    )


def build(ctx: AppContext, current: gr.Textbox):
    with gr.Row():
        inv_box = gr.Textbox(label="Investigation or case id", scale=4, elem_id="review-id")
        open_btn = gr.Button("Open", scale=1, elem_id="review-open")
        from_current = gr.Button("Open the current case", scale=1, elem_id="review-current")
    view = CaseView(ctx, "review")
    view.build_card()
    info = gr.Markdown(elem_id="review-summary")
    banner = gr.Markdown(elem_id="review-earlier")
    with gr.Row():
        with gr.Column(scale=3):
            chat = transcript("The agent's turns", "review-transcript")
        with gr.Column(scale=2):
            verdict = gr.Radio(VERDICTS, label="Analyst verdict", elem_id="review-verdict")
            with gr.Row():
                quick = {
                    v: gr.Button(f"{v.capitalize()} (Alt+{v[0].upper()})", elem_id=f"review-{v}", size="sm")
                    for v in VERDICTS
                }
            notes = gr.Textbox(label="Notes", lines=4, elem_id="review-notes")
            corrected = gr.Textbox(
                label="Corrected final answer (optional: the reasoning you would have written)",
                lines=3,
                elem_id="review-corrected",
            )
            attack = gr.Dropdown(
                ["", *models.ATTACK_TYPES], value="", label="Attack type of this case (empty: not set)"
            )
            flags = gr.CheckboxGroup([], label="Flag turns", elem_id="review-flags")
            # The version the form was loaded at (optimistic locking): needed to save, not for the analyst.
            version = gr.Number(value=NO_REVIEW, visible=False, precision=0)
            save_btn = gr.Button("Save review (Alt+Enter)", variant="primary", elem_id="review-save")
            saved = gr.Markdown(elem_id="review-saved")
            with gr.Row():
                rerun_btn = gr.Button("Re-run this investigation", elem_id="review-rerun")
                report_btn = gr.Button("Case report (HTML)", elem_id="review-report")
            report_file = gr.File(label="Case report", interactive=False, elem_id="review-report-file")
    view.build_panels()
    view.wire(inv_box, chat, api=False)
    with gr.Accordion("Case history (runs, reviews, reports, exports: from the audit log)", open=False):
        history = gr.Dataframe(
            headers=HISTORY_COLUMNS, interactive=False, wrap=True, elem_id="review-history", max_height=360
        )

    open_outputs = [
        chat,
        info,
        verdict,
        notes,
        corrected,
        flags,
        version,
        attack,
        inv_box,
        *view.outputs,
        banner,
        history,
    ]

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
        transcript = Transcript(ctx.png, [gr.ChatMessage(role="user", content=f"Re-run of {inv_id}")])
        for batch in job.stream_batches(timeout=600):
            for event in batch:
                transcript.on(event)
            yield transcript.messages(), job.investigation_id or inv_id
        job.wait(60)
        if job.error:
            raise UserError(f"re-run failed: {job.error}")

    def do_report(inv_id, request: gr.Request):
        return write_case_report(ctx, (inv_id or "").strip(), ctx.user(request))

    saved_outputs = [verdict, saved, version, info, banner]
    open_btn.click(do_open, inv_box, open_outputs, api_name="open_case")
    inv_box.submit(do_open, inv_box, open_outputs, api_name=False)
    from_current.click(lambda c: c, current, inv_box, api_name=False).then(
        do_open, inv_box, open_outputs, api_name=False
    )
    save_btn.click(
        do_save, [inv_box, verdict, notes, corrected, flags, version, attack], saved_outputs, api_name="save_review"
    ).then(lambda i: history_table(ctx, i), inv_box, history, api_name=False)
    for v, btn in quick.items():
        btn.click(
            quick_save(v),
            [inv_box, notes, corrected, flags, version, attack],
            saved_outputs,
            api_name=f"review_{v}",
        ).then(lambda i: history_table(ctx, i), inv_box, history, api_name=False)
    rerun_btn.click(do_rerun, inv_box, [chat, inv_box], api_name="rerun", concurrency_limit=None).then(
        do_open, inv_box, open_outputs, api_name=False
    )
    report_btn.click(do_report, inv_box, report_file, api_name="case_report")
    return inv_box, open_outputs, do_open

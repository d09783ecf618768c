"""Calibration tab: fit a calibration profile on reviewed cases (filtered by upload date, uploader and
source), see what it changes (confusion matrices, HTER, ROC with the old and the new operating point),
activate it for new investigations, roll back to an earlier profile, and re-score old cases under a
profile as a view (what the agent said at the time is never overwritten).

Fitting is :func:`app.calibration.fit_from_reviews`; profiles and activations are kept, audited, by
:mod:`storage.calibration`; the runner applies the active profile to every new investigation.
"""

from __future__ import annotations

from datetime import date

import gradio as gr
import pandas as pd

from app.calibration import CalibrationFit, CalibrationInputError, fit_from_reviews, rescore
from app.review_metrics import confusion_matrix_figure, roc_comparison_figure
from app.runner import RunSettings
from core.calibration import ProfileError, Target
from core.errors import TarfasError
from core.policies import readers_for
from storage import calibration as profiles
from storage.queries import RunFilter, uploaders

from .context import AppContext
from .errors import UserError
from .tab_investigate import TOOLS

TARGETS = ["eer", "apcer=0.05", "bpcer=0.05", "apcer=0.01", "bpcer=0.01"]
ANY = "anyone"
PROFILE_COLUMNS = [
    "profile",
    "name",
    "active",
    "policy",
    "version",
    "threshold",
    "target",
    "reviews (real/spoof)",
    "HTER before",
    "HTER after (CV)",
    "saved by",
    "saved (UTC)",
    "activations",
]
HISTORY_COLUMNS = ["when (UTC)", "who", "action", "profile", "name", "threshold"]
RESCORE_COLUMNS = [
    "investigation",
    "file",
    "uploaded (UTC)",
    "analyst",
    "recorded verdict",
    "recorded P(spoof)",
    "recorded with profile",
    "re-scored P(spoof)",
    "re-scored verdict",
    "changed",
    "note",
]


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _day(text: str | None, what: str) -> date | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise UserError(f"{what} must be a date YYYY-MM-DD (or empty), got {text!r}") from None


def run_filter(since, until, uploader, source, *, reviewed_only: bool = True) -> RunFilter:
    try:
        return RunFilter(
            since=_day(since, "'uploaded from'"),
            until=_day(until, "'uploaded until'"),
            uploader=None if uploader in (None, "", ANY) else uploader,
            source=(source or "").strip() or None,
            reviewed_only=reviewed_only,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _policy(ctx: AppContext, name: str, args: str):
    """The policy as loaded by the runner, uncalibrated (a profile maps its own scores)."""
    try:
        return ctx.runner.policy(ctx.settings_for(name, args, max_tool_calls=3, tools=TOOLS, on_no_face="error"))
    except (TarfasError, ValueError, TypeError) as exc:
        raise UserError(f"policy {name!r} could not be loaded: {exc}") from None


# --- what the tab shows ----------------------------------------------------------------------------
def active_text(ctx: AppContext) -> str:
    with ctx.storage.sessions() as s:
        history = profiles.activation_history(s, limit=1)
        try:
            active = profiles.active_profile(s)
        except (TarfasError, LookupError) as exc:
            return f"⚠️ **The active calibration profile cannot be used**: {exc}"
    if active is None:
        default = ctx.runner.policy(RunSettings()) if _loads(ctx) else None
        own = getattr(default, "threshold", None)
        return "**No calibration profile is active**: new investigations decide with the policy's own threshold" + (
            f" ({own:.3f})." if own is not None else "."
        )
    a = history[0]
    name = f" '{active.name}'" if active.name else ""
    return (
        f"**Active calibration profile** `{active.id}`{name}: threshold **{active.threshold:.3f}** ({active.target}, "
        f"{active.n_reviews} reviews) for `{active.policy}` [{active.policy_version}], since "
        f"{a.activated_at:%Y-%m-%d %H:%M:%S} UTC ({a.action} by {a.activated_by}). New investigations by that policy "
        "use it; any other policy's investigations say that it was not applied."
    )


def _bank(ctx: AppContext, policy_name: str):
    """The expert bank that reads faces for ``policy_name`` as the runner loads it by name (the shipped
    bank for a policy that needs arguments to load)."""
    try:
        return readers_for(ctx.runner.policy(RunSettings.make(policy_name)))
    except Exception:  # noqa: BLE001 (e.g. hf without its model path: its readers are the shipped bank)
        return readers_for(None)


def _loads(ctx: AppContext) -> bool:
    try:
        ctx.runner.policy(RunSettings())
        return True
    except Exception:  # noqa: BLE001 (no weights installed)
        return False


def profile_table(ctx: AppContext) -> pd.DataFrame:
    with ctx.storage.sessions() as s:
        rows = profiles.list_profiles(s)
    return pd.DataFrame(
        [
            [
                p.id,
                p.name,
                "yes" if p.active else "",
                p.policy,
                p.policy_version,
                round(p.threshold, 4),
                p.target,
                f"{p.n_reviews} ({p.n_real}/{p.n_spoof})",
                _pct((p.metrics.get("before") or {}).get("hter")),
                _pct((p.metrics.get("after") or {}).get("hter")),
                p.created_by,
                f"{p.created_at:%Y-%m-%d %H:%M}",
                p.activations,
            ]
            for p in rows
        ],
        columns=PROFILE_COLUMNS,
    )


def history_table(ctx: AppContext) -> pd.DataFrame:
    with ctx.storage.sessions() as s:
        rows = profiles.activation_history(s)
    return pd.DataFrame(
        [
            [
                f"{a.activated_at:%Y-%m-%d %H:%M:%S}",
                a.activated_by,
                a.action,
                a.profile_id or "(none: the policy's own threshold)",
                a.name or "",
                "" if a.threshold is None else round(a.threshold, 4),
            ]
            for a in rows
        ],
        columns=HISTORY_COLUMNS,
    )


def overview(ctx: AppContext):
    """(active profile, profiles, activation history, uploader choices) as they are now."""
    with ctx.storage.sessions() as s:
        people = uploaders(s)
    return active_text(ctx), profile_table(ctx), history_table(ctx), gr.update(choices=[ANY, *people])


def fit_text(fit: CalibrationFit) -> str:
    p = fit.profile
    before, after = p.metrics.get("before"), p.metrics["after"]
    name = f" '{p.name}'" if p.name else ""
    lines = [
        f"**Profile `{p.id}`**{name} for `{p.policy}` [{p.policy_version}], fitted on **{p.n_reviews}** reviewed cases "
        f"({p.n_real} real, {p.n_spoof} spoof), target {p.target}, prior strength {p.prior_strength:g}"
        + (", reads the faces' RGB features" if p.features else "")
        + ". Saved, **not active yet**: activate it below for new investigations.",
    ]
    if fit.left_out:
        lines.append("Left out: " + "; ".join(f"{n} {why}" for why, n in fit.left_out.items()) + ".")
    rows = ["| | threshold | AUC | APCER | BPCER | HTER |", "|---|---|---|---|---|---|"]
    if before:
        rows.append(
            f"| policy as shipped | {before['threshold']:.3f} | {_pct(before['auc'])} | {_pct(before['apcer'])} "
            f"| {_pct(before['bpcer'])} | **{_pct(before['hter'])}** |"
        )
    rows.append(
        f"| with the profile (nested cross-validation) | {p.threshold:.3f} | {_pct(after['auc'])} | {_pct(after['apcer'])} "
        f"| {_pct(after['bpcer'])} | **{_pct(after['hter'])}** |"
    )
    lines.append("\n".join(rows))
    lines.append(
        "_After_ is measured on reviews each profile was not fitted on, so it is what the profile will do on "
        "the next cases of these cameras, not a fit to these."
    )
    return "\n\n".join(lines)


def fit_figures(fit: CalibrationFit):
    roc = roc_comparison_figure(
        [
            ("policy as shipped", fit.roc_before, fit.point_before),
            ("with the profile (cross-validated)", fit.roc_after, fit.point_after),
        ]
    )
    before = fit.confusion_before
    cm_before = confusion_matrix_figure(before or [[0, 0], [0, 0]], "before: policy as shipped")
    cm_after = confusion_matrix_figure(fit.confusion_after, "after: with the profile (CV)")
    return roc, cm_before, cm_after


def fit(ctx: AppContext, since, until, uploader, source, policy_name, policy_args, target, name, features, user):
    try:
        Target.parse(target or "eer")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    policy = _policy(ctx, policy_name, policy_args)
    try:
        result = fit_from_reviews(
            ctx.storage,
            policy,
            filters=run_filter(since, until, uploader, source),
            target=target or "eer",
            name=(name or "").strip(),
            user=user,
            features=bool(features),
            bank=readers_for(policy),
        )
    except (CalibrationInputError, ProfileError, ValueError) as exc:
        raise UserError(str(exc)) from None
    with ctx.storage.sessions.begin() as s:
        profiles.save_profile(s, result.profile, user=user)
    gr.Info(f"profile {result.profile.id} fitted on {result.profile.n_reviews} reviewed cases and saved")
    return (fit_text(result), *fit_figures(result), result.profile.id, profile_table(ctx))


def set_active(ctx: AppContext, profile_id: str | None, user: str):
    try:
        with ctx.storage.sessions.begin() as s:
            entry = profiles.activate(s, profile_id, user=user)
    except (TarfasError, LookupError) as exc:
        raise UserError(str(exc)) from None
    if entry.profile_id is None:
        message = "Calibration switched off: new investigations use the policy's own threshold."
    else:
        verb = {"rollback": "Rolled back to", "activate": "Activated"}[entry.action]
        message = f"{verb} profile `{entry.profile_id}` for new investigations (threshold {entry.threshold:.3f})."
        default = ctx.runner.policy(RunSettings()) if _loads(ctx) else None
        with ctx.storage.sessions() as s:
            p = profiles.load_profile(s, entry.profile_id)
        if default is not None and (p.policy, p.policy_version) != (default.name, getattr(default, "version", "")):
            message += (
                f" Note: it was fitted for `{p.policy}` [{p.policy_version}]; investigations by `{default.name}` "
                f"[{getattr(default, 'version', '')}] will not be calibrated and say so."
            )
    gr.Info(message.replace("`", ""))
    return message, active_text(ctx), profile_table(ctx), history_table(ctx)


def rescore_table(
    ctx: AppContext, profile_id, since, until, uploader, source, reviewed_only
) -> tuple[str, pd.DataFrame]:
    profile_id = (profile_id or "").strip()
    if not profile_id:
        raise UserError("give a profile id (fit one, or copy one from the list of profiles)")
    try:
        with ctx.storage.sessions() as s:
            profile = profiles.load_profile(s, profile_id)
        rows = rescore(
            ctx.storage,
            profile,
            filters=run_filter(since, until, uploader, source, reviewed_only=bool(reviewed_only)),
            bank=_bank(ctx, profile.policy),
        )
    except (TarfasError, LookupError, ValueError) as exc:
        raise UserError(str(exc)) from None
    table = pd.DataFrame(
        [
            [
                r.run.investigation_id,
                r.run.filename or "",
                f"{r.run.uploaded_at:%Y-%m-%d %H:%M}",
                r.run.analyst_verdict or "",
                r.run.verdict or "",
                None if r.run.score_spoof is None else round(r.run.score_spoof, 4),
                r.run.calibration_profile_id or "",
                None if r.p_spoof is None else round(r.p_spoof, 4),
                r.verdict or "",
                "yes" if r.changed else "",
                r.note,
            ]
            for r in rows
        ],
        columns=RESCORE_COLUMNS,
    )
    done = [r for r in rows if r.p_spoof is not None]
    changed = sum(r.changed for r in done)
    info = (
        f"{len(done)} of {len(rows)} cases re-scored under profile `{profile.id}` (threshold {profile.threshold:.3f}); "
        f"**{changed}** would get another verdict. This is a view: the recorded verdicts are unchanged."
    )
    return info, table


# --- layout ----------------------------------------------------------------------------------------
def build(ctx: AppContext):
    active = gr.Markdown(elem_id="calibration-active")
    with gr.Accordion("Fit a profile on reviewed cases", open=True):
        gr.Markdown(
            "A profile maps the policy's P(spoof) (and the face's RGB features) to a calibrated P(spoof) and sets the "
            "decision threshold, from your analysts' reviews of cases from your own cameras. Unsure reviews are left out."
        )
        with gr.Row():
            since = gr.Textbox(label="Uploaded from (YYYY-MM-DD, UTC)", placeholder="any", elem_id="calibration-since")
            until = gr.Textbox(label="Uploaded until (YYYY-MM-DD, UTC)", placeholder="any", elem_id="calibration-until")
            uploader = gr.Dropdown([ANY], value=ANY, label="Uploaded by", allow_custom_value=True)
            source = gr.Textbox(label="Source (part of the file name or path)", elem_id="calibration-source")
        with gr.Row():
            policy = gr.Dropdown(ctx.catalog.names(), value="expert", label="Policy")
            policy_args = gr.Textbox(label="Policy arguments (key=value, as in Investigate)")
            target = gr.Dropdown(
                TARGETS, value="eer", allow_custom_value=True, label="Threshold target (eer, apcer=R or bpcer=R)"
            )
            name = gr.Textbox(label="Profile name (e.g. the site or camera)", elem_id="calibration-name")
            features = gr.Checkbox(True, label="Also read the faces' RGB features")
        fit_btn = gr.Button("Fit profile", variant="primary", elem_id="calibration-fit")
        fit_info = gr.Markdown(elem_id="calibration-fit-info")
        with gr.Row():
            roc = gr.Plot(label="ROC: old and new operating point")
            cm_before = gr.Plot(label="Confusion before")
            cm_after = gr.Plot(label="Confusion after")
    gr.Markdown("### Profiles")
    with gr.Row():
        profile_id = gr.Textbox(label="Profile id", scale=3, elem_id="calibration-profile-id")
        activate_btn = gr.Button(
            "Activate (or roll back to) this profile", variant="primary", scale=2, elem_id="calibration-activate"
        )
        deactivate_btn = gr.Button("Switch calibration off", scale=1, elem_id="calibration-deactivate")
    status = gr.Markdown(elem_id="calibration-status")
    table = gr.Dataframe(
        headers=PROFILE_COLUMNS,
        label="Stored profiles (click a row to pick it)",
        interactive=False,
        elem_id="calibration-profiles",
    )
    history = gr.Dataframe(
        headers=HISTORY_COLUMNS,
        label="Activation history (newest first)",
        interactive=False,
        elem_id="calibration-history",
    )
    with gr.Accordion("Re-score old cases under this profile (a view: nothing is written)", open=False):
        with gr.Row():
            reviewed_only = gr.Checkbox(True, label="Reviewed cases only")
            rescore_btn = gr.Button("Re-score the filtered cases", elem_id="calibration-rescore")
        rescore_info = gr.Markdown(elem_id="calibration-rescore-info")
        rescore_out = gr.Dataframe(
            headers=RESCORE_COLUMNS, interactive=False, wrap=True, elem_id="calibration-rescored"
        )

    filters = [since, until, uploader, source]

    def do_fit(since, until, uploader, source, policy, policy_args, target, name, features, request: gr.Request):
        return fit(ctx, since, until, uploader, source, policy, policy_args, target, name, features, ctx.user(request))

    def do_activate(pid, request: gr.Request):
        pid = (pid or "").strip()
        if not pid:
            raise UserError("give the id of the profile to activate (fit one, or pick one in the list)")
        return set_active(ctx, pid, ctx.user(request))

    def do_deactivate(request: gr.Request):
        return set_active(ctx, None, ctx.user(request))

    def pick(evt: gr.SelectData):
        row = evt.row_value or []
        if not row or not row[0]:
            raise UserError("this row has no profile")
        return str(row[0])

    fit_btn.click(
        do_fit,
        [*filters, policy, policy_args, target, name, features],
        [fit_info, roc, cm_before, cm_after, profile_id, table],
        api_name="calibration_fit",
    )
    activate_btn.click(do_activate, profile_id, [status, active, table, history], api_name="calibration_activate")
    deactivate_btn.click(do_deactivate, None, [status, active, table, history], api_name="calibration_deactivate")
    table.select(pick, None, profile_id, api_name=False)
    rescore_btn.click(
        lambda pid, *f: rescore_table(ctx, pid, *f),
        [profile_id, *filters, reviewed_only],
        [rescore_info, rescore_out],
        api_name="calibration_rescore",
    )
    return lambda: overview(ctx), [active, table, history, uploader]

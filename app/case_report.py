"""One self-contained HTML report of an investigation, for records and for showing how a verdict was
reached: the evidence (source image SHA-256, face box, crop), the policy, every turn with its tool
images and expert P(spoof trace), the tools an analyst ran by hand (apart from the agent's turns), the final verdict and score with the decision threshold it was compared
with (the calibration profile's, when the run had one), the analyst's review and the audit trail.

The file needs nothing else: images are PNG data URIs, the CSS is inline, there is no script and no
external URL. Every text is HTML-escaped (Jinja2 autoescape): model output is untrusted.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from jinja2 import Environment, StrictUndefined
from PIL import Image, ImageDraw
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, selectinload

from core.errors import InputImageError
from core.faces import load_image
from storage.analyst_actions import list_actions
from storage.calibration import ENTITY as CALIBRATION_ENTITY
from storage.cases import record_export
from storage.db import Storage
from storage.errors import NotFoundError
from storage.filestore import FileStore
from storage.models import (
    AuditEvent,
    CalibrationProfileRecord,
    DatasetExportItem,
    Export,
    Investigation,
    Review,
    Turn,
    TurnFlag,
)

PREVIEW_MAX_SIDE = 480  # the uploaded image is shown downscaled; its hash is of the original bytes


@dataclass
class CaseReport:
    """A report that was handed out and recorded as an :class:`storage.models.Export` (format "html")."""

    export_id: int
    filename: str
    file_sha256: str
    html: str
    path: Path | None = None  # where it was written, when an out_dir was given


def export_case_report(storage: Storage, inv_id: str, user: str, *, out_dir: str | Path | None = None) -> CaseReport:
    """Build the report, keep a copy in the file store and record who took it (audited); with ``out_dir``
    also write it there (e.g. for a download button)."""
    html = case_report_html(storage, inv_id, generated_by=user)
    data = html.encode("utf-8")
    with storage.sessions.begin() as s:
        inv = s.get(Investigation, inv_id)
        if inv is None:
            raise NotFoundError(f"no investigation {inv_id!r} in this database")
        filename = f"tarfas-case-{inv.case_id[:8]}-{inv_id[:8]}.html"
        exp = record_export(s, storage.files, inv_id, data, format="html", filename=filename, user=user)
        export_id, sha = exp.id, exp.file_sha256
    path = None
    if out_dir is not None:
        path = Path(out_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return CaseReport(export_id, filename, sha, html, path)


def case_report_html(storage: Storage, investigation_id: str, *, generated_by: str | None = None) -> str:
    """The report of one investigation as one HTML document (a str)."""
    with storage.sessions() as s:
        ctx = _context(s, storage.files, investigation_id)
    ctx["generated_at"] = _time(datetime.now(timezone.utc))
    ctx["generated_by"] = generated_by
    return _TEMPLATE.render(**ctx)


# --- gathering ------------------------------------------------------------------------------------
def _context(s: Session, files: FileStore, inv_id: str) -> dict:
    inv = s.scalars(
        select(Investigation)
        .where(Investigation.id == inv_id)
        .options(
            selectinload(Investigation.case),
            selectinload(Investigation.turns).selectinload(Turn.tool_result),
            selectinload(Investigation.review).selectinload(Review.flags).selectinload(TurnFlag.turn),
        )
    ).one_or_none()
    if inv is None:
        raise NotFoundError(f"no investigation {inv_id!r} in this database")
    case, review = inv.case, inv.review
    flags: dict[int, list[str]] = {}
    if review is not None:
        for f in review.flags:
            flags.setdefault(f.turn.index, []).append(f.flag)

    turns = []
    for t in inv.turns:
        r = t.tool_result
        turns.append(
            {
                "index": t.index,
                "kind": t.kind,
                "text": t.text,
                "fast": t.fast,
                "think": t.think,
                "tool_call": t.tool_call,
                "arguments": json.dumps(t.tool_call.get("arguments", {}), ensure_ascii=False) if t.tool_call else None,
                "tool": None
                if r is None
                else {
                    "name": r.name,
                    "arguments": json.dumps(r.arguments, ensure_ascii=False),
                    "stats": r.stats,
                    "expert_p_spoof": r.expert_p_spoof,
                    "elapsed_ms": r.elapsed_ms,
                    "image": _data_uri(files.read(r.image_sha256)) if r.image_sha256 else None,
                    "image_sha256": r.image_sha256,
                },
                "answer": t.answer,
                "parse_error": t.parse_error,
                "tool_error": t.tool_error,
                "score_spoof": t.score_spoof,
                "elapsed_ms": t.elapsed_ms,
                "flags": flags.get(t.index, []),
            }
        )

    turn_index = {str(t.id): t.index for t in inv.turns}
    turn_ids = list(turn_index)
    export_ids = [str(i) for i in s.scalars(select(Export.id).where(Export.investigation_id == inv.id))]
    dataset_ids = [
        str(i)
        for i in s.scalars(
            select(DatasetExportItem.dataset_export_id).where(DatasetExportItem.investigation_id == inv.id)
        )
    ]
    about = [
        and_(AuditEvent.entity == "case", AuditEvent.entity_id == case.id),
        and_(AuditEvent.entity == "investigation", AuditEvent.entity_id == inv.id),
        and_(AuditEvent.entity == "turn", AuditEvent.entity_id.in_(turn_ids)),
        and_(AuditEvent.entity == "export", AuditEvent.entity_id.in_(export_ids)),
        and_(AuditEvent.entity == "dataset_export", AuditEvent.entity_id.in_(dataset_ids)),
    ]
    if review is not None:
        about.append(and_(AuditEvent.entity == "review", AuditEvent.entity_id == str(review.id)))
    profile = s.get(CalibrationProfileRecord, inv.calibration_profile_id) if inv.calibration_profile_id else None
    if profile is not None:  # who saved and activated the profile this verdict was decided with
        about.append(and_(AuditEvent.entity == CALIBRATION_ENTITY, AuditEvent.entity_id == profile.id))
    events = s.scalars(select(AuditEvent).where(or_(*about)).order_by(AuditEvent.at, AuditEvent.id)).all()

    return {
        "case": {
            "id": case.id,
            "filename": case.filename,
            "image_sha256": case.image_sha256,
            "byte_size": case.byte_size,
            "created_by": case.created_by,
            "created_at": _time(case.created_at),
            "attack_type": case.attack_type,
        },
        "inv": {
            "id": inv.id,
            "policy": inv.policy,
            "policy_version": inv.policy_version,
            "status": inv.status,
            "verdict": inv.verdict,
            "score_spoof": inv.score_spoof,
            "final_source": inv.final_source,
            "error": inv.error,
            "started_by": inv.started_by,
            "started_at": _time(inv.started_at),
            "finished_at": _time(inv.finished_at),
            "rerun_of": inv.rerun_of,
            "params": json.dumps(inv.params or {}, ensure_ascii=False, sort_keys=True),
            "tools": ", ".join(inv.tools or []),
            "timings": {k: round(v, 1) for k, v in (inv.timings_ms or {}).items()},
        },
        "calibration": {
            "profile": None
            if profile is None
            else {
                "id": profile.id,
                "name": profile.name,
                "threshold": profile.profile.get("threshold"),
                "target": profile.profile.get("target"),
                "n_reviews": profile.profile.get("n_reviews"),
                "n_real": profile.profile.get("n_real"),
                "n_spoof": profile.profile.get("n_spoof"),
                "features": profile.profile.get("features"),
                "created_by": profile.created_by,
                "created_at": _time(profile.created_at),
            },
            "note": inv.calibration_note,
        },
        "face": inv.face,
        "crop": _data_uri(files.read(inv.crop_sha256)) if inv.crop_sha256 else None,
        "crop_sha256": inv.crop_sha256,
        "source_preview": _source_preview(
            files, case.image_sha256, (inv.face or {}).get("bbox"), (inv.face or {}).get("crop_box")
        ),
        "turns": turns,
        "actions": [
            {
                "id": a.id,
                "tool": a.tool,
                "actor": a.actor,
                "at": _time(a.created_at),
                "arguments": json.dumps(a.arguments, ensure_ascii=False),
                "stats": a.stats,
                "expert_p_spoof": a.expert_p_spoof,
                "image": _data_uri(files.read(a.image_sha256)) if a.image_sha256 else None,
                "image_sha256": a.image_sha256,
            }
            for a in list_actions(s, inv.id)
        ],
        "review": None
        if review is None
        else {
            "verdict": review.verdict,
            "notes": review.notes,
            "corrected_answer": review.corrected_answer,
            "reviewer": review.reviewer,
            "version": review.version,
            "created_at": _time(review.created_at),
            "updated_at": _time(review.updated_at),
            "flags": sorted(flags.items()),
        },
        "audit": [
            {
                "at": _time(e.at),
                "actor": e.actor,
                "action": e.action,
                "entity": _entity(e, turn_index),
                "change": change_text(e.before, e.after),
            }
            for e in events
        ],
    }


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _source_preview(files: FileStore, sha: str, bbox, crop_box) -> str | None:
    """The uploaded image, downscaled, with the detected face box (red) and the region cropped (blue)
    drawn; None if it cannot be decoded. Boxes are (x1, y1, x2, y2) in source pixels."""
    try:
        rgb = load_image(files.read(sha), name="the case image")
    except InputImageError:
        return None
    im = Image.fromarray(rgb)
    draw, line = ImageDraw.Draw(im), max(2, round(max(im.size) / 200))
    if crop_box:
        draw.rectangle(list(crop_box), outline=(40, 90, 255), width=line)
    if bbox:
        draw.rectangle(list(bbox), outline=(255, 0, 0), width=line)
    im.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return _data_uri(buf.getvalue())


def _entity(e: AuditEvent, turn_index: dict[str, int]) -> str:
    if e.entity == "turn" and e.entity_id in turn_index:
        return f"turn {turn_index[e.entity_id]} (row {e.entity_id})"  # the turn numbers shown above
    return f"{e.entity} {e.entity_id}"


def change_text(before, after) -> str:
    if before is None and after is None:
        return ""
    if before is None:
        return json.dumps(after, ensure_ascii=False, sort_keys=True)
    keys = sorted(set(before or {}) | set(after or {}))
    changed = {k: [before.get(k), (after or {}).get(k)] for k in keys if before.get(k) != (after or {}).get(k)}
    return " ; ".join(
        f"{k}: {json.dumps(a, ensure_ascii=False)} -> {json.dumps(b, ensure_ascii=False)}"
        for k, (a, b) in changed.items()
    )


def _time(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    dt = dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)  # SQLite returns naive UTC
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pct(p) -> str:
    return "—" if p is None else f"{p:.3f}"


_ENV = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_ENV.filters["p"] = _pct
_ENV.filters["num"] = lambda v: f"{v:.4g}" if isinstance(v, float) else v
_ENV.filters["box"] = lambda b: f"x1={b[0]}, y1={b[1]}, x2={b[2]}, y2={b[3]} ({b[2] - b[0]}x{b[3] - b[1]} px)"
_ENV.filters["verdict"] = lambda v: {"real": "REAL", "spoof": "SPOOF", "unsure": "UNSURE"}.get(v or "", "—")

_TEMPLATE = _ENV.from_string("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="tarfas case report">
<title>tarfas case report: {{ case.filename or case.id }} ({{ inv.verdict | verdict }})</title>
<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330; max-width: 980px; margin: 24px auto; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; border-bottom: 1px solid #d5d9e0; padding-bottom: 3px; margin-top: 28px; }
table.kv { border-collapse: collapse; } table.kv th { text-align: left; font-weight: 600; padding: 2px 14px 2px 0; vertical-align: top; white-space: nowrap; }
table.kv td { padding: 2px 0; } code, pre, .mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12.5px; }
.sha { word-break: break-all; } pre { white-space: pre-wrap; word-break: break-word; background: #f5f6f8; border: 1px solid #e2e5ea; padding: 8px; border-radius: 4px; }
.verdict { display: inline-block; padding: 2px 10px; border-radius: 4px; font-weight: 700; color: #fff; }
.v-spoof { background: #b3261e; } .v-real { background: #1e7b34; } .v-unsure, .v-none { background: #6b7280; }
.turn { border: 1px solid #d5d9e0; border-radius: 6px; padding: 10px 14px; margin: 12px 0; page-break-inside: avoid; }
.turn h3 { font-size: 15px; margin: 0 0 6px; } .error { color: #b3261e; font-weight: 600; }
.flag { display: inline-block; background: #fff3cd; border: 1px solid #e0c766; border-radius: 3px; padding: 0 6px; margin-right: 4px; font-size: 12px; }
.images { display: flex; gap: 16px; flex-wrap: wrap; align-items: flex-start; } figure { margin: 0; max-width: 480px; } figcaption { font-size: 12px; color: #555; }
img { border: 1px solid #ccd; image-rendering: pixelated; } .muted { color: #667; }
table.audit { border-collapse: collapse; width: 100%; font-size: 12.5px; } table.audit th, table.audit td { border-bottom: 1px solid #e2e5ea; text-align: left; padding: 3px 6px; vertical-align: top; }
table.audit td.change { word-break: break-word; }
</style>
</head>
<body>
<h1>Case report: {{ case.filename or "(no file name)" }}</h1>
<p class="muted">Generated {{ generated_at }}{% if generated_by %} by {{ generated_by }}{% endif %} by tarfas. Investigation {{ inv.id }} of case {{ case.id }}.</p>

<h2>Outcome</h2>
<table class="kv">
<tr><th>Model verdict</th><td><span class="verdict v-{{ inv.verdict or 'none' }}">{{ inv.verdict | verdict }}</span> P(spoof) = {{ inv.score_spoof | p }}{% if inv.final_source and inv.final_source != "answer" %} <span class="muted">(from {{ inv.final_source }})</span>{% endif %}</td></tr>
<tr><th>Analyst verdict</th><td>{% if review %}<span class="verdict v-{{ review.verdict }}">{{ review.verdict | verdict }}</span> by {{ review.reviewer }}{% else %}<span class="muted">not reviewed</span>{% endif %}</td></tr>
<tr><th>Decision threshold</th><td>{% if calibration.profile %}{{ calibration.profile.threshold | p }} of calibration profile <span class="mono">{{ calibration.profile.id }}</span>{% if calibration.profile.name %} &ldquo;{{ calibration.profile.name }}&rdquo;{% endif %} <span class="muted">(target {{ calibration.profile.target }}, fitted on {{ calibration.profile.n_reviews }} reviewed cases: {{ calibration.profile.n_real }} real, {{ calibration.profile.n_spoof }} spoof{% if calibration.profile.features %}; reads {{ calibration.profile.features }}{% endif %}; saved by {{ calibration.profile.created_by }} at {{ calibration.profile.created_at }})</span>; the P(spoof) above is calibrated by it{% else %}the policy's own (no calibration profile was applied){% endif %}{% if calibration.note %} <span class="error">{{ calibration.note }}</span>{% endif %}</td></tr>
<tr><th>Status</th><td>{{ inv.status }}{% if inv.error %} <span class="error">{{ inv.error }}</span>{% endif %}</td></tr>
</table>

<h2>Evidence</h2>
<table class="kv">
<tr><th>Source image SHA-256</th><td class="mono sha">{{ case.image_sha256 }}</td></tr>
<tr><th>File</th><td>{{ case.filename or "—" }} ({{ case.byte_size }} bytes), submitted by {{ case.created_by }} at {{ case.created_at }}</td></tr>
<tr><th>Attack type</th><td>{{ case.attack_type or "not set" }}</td></tr>
{% if face %}
<tr><th>Face box</th><td>{% if face.bbox %}{{ face.bbox | box }}{% else %}no face detected{% endif %} in a {{ face.source_size | join("x") }} image</td></tr>
<tr><th>Crop box</th><td>{{ face.crop_box | box }}, resized to 224x224{% if face.notes %}; {{ face.notes | join("; ") }}{% endif %}</td></tr>
{% endif %}
<tr><th>Crop SHA-256</th><td class="mono sha">{{ crop_sha256 or "—" }}</td></tr>
</table>
<div class="images">
{% if source_preview %}<figure><img src="{{ source_preview }}" alt="uploaded image, downscaled" style="max-width:480px"><figcaption>Uploaded image (downscaled copy{% if face and face.bbox %}, face box in red{% endif %}{% if face %}, cropped region in blue{% endif %}; the hash is of the original file)</figcaption></figure>{% endif %}
{% if crop %}<figure><img src="{{ crop }}" alt="224x224 face crop" width="224" height="224"><figcaption>Face crop investigated (224x224)</figcaption></figure>{% endif %}
</div>

<h2>Policy</h2>
<table class="kv">
<tr><th>Policy</th><td>{{ inv.policy }} <span class="mono">{{ inv.policy_version }}</span></td></tr>
<tr><th>Parameters</th><td class="mono">{{ inv.params }}</td></tr>
<tr><th>Tools offered</th><td>{{ inv.tools or "—" }}</td></tr>
<tr><th>Run</th><td>started by {{ inv.started_by }} at {{ inv.started_at }}{% if inv.finished_at %}, finished {{ inv.finished_at }}{% endif %}{% if inv.rerun_of %}; re-run of {{ inv.rerun_of }}{% endif %}</td></tr>
{% if inv.timings %}<tr><th>Timings (ms)</th><td class="mono">{% for k, v in inv.timings.items() %}{{ k }} {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}</td></tr>{% endif %}
</table>

<h2>Turns</h2>
{% for t in turns %}
<div class="turn" id="turn-{{ t.index }}">
<h3>Turn {{ t.index }}: {% if t.kind == "fast" %}fast answer{% elif t.tool_call %}tool call{% elif t.answer %}final answer{% else %}reasoning{% endif %}
{% for f in t.flags %} <span class="flag">{{ f }}</span>{% endfor %}</h3>
{% if t.fast %}<p><span class="verdict v-{{ t.fast.verdict }}">{{ t.fast.verdict | verdict }}</span> {{ t.fast.reason }}</p>{% endif %}
{% if t.think %}<p><b>Thought:</b> {{ t.think }}</p>{% endif %}
{% if t.tool_call %}<p><b>Tool call:</b> <code>{{ t.tool_call.name }}</code> arguments <code>{{ t.arguments }}</code></p>{% endif %}
{% if t.tool %}
<div class="images"><figure>{% if t.tool.image %}<img src="{{ t.tool.image }}" alt="{{ t.tool.name }} output" width="224">{% endif %}
<figcaption>{{ t.tool.name }} output{% if t.tool.image_sha256 %}, SHA-256 <span class="mono sha">{{ t.tool.image_sha256 }}</span>{% endif %}</figcaption></figure>
<table class="kv">
<tr><th>Expert P(spoof trace)</th><td>{{ t.tool.expert_p_spoof | p }}</td></tr>
<tr><th>Arguments run</th><td class="mono">{{ t.tool.arguments }}</td></tr>
{% for k, v in t.tool.stats.items() %}<tr><th>{{ k }}</th><td>{{ v | num }}</td></tr>{% endfor %}
<tr><th>Tool time</th><td>{{ "%.1f" | format(t.tool.elapsed_ms) }} ms</td></tr>
</table></div>
{% endif %}
{% if t.answer %}<p><b>Answer:</b> <span class="verdict v-{{ t.answer }}">{{ t.answer | verdict }}</span></p>{% endif %}
{% if t.score_spoof is not none %}<p><b>P(spoof) of this turn:</b> {{ t.score_spoof | p }}</p>{% endif %}
{% if t.parse_error %}<p class="error">Format error fed back to the model: {{ t.parse_error }}</p>{% endif %}
{% if t.tool_error %}<p class="error">Tool error fed back to the model: {{ t.tool_error }}</p>{% endif %}
<details><summary class="muted">Raw model text ({{ "%.0f" | format(t.elapsed_ms) }} ms)</summary><pre>{{ t.text }}</pre></details>
</div>
{% else %}
<p class="muted">No turns were recorded.</p>
{% endfor %}

<h2>Tools run by hand</h2>
{% for a in actions %}
<div class="turn" id="action-{{ a.id }}">
<h3>Analyst action #{{ a.id }}: {{ a.tool }} by {{ a.actor }} at {{ a.at }} (not part of the agent's run)</h3>
<div class="images"><figure>{% if a.image %}<img src="{{ a.image }}" alt="{{ a.tool }} output" width="224">{% endif %}
<figcaption>{{ a.tool }} output{% if a.image_sha256 %}, SHA-256 <span class="mono sha">{{ a.image_sha256 }}</span>{% endif %}</figcaption></figure>
<table class="kv">
<tr><th>Expert P(spoof trace)</th><td>{{ a.expert_p_spoof | p }}</td></tr>
<tr><th>Arguments run</th><td class="mono">{{ a.arguments }}</td></tr>
{% for k, v in a.stats.items() %}<tr><th>{{ k }}</th><td>{{ v | num }}</td></tr>{% endfor %}
</table></div>
</div>
{% else %}
<p class="muted">No tool was run by hand on this investigation.</p>
{% endfor %}

<h2>Analyst review</h2>
{% if review %}
<table class="kv">
<tr><th>Verdict</th><td><span class="verdict v-{{ review.verdict }}">{{ review.verdict | verdict }}</span></td></tr>
<tr><th>Reviewer</th><td>{{ review.reviewer }} (version {{ review.version }}, first saved {{ review.created_at }}, last {{ review.updated_at }})</td></tr>
<tr><th>Flags</th><td>{% for index, fs in review.flags %}<a href="#turn-{{ index }}">turn {{ index }}</a>: {% for f in fs %}<span class="flag">{{ f }}</span>{% endfor %} {% else %}none{% endfor %}</td></tr>
</table>
<p><b>Notes</b></p><pre>{{ review.notes or "(none)" }}</pre>
<p><b>Corrected final answer</b></p><pre>{{ review.corrected_answer or "(none: the model's answer stands)" }}</pre>
{% else %}
<p class="muted">This investigation has not been reviewed.</p>
{% endif %}

<h2>Audit trail</h2>
<table class="audit">
<tr><th>When</th><th>Who</th><th>Action</th><th>Record</th><th>Change</th></tr>
{% for e in audit %}
<tr><td>{{ e.at }}</td><td>{{ e.actor }}</td><td>{{ e.action }}</td><td class="mono">{{ e.entity }}</td><td class="change mono">{{ e.change }}</td></tr>
{% endfor %}
</table>
</body>
</html>
""")

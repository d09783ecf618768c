"""Helpers shared by the workbench tests: real investigations (scripted policy, real tools) recorded in
a real SQLite store, and reviews submitted through storage.reviews."""

from __future__ import annotations

from storage_support import astronaut_png

from core import protocol
from core.agent import investigate
from core.policies import ScriptedPolicy
from core.policies.base import PolicyOutput
from core.protocol import ToolCall
from core.registry import ToolRegistry
from storage.cases import create_case, set_attack_type
from storage.investigations import InvestigationRecorder
from storage.reviews import NO_REVIEW, load_review, submit_review


def fast(verdict: str, p: float, reason: str = "First look.") -> PolicyOutput:
    return PolicyOutput(protocol.format_fast_answer(verdict, reason), score_spoof=p)


def tool(name: str, think: str = "Check the texture.", **arguments) -> PolicyOutput:
    return PolicyOutput(protocol.format_tool_call_turn(think, ToolCall(name, arguments)))


def answer(verdict: str, p: float, think: str = "The evidence is consistent.") -> PolicyOutput:
    return PolicyOutput(protocol.format_answer_turn(think, verdict), score_spoof=p)


def run_case(
    storage,
    face,
    replies,
    *,
    filename="suspect.png",
    data: bytes | None = None,
    user="ana",
    attack_type=None,
    case_id=None,
    experts=None,
):
    """Open a case (unless ``case_id`` is given) and record one investigation of it; returns (case_id, investigation_id)."""
    if case_id is None:
        with storage.sessions.begin() as s:
            case = create_case(
                s, storage.files, data if data is not None else astronaut_png(), filename=filename, user=user
            )
            if attack_type is not None:
                set_attack_type(s, case.id, attack_type, user=user)
            case_id, sha = case.id, case.image_sha256
    else:
        from storage.cases import get_case

        with storage.sessions() as s:
            sha = get_case(s, case_id).image_sha256
    rec = InvestigationRecorder(storage.sessions, storage.files, case_id, user=user)
    for _ in rec.record(
        investigate(
            face, ScriptedPolicy(replies), image_sha256=sha, source=filename, registry=ToolRegistry(readers=experts)
        )
    ):
        pass
    return case_id, rec.investigation_id


def review(storage, inv_id, verdict, *, reviewer="rita", **kwargs):
    """Submit (or update) the review of ``inv_id`` as ``reviewer``."""
    with storage.sessions.begin() as s:
        current = load_review(s, inv_id)
        return submit_review(
            s,
            inv_id,
            reviewer=reviewer,
            verdict=verdict,
            expected_version=current.version if current else NO_REVIEW,
            **kwargs,
        )

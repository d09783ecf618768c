"""Helpers shared by the workbench tests: real investigations (scripted policy, real tools) recorded in
a real SQLite store, and reviews submitted through storage.reviews."""

from __future__ import annotations

import numpy as np
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


def face_images(n: int = 4) -> list[tuple[str, np.ndarray]]:
    """``n`` live faces (the astronaut portrait, shifted and lit differently) and ``n`` simulated attacks
    of them (prints and replays, alternately): [(label, RGB image)], real first."""
    import numpy as np

    from core.samples import live_portrait, simulate_print, simulate_replay

    base = live_portrait()
    live = []
    for i in range(n):
        shifted = np.roll(base, (6 * i - 9, 5 * i - 7), axis=(0, 1)).astype(np.float32)
        live.append(np.clip(shifted * (0.8 + 0.12 * i) + 4 * i, 0, 255).astype(np.uint8))
    attacks = [simulate_print(img) if i % 2 == 0 else simulate_replay(img) for i, img in enumerate(live)]
    return [("real", img) for img in live] + [("spoof", img) for img in attacks]


def expert_case(storage, policy, rgb, *, filename: str, user: str = "ana") -> tuple[str, str]:
    """Open a case of ``rgb`` (uploaded as PNG) and record one investigation of it by ``policy`` (e.g.
    the real expert policy, calibrated or not) with its expert bank reading the tool images."""
    from core.dataset import png_bytes
    from core.faces import prepare_face
    from core.policies import readers_for

    data = png_bytes(rgb)
    with storage.sessions.begin() as s:
        case = create_case(s, storage.files, data, filename=filename, user=user)
        case_id, sha = case.id, case.image_sha256
    rec = InvestigationRecorder(storage.sessions, storage.files, case_id, user=user)
    events = investigate(
        prepare_face(rgb),
        policy,
        image_sha256=sha,
        source=filename,
        registry=ToolRegistry(readers=readers_for(policy)),
    )
    for _ in rec.record(events):
        pass
    return case_id, rec.investigation_id


def reviewed_expert_cases(storage, policy, *, n: int = 4, user: str = "ana", prefix: str = "cam1/", reviewer="rita"):
    """:func:`face_images` investigated by ``policy`` and reviewed with their true labels; returns
    [(investigation id, label)]."""
    out = []
    for k, (label, rgb) in enumerate(face_images(n)):
        _, inv = expert_case(storage, policy, rgb, filename=f"{prefix}{label}-{k}.png", user=user)
        review(storage, inv, label, reviewer=reviewer)
        out.append((inv, label))
    return out

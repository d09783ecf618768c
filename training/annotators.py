"""Annotators for the tool-augmented annotation pipeline (paper §3.1.2), and the facts of the
annotation conversation they answer.

An annotator is a :class:`core.policies.Policy`: the agent loop (:mod:`core.agent`, with
:class:`core.protocol.AnnotationPrompts`) asks it for each turn of the conversation of eqs. 2-5 (Fig. S8
system prompt, the face image with the query and the hint, its own earlier replies, each tool image
with the expert guidance) and it returns its next reply as protocol text. The conversation is a
:class:`core.trajectory.Trajectory` whose ``meta`` holds the hint (:class:`Hint`), the attempt and the
guidance given after each tool. Two annotators:

- :class:`OpenAIAnnotator`: any OpenAI-compatible vision chat endpoint (vLLM, ``transformers serve``,
  a hosted API): base URL + key from an environment variable, images as PNG data URIs, timeouts,
  retries with exponential backoff, and structured output (JSON schema) where the endpoint accepts it.
- :class:`ExpertAnnotator`: offline, built on the expert ensemble policy. Like the paper's annotator it
  sees the hint and the expert guidance; it chooses tools by the policy's expected information gain and
  writes its analysis in words, without the hint or any expert number.

The pipeline itself (conversation, verification, writing) is :mod:`training.annotate`.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Literal

from core import protocol
from core.errors import ProtocolParseError, TarfasError
from core.policies.base import Conversation, Policy, PolicyOutput
from core.protocol import ReasoningTurn, Verdict
from core.registry import ToolRegistry, tool_spec
from core.trajectory import Trajectory

Stop = Literal["answered", "turn_limit", "format", "annotator_error"]


class AnnotatorError(TarfasError):
    """The annotator could not produce a reply (endpoint down, timeouts or malformed replies after all
    retries, authentication). The sample is left for a later run, not discarded."""


# --- the annotation conversation ------------------------------------------------------------------
@dataclass
class Hint:
    """H(I) of eq. 4: what the annotator is told about the image."""

    label: Verdict
    attack_type: str | None = None

    @property
    def text(self) -> str:
        return protocol.annotation_hint(self.label, self.attack_type)

    def as_meta(self) -> dict:
        """As the annotation trajectory carries it (``meta["hint"]``; the text is what the annotator read)."""
        return {"label": self.label, "attack_type": self.attack_type, "text": self.text}

    @classmethod
    def of(cls, traj: Trajectory) -> Hint:
        h = traj.meta["hint"]
        return cls(h["label"], h.get("attack_type"))


def attempt_of(traj: Trajectory) -> int:
    """1, or 2 for the re-annotation of §3.1.3."""
    return int(traj.meta.get("attempt", 1))


def final_answer(traj: Trajectory) -> Verdict | None:
    """The annotation's answer: its last turn's (None when it broke off or ran out of turns)."""
    return traj.turns[-1].answer if traj.turns else None


def stop_reason(traj: Trajectory) -> Stop:
    """Why the conversation ended: the annotator failed (an exception: the sample is retried by a later
    run), it answered, a reply broke the protocol or called a tool wrongly, or it ran out of turns."""
    if traj.status == "failed" or not traj.turns:
        return "annotator_error"
    last = traj.turns[-1]
    if last.answer is not None:
        return "answered"
    return "format" if last.error else "turn_limit"


def resolve_annotator(name: str = "expert", *, weights=None, **options) -> tuple[Policy, ToolRegistry]:
    """``(annotator, registry)`` for an annotation run, like :func:`core.policies.resolve` for inference:

    - "expert": :class:`ExpertAnnotator` on the expert policy at ``weights`` (default: the shipped one);
      its own bank reads the tool images;
    - "openai": ``OpenAIAnnotator(**options)`` (model, base_url, api_key_env, timeout, retries,
      structured, temperature, max_tokens); the bank at ``weights`` reads the tool images.

    The bank must load (WeightsError otherwise): the guidance of eq. 5 is its reading.
    """
    from core.policies import readers_for

    if name == "expert":
        annotator = ExpertAnnotator.load(weights)
    elif name == "openai":
        annotator = OpenAIAnnotator(**options)
    else:
        raise ValueError(f"unknown annotator {name!r}; use 'expert' or 'openai'")
    return annotator, ToolRegistry(readers=readers_for(annotator, weights, required=True))


# --- OpenAI-compatible endpoints ------------------------------------------------------------------
def _structured_schema(kind: str, tools: list[str]) -> dict:
    if kind == "fast":
        return {
            "type": "object",
            "properties": {"verdict": {"type": "string", "enum": ["Real", "Spoof"]}, "reason": {"type": "string"}},
            "required": ["verdict", "reason"],
        }
    return {
        "type": "object",
        "properties": {
            "think": {"type": "string"},
            "action": {"type": "string", "enum": ["tool_call", "answer"]},
            "tool_name": {"type": "string", "enum": list(tools)},
            "arguments": {"type": "object"},
            "answer": {"type": "string", "enum": ["Real", "Spoof"]},
        },
        "required": ["think", "action"],
    }


class OpenAIAnnotator:
    """An annotator behind any OpenAI-compatible ``/v1/chat/completions`` endpoint.

    ``structured``: "auto" asks for a JSON-schema reply and falls back to the text format for good if
    the endpoint refuses ``response_format`` (``transformers serve`` does); "on" requires it; "off"
    never asks. A reply that cannot be used (empty, not JSON in structured mode) is retried like a
    timeout or a 5xx/429, with exponential backoff; after ``retries`` retries :class:`AnnotatorError`.
    A well-formed reply that breaks the protocol is returned as is: verification judges it.
    """

    def __init__(
        self,
        model: str,
        base_url: str,
        *,
        api_key_env: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        structured: Literal["auto", "on", "off"] = "auto",
        temperature: float = 0.7,
        max_tokens: int = 1024,
    ):
        import openai

        from core.policies.openai_chat import openai_client

        if structured not in ("auto", "on", "off"):
            raise ValueError(f"structured must be auto, on or off, got {structured!r}")
        self.model = model
        self.name = f"openai:{model}"
        self.version = base_url
        self.description = f"annotator {model} behind the OpenAI-compatible endpoint {base_url}"
        self.api_key_env = api_key_env
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.structured = structured
        self.temperature, self.max_tokens = temperature, max_tokens
        self._openai = openai
        # Our own retry loop (below) also covers malformed replies, so the client's is off.
        self.client = openai_client(base_url, api_key_env, timeout)
        self._structured_seen = False  # a structured reply has parsed: the endpoint honours response_format
        self.calls = 0  # requests sent, for progress and tests
        self.retried: dict[str, int] = {}  # why requests were retried
        self._lock = threading.Lock()

    def next_turn(self, conv: Conversation) -> PolicyOutput:
        return PolicyOutput(self._reply(conv))

    def _reply(self, conv: Conversation) -> str:
        from core.mllm.messages import to_openai_messages

        last, fallback, failures = "no request sent", False, 0  # failures: tries that count against retries
        while failures <= self.retries:
            if failures and not fallback:  # a one-off switch to the text format is not a retry
                time.sleep(self.backoff * 2 ** (failures - 1) * (1 + 0.1 * random.random()))
            fallback = False
            use_json = self.structured != "off"
            messages = to_openai_messages(conv.messages)
            kwargs: dict[str, Any] = {}
            if use_json:
                hint = protocol.ANNOTATION_JSON_FAST if conv.kind == "fast" else protocol.ANNOTATION_JSON_REASONING
                messages[-1] = _append_text(messages[-1], hint)
                schema = _structured_schema(conv.kind, conv.registry.names)
                kwargs["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": f"annotation_{conv.kind}", "schema": schema},
                }
            try:
                self.calls += 1
                resp = self.client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                    **kwargs,
                )
            except self._openai.BadRequestError as exc:
                if use_json and self.structured == "auto" and "response_format" in str(exc):
                    self.structured = "off"  # this endpoint has no structured output: text from now on
                    last, fallback = f"structured output refused ({_short(exc)})", True
                    self._count("no_structured_output")
                    continue
                raise AnnotatorError(f"{self.name}: the endpoint refused the request: {_short(exc)}") from exc
            except (
                self._openai.AuthenticationError,
                self._openai.PermissionDeniedError,
                self._openai.NotFoundError,
            ) as exc:
                key = (
                    f"${self.api_key_env}"
                    if self.api_key_env
                    else "an API key (no key variable named: 'EMPTY' was sent)"
                )
                raise AnnotatorError(
                    f"{self.name}: {_short(exc)} (is {key} right, and does the endpoint serve model {self.model!r}?)"
                ) from exc
            except self._openai.APITimeoutError:
                last = f"timed out after {self.timeout:g} s"
                self._count("timeout")
                failures += 1
                continue
            except (
                self._openai.APIConnectionError,
                self._openai.RateLimitError,
                self._openai.InternalServerError,
            ) as exc:
                last = _short(exc)
                self._count(type(exc).__name__)
                failures += 1
                continue
            except self._openai.APIStatusError as exc:
                if exc.status_code >= 500:
                    last = _short(exc)
                    self._count("server_error")
                    failures += 1
                    continue
                raise AnnotatorError(f"{self.name}: {_short(exc)}") from exc
            except self._openai.APIError as exc:  # e.g. a reply that is not a chat completion at all
                raise AnnotatorError(f"{self.name}: unusable response: {_short(exc)}") from exc
            content = resp.choices[0].message.content if resp.choices else None
            if not content or not content.strip():
                last = "empty reply"
                self._count("empty_reply")
                failures += 1
                continue
            if not use_json:
                return content.strip()
            try:
                text = protocol.render_structured(conv.kind, content)
            except ProtocolParseError as exc:
                if self.structured == "auto" and not self._structured_seen and not content.lstrip().startswith("{"):
                    # Not JSON at all before any JSON reply: the endpoint ignores response_format
                    # (transformers serve does, with a warning). Text format from now on.
                    self.structured = "off"
                    last, fallback = "the endpoint ignores structured output", True
                    self._count("no_structured_output")
                    continue
                last = f"malformed structured reply: {exc}"
                self._count("malformed_reply")
                failures += 1
                continue
            self._structured_seen = True
            return text
        raise AnnotatorError(f"{self.name}: no usable reply after {self.retries + 1} tries; last: {last}")

    def _count(self, why: str) -> None:
        with self._lock:
            self.retried[why] = self.retried.get(why, 0) + 1


def _append_text(message: dict, text: str) -> dict:
    content = message["content"]
    if isinstance(content, str):
        return {**message, "content": content + "\n" + text}
    return {**message, "content": [*content, {"type": "text", "text": text}]}


def _short(exc: Exception, n: int = 200) -> str:
    s = " ".join(str(exc).split())
    return s if len(s) <= n else s[:n] + "..."


# --- offline: the expert ensemble as annotator ----------------------------------------------------
# What each tool's output shows, in words, is the tool's own fact (ToolSpec.seen / .purpose).
FAST_REASONS = {
    ("spoof", "print", True): "The face looks flat, with a paper-like surface and dull, uneven skin tones.",
    ("spoof", "replay", True): "The face looks flat and slightly washed out, with a glossy, screen-like sheen.",
    ("spoof", None, True): "The face looks flat and lacks the depth and shading of a live face.",
    (
        "spoof",
        None,
        False,
    ): "The face looks plausible at a glance, but its surface seems slightly flat and needs a closer look.",
    ("real", None, True): "The face shows natural 3D shading, skin texture and highlights.",
    ("real", None, False): "Some regions look a little flat, but the shading and skin texture look natural overall.",
}
ATTACK_WORDS = {"print": "a printed photo", "replay": "a face replayed on a screen"}


def _strength(p: float) -> str:
    d = abs(p - 0.5)
    return "clearly shows" if d >= 0.3 else ("shows" if d >= 0.15 else "faintly shows")


class ExpertAnnotator:
    """The offline annotator: the expert ensemble policy (core/policies/expert.py) plus the hint.

    - Fast answer: the hint's class, worded from the RGB network's first impression.
    - Tools: the policy's choice (largest expected information gain given the evidence). While the
      evidence leans against the hint, it keeps looking (up to the turn limit), as an annotator told the
      answer would look for the traces that support it.
    - Answer: the hint's class, argued from what the tools showed, each in words. When the evidence
      still disagrees, it says so in words; such annotations go to manual verification.
    - The second attempt (re-annotation) looks at one more tool before it may stop.

    Every number the experts give stays out of the text (the leakage rule of §3.1.3).
    """

    name = "expert"
    description = (
        "Offline annotator: the expert ensemble policy, told the label (the hint), writing its analysis in words."
    )
    enough_tools = 3  # stop once this many tools agree with the hint (the paper's best tool budget)

    def __init__(self, policy):
        from core.policies.expert import ExpertPolicy

        self.policy: ExpertPolicy = policy
        self.version = policy.version
        # One policy per behaviour (never mutated: annotations may run in threads).
        self._by_attempt = {
            1: ExpertPolicy(policy.bank, policy.threshold, min_tool_calls=1),
            2: ExpertPolicy(policy.bank, policy.threshold, min_tool_calls=2),
        }
        self._persistent = ExpertPolicy(policy.bank, policy.threshold, min_tool_calls=10**6)

    @classmethod
    def load(cls, weights=None) -> ExpertAnnotator:
        from core.policies.expert import ExpertPolicy

        return cls(ExpertPolicy.load(weights))

    @property
    def bank(self):
        """The policy's expert bank: it also reads the tool images for the guidance."""
        return self.policy.bank

    def next_turn(self, conv: Conversation) -> PolicyOutput:
        traj, hint = conv.trajectory, Hint.of(conv.trajectory)
        if conv.kind == "fast":
            return PolicyOutput(self._fast(conv, hint))
        turns_left = conv.turns_left if conv.turns_left is not None else conv.tool_calls_left + 1
        look = replace(conv, tool_calls_left=min(conv.tool_calls_left, turns_left - 1))  # the last turn must answer
        out = self._by_attempt[min(attempt_of(traj), 2)].next_turn(look)  # attempt 2 looks at one more tool
        turn = protocol.parse_reasoning_turn(out.text)
        evidence: dict[str, float] = out.notes.get("evidence", {})
        p = float(out.notes.get("p_spoof_so_far", 0.5))
        agrees = (p >= self.policy.threshold) == (hint.label == "spoof")
        may_call = conv.tool_calls_left > 0 and turns_left > 1
        if turn.answer is not None and not agrees and may_call:
            # The evidence contradicts the hint: look further before concluding.
            turn = protocol.parse_reasoning_turn(self._persistent.next_turn(look).text)
        elif turn.tool_call is not None and agrees and len(traj.tool_turns) >= self.enough_tools:
            turn = ReasoningTurn(turn.think, answer=hint.label)  # enough agreeing evidence
        if turn.tool_call is not None and may_call:
            return PolicyOutput(
                protocol.format_tool_call_turn(self._plan(traj, turn.tool_call.name, evidence, agrees), turn.tool_call)
            )
        return PolicyOutput(protocol.format_answer_turn(self._conclusion(traj, hint, evidence), hint.label))

    # --- texts --------------------------------------------------------------------------------
    def _fast(self, conv: Conversation, hint: Hint) -> str:
        from core.experts import RGB

        p = self.policy.p_spoof({RGB: self.policy.bank.logit(RGB, conv.crop)})  # the policy's own fast answer
        agrees = (p >= self.policy.threshold) == (hint.label == "spoof")
        attack = hint.attack_type if hint.attack_type in ("print", "replay") and agrees else None
        return protocol.format_fast_answer(hint.label, FAST_REASONS[(hint.label, attack, agrees)])

    @staticmethod
    def _seen(name: str, p: float) -> str:
        spoof, live = tool_spec(name).seen
        return f"{name} {_strength(p)} {spoof if p >= 0.5 else live}"

    def _last_observation(self, traj: Trajectory, evidence: dict[str, float]) -> str:
        last = traj.turns[-1] if traj.turns else None
        if last is None or last.tool_result is None or last.tool_result.name not in evidence:
            return ""  # nothing read (e.g. a tool no expert reads)
        return self._seen(last.tool_result.name, evidence[last.tool_result.name]) + "."

    def _plan(self, traj: Trajectory, tool: str, evidence: dict[str, float], agrees: bool) -> str:
        parts = [self._last_observation(traj, evidence)]
        if not traj.tool_turns:
            parts.append("My first impression needs checking against finer visual evidence.")
        elif agrees:
            parts.append("This fits what I have seen so far; I want one more independent check.")
        else:
            parts.append("The evidence so far is mixed, so I look further.")
        parts.append(f"Next I use {tool} {tool_spec(tool).purpose}.")
        return " ".join(s for s in parts if s)

    def _conclusion(self, traj: Trajectory, hint: Hint, evidence: dict[str, float]) -> str:
        label = hint.label
        tools = [t.tool_result.name for t in traj.tool_turns if t.tool_result.name in evidence]
        support = [t for t in tools if (evidence[t] >= 0.5) == (label == "spoof")]
        against = [t for t in tools if t not in support]
        parts = [self._last_observation(traj, evidence)]
        if support:
            parts.append("Taken together: " + "; ".join(self._seen(t, evidence[t]) for t in support) + ".")
        if against:
            parts.append(
                "Against this, " + "; ".join(self._seen(t, evidence[t]) for t in against) + ", which I weigh less."
            )
        if label == "spoof":
            what = ATTACK_WORDS.get(hint.attack_type or "", "a recaptured face")
            parts.append(f"The face is {what}, not a live person: this is a presentation attack.")
        else:
            parts.append("I find no trace of a print or screen recapture: this is a live face.")
        return " ".join(s for s in parts if s)

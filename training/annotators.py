"""Annotators for the tool-augmented annotation pipeline (paper §3.1.2), and the annotation
conversation they answer.

An annotator gets the conversation of eqs. 2-5 so far (Fig. S8 system prompt, the face image with the
query and the hint, its own earlier replies, each tool image with the expert guidance) and returns its
next reply as protocol text. Two kinds:

- :class:`OpenAIAnnotator`: any OpenAI-compatible vision chat endpoint (vLLM, ``transformers serve``,
  a hosted API): base URL + key from an environment variable, images as PNG data URIs, timeouts,
  retries with exponential backoff, and structured output (JSON schema) where the endpoint accepts it.
- :class:`ExpertAnnotator`: offline, built on the expert ensemble policy. Like the paper's annotator it
  sees the hint and the expert guidance; it chooses tools by the policy's expected information gain and
  writes its analysis in words, without the hint or any expert number.

The pipeline itself (tools, experts, verification, writing) is :mod:`training.annotate`.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from core import protocol
from core.errors import ProtocolParseError, TarfasError
from core.protocol import FastAnswer, ReasoningTurn, Verdict
from core.registry import ToolRegistry

Kind = Literal["fast", "reasoning"]
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


@dataclass
class ToolOutcome:
    """A tool call that ran: normalised arguments, the output image and the expert's reading."""

    name: str
    arguments: dict
    image: np.ndarray = field(repr=False)
    stats: dict[str, float]
    expert_p_spoof: float | None  # None for ZoomInTool (no expert, paper §3.1.2)
    elapsed_ms: float = 0.0

    @property
    def guidance(self) -> str:
        """The user text sent back with the tool image (eq. 5)."""
        return protocol.annotation_tool_prompt(self.name, self.expert_p_spoof)


@dataclass
class Step:
    """One annotator reply (a sub-annotation Ann(l)) and what came of it."""

    kind: Kind
    text: str
    fast: FastAnswer | None = None
    turn: ReasoningTurn | None = None
    tool: ToolOutcome | None = None
    parse_error: str | None = None
    tool_error: str | None = None
    elapsed_ms: float = 0.0

    @property
    def error(self) -> str | None:
        return self.parse_error or self.tool_error


@dataclass
class Annotation:
    """One attempt at annotating one image: the multi-turn conversation of eqs. 1-5."""

    crop: np.ndarray = field(repr=False)  # the 224x224 RGB face crop
    hint: Hint
    annotator: str
    tools: list[str]  # tools offered
    attempt: int = 1  # 1, or 2 for the re-annotation of §3.1.3
    annotator_version: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    steps: list[Step] = field(default_factory=list)
    stop: Stop | None = None
    error: str | None = None  # why the annotator failed (stop == "annotator_error")

    @property
    def fast(self) -> FastAnswer | None:
        return next((s.fast for s in self.steps if s.kind == "fast" and s.fast), None)

    @property
    def final(self) -> Verdict | None:
        last = self.steps[-1] if self.steps else None
        return last.turn.answer if last is not None and last.turn is not None else None

    @property
    def tool_steps(self) -> list[Step]:
        return [s for s in self.steps if s.tool is not None]

    @property
    def reasoning_turns(self) -> int:
        return sum(1 for s in self.steps if s.kind == "reasoning")

    def messages(self, *, next_kind: Kind | None = None) -> list[dict]:
        """The annotator's conversation in the content-part layout of :func:`core.trajectory.to_messages`
        (images as ndarrays): system, first user turn, then each reply and the user turn after it.
        ``next_kind`` appends the user prompt that the annotator must answer next."""
        system = protocol.annotator_system_prompt(ToolRegistry(self.tools).schemas())
        msgs = [
            {"role": "system", "content": [_text(system)]},
            {"role": "user", "content": [_image(self.crop), _text(protocol.annotation_first_prompt(self.hint.text))]},
        ]
        for i, step in enumerate(self.steps):
            msgs.append({"role": "assistant", "content": [_text(step.text)]})
            after = _prompt_after(step)
            if after is not None and (i < len(self.steps) - 1 or next_kind is not None):
                msgs.append({"role": "user", "content": after})
        return msgs


def _prompt_after(step: Step) -> list[dict] | None:
    if step.kind == "fast":
        return [_text(protocol.second_round_prompt())]
    if step.tool is not None:
        return [_image(step.tool.image), _text(step.tool.guidance)]
    return None  # the answer ends the conversation; an error ends the attempt


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _image(image: np.ndarray) -> dict:
    return {"type": "image", "image": image, "path": None}


@dataclass
class AnnotationRequest:
    """What an annotator answers: the messages (LLM annotators) and the same content structured
    (the offline annotator reads the hint and the tool readings without parsing text)."""

    annotation: Annotation
    kind: Kind
    messages: list[dict]
    registry: ToolRegistry
    turns_left: int  # reasoning turns left including this one (eq. 1: L <= L_max)
    tool_calls_left: int


@runtime_checkable
class Annotator(Protocol):
    name: str  # short id recorded with every trajectory ("expert", "openai:<model>")
    version: str

    def reply(self, request: AnnotationRequest) -> str: ...


# --- OpenAI-compatible endpoints ------------------------------------------------------------------
def _structured_schema(kind: Kind, tools: list[str]) -> dict:
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
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        structured: Literal["auto", "on", "off"] = "auto",
        temperature: float = 0.7,
        max_tokens: int = 1024,
    ):
        import openai

        if structured not in ("auto", "on", "off"):
            raise ValueError(f"structured must be auto, on or off, got {structured!r}")
        key = os.environ.get(api_key_env)
        if not key:
            # Local servers (vLLM, transformers serve) accept any key; a hosted API answers 401, reported below.
            key = "EMPTY"
        self.model = model
        self.name = f"openai:{model}"
        self.version = base_url
        self.api_key_env = api_key_env
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.structured = structured
        self.temperature, self.max_tokens = temperature, max_tokens
        self._openai = openai
        # Our own retry loop (below) also covers malformed replies, so the client's is off.
        self.client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)
        self._structured_seen = False  # a structured reply has parsed: the endpoint honours response_format
        self.calls = 0  # requests sent, for progress and tests
        self.retried: dict[str, int] = {}  # why requests were retried
        self._lock = threading.Lock()

    def reply(self, request: AnnotationRequest) -> str:
        from core.mllm.messages import to_openai_messages

        last, fallback, failures = "no request sent", False, 0  # failures: tries that count against retries
        while failures <= self.retries:
            if failures and not fallback:  # a one-off switch to the text format is not a retry
                time.sleep(self.backoff * 2 ** (failures - 1) * (1 + 0.1 * random.random()))
            fallback = False
            use_json = self.structured != "off"
            messages = to_openai_messages(request.messages)
            kwargs: dict[str, Any] = {}
            if use_json:
                hint = protocol.ANNOTATION_JSON_FAST if request.kind == "fast" else protocol.ANNOTATION_JSON_REASONING
                messages[-1] = _append_text(messages[-1], hint)
                schema = _structured_schema(request.kind, request.registry.names)
                kwargs["response_format"] = {"type": "json_schema", "json_schema": {"name": f"annotation_{request.kind}", "schema": schema}}
            try:
                self.calls += 1
                resp = self.client.chat.completions.create(
                    model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens, **kwargs
                )
            except self._openai.BadRequestError as exc:
                if use_json and self.structured == "auto" and "response_format" in str(exc):
                    self.structured = "off"  # this endpoint has no structured output: text from now on
                    last, fallback = f"structured output refused ({_short(exc)})", True
                    self._count("no_structured_output")
                    continue
                raise AnnotatorError(f"{self.name}: the endpoint refused the request: {_short(exc)}") from exc
            except (self._openai.AuthenticationError, self._openai.PermissionDeniedError, self._openai.NotFoundError) as exc:
                raise AnnotatorError(
                    f"{self.name}: {_short(exc)} (is ${self.api_key_env} set, and does the endpoint serve model {self.model!r}?)"
                ) from exc
            except self._openai.APITimeoutError:
                last = f"timed out after {self.timeout:g} s"
                self._count("timeout")
                failures += 1
                continue
            except (self._openai.APIConnectionError, self._openai.RateLimitError, self._openai.InternalServerError) as exc:
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
                text = protocol.render_structured(request.kind, content)
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
# What each tool's output shows, in words: (spoof trace seen, no trace seen).
OBSERVATIONS = {
    "ZoomInTool": ("print dots, paper grain or screen pixels on the cheeks and nose", "natural pores and fine skin detail on the cheeks and nose"),
    "FFTTool": ("periodic peaks in the spectrum, typical of screen moire or print halftone", "a smooth spectrum without periodic peaks"),
    "LBPTool": ("a regular, grainy micro-texture like paper or a screen surface", "an irregular micro-texture typical of live skin"),
    "WaveletTransformTool": ("fine-scale noise that does not look like natural camera noise", "fine-scale detail consistent with natural camera noise"),
    "EdgeDetectionTool": ("soft, blurred fine edges and flat regions typical of a recapture", "crisp, natural facial edges"),
    "HOGTool": ("a flattened gradient structure that lacks 3D relief", "a coherent gradient structure with natural 3D relief"),
}
FAST_REASONS = {
    ("spoof", "print", True): "The face looks flat, with a paper-like surface and dull, uneven skin tones.",
    ("spoof", "replay", True): "The face looks flat and slightly washed out, with a glossy, screen-like sheen.",
    ("spoof", None, True): "The face looks flat and lacks the depth and shading of a live face.",
    ("spoof", None, False): "The face looks plausible at a glance, but its surface seems slightly flat and needs a closer look.",
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
    enough_tools = 3  # stop once this many tools agree with the hint (the paper's best tool budget)

    def __init__(self, policy):
        from core.policies.expert import ExpertPolicy

        self.policy: ExpertPolicy = policy
        self.version = policy.version
        # One policy per behaviour (never mutated: annotations may run in threads).
        self._by_attempt = {1: ExpertPolicy(policy.bank, policy.threshold, min_tool_calls=1), 2: ExpertPolicy(policy.bank, policy.threshold, min_tool_calls=2)}
        self._persistent = ExpertPolicy(policy.bank, policy.threshold, min_tool_calls=10**6)

    @classmethod
    def load(cls, weights=None) -> ExpertAnnotator:
        from core.policies.expert import ExpertPolicy

        return cls(ExpertPolicy.load(weights))

    def reply(self, request: AnnotationRequest) -> str:
        ann = request.annotation
        if request.kind == "fast":
            return self._fast(ann)
        traj = self._trajectory(ann)
        conv = self._conversation(ann, traj, request)
        out = self._by_attempt[min(ann.attempt, 2)].next_turn(conv)  # attempt 2 looks at one more tool
        turn = protocol.parse_reasoning_turn(out.text)
        evidence: dict[str, float] = out.notes.get("evidence", {})
        p = float(out.notes.get("p_spoof_so_far", 0.5))
        agrees = (p >= self.policy.threshold) == (ann.hint.label == "spoof")
        if turn.answer is not None and not agrees and request.tool_calls_left > 0 and request.turns_left > 1:
            # The evidence contradicts the hint: look further before concluding.
            turn = protocol.parse_reasoning_turn(self._persistent.next_turn(conv).text)
        elif turn.tool_call is not None and agrees and len(ann.tool_steps) >= self.enough_tools:
            turn = ReasoningTurn(turn.think, answer=ann.hint.label)  # enough agreeing evidence
        if turn.tool_call is not None and request.tool_calls_left > 0 and request.turns_left > 1:
            return protocol.format_tool_call_turn(self._plan(ann, turn.tool_call.name, evidence, agrees), turn.tool_call)
        return protocol.format_answer_turn(self._conclusion(ann, evidence), ann.hint.label)

    # --- structured view for the policy -------------------------------------------------------
    def _trajectory(self, ann: Annotation):
        from core.trajectory import ToolResult, Trajectory, Turn

        traj = Trajectory(policy=self.name, id=ann.id, tools=list(ann.tools), crop=ann.crop)
        for i, s in enumerate(ann.steps):
            t = Turn(i, s.kind, s.text, fast=s.fast)
            if s.tool is not None:
                o = s.tool
                t.tool_result = ToolResult(o.name, o.arguments, o.stats, o.expert_p_spoof, o.elapsed_ms, o.image)
            traj.turns.append(t)
        return traj

    @staticmethod
    def _conversation(ann: Annotation, traj, request: AnnotationRequest):
        from core.policies.base import Conversation

        return Conversation(ann.crop, traj, request.messages, request.registry, min(request.tool_calls_left, request.turns_left - 1))

    # --- texts --------------------------------------------------------------------------------
    def _fast(self, ann: Annotation) -> str:
        from core.experts import RGB

        p = self.policy.p_spoof({RGB: self.policy.bank.logit(RGB, ann.crop)})  # the policy's own fast answer
        label = ann.hint.label
        agrees = (p >= self.policy.threshold) == (label == "spoof")
        attack = ann.hint.attack_type if ann.hint.attack_type in ("print", "replay") and agrees else None
        reason = FAST_REASONS[(label, attack, agrees)]
        return protocol.format_fast_answer(label, reason)

    @staticmethod
    def _seen(name: str, p: float) -> str:
        spoof, live = OBSERVATIONS[name]
        return f"{name} {_strength(p)} {spoof if p >= 0.5 else live}"

    def _last_observation(self, ann: Annotation, evidence: dict[str, float]) -> str:
        last = ann.steps[-1] if ann.steps else None
        if last is None or last.tool is None or last.tool.name not in evidence:
            return ""
        return self._seen(last.tool.name, evidence[last.tool.name]) + "."

    def _plan(self, ann: Annotation, tool: str, evidence: dict[str, float], agrees: bool) -> str:
        from core.policies.expert import PURPOSE

        first = len(ann.tool_steps) == 0
        parts = [self._last_observation(ann, evidence)]
        if first:
            parts.append("My first impression needs checking against finer visual evidence.")
        elif agrees:
            parts.append("This fits what I have seen so far; I want one more independent check.")
        else:
            parts.append("The evidence so far is mixed, so I look further.")
        parts.append(f"Next I use {tool} {PURPOSE[tool]}.")
        return " ".join(s for s in parts if s)

    def _conclusion(self, ann: Annotation, evidence: dict[str, float]) -> str:
        label = ann.hint.label
        tools = [s.tool.name for s in ann.tool_steps if s.tool.name in evidence]
        support = [t for t in tools if (evidence[t] >= 0.5) == (label == "spoof")]
        against = [t for t in tools if t not in support]
        parts = [self._last_observation(ann, evidence)]
        if support:
            parts.append("Taken together: " + "; ".join(self._seen(t, evidence[t]) for t in support) + ".")
        if against:
            parts.append("Against this, " + "; ".join(self._seen(t, evidence[t]) for t in against) + ", which I weigh less.")
        if label == "spoof":
            what = ATTACK_WORDS.get(ann.hint.attack_type or "", "a recaptured face")
            parts.append(f"The face is {what}, not a live person: this is a presentation attack.")
        else:
            parts.append("I find no trace of a print or screen recapture: this is a live face.")
        return " ".join(s for s in parts if s)

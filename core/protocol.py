"""The CoT-VT protocol of TAR-FAS (paper §3 and App. B): every prompt, every output format, and the
parsers for them. Nothing else in tarfas writes or reads model text.

Turn layout:
  system     ROLE_AND_MISSION + Hermes tool block (JSON Schemas)
  user       <face image> FIRST_ROUND_QUERY
  assistant  <Real|Spoof><reason>...</reason>                         (fast answer)
  user       TOOL_GUIDANCE + FORMAT_DECLARATION
  assistant  <think>...</think><tool_call>{"name":..,"arguments":..}</tool_call>
  user       <tool image> FORMAT_DECLARATION                          (tool result as a user turn)
  ...
  assistant  <think>...</think><answer><Spoof>|<Real></answer>
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Literal

from .errors import ProtocolParseError

Verdict = Literal["real", "spoof"]

# --- prompts (App. B.1, verbatim) ----------------------------------------------------------------
ROLE_AND_MISSION = (
    "## Role & Mission\n"
    "You are a face forensics expert. Your mission is to classify an image as either 'Real' or 'Spoof' by "
    "analyzing evidence strictly within the **facial region**, focusing only on physical presentation attack."
)
FIRST_ROUND_QUERY = "Is this photo of a real person? (Do not use any tools)"
TOOL_GUIDANCE = "Wait, you should re-examine the image and give the final answer (use tools if needed)."
FORMAT_DECLARATION = (
    "Think first, call tools if needed, then answer. Format strictly as: "
    "<think></think> <tool_call></tool_call> (if tools needed) <answer>(<Spoof>/<Real>)</answer>"
)

# The Hermes tool block of Qwen2.5's chat template, so that a stock Qwen2.5-VL sees what it was trained on.
_HERMES_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)

# The annotator's system prompt (Fig. S8, App. A.2), used by the annotation pipeline.
ANNOTATOR_SYSTEM_PROMPT = (
    "## Role & Mission\nYou are a face forensics expert. Your mission is to classify an image as either 'real' or "
    "'spoof' by analyzing evidence strictly within the **facial region**, focusing **only on physical presentation "
    "attacks** (e.g., printed photos, screen displays). You will be given a hint early in the conversation. Do not "
    "mention the hint when making your decision. Your final classification must match the hint, and be supported by "
    "image evidence and tool-based analysis.\n"
    "## Core Principle\nConcentrate solely on **physical attack artifacts**. These include:\n"
    "- **Semantic clues**: unnatural flatness, rigid expressions, lack of 3D structure, unnatural reflections.\n"
    "- **Pixel-level clues**: print texture, Moire patterns, screen glare, paper/screen surface noise.\n"
    "Since input images are cropped and aligned, **do not consider black borders and compression artifacts as "
    "spoof clues**.\n"
    "## Workflow & Behavioral Rules\n"
    "1. Begin with a brief visual scan of the **facial region**. **Ignore black borders and all context outside "
    "the face.**\n"
    "2. If needed, call **ONE tool at a time** to test a specific hypothesis, either to look for signs of physical "
    "attack, or to confirm their absence.\n"
    "   - Each tool request must include a clear expectation (what you're testing for).\n"
    "3. When you receive tool results, you may receive an **Expert Judgment** on the result.\n"
    "   - You may consider the expert's interpretation as a reference, but **must perform your own independent "
    "analysis**.\n"
    "   - Your reasoning should not blindly follow the expert; only adopt it when it aligns with your observations.\n"
    "4. When you are confident, provide your conclusion.\n"
    "## Available Tools\n"
    "- **ZoomInTool**: Inspect local details for physical (print/screen) or digital (blending) artifacts.\n"
    "- **FFTTool (Fast Fourier Transform):** Visualizes the image's frequency domain. Used to detect periodic "
    "patterns like screen Moire effects or subtle artifacts from digital generation.\n"
    "- **EdgeDetectionTool**: Find inconsistent edges from cutouts or digital blending.\n"
    "- **LBPTool**: Analyze skin texture for unnatural or synthetic patterns.\n"
    "- **WaveletTransformTool**: Find subtle digital tampering or noise mismatches via multi-scale analysis.\n"
    "- **HOGTool**: Check facial structure gradients, which are often disrupted in physical attacks.\n"
    "## Final Conclusion\nYour conclusion must be 'Real' or 'Spoof'."
)


def system_prompt(tool_schemas: list[dict]) -> str:
    """Role & Mission (App. B.1) followed by the tools as JSON Schema in the Hermes layout."""
    if not tool_schemas:
        return ROLE_AND_MISSION
    listing = "\n".join(json.dumps(s, ensure_ascii=False) for s in tool_schemas)
    return ROLE_AND_MISSION + "\n\n" + _HERMES_TOOLS.format(tools=listing)


def second_round_prompt(error: str | None = None) -> str:
    """Tool guidance + format declaration; prefixed by the error when the fast answer was malformed
    and its retries are used up."""
    text = TOOL_GUIDANCE + " " + FORMAT_DECLARATION
    return f"Error: {error}\n{text}" if error else text


def tool_result_prompt(tool_name: str | None = None) -> str:
    """Text beside a tool's output image. The paper's inference prompt is the format declaration only."""
    return FORMAT_DECLARATION


def expert_guidance(tool_name: str, p_spoof: float) -> str:
    """Expert-model guidance of eq. 5 / §3.1.2, e.g. "This is the result of FFTTool. The expert predicts
    87% there's spoof trace"."""
    return f"This is the result of {tool_name}. The expert predicts {round(100 * p_spoof)}% there's spoof trace"


# --- annotation prompts (§3.1.2, eqs. 4-5; used by training/annotate.py) ---------------------------
# The annotator sees the Fig. S8 system prompt plus the tool schemas and the reply format; its first
# user turn is image + ANNOTATION_QUERY + hint (eq. 4), preceded here by a request for the one-line
# first impression that the inference format's fast answer needs; later turns are tool image + expert
# guidance (eq. 5). None of this text reaches the training conversation.
ANNOTATION_QUERY = "This is the image you need to investigate."
ANNOTATION_FAST_REQUEST = (
    "Begin with a brief visual scan of the facial region, without tools, and give your first impression in one "
    "line, exactly as <Real><reason>...</reason> or <Spoof><reason>...</reason>."
)
ANNOTATION_REPLY_FORMAT = (
    "## Reply Format\n"
    "- First reply (no tools): <Real><reason>one line</reason> or <Spoof><reason>one line</reason>.\n"
    "- Every later reply: <think>your analysis and what you test next</think> followed by exactly one of "
    '<tool_call>{"name": <tool>, "arguments": {...}}</tool_call> or <answer><Real></answer> / <answer><Spoof></answer>.\n'
    "- Write the analysis in your own words: never mention the hint, the expert, or any probability or percentage."
)
# In structured-output mode the same turns are requested as JSON objects, then rendered in the text
# format above (format_fast_answer / format_tool_call_turn / format_answer_turn) before parsing.
ANNOTATION_JSON_FAST = 'Reply with a JSON object {"verdict": "Real" or "Spoof", "reason": "one line"}.'
ANNOTATION_JSON_REASONING = (
    'Reply with a JSON object {"think": "...", "action": "tool_call" or "answer", '
    '"tool_name": <tool> (for tool_call), "arguments": {...} (for tool_call), "answer": "Real" or "Spoof" (for answer)}.'
)
_HINT_ATTACKS = {
    "print": "print attack (a printed photo)",
    "replay": "replay attack (a face shown on a screen)",
    "mask": "mask attack",
    "": "presentation attack",
    "unknown": "presentation attack of unknown type",
}


def render_structured(kind: Literal["fast", "reasoning"], content: str) -> str:
    """Render a structured (JSON) reply in the protocol's text format, so that it is parsed and
    trained on exactly like a text reply. Raises ProtocolParseError for JSON that does not fit."""
    content = content.strip()
    if content.startswith("```"):  # some hosted models fence JSON even in JSON mode
        content = content.strip("`").removeprefix("json").strip()
    try:
        obj = json.loads(content)
    except json.JSONDecodeError as exc:
        raise ProtocolParseError(f"structured reply is not JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(obj, dict):
        raise ProtocolParseError("structured reply must be a JSON object")
    if kind == "fast":
        verdict, reason = str(obj.get("verdict", "")).lower(), obj.get("reason")
        if verdict not in ("real", "spoof") or not isinstance(reason, str) or not reason.strip():
            raise ProtocolParseError('structured fast answer needs "verdict" (Real/Spoof) and a non-empty "reason"')
        return format_fast_answer(verdict, reason)
    think, action = obj.get("think"), obj.get("action")
    if not isinstance(think, str) or not think.strip():
        raise ProtocolParseError('structured reply needs a non-empty "think"')
    if action == "tool_call":
        name, args = obj.get("tool_name"), obj.get("arguments") or {}
        if not isinstance(name, str) or not name or not isinstance(args, dict):
            raise ProtocolParseError('a structured tool call needs "tool_name" and an "arguments" object')
        return format_tool_call_turn(think, ToolCall(name, args))
    if action == "answer":
        answer = str(obj.get("answer", "")).lower()
        if answer not in ("real", "spoof"):
            raise ProtocolParseError('a structured answer needs "answer": "Real" or "Spoof"')
        return format_answer_turn(think, answer)
    raise ProtocolParseError(f'"action" must be "tool_call" or "answer", got {action!r}')


def annotator_system_prompt(tool_schemas: list[dict]) -> str:
    """Fig. S8 followed by the reply format and the tools as JSON Schema (Hermes layout)."""
    text = ANNOTATOR_SYSTEM_PROMPT + "\n" + ANNOTATION_REPLY_FORMAT
    if tool_schemas:
        listing = "\n".join(json.dumps(s, ensure_ascii=False) for s in tool_schemas)
        text += "\n\n" + _HERMES_TOOLS.format(tools=listing)
    return text


def annotation_hint(label: Verdict, attack_type: str | None = None) -> str:
    """The hint H(I) of eq. 4: the label and, for spoofs, the attack type."""
    if label == "real":
        return "Hint: this is a real face (bona fide)."
    kind = _HINT_ATTACKS.get((attack_type or "").strip().lower(), f"{attack_type} attack")
    return f"Hint: this is a spoof face, {kind}."


def annotation_first_prompt(hint: str) -> str:
    """Text of the first user turn (eq. 4: Q + H), beside the face image."""
    return f"{ANNOTATION_QUERY} {hint}\n{ANNOTATION_FAST_REQUEST}"


def annotation_guidance(tool_name: str, p_spoof: float | None) -> str:
    """The guidance of eq. 5 after a tool result: the expert's reading, or only the tool's name when no
    expert read it (ZoomInTool has none)."""
    return expert_guidance(tool_name, p_spoof) + "." if p_spoof is not None else f"This is the result of {tool_name}."


def annotation_tool_prompt(tool_name: str, p_spoof: float | None) -> str:
    """Text beside a tool's output image in annotation (eq. 5): the guidance and the format declaration."""
    return AnnotationPrompts().after_tool(tool_name, p_spoof)


def error_feedback(message: str) -> str:
    """User turn sent back after a malformed reasoning turn or an invalid tool call."""
    return f"Error: {message}\n{FORMAT_DECLARATION}"


def fast_answer_feedback(message: str) -> str:
    """User turn sent back after a malformed fast answer."""
    return f"Error: {message}\nAnswer strictly as <Real><reason>one line</reason> or <Spoof><reason>one line</reason>."


TOOL_LIMIT_MESSAGE = "the maximum number of tool calls is reached; give your final <answer> now"

# Where an assistant turn ends: the closing tag of a tool call, an answer or a fast answer's reason. Every
# sampler stops there (core/policies/hf.py and openai_chat.py at inference, training/rollout.py in DT-GRPO
# rollouts), so the turns the model is trained on end where the turns it is run on end.
STOP_STRINGS = ("</tool_call>", "</answer>", "</reason>")


# --- who says what around the policy's turns -------------------------------------------------------
class Prompts:
    """The loop's side of the conversation, as a strategy given to :func:`core.agent.investigate` and
    :func:`core.trajectory.to_messages`. This default is inference (paper App. B): the Role & Mission
    system prompt, the first-round query, the format declaration beside each tool image, and errors fed
    back to the model (a malformed fast answer is asked again) so that it can correct itself. Every
    other user text of a conversation is one of these methods' results.
    """

    feeds_back_errors = True  # False: the first malformed turn or invalid call ends the conversation
    falls_back_to_fast = True  # no final answer: the fast answer becomes the verdict

    def system(self, tool_schemas: list[dict]) -> str:
        return system_prompt(tool_schemas)

    def first_round(self, meta: dict) -> str:
        """Text beside the face image; ``meta`` is the trajectory's (the annotation hint lives there)."""
        return FIRST_ROUND_QUERY

    def after_fast(self, error: str | None, retry: bool) -> str | None:
        """After the fast answer: the second-round prompt, or after a malformed one the request to
        answer again (``retry``) or the second-round prompt with the error; None ends the conversation."""
        if error and not self.feeds_back_errors:
            return None
        if error and retry:
            return fast_answer_feedback(error)
        return second_round_prompt(error)

    def after_error(self, error: str) -> str | None:
        """After a malformed reasoning turn or a refused tool call; None ends the conversation."""
        return error_feedback(error) if self.feeds_back_errors else None

    def guidance(self, tool_name: str, p_spoof: float | None) -> str | None:
        """What the loop says about a tool result beside its image (None: nothing; the model reads the
        image itself). Recorded in the trajectory's ``meta["guidance"]`` when there is any."""
        return None

    def after_tool(self, tool_name: str, p_spoof: float | None) -> str:
        """Text beside a tool's output image."""
        guidance = self.guidance(tool_name, p_spoof)
        return f"{guidance}\n{FORMAT_DECLARATION}" if guidance else tool_result_prompt(tool_name)

    def max_reasoning_turns(self, max_tool_calls: int, max_format_errors: int) -> int:
        """Reasoning turns allowed: each tool call, each tolerated error, and the answer."""
        return max_tool_calls + max_format_errors + 1


class AnnotationPrompts(Prompts):
    """The annotation conversation (§3.1.2, eqs. 1-5): the Fig. S8 system prompt, the face with the query
    and the hint (``meta["hint"]["text"]``), each tool image with the expert guidance, at most
    ``max_turns`` reasoning turns (L_max), and no error feedback: the first malformed reply or invalid
    call ends the attempt (verification rejects it), so a kept conversation is clean."""

    feeds_back_errors = False
    falls_back_to_fast = False  # an annotation without an answer has none: verification rejects it

    def __init__(self, max_turns: int = 6):
        self.max_turns = max_turns

    def system(self, tool_schemas: list[dict]) -> str:
        return annotator_system_prompt(tool_schemas)

    def first_round(self, meta: dict) -> str:
        return annotation_first_prompt(meta["hint"]["text"])

    def guidance(self, tool_name: str, p_spoof: float | None) -> str | None:
        return annotation_guidance(tool_name, p_spoof)

    def max_reasoning_turns(self, max_tool_calls: int, max_format_errors: int) -> int:
        return self.max_turns


# --- parsed turns --------------------------------------------------------------------------------
@dataclass
class FastAnswer:
    verdict: Verdict
    reason: str


@dataclass
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)


@dataclass
class ReasoningTurn:
    """One later assistant turn: a thought and either a tool call or the final answer."""

    think: str
    tool_call: ToolCall | None = None
    answer: Verdict | None = None


_CLS = {"<real>": "real", "<spoof>": "spoof"}
_FAST_RE = re.compile(r"^\s*<(Real|Spoof)>\s*<reason>(.*?)</reason>\s*$", re.S | re.I)
_TAG_RE = re.compile(r"<(/?)(think|tool_call|answer|reason)>", re.I)


def format_fast_answer(verdict: Verdict, reason: str) -> str:
    return f"<{verdict.capitalize()}><reason>{_one_line(reason)}</reason>"


def format_tool_call_turn(think: str, call: ToolCall) -> str:
    payload = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
    return f"<think>{think.strip()}</think>\n<tool_call>\n{payload}\n</tool_call>"


def format_answer_turn(think: str, verdict: Verdict) -> str:
    return f"<think>{think.strip()}</think>\n<answer><{verdict.capitalize()}></answer>"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def parse_fast_answer(text: str) -> FastAnswer:
    """Parse ``<Real|Spoof><reason>...</reason>``; anything else raises ProtocolParseError."""
    if not isinstance(text, str) or not text.strip():
        raise ProtocolParseError(
            "empty fast answer; expected <Real><reason>...</reason> or <Spoof><reason>...</reason>"
        )
    m = _FAST_RE.match(text)
    if not m:
        raise ProtocolParseError(
            "fast answer must be exactly <Real><reason>...</reason> or <Spoof><reason>...</reason>, got "
            + _preview(text)
        )
    reason = m.group(2).strip()
    if not reason:
        raise ProtocolParseError("fast answer has an empty <reason></reason>")
    if _TAG_RE.search(reason):
        raise ProtocolParseError("the <reason> of a fast answer must not contain other tags")
    return FastAnswer(_CLS["<" + m.group(1).lower() + ">"], reason)


def parse_reasoning_turn(text: str) -> ReasoningTurn:
    """Parse ``<think>..</think><tool_call>{json}</tool_call>`` or ``<think>..</think><answer><CLS></answer>``.

    Exactly one think block followed by exactly one tool call or one answer; only whitespace between
    and around them. Raises ProtocolParseError with a message that tells the model what to fix.
    """
    if not isinstance(text, str) or not text.strip():
        raise ProtocolParseError("empty reply; " + FORMAT_DECLARATION)
    blocks = _blocks(text)
    kinds = [k for k, _ in blocks]
    if kinds not in (["think", "tool_call"], ["think", "answer"]):
        found = " + ".join(f"<{k}>" for k in kinds) or "no tags"
        raise ProtocolParseError(
            f"expected <think></think> followed by one <tool_call></tool_call> or one <answer></answer>, found {found}"
        )
    think = blocks[0][1].strip()
    if not think:
        raise ProtocolParseError("<think></think> is empty; say what you are testing for")
    body = blocks[1][1].strip()
    if kinds[1] == "answer":
        verdict = _CLS.get(body.lower())
        if verdict is None:
            raise ProtocolParseError(f"<answer> must hold <Spoof> or <Real>, got {_preview(body)}")
        return ReasoningTurn(think, answer=verdict)
    return ReasoningTurn(think, tool_call=parse_tool_call(body))


# Where the class token sits in an assistant turn: the start of a fast answer (<Spoof><reason>..) or right
# after <answer>. The class-token score is read there; this only locates it, the parsers above judge the turn.
_FAST_CLASS_RE = re.compile(r"^\s*<(?:Spoof|Real)>", re.I)
_ANSWER_CLASS_RE = re.compile(r"<answer>\s*<(?:Spoof|Real)>", re.I)


def class_tag_offset(text: str) -> int | None:
    """Character offset of the class tag (``<Spoof>``/``<Real>``) in an assistant turn, or None when the
    turn gives no verdict."""
    m = _ANSWER_CLASS_RE.search(text) or _FAST_CLASS_RE.match(text)
    return m.start() + m.group(0).rfind("<") if m else None


_BARE_VERDICT_RE = re.compile(r"^\s*(?:<answer>\s*)?<?\s*(real|spoof)\s*>?\s*(?:</answer>)?\s*$", re.I)


def parse_bare_verdict(text: str) -> Verdict | None:
    """A verdict written without reasoning ("Real", "<Spoof>", "<answer><Real></answer>"), as analysts
    correct an answer; None for anything else."""
    m = _BARE_VERDICT_RE.match(text or "")
    return m.group(1).lower() if m else None  # type: ignore[return-value]


def parse_tool_call(body: str) -> ToolCall:
    """Parse the Hermes JSON inside <tool_call>: ``{"name": str, "arguments": {...}}``."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ProtocolParseError(f"<tool_call> is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(obj, dict):
        raise ProtocolParseError('<tool_call> must be a JSON object {"name": ..., "arguments": {...}}')
    name, args = obj.get("name"), obj.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise ProtocolParseError('<tool_call> needs a "name" string')
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise ProtocolParseError('"arguments" must be a JSON object') from None
    if not isinstance(args, dict):
        raise ProtocolParseError('"arguments" must be a JSON object')
    extra = set(obj) - {"name", "arguments"}
    if extra:
        raise ProtocolParseError(f"<tool_call> has unexpected keys {sorted(extra)}")
    return ToolCall(name, args)


def _blocks(text: str) -> list[tuple[str, str]]:
    """Split text into top-level tagged blocks; raise on text outside blocks, nesting or open tags."""
    blocks, pos = [], 0
    while pos < len(text):
        m = _TAG_RE.search(text, pos)
        if not m:
            if text[pos:].strip():
                raise ProtocolParseError(f"text outside the tags: {_preview(text[pos:])}")
            break
        if text[pos : m.start()].strip():
            raise ProtocolParseError(f"text outside the tags: {_preview(text[pos : m.start()])}")
        closing, tag = m.group(1), m.group(2).lower()
        if closing or tag == "reason":
            raise ProtocolParseError(f"unexpected <{m.group(1)}{m.group(2)}>")
        end = re.compile(rf"</{tag}>", re.I).search(text, m.end())
        if not end:
            raise ProtocolParseError(f"<{tag}> is never closed")
        inner = text[m.end() : end.start()]
        nested = _TAG_RE.search(inner)
        if nested:
            raise ProtocolParseError(f"<{nested.group(1)}{nested.group(2)}> inside <{tag}>")
        blocks.append((tag, inner))
        pos = end.end()
    return blocks


def _preview(text: str, n: int = 80) -> str:
    text = _one_line(text)
    return repr(text if len(text) <= n else text[:n] + "...")


# --- a whole investigation ------------------------------------------------------------------------
def investigation_error(
    turns: list[str], *, max_tool_calls: int = 3, tool_names: list[str] | tuple[str, ...] | None = None
) -> str | None:
    """Why the assistant turns of one investigation do not follow the protocol from the fast answer to
    ``<answer>``, or None when they do: a fast answer, then at most ``max_tool_calls`` think + tool-call
    turns (naming one of ``tool_names`` when given), then one think + answer turn, and nothing after it.
    Judged by the same parsers as inference (a turn the loop had to send back as an error makes the whole
    investigation invalid). Used to measure the sampled format rate of trained policies."""
    if not turns:
        return "no turns"
    try:
        parse_fast_answer(turns[0])
    except ProtocolParseError as exc:
        return f"turn 1 (fast answer): {exc}"
    calls = 0
    for i, text in enumerate(turns[1:], start=2):
        try:
            turn = parse_reasoning_turn(text)
        except ProtocolParseError as exc:
            return f"turn {i}: {exc}"
        if turn.answer is not None:
            return None if i == len(turns) else f"turn {i} answered but {len(turns) - i} more turns follow"
        calls += 1
        if calls > max_tool_calls:
            return f"turn {i}: tool call {calls} is over the limit of {max_tool_calls}"
        if tool_names is not None and turn.tool_call.name not in tool_names:
            return f"turn {i}: unknown tool {turn.tool_call.name!r}"
    return "no <answer> turn"


def is_valid_investigation(turns: list[str], **kwargs) -> bool:
    """True when :func:`investigation_error` finds nothing wrong with the turns."""
    return investigation_error(turns, **kwargs) is None

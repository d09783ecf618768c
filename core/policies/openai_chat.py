"""The ``vllm`` policy: a client of an OpenAI-compatible Chat Completions server (``vllm serve``,
``transformers serve``) that runs Qwen2.5-VL / InternVL3 with the tarfas chat template.

Each turn sends the whole conversation (system prompt with the Hermes tool block, the face and every
tool image as PNG data-URI ``image_url`` parts) and asks for ``logprobs`` so that the score is the
class-token probability (core.mllm.scoring). A server that does not return logprobs (``transformers
serve``) is detected once; from then on the score is left to the verdict text and every turn's notes
say so (``score_source``). Tool calls are read from the text, never through the server's tool parser.
"""

from __future__ import annotations

import json
import os
import time

from ..mllm.errors import ModelServerError
from ..mllm.messages import to_openai_messages
from ..mllm.scoring import score_from_top_logprobs
from ..protocol import STOP_STRINGS
from .base import Conversation, PolicyOutput

_OPEN_TAGS = ("tool_call", "answer", "reason")


def openai_client(base_url: str, api_key_env: str | None, timeout_s: float):
    """The OpenAI client of every OpenAI-compatible endpoint tarfas talks to (this policy and the
    annotation pipeline's annotator), with one rule for the API key:

    - ``api_key_env`` names the environment variable that holds the key; when it is not set, that is an
      error now (ValueError), rather than a 401 on every request later;
    - no variable named: a local server (``vllm serve``, ``transformers serve``), which accepts any key,
      gets "EMPTY".

    The client's own retries are off: callers retry what they can recover from themselves.
    """
    from openai import OpenAI

    key = os.environ.get(api_key_env) if api_key_env else None
    if api_key_env and not key:
        raise ValueError(f"environment variable {api_key_env} (the API key) is not set")
    return OpenAI(base_url=base_url, api_key=key or "EMPTY", timeout=timeout_s, max_retries=0)


class OpenAIChatPolicy:
    name = "vllm"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        logprobs: bool | None = None,
        top_logprobs: int = 20,
        timeout_s: float = 300.0,
        image_root: str | None = None,
    ):
        """``logprobs=None`` asks for them and falls back (once, recorded) if the server refuses."""
        if not base_url or not model:
            raise ValueError("the vllm policy needs base_url and model")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.client = openai_client(self.base_url, api_key_env, timeout_s)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.image_root = image_root
        self.version = f"{model}@{self.base_url}"
        self.description = (
            f"MLLM {model} served by an OpenAI-compatible endpoint at {self.base_url}; "
            "score = class-token probability from logprobs when the server returns them"
        )

    def next_turn(self, conversation: Conversation) -> PolicyOutput:
        import openai

        messages = to_openai_messages(conversation.messages, self.image_root)
        request = dict(
            model=self.model,
            messages=messages,
            max_tokens=self.max_new_tokens,
            temperature=self.temperature,
            stop=list(STOP_STRINGS),
        )
        notes: dict = {}
        t0 = time.perf_counter()
        try:
            if self.logprobs is not False:
                try:
                    resp = self.client.chat.completions.create(**request, logprobs=True, top_logprobs=self.top_logprobs)
                    self.logprobs = True
                except openai.BadRequestError as exc:  # 400 / 422: this server does not take logprobs
                    if self.logprobs is True or "logprob" not in str(exc).lower():
                        raise
                    self.logprobs = False
                    notes["logprobs_refused"] = _short(exc)
            if self.logprobs is False:
                resp = self.client.chat.completions.create(**request)
        except openai.APITimeoutError as exc:  # before APIConnectionError, its base class
            raise ModelServerError(f"{self.base_url} did not answer within {self.client.timeout:g} s") from exc
        except openai.APIConnectionError as exc:
            raise ModelServerError(f"cannot reach {self.base_url}: {exc}") from exc
        except openai.APIStatusError as exc:
            raise ModelServerError(
                f"{self.base_url} refused the request (HTTP {exc.status_code}): {_short(exc)}"
            ) from exc
        except ValueError as exc:  # a body that is not JSON
            raise ModelServerError(f"{self.base_url} answered with something that is not JSON: {_short(exc)}") from exc
        elapsed = time.perf_counter() - t0
        choices = getattr(resp, "choices", None)
        if not choices:  # an HTML error page, a JSON body that is not a completion, an empty list
            raise ModelServerError(f"{self.base_url} answered with no chat completion: {_short(resp, 120)!r}")
        choice = choices[0]
        text = _with_closing_tag(_text_of(choice.message), choice.finish_reason, getattr(choice, "stop_reason", None))
        usage = getattr(resp, "usage", None)
        notes.update(finish_reason=choice.finish_reason, request_ms=round(elapsed * 1e3, 1))
        if usage is not None:
            notes.update(prompt_tokens=usage.prompt_tokens, new_tokens=usage.completion_tokens)
        score = None
        content_lp = getattr(getattr(choice, "logprobs", None), "content", None)
        if content_lp:
            entries = [
                {
                    "token": e.token,
                    "logprob": e.logprob,
                    "top_logprobs": [{"token": a.token, "logprob": a.logprob} for a in (e.top_logprobs or [])],
                }
                for e in content_lp
            ]
            score, how = score_from_top_logprobs(text, entries)
            notes["score_source"] = how
        else:
            notes["score_source"] = "verdict text (the server returned no logprobs)"
        return PolicyOutput(text, score, notes)


def _text_of(message) -> str:
    """The assistant text; tool calls a server-side parser pulled out are put back in Hermes form."""
    text = message.content or ""
    for call in getattr(message, "tool_calls", None) or []:
        fn = call.function
        try:
            args = json.loads(fn.arguments) if isinstance(fn.arguments, str) else fn.arguments
        except json.JSONDecodeError:
            args = fn.arguments
        payload = json.dumps({"name": fn.name, "arguments": args}, ensure_ascii=False)
        text += ("\n" if text else "") + f"<tool_call>\n{payload}\n</tool_call>"
    return text


def _with_closing_tag(text: str, finish_reason: str | None, stop_reason) -> str:
    """OpenAI servers drop the matched stop string (vLLM by default): put it back so the turn parses."""
    if finish_reason != "stop" or text.rstrip().endswith(STOP_STRINGS):
        return text
    if isinstance(stop_reason, str) and stop_reason in STOP_STRINGS:
        return text + stop_reason
    last = max(_OPEN_TAGS, key=lambda t: text.rfind(f"<{t}>"))
    if text.rfind(f"<{last}>") >= 0 and text.rfind(f"</{last}>") < text.rfind(f"<{last}>"):
        return text + f"</{last}>"
    return text


def _short(exc: Exception, n: int = 300) -> str:
    s = " ".join(str(exc).split())
    return s if len(s) <= n else s[:n] + "..."

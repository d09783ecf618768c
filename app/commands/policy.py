"""The flags every investigating command shares: which policy, its backend's options (one dataclass per
backend), and the agent's tool settings."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from .flags import add_config_args, config_from_args


@dataclass
class AgentOptions:
    policy: str = field(
        default="expert", metadata={"help": "policy that investigates: expert (the offline ensemble), hf or vllm"}
    )
    max_tool_calls: int = field(default=3, metadata={"help": "tool calls allowed per investigation (paper: 3)"})
    tools: list[str] | None = field(
        default=None, metadata={"help": "comma-separated subset of tools to offer (default: all six)"}
    )
    calibration: str | None = field(
        default=None,
        metadata={
            "help": "a calibration profile (JSON, from `tarfas calibrate`) to decide with: its calibrated scores and threshold"
        },
    )
    on_no_face: Literal["error", "whole"] | None = field(
        default=None, metadata={"help": "when no face is found: stop with an error, or analyse the whole image"}
    )

    def __post_init__(self):
        if self.max_tool_calls < 0:
            raise ValueError("--max-tool-calls must be >= 0")
        from core.registry import ToolRegistry

        ToolRegistry(self.tools)  # unknown names fail here, with the known ones, before any work

    def agent_config(self, on_no_face: str):
        from core.agent import AgentConfig

        return AgentConfig(
            max_tool_calls=self.max_tool_calls, allowed_tools=self.tools, extra={"on_no_face": on_no_face}
        )


@dataclass
class ExpertOptions:
    weights: str | None = field(
        default=None, metadata={"help": "expert weights folder (default: the shipped assets/experts)"}
    )


@dataclass
class HFOptions:
    model: str | None = field(default=None, metadata={"help": "hf: checkpoint folder (Qwen2.5-VL / InternVL3-hf)"})
    adapter: str | None = field(default=None, metadata={"help": "hf: PEFT LoRA adapter folder"})
    max_new_tokens: int = field(default=512, metadata={"help": "hf/vllm: token budget of one assistant turn"})
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = field(
        default=None,
        metadata={"help": "hf: attention kernels (flash_attention_2 needs flash-attn; default: transformers' choice)"},
    )

    def __post_init__(self):
        if not self.model:
            raise ValueError("--policy hf needs --model DIR (a Qwen2.5-VL or InternVL3-hf checkpoint folder)")


@dataclass
class VLLMOptions:
    base_url: str | None = field(
        default=None, metadata={"help": "vllm: OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"}
    )
    model: str | None = field(default=None, metadata={"help": "vllm: served model name"})
    api_key_env: str | None = field(
        default=None, metadata={"help": "vllm: environment variable that holds the API key"}
    )
    max_new_tokens: int = field(default=512, metadata={"help": "hf/vllm: token budget of one assistant turn"})

    def __post_init__(self):
        if not self.base_url or not self.model:
            raise ValueError("--policy vllm needs --base-url URL and --model NAME")


BACKENDS = {"expert": ExpertOptions, "hf": HFOptions, "vllm": VLLMOptions}


def add_policy_args(parser: argparse.ArgumentParser, *, calibration: bool = True) -> None:
    add_config_args(parser, AgentOptions, exclude=() if calibration else ("calibration",))
    for options in BACKENDS.values():
        add_config_args(parser, options)


def agent_options(args: argparse.Namespace) -> AgentOptions:
    return config_from_args(AgentOptions, args)


def load_policy(args: argparse.Namespace):
    """``(policy, registry)``: the chosen backend built from its options, and the tool registry whose
    expert bank reads tool images (core.policies.resolve)."""
    from core.policies import resolve

    options = config_from_args(BACKENDS[args.policy], args) if args.policy in BACKENDS else None
    kwargs = dataclasses.asdict(options) if options else {}
    kwargs.pop("weights", None)
    return resolve(args.policy, weights=args.weights, calibration=getattr(args, "calibration", None), **kwargs)

"""Command-line flags are generated from config dataclasses (app.commands.flags): the type, the choices,
the default and the help come from the field; validation stays in the dataclass."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from app.cli import build_parser, main
from app.commands.flags import add_config_args, config_from_args


@dataclass
class Example:
    path: str = field(default="", metadata={"help": "a positional path"})
    steps: int = field(default=3, metadata={"help": "how many steps"})
    rate: float | None = field(default=None, metadata={"help": "an optional rate"})
    mode: Literal["fast", "slow"] = field(default="fast", metadata={"help": "which mode"})
    sizes: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "sizes"})
    names: list[str] | None = field(default=None, metadata={"help": "names"})
    merge: bool = field(default=False, metadata={"help": "merge at the end"})

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


@dataclass
class Other:
    steps: int = field(default=3, metadata={"help": "the other meaning of steps"})


def parse(argv):
    p = argparse.ArgumentParser()
    add_config_args(p, Example, positional=("path",))
    return p, p.parse_args(argv)


def test_defaults_types_and_lists():
    _, args = parse(["x.csv"])
    cfg = config_from_args(Example, args)
    assert cfg == Example(path="x.csv")
    _, args = parse(
        ["x.csv", "--steps", "5", "--rate", "0.5", "--mode", "slow", "--sizes", "4, 8", "--names", "a,b", "--merge"]
    )
    cfg = config_from_args(Example, args)
    assert (cfg.steps, cfg.rate, cfg.mode, cfg.sizes, cfg.names, cfg.merge) == (
        5,
        0.5,
        "slow",
        [4, 8],
        ["a", "b"],
        True,
    )
    assert config_from_args(Example, parse(["x", "--no-merge"])[1]).merge is False


def test_literal_fields_refuse_other_values(capsys):
    with pytest.raises(SystemExit):
        parse(["x.csv", "--mode", "medium"])
    assert "invalid choice: 'medium'" in capsys.readouterr().err


def test_help_shows_the_field_help_and_default():
    p, _ = parse(["x"])
    text = p.format_help()
    assert "how many steps (default: 3)" in text and "sizes (default: 1,2)" in text and "{fast,slow}" in text


def test_validation_stays_in_the_dataclass():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        config_from_args(Example, parse(["x", "--steps", "0"])[1])


def test_a_flag_two_configs_share_keeps_one_flag_with_both_helps():
    p = argparse.ArgumentParser()
    add_config_args(p, Example)
    add_config_args(p, Other)
    assert "how many steps; the other meaning of steps" in " ".join(p.format_help().split())


def test_every_verb_is_wired_and_bad_flags_are_an_exit_status(capsys):
    verbs = build_parser()._subparsers._group_actions[0].choices
    assert set(verbs) == {"investigate", "eval", "calibrate", "app", "annotate", "train", "model", "audit"}
    assert main(["train", "sft", "--stage", "xx"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["eval", "m.csv", "--max-tool-calls", "-1"]) == 2
    assert "--max-tool-calls must be >= 0" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_every_command_prints_its_help():
    """`--help` of every verb and sub-verb formats (argparse reads % in help texts as a format)."""

    def parsers(p):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield sub
                    yield from parsers(sub)

    subs = list(parsers(build_parser()))
    assert len(subs) >= 10
    for sub in subs:
        assert sub.format_help().startswith("usage:"), sub.prog
    assert "LODO AUC 88.2% -> 85.3%" in " ".join(
        next(s for s in subs if s.prog.endswith("train experts")).format_help().split()
    )

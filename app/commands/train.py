"""``tarfas train experts|sft|rs|grpo``: flags generated 1:1 from the config dataclasses of training/configs.py."""

from __future__ import annotations

import argparse

from .flags import add_config_args, config_from_args

HELP = "train models"
TARGETS = {
    "experts": (
        "ExpertTrainConfig",
        "training.experts",
        "train_experts",
        "train the expert ensemble (pretrained RGB network + one CNN per tool), choosing and calibrating on held-out domains",
        "Leave-one-domain-out training: epochs, calibration, fusion and the threshold are fitted on out-of-fold scores of domains "
        "the networks never saw; then the shipped networks are trained on every domain. See README (Shipped weights).",
    ),
    "sft": (
        "SFTConfig",
        "training.sft",
        "train_sft",
        "supervised fine-tuning of an MLLM policy: --stage kt (fast answers) or fi (multi-turn trajectories)",
        "TRL SFTTrainer + LoRA (paper §3.2.1-3.2.2). --data takes dataset folders (app export, annotation) and/or manifest CSVs, "
        "comma-separated. Writes OUT/adapter (or OUT/model) with tarfas_lineage.json. See docs/training.md.",
    ),
    "rs": (
        "RejectionSamplingConfig",
        "training.rejection",
        "rejection_sample",
        "rejection sampling: investigations sampled from a trained model, kept when valid and right, as FI data",
        "Samples investigations (real agent loop and tools) from --model on a manifest's labelled faces and keeps those "
        "that follow the protocol and reach the label, as a dataset folder for `train sft --stage fi`. See docs/training.md.",
    ),
    "grpo": (
        "GRPOConfig",
        "training.grpo",
        "train_grpo",
        "DT-GRPO with real tool rollouts (or the ST-GRPO baseline with --reward st)",
        "TRL GRPOTrainer whose rollouts run tarfas's agent loop and tools (paper §3.2.3). "
        "Writes OUT/model (or OUT/adapter with --use-lora) with tarfas_lineage.json. See docs/training.md.",
    ),
}


def _config_class(name: str):
    import training.configs

    return getattr(training.configs, name)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True)
    for what, (cls, _, _, help_text, description) in TARGETS.items():
        add_config_args(sub.add_parser(what, help=help_text, description=description), _config_class(cls))


def run(args) -> int:
    import importlib

    cls, module, function, _, _ = TARGETS[args.what]
    cfg = config_from_args(_config_class(cls), args)
    path = getattr(importlib.import_module(module), function)(cfg)
    print(f"saved {path}")
    return 0

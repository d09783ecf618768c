"""Training configurations, one dataclass per command (TRL style): every field documented, defaults
in one place, and ``tarfas train ...`` flags generated 1:1 from the fields. No heavy imports here, so
the CLI can build its parser without loading torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ExpertTrainConfig:
    """Configuration of ``tarfas train experts``; defaults are the shipped recipe. Every choice that
    depends on data (epochs, calibration, fusion, threshold) is made on held-out capture domains."""

    # data: every domain of these manifests; each is held out once (leave-one-domain-out)
    manifests: list[str] = field(
        default_factory=lambda: ["../shared/data/fas-dev/manifest.csv", "../shared/data/fas-train/manifest.csv"],
        metadata={"help": "manifests whose every domain is held out once (leave-one-domain-out)"},
    )
    domains: list[str] = field(default_factory=list, metadata={"help": "keep only these domains (empty = all)"})
    max_images: int | None = field(default=None, metadata={"help": "a seeded sample of this many images (smoke runs)"})
    # the RGB network: linear probes on frozen ImageNet MobileNetV2 and EfficientNet-Lite0 features and on
    # HSV colour LBP histograms, averaged
    rgb_size: int = field(default=128, metadata={"help": "input side (the 224 crop is resized)"})
    rgb_c: list[float] = field(
        default_factory=lambda: [0.003, 0.01, 0.03, 0.1],
        metadata={"help": "probe's inverse L2 strengths; the best by mean LODO AUC is kept"},
    )
    augment_views: int = field(
        default=0,
        metadata={
            "help": "camera-augmented copies per image added to the probe's training rows (LODO AUC 88.2% -> 85.3% with 1: off)"
        },
    )
    # the tool experts: small CNNs from scratch (AdamW, one-cycle schedule)
    epochs: int = field(
        default=3, metadata={"help": "per expert, the best epoch count up to this is kept (mean LODO AUC)"}
    )
    samples_per_epoch: int = field(default=3000, metadata={"help": "domain- and class-balanced draws per epoch"})
    batch_size: int = field(default=32, metadata={"help": "tool experts: draws per optimiser step"})
    lr_tools: float = field(default=1e-3, metadata={"help": "paper App. A.3"})
    weight_decay: float = field(default=1e-4, metadata={"help": "tool experts: AdamW weight decay"})
    # policy
    max_tool_calls: int = field(
        default=3, metadata={"help": "the policy replayed on out-of-fold logits to fix its threshold"}
    )
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    seed: int = field(default=0, metadata={"help": "seed of the draws, samples and initialisation"})
    # output
    out: str = field(
        default="assets/experts", metadata={"help": "output folder of the networks, experts.json and lodo_logits.csv"}
    )
    reuse_tool_experts: str = field(
        default="",
        metadata={
            "help": "an expert folder trained on the same images (same data digest): keep its tool experts and their "
            "out-of-fold logits, train only the RGB network (the tool experts are seeded: a full run reproduced them, HOGTool's up to float noise)"
        },
    )
    calibrate_only: bool = field(
        default=False,
        metadata={
            "help": "keep the networks in `out`; refit calibration, fusion and threshold from its lodo_logits.csv"
        },
    )


# --- MLLM training (paper §3.2, §4.1): KT / FI supervised fine-tuning and DT-GRPO ------------------------
PRECISION_HELP = (
    '"auto" (bf16 on GPUs that support it, else fp32), "bf16", "fp16" or "fp32". Mixed precision: LoRA runs load the'
    " frozen base in this dtype; full-parameter runs keep fp32 weights (DeepSpeed: its fp32 master copies)"
)


@dataclass
class SFTConfig:
    """Configuration of ``tarfas train sft`` (stages KT and FI). Defaults are the paper's (§4.1): LoRA rank
    16, lr 1e-4, AdamW with weight decay 0.05, first-turn loss scale alpha = 0.9. The paper's batch is 256
    for up to 4000 steps; the defaults here are sized for one device (see docs/training.md to scale out)."""

    # Parameters that control the data
    stage: Literal["kt", "fi"] = field(
        default="kt",
        metadata={"help": '"kt": image + first-round query -> fast answer; "fi": whole multi-turn trajectories'},
    )
    data: list[str] = field(
        default_factory=list, metadata={"help": "dataset folders (app export, annotation, built) and/or manifest CSVs"}
    )
    domains: list[str] = field(
        default_factory=list, metadata={"help": "manifest rows: keep these domains (empty = all)"}
    )
    split: str | None = field(default=None, metadata={"help": "manifest rows: keep this split (train/test)"})
    max_examples: int | None = field(
        default=None, metadata={"help": "cap on examples (a seeded sample), for smoke runs"}
    )
    build_dir: str | None = field(
        default=None, metadata={"help": "where a manifest is turned into a dataset folder (default: OUT/data)"}
    )
    keep_mismatched: bool = field(
        default=False, metadata={"help": "FI: also train on trajectories whose final answer disagrees with the label"}
    )
    # Parameters that control the model
    model: str = field(
        default="",
        metadata={
            "help": "base checkpoint folder (Qwen2.5-VL / InternVL3, transformers format; `tarfas model init-nano`)"
        },
    )
    adapter: str | None = field(
        default=None, metadata={"help": "start from this LoRA adapter (e.g. the KT adapter for FI): it keeps training"}
    )
    use_lora: bool = field(
        default=True,
        metadata={"help": "the paper's LoRA; False trains all parameters (nano smoke runs) and writes OUT/model"},
    )
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_targets: str = field(
        default=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        metadata={"help": "regex of the modules that get LoRA adapters"},
    )
    # Parameters that control the optimisation
    first_turn_weight: float = field(
        default=0.9, metadata={"help": "alpha of the FI loss: a*NLL(turn 1) + (1-a)*NLL(later turns)"}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers learning-rate schedule"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "share of steps spent warming up"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "examples per device and step"})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "paper: per-device batch x accumulation x GPUs = 256"}
    )
    max_steps: int = field(default=4000, metadata={"help": "paper: up to 4000 steps; -1 = use num_train_epochs"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs when max_steps is -1"})
    max_length: int | None = field(
        default=4096, metadata={"help": "tokens per example (images included); longer examples are truncated"}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})
    share_prefix: bool = field(
        default=True,
        metadata={
            "help": "compute the prompt every example of a batch starts with (system prompt, up to the first image) "
            "once per batch instead of once per example: the same loss and gradients, less compute "
            "(training/shared_prefix.py; one-process runs without --gradient-checkpointing)"
        },
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = field(default="auto", metadata={"help": PRECISION_HELP})
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = field(
        default=None,
        metadata={
            "help": 'attention kernels of the model: "eager", "sdpa" or "flash_attention_2" (needs flash-attn; default: transformers\' choice, sdpa)'
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the data order and initialisation"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    logging_steps: int = field(default=10, metadata={"help": "log every N steps"})
    save_steps: int = field(default=500, metadata={"help": "save a checkpoint every N steps (0 = only at the end)"})
    # Parameters that control the output
    out: str = field(
        default="runs/sft", metadata={"help": "output folder (adapter or model, with tarfas_lineage.json)"}
    )
    merge: bool = field(
        default=False,
        metadata={"help": "also write OUT/merged: the base with the adapter merged in (a plain checkpoint folder)"},
    )
    report_to: str = field(default="none", metadata={"help": '"none", "tensorboard", "wandb", ...'})


@dataclass
class RewardConfig:
    """The reward of ``tarfas train grpo`` (training/rewards.py): its kind and the paper's weights (§4.1)."""

    kind: Literal["dt", "st"] = field(
        default="dt", metadata={"help": "dt: DT-GRPO, eqs. 10-14; st: the ST-GRPO baseline, eq. S15"}
    )
    beta_fast: float = field(default=0.1, metadata={"help": "reward weight of the fast answer (eq. 14)"})
    beta_rsn: float = field(default=0.5, metadata={"help": "reward weight of the reasoning answer (eq. 14)"})
    beta_tool: float = field(default=0.4, metadata={"help": "reward weight of the tool-diversity term (eq. 14)"})
    gamma: dict[str, float] = field(
        default_factory=lambda: {name: DEFAULT_GAMMA for name in _tool_names()},
        metadata={"help": "gamma_k per tool (eq. 12)"},
    )

    def __post_init__(self):
        if self.kind not in ("dt", "st"):
            raise ValueError(f"reward kind must be 'dt' or 'st', got {self.kind!r}")
        unknown = set(self.gamma) - set(_tool_names())
        if unknown:
            raise ValueError(f"gamma names unknown tools {sorted(unknown)}; tools: {_tool_names()}")


DEFAULT_GAMMA = 0.2  # gamma_k of every tool (paper §4.1)


def _reward_field(name: str):
    """A GRPOConfig flag that is a RewardConfig field: the same default and help, written once."""
    f = RewardConfig.__dataclass_fields__[name]
    return field(default=f.default, metadata=f.metadata)


def _tool_names() -> list[str]:
    from core.registry import ToolRegistry  # the tools' image code is heavy; the parser must stay light

    return ToolRegistry(None).names


@dataclass
class GRPOConfig:
    """Configuration of ``tarfas train grpo`` (DT-GRPO, paper §3.2.3 and §4.1). Defaults are the paper's:
    G = 8 rollouts per query, KL coefficient 0, lr 1e-6, AdamW weight decay 0.05, full-parameter training,
    reward weights 0.1 / 0.5 / 0.4 and gamma_k = 0.2, at most 3 tool calls. The paper's completion batch is
    512 (64 queries x 8) for 300 steps."""

    # Parameters that control the data
    data: list[str] = field(
        default_factory=list, metadata={"help": "dataset folders and/or manifest CSVs: (face crop, label) queries"}
    )
    domains: list[str] = field(
        default_factory=list, metadata={"help": "manifest rows: keep these domains (empty = all)"}
    )
    split: str | None = field(default=None, metadata={"help": "manifest rows: keep this split (train/test)"})
    max_examples: int | None = field(
        default=None, metadata={"help": "cap on queries (a seeded sample), for smoke runs"}
    )
    build_dir: str | None = field(
        default=None, metadata={"help": "where a manifest is turned into a dataset folder (default: OUT/data)"}
    )
    select_band: float | None = field(
        default=None,
        metadata={
            "help": "train only on queries whose fast-answer P(spoof) under the starting model lies in "
            "[BAND, 1 - BAND] (one forward pass per candidate; a sure model gives unanimous groups and no "
            "gradient); None: every query"
        },
    )
    # Parameters that control the model
    model: str = field(
        default="", metadata={"help": "base checkpoint folder, or the merged output of `train sft --merge`"}
    )
    adapter: str | None = field(default=None, metadata={"help": "the FI adapter: merged into the base before RL"})
    use_lora: bool = field(
        default=False,
        metadata={"help": "the paper trains all parameters; True trains (and saves) a LoRA adapter instead"},
    )
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank (with use_lora)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (with use_lora)"})
    lora_targets: str = field(
        default=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        metadata={"help": "regex of the modules that get LoRA adapters"},
    )
    # Parameters that control the rollouts
    num_generations: int = field(default=8, metadata={"help": "G"})
    max_tool_calls: int = field(default=3, metadata={"help": "paper's best (Fig. S11)"})
    max_format_errors: int = field(
        default=2, metadata={"help": "malformed turns tolerated inside a rollout (each costs the format reward)"}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "per assistant turn"})
    max_completion_length: int = field(default=4096, metadata={"help": "all turns of a rollout, tool images included"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of the rollouts"})
    tools: list[str] = field(
        default_factory=list, metadata={"help": 'tools offered (empty = all six; reward "st" forces ZoomInTool)'}
    )
    use_vllm: bool = field(
        default=False, metadata={"help": 'generate with vLLM (GPU); "colocate" shares the GPU with training'}
    )
    vllm_mode: Literal["colocate", "server"] = field(
        default="colocate",
        metadata={"help": "vLLM next to training on the same GPU (colocate) or a separate `trl vllm-serve` (server)"},
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "share of GPU memory vLLM may take (colocate)"}
    )
    vllm_max_model_length: int | None = field(
        default=None,
        metadata={
            "help": "vLLM context window (colocate): prompt + whole rollout, tool images included (default: the model's)"
        },
    )
    vllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "GPUs that hold one vLLM copy (colocate; a divisor of the processes)"}
    )
    # Parameters that control the reward (training/rewards.py)
    reward: Literal["dt", "st"] = field(
        default="dt", metadata={"help": '"dt": DT-GRPO eqs. 10-14; "st": the ST-GRPO baseline, eq. S15 (ZoomIn only)'}
    )
    beta_fast: float = _reward_field("beta_fast")
    beta_rsn: float = _reward_field("beta_rsn")
    beta_tool: float = _reward_field("beta_tool")
    gamma: float = field(default=DEFAULT_GAMMA, metadata={"help": "gamma_k of every tool"})
    # Parameters that control the optimisation
    beta: float = field(default=0.0, metadata={"help": "KL coefficient (paper: 0)"})
    replay_data: list[str] = field(
        default_factory=list,
        metadata={
            "help": "SFT trajectories replayed during RL (dataset folders, as --data of `train sft --stage fi`): "
            "their FI loss joins every step's loss, so the protocol learnt in SFT is not forgotten (InstructGPT's "
            "PPO-ptx); empty: off (the paper)"
        },
    )
    replay_coef: float = field(default=1.0, metadata={"help": "weight of the replayed FI loss (with replay_data)"})
    replay_batch: int = field(default=2, metadata={"help": "replayed trajectories per step (with replay_data)"})
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = field(
        default="grpo",
        metadata={
            "help": "TRL's loss normalisation: \"grpo\" averages each completion over its own tokens (the paper's "
            'eq.; a long wrong completion then costs less per token), "dapo" averages over every token of the batch, '
            '"dr_grpo" divides by batch size x max_completion_length'
        },
    )
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "completions per device and step; a multiple of num_generations"}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "paper: completions per step = 512"})
    max_steps: int = field(default=300, metadata={"help": "optimiser steps"})
    precision: Literal["auto", "bf16", "fp16", "fp32"] = field(default="auto", metadata={"help": PRECISION_HELP})
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = field(
        default=None,
        metadata={
            "help": 'attention kernels of the model: "eager", "sdpa" or "flash_attention_2" (needs flash-attn; default: transformers\' choice, sdpa)'
        },
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})
    seed: int = field(default=0, metadata={"help": "seed of the data order and rollouts"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    logging_steps: int = field(default=1, metadata={"help": "log every N steps"})
    save_steps: int = field(default=50, metadata={"help": "save a checkpoint every N steps (0 = only at the end)"})
    # Parameters that control the output
    out: str = field(
        default="runs/grpo",
        metadata={"help": "output folder (model, or adapter with use_lora, with tarfas_lineage.json)"},
    )
    report_to: str = field(default="none", metadata={"help": "where to report metrics: none, tensorboard, wandb, ..."})

    def reward_config(self) -> RewardConfig:
        """The reward these flags describe (gamma_k the same for every tool)."""
        return RewardConfig(
            kind=self.reward,
            beta_fast=self.beta_fast,
            beta_rsn=self.beta_rsn,
            beta_tool=self.beta_tool,
            gamma={name: self.gamma for name in _tool_names()},
        )


@dataclass
class RejectionSamplingConfig:
    """Configuration of ``tarfas train rs``: investigations sampled from a trained checkpoint at
    ``temperature`` on labelled faces, kept when they follow the protocol and (``keep="correct"``) reach the
    label; the kept ones are a dataset folder for ``tarfas train sft --stage fi`` (training/rejection.py)."""

    # Parameters that control the data
    manifest: str = field(default="", metadata={"help": "labelled faces: a manifest CSV (fas-dev's format)"})
    root: str | None = field(default=None, metadata={"help": "folder the manifest's paths are relative to"})
    domains: list[str] = field(
        default_factory=list, metadata={"help": "manifest rows: keep these domains (empty = all)"}
    )
    split: str | None = field(default=None, metadata={"help": "manifest rows: keep this split (train/test)"})
    exclude: list[str] = field(
        default_factory=list,
        metadata={"help": "dataset folders whose faces are skipped (annotation or earlier rs folders)"},
    )
    limit: int | None = field(
        default=None, metadata={"help": "faces to sample: a seeded sample of the rows left (default: all)"}
    )
    samples_per_face: int = field(default=1, metadata={"help": "investigations sampled per face"})
    num_shards: int = field(
        default=1, metadata={"help": "split the selected faces into this many shards (one process each)"}
    )
    shard: int = field(default=0, metadata={"help": "the shard this process samples (0 .. num_shards - 1)"})
    keep: Literal["correct", "valid"] = field(
        default="correct",
        metadata={"help": '"correct": valid investigations whose final answer is the label; "valid": every valid one'},
    )
    # Parameters that control the sampling
    model: str = field(default="", metadata={"help": "checkpoint folder to sample (the FI model)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (the rollouts' and GRPO's)"})
    max_new_tokens: int = field(default=192, metadata={"help": "per assistant turn"})
    max_tool_calls: int = field(default=3, metadata={"help": "the inference loop's limit"})
    batch_size: int = field(default=16, metadata={"help": "investigations sampled in lockstep"})
    seed: int = field(default=0, metadata={"help": "seed of the face sample and the sampling"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    # Parameters that control the output
    out: str = field(default="runs/rs", metadata={"help": "output dataset folder (new or empty)"})

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0: rejection sampling needs samples")
        if self.samples_per_face < 1 or self.batch_size < 1:
            raise ValueError("samples_per_face and batch_size must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")
        if not 0 <= self.shard < self.num_shards:
            raise ValueError(f"shard must be in 0 .. num_shards - 1 (got {self.shard} of {self.num_shards})")

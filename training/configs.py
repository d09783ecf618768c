"""Training configurations, one dataclass per command (TRL style): every field documented, defaults
in one place, and ``tarfas train ...`` flags generated 1:1 from the fields. No heavy imports here, so
the CLI can build its parser without loading torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ExpertTrainConfig:
    """Configuration of ``tarfas train experts``; defaults are the shipped recipe. Every choice that
    depends on data (epochs, calibration, fusion, threshold) is made on held-out capture domains."""

    # data: every domain of these manifests; each is held out once (leave-one-domain-out)
    manifests: list[str] = field(default_factory=lambda: ["../shared/data/fas-dev/manifest.csv", "../shared/data/fas-train/manifest.csv"])
    domains: list[str] = field(default_factory=list)  # keep only these domains (empty = all)
    max_images: int | None = None  # a seeded sample of this many images (smoke runs)
    # the RGB network: a linear probe on frozen ImageNet MobileNetV2 features
    rgb_size: int = 128  # input side (the 224 crop is resized)
    rgb_c: list[float] = field(default_factory=lambda: [0.003, 0.01, 0.03, 0.1])  # probe's inverse L2 strengths; the best by mean LODO AUC is kept
    augment_views: int = 0  # camera-augmented copies per image added to the probe's training rows (LODO AUC 88.2% -> 85.3% with 1: off)
    # the tool experts: small CNNs from scratch (AdamW, one-cycle schedule)
    epochs: int = 3  # per expert, the best epoch count up to this is kept (mean LODO AUC)
    samples_per_epoch: int = 3000  # domain- and class-balanced draws per epoch
    batch_size: int = 32
    lr_tools: float = 1e-3  # paper App. A.3
    weight_decay: float = 1e-4
    # policy
    max_tool_calls: int = 3  # the policy replayed on out-of-fold logits to fix its threshold
    threads: int = 2
    seed: int = 0
    # output
    out: str = "assets/experts"
    calibrate_only: bool = False  # keep the networks in `out`; refit calibration, fusion and threshold from its lodo_logits.csv


# --- MLLM training (paper §3.2, §4.1): KT / FI supervised fine-tuning and DT-GRPO ------------------------
@dataclass
class SFTConfig:
    """Configuration of ``tarfas train sft`` (stages KT and FI). Defaults are the paper's (§4.1): LoRA rank
    16, lr 1e-4, AdamW with weight decay 0.05, first-turn loss scale alpha = 0.9. The paper's batch is 256
    for up to 4000 steps; the defaults here are sized for one device (see docs/training.md to scale out)."""

    # Parameters that control the data
    stage: str = "kt"  # "kt": image + first-round query -> fast answer; "fi": whole multi-turn trajectories
    data: list[str] = field(default_factory=list)  # dataset folders (app export, annotation, built) and/or manifest CSVs
    domains: list[str] = field(default_factory=list)  # manifest rows: keep these domains (empty = all)
    split: str | None = None  # manifest rows: keep this split (train/test)
    max_examples: int | None = None  # cap on examples (a seeded sample), for smoke runs
    build_dir: str | None = None  # where a manifest is turned into a dataset folder (default: OUT/data)
    keep_mismatched: bool = False  # FI: also train on trajectories whose final answer disagrees with the label
    # Parameters that control the model
    model: str = ""  # base checkpoint folder (Qwen2.5-VL / InternVL3, transformers format; `tarfas model init-nano`)
    adapter: str | None = None  # start from this LoRA adapter (e.g. the KT adapter for FI): it keeps training
    use_lora: bool = True  # the paper's LoRA; False trains all parameters (nano smoke runs) and writes OUT/model
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    # Parameters that control the optimisation
    first_turn_weight: float = 0.9  # alpha of the FI loss: a*NLL(turn 1) + (1-a)*NLL(later turns)
    learning_rate: float = 1e-4
    weight_decay: float = 0.05
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1  # paper: per-device batch x accumulation x GPUs = 256
    max_steps: int = 4000  # paper: up to 4000 steps; -1 = use num_train_epochs
    num_train_epochs: float = 1.0
    max_length: int | None = 4096  # tokens per example (images included); longer examples are truncated
    gradient_checkpointing: bool = False
    precision: str = "auto"  # "auto" (bf16 on GPUs that support it, else fp32), "bf16", "fp16" or "fp32"
    seed: int = 0
    threads: int = 2  # torch CPU threads
    logging_steps: int = 10
    save_steps: int = 500
    # Parameters that control the output
    out: str = "runs/sft"
    merge: bool = False  # also write OUT/merged: the base with the adapter merged in (a plain checkpoint folder)
    report_to: str = "none"  # "none", "tensorboard", "wandb", ...


@dataclass
class GRPOConfig:
    """Configuration of ``tarfas train grpo`` (DT-GRPO, paper §3.2.3 and §4.1). Defaults are the paper's:
    G = 8 rollouts per query, KL coefficient 0, lr 1e-6, AdamW weight decay 0.05, full-parameter training,
    reward weights 0.1 / 0.5 / 0.4 and gamma_k = 0.2, at most 3 tool calls. The paper's completion batch is
    512 (64 queries x 8) for 300 steps."""

    # Parameters that control the data
    data: list[str] = field(default_factory=list)  # dataset folders and/or manifest CSVs: (face crop, label) queries
    domains: list[str] = field(default_factory=list)
    split: str | None = None
    max_examples: int | None = None
    build_dir: str | None = None
    # Parameters that control the model
    model: str = ""  # base checkpoint folder, or the merged output of `train sft --merge`
    adapter: str | None = None  # the FI adapter: merged into the base before RL
    use_lora: bool = False  # the paper trains all parameters; True trains (and saves) a LoRA adapter instead
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_targets: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    # Parameters that control the rollouts
    num_generations: int = 8  # G
    max_tool_calls: int = 3  # paper's best (Fig. S11)
    max_format_errors: int = 2  # malformed turns tolerated inside a rollout (each costs the format reward)
    max_new_tokens: int = 256  # per assistant turn
    max_completion_length: int = 4096  # all turns of a rollout, tool images included
    temperature: float = 1.0
    top_p: float = 1.0
    tools: list[str] = field(default_factory=list)  # tools offered (empty = all six; reward "st" forces ZoomInTool)
    use_vllm: bool = False  # generate with vLLM (GPU); "colocate" shares the GPU with training
    vllm_mode: str = "colocate"
    vllm_gpu_memory_utilization: float = 0.3
    # Parameters that control the reward (training/rewards.py)
    reward: str = "dt"  # "dt": DT-GRPO eqs. 10-14; "st": the ST-GRPO baseline, eq. S15 (ZoomIn only)
    beta_fast: float = 0.1
    beta_rsn: float = 0.5
    beta_tool: float = 0.4
    gamma: float = 0.2  # gamma_k of every tool
    # Parameters that control the optimisation
    beta: float = 0.0  # KL coefficient (paper: 0)
    learning_rate: float = 1e-6
    weight_decay: float = 0.05
    per_device_train_batch_size: int = 8  # completions per device and step; a multiple of num_generations
    gradient_accumulation_steps: int = 1  # paper: completions per step = 512
    max_steps: int = 300
    precision: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    threads: int = 2
    logging_steps: int = 1
    save_steps: int = 50
    # Parameters that control the output
    out: str = "runs/grpo"
    report_to: str = "none"

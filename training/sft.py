"""``tarfas train sft --stage kt|fi``: supervised fine-tuning with TRL's SFTTrainer and a PEFT LoRA adapter.

- **KT** (§3.2.1, eq. 7): the plain token NLL of the fast answer, assistant tokens only.
- **FI** (§3.2.2, eq. 8): whole trajectories with the first-turn loss scale,
  ``L = [a * sum_{t in turn 1} nll_t + (1 - a) * sum_{t in later turns} nll_t] / N`` with a = 0.9 and N the
  number of supervised tokens in the batch (TRL's normalisation, so the loss keeps the usual per-token
  scale and gradient accumulation stays exact). TRL has no per-turn weights, so two small pieces are
  written here: :class:`TurnWeightedCollator` marks which assistant turn every label token belongs to,
  and :class:`TurnWeightedSFTTrainer.compute_loss` applies the weights.

The chat template (core/mllm/templates) wraps assistant text in ``{% generation %}`` markers, so TRL's
``assistant_only_loss`` masks the system prompt, the user turns and the tool images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from .configs import SFTConfig
from .datasets import fi_examples, kt_examples, load_sources, to_hf_dataset
from .lineage import write_lineage
from .shared_prefix import prefill_shared_prefix


# --- the FI loss weighting ------------------------------------------------------------------------------
def turn_index(labels: torch.Tensor) -> torch.Tensor:
    """For each position, the 0-based index of the assistant turn its label belongs to (-1 where the label
    is ignored). Assistant turns are the maximal runs of supervised labels: user turns always separate them."""
    supervised = labels != -100
    starts = supervised & ~torch.nn.functional.pad(supervised[:, :-1], (1, 0), value=False)
    index = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(supervised, index, torch.full_like(index, -1))


def turn_weights(labels: torch.Tensor, first_turn_weight: float) -> torch.Tensor:
    """a on the first assistant turn's tokens, 1 - a on later turns' tokens, 0 on ignored positions."""
    idx = turn_index(labels)
    w = torch.zeros(labels.shape, dtype=torch.float32)
    w[idx == 0] = first_turn_weight
    w[idx > 0] = 1.0 - first_turn_weight
    return w


@dataclass
class TurnWeightedCollator(DataCollatorForVisionLanguageModeling):
    """TRL's VLM collator plus ``loss_weights`` (per label position) for the FI loss."""

    first_turn_weight: float = 0.9

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        batch["loss_weights"] = turn_weights(batch["labels"], self.first_turn_weight)
        return batch


def weighted_nll(log_probs: torch.Tensor, loss_weights: torch.Tensor, num_tokens) -> torch.Tensor:
    """The FI loss from TRL's fused-head output. ``log_probs[:, t]`` scores ``labels[:, t + 1]`` (zero on
    ignored positions), so the weights are shifted the same way."""
    w = loss_weights[:, 1:].to(log_probs.dtype)
    return (-log_probs * w).sum() / torch.as_tensor(num_tokens).clamp(min=1)


class TurnWeightedSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is a*NLL(turn 1) + (1-a)*NLL(later turns) when the batch has ``loss_weights``."""

    share_prefix: bool = False  # set from SFTConfig.share_prefix (training/shared_prefix.py)

    def _can_share_prefix(self) -> bool:
        """Two forward passes feed one backward: fine for one process, not for DDP/DeepSpeed/FSDP, whose gradient
        hooks expect each parameter once per step; gradient checkpointing re-runs the forward without a cache."""
        distributed = self.accelerator.num_processes > 1 or self.is_deepspeed_enabled or self.is_fsdp_enabled
        return not (distributed or self.args.gradient_checkpointing)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop("loss_weights", None)
        if self.share_prefix and self._can_share_prefix():
            inputs, p = prefill_shared_prefix(model, inputs)
            weights = None if weights is None else weights[:, p:]
        if weights is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = weighted_nll(outputs.log_probs, weights, num_tokens)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        with torch.no_grad():  # per-turn NLL, for the logs
            idx = turn_index(inputs["labels"])[:, 1:]
            nll = -outputs.log_probs.detach()
            for name, sel in (("nll/turn1", idx == 0), ("nll/later_turns", idx > 0)):
                if sel.any():
                    self._metrics[mode][name].append(nll[sel].mean().item())
        return (loss, outputs) if return_outputs else loss


# --- the command ----------------------------------------------------------------------------------------
def precision_plan(
    device: str, precision: str, *, use_lora: bool, deepspeed: bool, bf16_supported: bool = True
) -> dict:
    """How a training run holds and computes its weights: ``{"dtype": load dtype, "bf16": ..., "fp16": ...}``
    (the last two are the Trainer's mixed-precision flags: autocast compute, weights kept as loaded).

    - precision "auto" is bf16 on a GPU that supports it, else fp32;
    - LoRA: the base weights are frozen, so they load in the compute dtype (half the memory); PEFT keeps the
      adapter weights in fp32 (``autocast_adapter_dtype``);
    - full-parameter with DeepSpeed: the compute dtype too; DeepSpeed's bf16/fp16 optimizer keeps fp32
      master copies of the weights (and ZeRO-3 shards them as they load);
    - full-parameter otherwise (DDP, FSDP, one device): fp32 weights, bf16/fp16 autocast for the compute.
      AdamW on bf16 weights loses every update below the weight's bf16 spacing (2^-8 relative): at lr 1e-6
      almost no weight moves, and the run silently does not learn.
    """
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") and bf16_supported else "fp32"
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    compute = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
    dtype = compute if (use_lora or deepspeed) else "float32"
    return {"dtype": dtype, "bf16": precision == "bf16", "fp16": precision == "fp16"}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX-512 BF16 or AMX): there bf16 autocast trains
    a small model about 1.4x faster than fp32; without it bf16 is emulated and slower."""
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def precision_flags(precision: str) -> dict:
    """The Trainer's ``bf16`` / ``fp16`` flags of ``precision`` on this machine (see :func:`precision_plan`)."""
    plan = precision_plan(_device(), precision, use_lora=True, deepspeed=False, bf16_supported=_bf16_supported())
    flags = {"bf16": plan["bf16"], "fp16": plan["fp16"]}
    if plan["bf16"] and _device() == "cpu":
        flags["use_cpu"] = True  # bf16 autocast on a CPU (AVX-512 BF16 / AMX): transformers asks for it explicitly
    return flags


def training_dtype(args, precision: str, *, use_lora: bool) -> str:
    """The load dtype of the weights to train, given the built TRL/transformers config ``args`` (which knows
    whether DeepSpeed runs: ``accelerate launch`` with a DeepSpeed config, or ``args.deepspeed``)."""
    deepspeed = getattr(args, "deepspeed_plugin", None) is not None or bool(getattr(args, "deepspeed", None))
    plan = precision_plan(
        _device(), precision, use_lora=use_lora, deepspeed=deepspeed, bf16_supported=_bf16_supported()
    )
    return plan["dtype"]


def load_policy_model(
    model_dir: str,
    adapter: str | None,
    *,
    trainable_adapter: bool,
    merge_adapter: bool,
    dtype: str | None = None,
    attn_implementation: str | None = None,
):
    """The base checkpoint (+ an existing adapter: trainable, or merged in) and its processor. ``dtype``: the
    load dtype (training: :func:`training_dtype`; None: bf16 when a bf16 GPU is present, else fp32).

    Call it after building the training config: under ``accelerate launch`` with DeepSpeed ZeRO-3 the config
    registers DeepSpeed, and only then does ``from_pretrained`` shard the weights as it loads them."""
    from core.mllm.processor import load_model_and_processor

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Weights load on the CPU (the Trainer places them).
    if dtype is None:
        dtype = "bfloat16" if _bf16_supported() else "float32"
    loaded = load_model_and_processor(model_dir, device="cpu", dtype=dtype, attn_implementation=attn_implementation)
    model = loaded.model
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable_adapter)
        if merge_adapter:
            model = model.merge_and_unload()
            model.requires_grad_(True)  # PEFT froze the base weights; merged, they are the model to train
    model.train()
    return model, loaded.processor, loaded.arch


def load_data(cfg, out: Path):
    """The run's sources; under ``accelerate launch`` the main process builds manifests first, once."""
    from accelerate import PartialState

    with PartialState().main_process_first():
        return load_sources(cfg.data, build_dir=cfg.build_dir or out / "data", domains=cfg.domains or None, split=cfg.split,
                            max_examples=cfg.max_examples, seed=cfg.seed)  # fmt: skip


# SFTConfig fields that trl.SFTConfig takes under the same name and with the same meaning.
TRL_SFT_FIELDS = (
    "max_length",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "weight_decay",
    "lr_scheduler_type",
    "max_steps",
    "num_train_epochs",
    "logging_steps",
    "save_steps",
    "report_to",
    "seed",
    "gradient_checkpointing",
)


def train_sft(cfg: SFTConfig, callbacks: list | None = None) -> Path:
    """Run one SFT stage; returns the adapter folder ``OUT/adapter`` (or ``OUT/model`` without LoRA), with its
    lineage (tarfas_lineage.json) inside."""
    import trl
    from peft import LoraConfig

    if cfg.stage not in ("kt", "fi"):
        raise ValueError(f"stage must be 'kt' or 'fi', got {cfg.stage!r}")
    if not cfg.model:
        raise ValueError("--model is required: a checkpoint folder (e.g. from `tarfas model init-nano`)")
    if not 0.0 <= cfg.first_turn_weight <= 1.0:
        raise ValueError("first_turn_weight must be in [0, 1]")
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    data = load_data(cfg, out)
    if cfg.stage == "kt":
        rows = kt_examples(data, max_examples=cfg.max_examples, seed=cfg.seed)
    else:
        rows = fi_examples(data, keep_mismatched=cfg.keep_mismatched, max_examples=cfg.max_examples, seed=cfg.seed)
    print(f"[sft {cfg.stage}] {len(rows)} examples; data: {data.stats}")
    train_ds = to_hf_dataset([{"messages": r["messages"], "images": r["images"]} for r in rows])

    # The training config first: under `accelerate launch` with DeepSpeed it registers DeepSpeed, which ZeRO-3
    # needs before the weights load (they are sharded as they load) and which decides their load dtype.
    args = trl.SFTConfig(**{
        **{name: getattr(cfg, name) for name in TRL_SFT_FIELDS},
        "output_dir": str(out / "checkpoints"), "assistant_only_loss": True, "optim": "adamw_torch",
        "warmup_steps": cfg.warmup_ratio,  # a float < 1 is a ratio of the steps (warmup_ratio is deprecated)
        "save_strategy": "steps" if cfg.save_steps > 0 else "no", "save_only_model": True,
        "remove_unused_columns": False, "dataloader_num_workers": 0, **precision_flags(cfg.precision),
    })  # fmt: skip
    # Continuing from an adapter (KT -> FI) keeps training that same adapter, so the result always applies to
    # the original base model: the app loads it as --model BASE --adapter OUT/adapter.
    # Without LoRA, a given adapter is merged into the base and every weight trains.
    model, processor, _ = load_policy_model(
        cfg.model, cfg.adapter, trainable_adapter=cfg.use_lora, merge_adapter=not cfg.use_lora,
        dtype=training_dtype(args, cfg.precision, use_lora=cfg.use_lora), attn_implementation=cfg.attn_implementation,
    )  # fmt: skip
    peft_config = None
    if cfg.use_lora and cfg.adapter is None:
        peft_config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=cfg.lora_targets, task_type="CAUSAL_LM")  # fmt: skip
    collator = None
    if cfg.stage == "fi":
        collator = TurnWeightedCollator(
            processor, max_length=cfg.max_length, assistant_only_loss=True, first_turn_weight=cfg.first_turn_weight
        )
    trainer = TurnWeightedSFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=processor,
                                     data_collator=collator, peft_config=peft_config, callbacks=callbacks)  # fmt: skip
    trainer.share_prefix = cfg.share_prefix
    result = trainer.train()
    dest = out / ("adapter" if cfg.use_lora else "model")
    trainer.save_model(str(dest))  # every rank takes part (ZeRO-3 gathers the weights); the rest is the main rank's
    if not trainer.accelerator.is_main_process:
        return dest
    (dest / "training_args.bin").unlink(missing_ok=True)  # a pickle; nothing of ours reads it
    if not cfg.use_lora:
        from core.mllm.processor import detect_arch, install_remote_code

        processor.save_pretrained(str(dest))
        install_remote_code(dest, detect_arch(cfg.model))
    history = [h for h in trainer.state.log_history if "loss" in h]
    summary = {"train_loss": result.training_loss, "steps": trainer.state.global_step, "log": history,
               "seconds": result.metrics.get("train_runtime")}  # fmt: skip
    write_lineage(dest, kind="lora-adapter" if cfg.use_lora else "full-model", stage=cfg.stage, config=cfg, base_model=cfg.model,
                  parent=cfg.adapter, data=data.fingerprints(), stats=data.stats, result=summary)  # fmt: skip
    if cfg.merge and cfg.use_lora:
        merge_adapter(cfg.model, dest, out / "merged")
    return dest


def merge_adapter(model_dir: str | Path, adapter_dir: str | Path, out: str | Path) -> Path:
    """Write base + adapter as one plain checkpoint folder (weights, processor, chat template, lineage)."""
    import shutil

    from core.mllm.processor import install_remote_code

    model, processor, arch = load_policy_model(
        str(model_dir), str(adapter_dir), trainable_adapter=False, merge_adapter=True
    )
    out = Path(out)
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    install_remote_code(out, arch)  # (no tarfas_nano.json: the hf policy would call the model untrained)
    src = Path(adapter_dir) / "tarfas_lineage.json"
    if src.is_file():
        shutil.copyfile(src, out / "tarfas_lineage.json")
    return out

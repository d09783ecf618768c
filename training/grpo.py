"""``tarfas train grpo``: DT-GRPO (paper §3.2.3) on TRL's GRPOTrainer, with rollouts that run the real tools.

Why a subclass that replaces the generation step. TRL's own tool loop (``GRPOTrainer(tools=[...])``)
cannot express the CoT-VT protocol exactly:

- after turn 1 (the fast answer, which calls no tool) the environment must answer with the *re-examine*
  user prompt, not end the episode, and TRL only continues after a tool call;
- tool results here are user turns holding the tool image and the format declaration, produced by
  core.trajectory; TRL appends ``role: tool`` messages whose rendering it owns;
- malformed turns and invalid calls must be fed back as error turns and recorded (parse_error /
  tool_error), which is what the format reward reads; TRL parses calls with the tokenizer's response
  schema, not with core.protocol, and has no notion of a fast answer or of an ``<answer>``;
- ``rollout_func`` would do it, but it drops images, so it cannot serve a VLM.

So :meth:`DTGRPOTrainer._generate` runs core.agent's loop once per completion with the model being trained
as the policy (training/rollout.py). The loops run side by side and their turns are sampled in lockstep
batches through TRL's own ``_generate_single_turn`` (transformers ``generate`` on CPU, vLLM on GPUs):
one sampling call per turn for the whole generation batch. The rewards are computed from the resulting
Trajectory (training/rewards.py) and the loss covers the sampled tokens only (``tool_mask`` = 0 on
prompts and tool images). Everything else (grouping into G completions per query, advantages, the clipped
GRPO loss, the optimizer, logging, accelerate/DeepSpeed) is TRL's.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import torch
from trl import GRPOTrainer

from core.agent import AgentConfig
from core.mllm.processor import load_processor, vision_token_ids
from core.protocol import STOP_STRINGS
from core.registry import ToolRegistry

from .configs import GRPOConfig
from .datasets import TrainingDataError, fi_examples, grpo_queries, load_sources, to_hf_dataset
from .lineage import write_lineage
from .query_selection import check_band, fast_answer_p_spoof, select_uncertain
from .rewards import fast_format, final_answer, make_reward_funcs, reasoning_format
from .rollout import TokenPolicy, face_from_image, run_rollouts
from .sft import TurnWeightedCollator, load_data, load_policy_model, precision_flags, training_dtype, weighted_nll


class SFTReplay:
    """FI examples drawn in a seeded, reshuffled order, for the replay loss (GRPOConfig.replay_data); the
    trainer collates them.

    InstructGPT (Ouyang et al., 2022, "PPO-ptx") mixes the pre-training loss into PPO's to stop RL from
    un-learning what came before; here what must not be forgotten is the protocol the SFT stages taught."""

    def __init__(self, rows: list[dict], batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"replay_batch must be >= 1, got {batch_size}")
        self.dataset = to_hf_dataset([{"messages": r["messages"], "images": r["images"]} for r in rows])
        self.batch_size = batch_size
        self._rng, self._order = random.Random(seed), []

    def next_batch(self) -> list[dict]:
        picked = []
        while len(picked) < self.batch_size:
            if not self._order:
                self._order = list(range(len(self.dataset)))
                self._rng.shuffle(self._order)
            picked.append(self._order.pop())
        return [self.dataset[i] for i in picked]


def replay_nll(model, batch: dict) -> torch.Tensor:
    """The FI loss (training/sft.py: a on turn 1, 1 - a on later turns) of a collated batch. It computes the
    logits of every position (batch x length x vocabulary: keep ``replay_batch`` small at a 152k vocabulary)."""
    weights, labels = batch.pop("loss_weights"), batch.pop("labels")
    logits = model(**batch, use_cache=False).logits[:, :-1].float()
    target = labels[:, 1:]
    log_probs = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    log_probs = log_probs * (target != -100)
    return weighted_nll(log_probs, weights.to(log_probs.device), (target != -100).sum())


class DTGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose completions are whole CoT-VT investigations (see the module docstring)."""

    def __init__(
        self, *args, agent_config: AgentConfig, replay: SFTReplay | None = None, replay_coef: float = 0.0, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.agent_config = agent_config
        self.replay, self.replay_coef = replay, replay_coef
        # Whole trajectories, never cut (a cut through an image's tokens breaks the processor)
        self.replay_collator = TurnWeightedCollator(self.processing_class, max_length=None, assistant_only_loss=True,
                                                    first_turn_weight=REPLAY_FIRST_TURN_WEIGHT)  # fmt: skip
        # TRL builds the forward pass over tool images (image processor on every image of a completion,
        # mm_token_type_ids from the image pad tokens) only when `self.tools` is set. Our tools run inside
        # the agent loop, so `tools` stays out of __init__ (no TRL tool loop) and is set here to the schemas.
        self.tools = ToolRegistry(agent_config.allowed_tools).schemas()

    # --- the next turn of several rollouts, through TRL's generation backends ---------------------------
    def _generate_turns(self, ids: list, images: list, fields: list):
        """One batched sampling call (TRL's _generate_single_turn: transformers generate or vLLM)."""
        merged = {}
        for key in ("pixel_values", "image_grid_thw"):
            parts = [f[key] for f in fields if key in f]
            if parts:
                merged[key] = torch.cat(parts, dim=0).to(self.accelerator.device)
        completion_ids, logprobs = self._generate_single_turn(
            ids, images, merged, num_generations=1, has_tool_images="image_grid_thw" in merged
        )
        return [(c, logprobs[i] if logprobs is not None else None) for i, c in enumerate(completion_ids)]

    def _generate(self, prompts: list):
        mode = "train" if self.model.training else "eval"
        max_tokens = self.max_completion_length
        faces = [
            face_from_image(
                next(
                    p["image"] for m in prompt if m["role"] == "user" for p in m["content"] if p.get("type") == "image"
                )
            )
            for prompt in prompts
        ]
        t0 = time.perf_counter()
        rollouts, sampler = run_rollouts(
            faces,
            lambda gen: TokenPolicy(gen, self.processing_class, max_tokens),
            self._generate_turns,
            self.agent_config,
        )
        wall = time.perf_counter() - t0

        # What TRL's _generate returns: ids, the env mask (as tool_mask), completions as messages (logged),
        # sampling log-probs, extra columns for the reward functions, and every image of each completion.
        prompt_ids = [r.prompt_ids for r in rollouts]
        completion_ids = [r.completion_ids for r in rollouts]
        masks = [r.mask for r in rollouts]
        logprobs = None if any(r.logprobs is None for r in rollouts) else [r.logprobs for r in rollouts]
        completions = [[{"role": "assistant", "content": t} for t in r.texts] for r in rollouts]
        images = [r.images for r in rollouts]
        # TRL encodes the images of a completion that holds tool images with the image processor alone and finds
        # their tokens in the ids; otherwise it re-renders the prompt text to encode the prompt's image. Our ids
        # are already final (face crop included), so every rollout takes the first path: all its images count.
        tool_images = images

        m = self._metrics[mode]
        lengths = [sum(r.mask) for r in rollouts]
        m["completions/mean_length"].append(sum(lengths) / len(lengths))
        m["completions/max_length"].append(max(lengths))
        self.state.num_input_tokens_seen += sum(
            len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True)
        )
        m["num_tokens"] = [self.state.num_input_tokens_seen]
        counts = Counter()
        for r in rollouts:
            counts.update(t.tool_result.name for t in r.trajectory.tool_turns)
        for name in ToolRegistry(self.agent_config.allowed_tools).names:
            m[f"tools/calls_per_rollout/{name}"].append(counts[name] / len(rollouts))
        m["tools/calls_per_rollout"].append(sum(counts.values()) / len(rollouts))
        m["rollout/turns"].append(sum(len(r.trajectory.turns) for r in rollouts) / len(rollouts))
        m["rollout/failed"].append(sum(r.trajectory.status == "failed" for r in rollouts) / len(rollouts))
        tool_s, gen_s = sum(r.tool_s for r in rollouts), sampler.generate_s
        m["rollout/sampling_calls"].append(sampler.calls)
        m["time/rollout_s"].append(wall)
        m["time/generate_s"].append(gen_s)
        m["time/tools_s"].append(tool_s)
        m["time/tools_share"].append(tool_s / wall if wall > 0 else 0.0)
        extra = {"trajectory": [r.trajectory for r in rollouts]}
        return prompt_ids, completion_ids, masks, completions, logprobs, extra, images, tool_images

    # --- the GRPO loss, plus the replayed FI loss when asked ------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.replay is None or not model.training:
            return loss
        batch = self.replay_collator(self.replay.next_batch())
        batch = {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        nll = replay_nll(model, batch)
        self._metrics["train"]["replay/nll"].append(self.accelerator.gather(nll.detach()).mean().item())
        return loss + self.replay_coef * nll

    # --- accuracy and format rates per step, beside TRL's per-reward means ---------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        mode = "train" if self.model.training else "eval"
        trajs, labels = [x["trajectory"] for x in inputs], [x["label"] for x in inputs]
        n = len(trajs)
        m = self._metrics[mode]
        m["accuracy/fast"].append(
            sum(t.fast_answer is not None and t.fast_answer.verdict == y for t, y in zip(trajs, labels, strict=True))
            / n
        )
        m["accuracy/final"].append(sum(final_answer(t) == y for t, y in zip(trajs, labels, strict=True)) / n)
        m["format/fast_ok"].append(sum(fast_format(t) == 0 for t in trajs) / n)
        m["format/reasoning_ok"].append(sum(reasoning_format(t) == 0 for t in trajs) / n)
        return rewards


REPLAY_FIRST_TURN_WEIGHT = 0.9  # the replayed FI loss weighs turns as FI does (the paper's a)

# GRPOConfig fields that trl.GRPOConfig takes under the same name and with the same meaning.
TRL_GRPO_FIELDS = (
    "num_generations",
    "beta",
    "loss_type",
    "max_completion_length",
    "temperature",
    "top_p",
    "use_vllm",
    "vllm_mode",
    "vllm_gpu_memory_utilization",
    "vllm_max_model_length",
    "vllm_tensor_parallel_size",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "weight_decay",
    "max_steps",
    "logging_steps",
    "save_steps",
    "report_to",
    "seed",
    "gradient_checkpointing",
)


def sampling_kwargs(cfg: GRPOConfig, tokenizer) -> dict:
    """``trl.GRPOConfig.generation_kwargs``: the per-turn sampling options, in the backend's own words. TRL
    passes the dict to ``transformers.GenerationConfig`` without vLLM and to ``vllm.SamplingParams`` (colocate)
    or the vLLM server's /v1/completions request (server) with it, updating its own defaults.

    Both keep vision tokens out of samples (a sampled image token would not match the image features) and end
    a turn at the protocol's stop strings (core.protocol.STOP_STRINGS, as at inference):

    - transformers: ``max_new_tokens`` and ``suppress_tokens``. ``stop_strings`` would need the tokenizer passed
      to ``generate``, which TRL does not do, so :class:`~training.rollout.TokenPolicy` cuts each sample after
      its first stop string (the same tokens as stopping there);
    - vLLM: ``max_tokens``, ``bad_words`` (the vision tokens' texts; vLLM encodes each to its single id and
      bans it), ``stop`` with ``include_stop_str_in_output`` (the closing tag is part of the turn).
    """
    vision = vision_token_ids(tokenizer)
    if not cfg.use_vllm:
        return {"max_new_tokens": cfg.max_new_tokens, "suppress_tokens": vision}
    return {
        "max_tokens": cfg.max_new_tokens,  # TRL's own max_tokens is the whole completion's budget; ours is per turn
        "bad_words": tokenizer.convert_ids_to_tokens(vision),
        "stop": list(STOP_STRINGS),
        "include_stop_str_in_output": True,
    }


def train_grpo(cfg: GRPOConfig, callbacks: list | None = None) -> Path:
    """Run DT-GRPO (or the ST-GRPO baseline); returns the output folder (a model, or an adapter with use_lora)."""
    import trl
    from peft import LoraConfig

    if not cfg.model:
        raise ValueError("--model is required: a checkpoint folder (base, or the merged output of `train sft --merge`)")
    if cfg.per_device_train_batch_size % cfg.num_generations:
        raise ValueError(
            f"per_device_train_batch_size ({cfg.per_device_train_batch_size}) must be a multiple of num_generations ({cfg.num_generations})"
        )
    if cfg.select_band is not None:
        check_band(cfg.select_band)  # before the data and the model load
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    reward_cfg = cfg.reward_config()
    tools = ["ZoomInTool"] if cfg.reward == "st" else (cfg.tools or None)
    agent_config = AgentConfig(
        max_tool_calls=cfg.max_tool_calls, max_format_errors=cfg.max_format_errors, allowed_tools=tools
    )

    data = load_data(cfg, out)
    rows = grpo_queries(data, max_examples=cfg.max_examples, seed=cfg.seed)
    print(f"[grpo {cfg.reward}] {len(rows)} queries; data: {data.stats}")
    replay = None
    if cfg.replay_data:  # read before the model loads, so that bad replay data fails fast
        replay_data = load_sources(cfg.replay_data, build_dir=cfg.build_dir or out / "data")
        replay_rows = fi_examples(replay_data, seed=cfg.seed)
        data.stats["replay"] = {"trajectories": len(replay_rows), **replay_data.stats}
        replay = SFTReplay(replay_rows, cfg.replay_batch, cfg.seed)
        print(
            f"[grpo {cfg.reward}] replaying {len(replay_rows)} SFT trajectories, {cfg.replay_batch} a step, x {cfg.replay_coef}"
        )

    funcs, weights = make_reward_funcs(reward_cfg)
    # The training config first: under `accelerate launch` with DeepSpeed it registers DeepSpeed, which ZeRO-3
    # needs before the weights load (they are sharded as they load) and which decides their load dtype.
    args = trl.GRPOConfig(**{
        **{name: getattr(cfg, name) for name in TRL_GRPO_FIELDS},
        "output_dir": str(out / "checkpoints"), "scale_rewards": "group", "num_iterations": 1,
        "reward_weights": weights, "optim": "adamw_torch", "lr_scheduler_type": "constant",
        "generation_kwargs": sampling_kwargs(cfg, load_processor(cfg.model).tokenizer),
        "save_strategy": "steps" if cfg.save_steps > 0 else "no", "save_only_model": True,
        "remove_unused_columns": False, "log_completions": False, **precision_flags(cfg.precision),
    })  # fmt: skip
    # The paper trains all parameters from the FI model: the FI adapter is merged into the base first.
    # With use_lora the adapter itself keeps training instead, so the output stays a small adapter.
    model, processor, _ = load_policy_model(
        cfg.model, cfg.adapter, trainable_adapter=cfg.use_lora, merge_adapter=not cfg.use_lora,
        dtype=training_dtype(args, cfg.precision, use_lora=cfg.use_lora), attn_implementation=cfg.attn_implementation,
    )  # fmt: skip
    if cfg.select_band is not None:  # the queries whose verdict the starting model is unsure of
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ValueError("--select-band reads the whole model in every process: it does not run under ZeRO-3")
        model.to(args.device)
        t0 = time.perf_counter()
        rows, data.stats["query_selection"] = select_uncertain(
            rows, fast_answer_p_spoof(model, processor, rows), cfg.select_band
        )
        data.stats["query_selection"]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[grpo {cfg.reward}] query selection: {data.stats['query_selection']}")
        if not rows:
            raise TrainingDataError(
                f"no query has a fast-answer P(spoof) in [{cfg.select_band}, {1 - cfg.select_band}]: the model is "
                "surer than that of every face given; use a smaller --select-band or give more queries"
            )
    train_ds = to_hf_dataset([{"prompt": r["prompt"], "image": r["image"], "label": r["label"]} for r in rows])
    peft_config = None
    if cfg.use_lora and cfg.adapter is None:
        peft_config = LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=cfg.lora_targets, task_type="CAUSAL_LM"
        )
    trainer = DTGRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=train_ds, processing_class=processor,
                            peft_config=peft_config, agent_config=agent_config, callbacks=callbacks, replay=replay,
                            replay_coef=cfg.replay_coef)  # fmt: skip
    result = trainer.train()
    history = [h for h in trainer.state.log_history if "reward" in h]
    summary = {"train_loss": result.training_loss, "steps": trainer.state.global_step, "log": history,
               "seconds": result.metrics.get("train_runtime")}  # fmt: skip
    if cfg.use_lora:
        dest, kind, parent = out / "adapter", "lora-adapter", cfg.adapter
        trainer.save_model(str(dest))
    else:
        from core.mllm.processor import detect_arch, install_remote_code

        dest, kind, parent = out / "model", "full-model", cfg.adapter
        trainer.save_model(str(dest))
        if trainer.accelerator.is_main_process:
            processor.save_pretrained(str(dest))
            install_remote_code(dest, detect_arch(cfg.model))
    if not trainer.accelerator.is_main_process:  # saving took every rank (ZeRO-3); the files are the main rank's
        return dest
    (dest / "training_args.bin").unlink(missing_ok=True)  # a pickle; nothing of ours reads it
    write_lineage(dest, kind=kind, stage="grpo", config=cfg, base_model=cfg.model, parent=parent,
                  data=data.fingerprints(), stats=data.stats, result=summary)  # fmt: skip
    return dest

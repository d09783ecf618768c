"""DT-GRPO on TRL's GRPOTrainer with rollouts that run the project's agent loop and real tools: the token
bookkeeping of a rollout, real optimizer steps on the nano model, per-step logging, and the CLI."""

from __future__ import annotations

import math
import os

import pytest
import torch
from training_support import nano_model, safetensors_state, write_dataset

from core import protocol
from core.agent import AgentConfig, run
from core.mllm.processor import load_processor
from core.protocol import ToolCall
from core.registry import ToolRegistry
from core.trajectory import to_messages
from training.lineage import read_lineage
from training.rollout import RolloutBudgetError, TokenPolicy, face_from_image

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    return nano_model(tmp_path_factory)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("grpo_data") / "annotation", n=2)


def _scripted_generator(processor, turns):
    """A stand-in for the model's sampler: returns the token ids of the next scripted turn (+ end of turn,
    unless the turn is marked as cut off by max_new_tokens)."""
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    queue = list(turns)

    def generate(ids, images, fields):
        text, cut = queue.pop(0)
        if "image_grid_thw" in fields:  # Qwen2.5-VL: patch rows per image
            assert fields["pixel_values"].shape[0] == sum(int(g.prod()) for g in fields["image_grid_thw"])
            assert len(images) == fields["image_grid_thw"].shape[0]
        else:  # InternVL: one 224x224 tile per image
            assert fields["pixel_values"].shape[0] == len(images)
        new = tok.encode(text, add_special_tokens=False)
        return (new if cut else new + [eos]), None

    return generate


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "internvl"])
def test_rollout_tokens_are_the_rendered_conversation_and_the_mask_marks_sampled_tokens(arch, tmp_path_factory, crop):
    processor = load_processor(nano_model(tmp_path_factory, arch))
    turns = [
        ("<Spoof><reason>flat", True),  # cut off by max_new_tokens: malformed, fed back, retried
        (protocol.format_fast_answer("spoof", "Flat, paper-like face."), False),
        (protocol.format_tool_call_turn("Look for moire.", ToolCall("FFTTool", {})), False),
        (protocol.format_tool_call_turn("Magic.", ToolCall("MagicTool", {})), False),  # refused: error turn
        (protocol.format_tool_call_turn("Texture.", ToolCall("LBPTool", {})), False),
        (protocol.format_answer_turn("Periodic peaks.", "spoof"), False),
    ]
    policy = TokenPolicy(_scripted_generator(processor, turns), processor, max_completion_tokens=4096)
    traj = run(face_from_image(crop), policy, AgentConfig())
    assert traj.status == "completed" and traj.final.verdict == "spoof"
    assert [t.tool_result.name for t in traj.tool_turns] == ["FFTTool", "LBPTool"] and traj.turns[3].tool_error
    r = policy.rollout(traj)

    # The ids are exactly what rendering the whole conversation with the chat template gives.
    from core.mllm.messages import to_processor_inputs

    system = protocol.system_prompt(ToolRegistry(None).schemas())
    whole = to_processor_inputs(to_messages(traj, system=system), processor, add_generation_prompt=False)
    enc = processor(text=[whole.text], images=whole.images, return_tensors="pt")
    expected = enc["input_ids"][0].tolist()
    assert r.prompt_ids + r.completion_ids == expected[: len(r.prompt_ids) + len(r.completion_ids)]
    assert expected[len(r.prompt_ids) + len(r.completion_ids) :] == processor.tokenizer.encode(
        "\n", add_special_tokens=False
    )
    assert len(r.images) == 3 and len(r.tool_images) == 2  # face crop + FFT + LBP images

    # mask = 1 on exactly the sampled tokens: decoding them gives back the turns (the cut one without <|im_end|>)
    sampled = [i for i, m in zip(r.completion_ids, r.mask, strict=True) if m]
    tok = processor.tokenizer
    assert tok.decode(sampled) == "".join(t + ("" if cut else "<|im_end|>") for t, cut in turns)
    assert r.texts == [t for t, _ in turns]
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>" if arch == "qwen2_5_vl" else "<IMG_CONTEXT>")
    assert all(m == 0 for i, m in zip(r.completion_ids, r.mask, strict=True) if i == image_pad)


def test_lockstep_sampler_batches_the_live_rollouts_and_survives_failures():
    import threading

    from training.rollout import LockstepSampler

    sizes = []

    def generate_batch(ids, images, fields):
        sizes.append(len(ids))
        if any(i == [-1] for i in ids):
            raise RuntimeError("backend failed")
        return [(i + [len(ids)], None) for i in ids]

    sampler = LockstepSampler(generate_batch, 3)
    results = {}

    def worker(k, turns):
        gen, got = sampler.for_rollout(k), []
        try:
            for t in range(turns):
                got.append(gen([k, t], [], {})[0])
        except RuntimeError as exc:
            got.append(str(exc))
        finally:
            sampler.finished()
        results[k] = got

    threads = [threading.Thread(target=worker, args=(k, n)) for k, n in ((0, 1), (1, 3), (2, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sizes == [3, 2, 1]  # rollouts drop out of the batch as they finish
    assert results == {0: [[0, 0, 3]], 1: [[1, 0, 3], [1, 1, 2], [1, 2, 1]], 2: [[2, 0, 3], [2, 1, 2]]}
    failing = LockstepSampler(generate_batch, 1)
    with pytest.raises(RuntimeError, match="backend failed"):
        failing.for_rollout(0)([-1], [], {})


def test_rollout_budget_ends_the_investigation_as_failed(nano, crop):
    processor = load_processor(nano)
    turns = [(protocol.format_fast_answer("real", "Natural skin."), False)] + [
        (protocol.format_tool_call_turn("x", ToolCall("HOGTool", {})), False)
    ] * 3
    policy = TokenPolicy(_scripted_generator(processor, turns), processor, max_completion_tokens=60)
    traj = run(face_from_image(crop), policy, AgentConfig())
    assert traj.status == "failed" and RolloutBudgetError.__name__ in traj.error


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "internvl"])
def test_grpo_loss_covers_tool_images_for_both_architectures(arch, tmp_path_factory, data, tmp_path):
    # Sampling is replaced by scripted turns (one tool call) so that every completion holds a tool image;
    # TRL's forward pass then sees face + tool images in the ids, and the loss is computed over them.
    nano = nano_model(tmp_path_factory, arch)
    trainer = _grpo_trainer(nano, data, tmp_path, steps=1)
    turns = [(protocol.format_fast_answer("spoof", "Flat."), False), (protocol.format_tool_call_turn("Moire?", ToolCall("FFTTool", {})), False),
             (protocol.format_answer_turn("Peaks.", "spoof"), False)]  # fmt: skip
    generators = [_scripted_generator(trainer.processing_class, turns) for _ in range(2)]
    batches = []

    def scripted_batch(ids, images, fields):  # both rollouts run the same script, so they stay in lockstep
        batches.append(len(ids))
        return [g(*args) for g, args in zip(generators, zip(ids, images, fields, strict=True), strict=True)]

    trainer._generate_turns = scripted_batch
    rows = [trainer.train_dataset[0], trainer.train_dataset[0]]
    trainer.model.train()
    out = trainer._generate_and_score_completions(rows)
    assert out["num_images"] == [2, 2] and out["tool_mask"].sum() < out["completion_mask"].sum()
    assert batches == [2, 2, 2]  # one sampling call per turn for both rollouts
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() in a real run
    loss = trainer.compute_loss(trainer.model, out)
    assert math.isfinite(loss.item())
    loss.backward()
    assert any(p.grad is not None for p in trainer.model.parameters())


def _grpo_trainer(nano, data, tmp_path, extra_reward=None, steps=2):
    import trl

    from training.datasets import grpo_queries, load_sources, to_hf_dataset
    from training.grpo import DTGRPOTrainer
    from training.rewards import RewardConfig, make_reward_funcs
    from training.sft import load_policy_model

    rows = grpo_queries(load_sources([str(data)], build_dir=tmp_path))
    ds = to_hf_dataset([{"prompt": r["prompt"], "image": r["image"], "label": r["label"]} for r in rows])
    model, processor, _ = load_policy_model(str(nano), None, trainable_adapter=False, merge_adapter=False)
    funcs, weights = make_reward_funcs(RewardConfig())
    if extra_reward is not None:
        funcs, weights = funcs + [extra_reward], weights + [1.0]
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "o"), num_generations=2, per_device_train_batch_size=2, max_steps=steps, beta=0.0,
        loss_type="grpo", reward_weights=weights, max_completion_length=400, generation_kwargs={"max_new_tokens": 12},
        learning_rate=1e-3, report_to="none", bf16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
        remove_unused_columns=False, log_completions=False,
    )  # fmt: skip
    return DTGRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=ds, processing_class=processor,
                         agent_config=AgentConfig(max_tool_calls=3, max_format_errors=0))  # fmt: skip


def test_grpo_real_steps_change_the_weights_and_log_every_reward_term(nano, data, tmp_path):
    # An untrained nano model breaks the format every time, so the DT reward alone is the same (-0.6) for
    # every rollout and the advantages are zero. A second reward (fewer sampled tokens is better) gives the
    # group a spread, so these steps exercise the whole update: rollouts, env-token masking, GRPO loss, AdamW.
    def shorter(completions, trajectory, **kwargs):
        return [-sum(len(t.text) for t in traj.turns) / 100 for traj in trajectory]

    trainer = _grpo_trainer(nano, data, tmp_path, extra_reward=shorter)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    h = logs[0]
    assert h["rewards/r_fast/mean"] == -1 and h["rewards/r_rsn/mean"] == -1 and h["rewards/r_tool/mean"] == 0
    for key in ("accuracy/fast", "accuracy/final", "format/fast_ok", "tools/calls_per_rollout", "tools/calls_per_rollout/FFTTool",
                "time/tools_share", "time/generate_s", "rollout/turns"):  # fmt: skip
        assert key in h, key


def test_cli_train_grpo_st_baseline_writes_a_model_with_lineage(nano, data, tmp_path):
    from app.cli import main
    from core.policies import load_policy

    out = tmp_path / "st"
    rc = main(["train", "grpo", "--model", str(nano), "--data", str(data), "--out", str(out), "--reward", "st",
               "--num-generations", "2", "--per-device-train-batch-size", "2", "--max-steps", "1", "--max-new-tokens", "8",
               "--max-completion-length", "200", "--threads", "1", "--save-steps", "0"])  # fmt: skip
    assert rc == 0
    lin = read_lineage(out / "model")
    assert lin["stage"] == "grpo" and lin["kind"] == "full-model" and lin["config"]["reward"] == "st"
    assert lin["config"]["num_generations"] == 2 and lin["data"][0]["source"] == "annotation"
    assert lin["result"]["log"][0]["rewards/st_grpo/mean"] == -1  # untrained: format broken, no answer
    assert "tools/calls_per_rollout/FFTTool" not in lin["result"]["log"][0]  # ST-GRPO offers ZoomInTool only
    policy = load_policy("hf", model=str(out / "model"), max_new_tokens=4)
    assert policy.version and safetensors_state(out / "model").keys() == safetensors_state(nano).keys()


def test_grpo_config_errors(nano, data, tmp_path):
    from app.cli import main

    assert (
        main(
            [
                "train",
                "grpo",
                "--model",
                str(nano),
                "--data",
                str(data),
                "--num-generations",
                "3",
                "--per-device-train-batch-size",
                "4",
            ]
        )
        == 2
    )
    assert main(["train", "grpo", "--model", str(nano), "--data", str(data), "--reward", "xx", "--num-generations", "2",
                 "--per-device-train-batch-size", "2"]) == 2  # fmt: skip


def test_loss_type_reaches_trl(nano, data, tmp_path):
    # "grpo" averages each completion over its own tokens, so a long malformed rollout costs less per token
    # than a short one; "dapo" weighs every sampled token of the batch the same. The choice must reach TRL.
    from transformers import TrainerCallback

    from training.configs import GRPOConfig
    from training.grpo import train_grpo

    seen = {}

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["loss_type"] = args.loss_type

    cfg = GRPOConfig(model=str(nano), data=[str(data)], out=str(tmp_path / "dapo"), loss_type="dapo", num_generations=2,
                     per_device_train_batch_size=2, max_steps=1, max_new_tokens=8, max_completion_length=200, threads=1,
                     save_steps=0)  # fmt: skip
    train_grpo(cfg, callbacks=[Record()])
    assert seen == {"loss_type": "dapo"}
    assert read_lineage(tmp_path / "dapo" / "model")["config"]["loss_type"] == "dapo"
    assert GRPOConfig().loss_type == "grpo"  # the paper's normalisation stays the default


# --- replaying the SFT trajectories during RL (GRPOConfig.replay_data) ----------------------------------
def test_replay_draws_every_trajectory_once_an_epoch_in_a_seeded_order(tmp_path):
    from training.datasets import fi_examples, load_sources
    from training.grpo import SFTReplay

    rows = fi_examples(load_sources([str(write_dataset(tmp_path / "ann", n=5))], build_dir=tmp_path))
    order = [SFTReplay(rows, 2, seed=s) for s in (0, 0, 1)]
    a, b, c = ([[e["messages"] for e in r.next_batch()] for _ in range(5)] for r in order)
    assert a == b and a != c  # seeded
    flat = [str(m) for batch in a for m in batch]
    assert len(flat) == 10 and len(set(flat[:5])) == 5 and len(set(flat[5:])) == 5  # each epoch: every row once
    with pytest.raises(ValueError, match="replay_batch"):
        SFTReplay(rows, 0, seed=0)


def test_replayed_fi_loss_is_added_to_the_grpo_loss_and_is_the_whole_gradient_when_groups_agree(nano, data, tmp_path):
    # An untrained nano model breaks the format in every rollout: equal rewards, zero advantages, no GRPO
    # gradient. With replay on, the loss gains replay_coef x the FI loss of the replayed batch, which is then
    # the whole gradient; that FI loss is a*NLL(turn 1) + (1-a)*NLL(later turns) per supervised token.
    import torch.nn.functional as F

    from training.datasets import fi_examples, load_sources
    from training.grpo import SFTReplay, replay_nll
    from training.sft import TurnWeightedCollator, turn_weights

    trainer = _grpo_trainer(nano, data, tmp_path, steps=1)
    trainer.model.train()
    out = trainer._generate_and_score_completions([trainer.train_dataset[0]] * 2)
    assert out["advantages"].abs().max() == 0
    trainer.current_gradient_accumulation_steps = 1
    grpo_only = trainer.compute_loss(trainer.model, out)
    grpo_only.backward()
    assert all(p.grad is None or not p.grad.any() for p in trainer.model.parameters())
    trainer.model.zero_grad()

    rows = fi_examples(load_sources([str(data)], build_dir=tmp_path))
    collator = TurnWeightedCollator(
        trainer.processing_class, max_length=2048, assistant_only_loss=True, first_turn_weight=0.9
    )
    trainer.replay, trainer.replay_coef = SFTReplay(rows, 2, seed=0), 0.5
    total = trainer.compute_loss(trainer.model, out)
    total.backward()
    assert any(p.grad is not None and p.grad.any() for p in trainer.model.parameters())
    nll = trainer._metrics["train"]["replay/nll"][-1]
    assert total.item() == pytest.approx(grpo_only.item() + 0.5 * nll, rel=1e-5)

    batch = collator([trainer.replay.dataset[i] for i in range(2)])
    labels = batch["labels"]
    with torch.no_grad():
        logits = trainer.model(**{k: v for k, v in batch.items() if k not in ("labels", "loss_weights")}).logits
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], reduction="none", ignore_index=-100)
        w = turn_weights(labels, 0.9)[:, 1:]
        expected = (ce * w).sum() / (labels[:, 1:] != -100).sum()
        assert replay_nll(trainer.model, dict(batch)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_cli_train_grpo_with_replay_records_it_in_the_lineage_and_the_log(nano, data, tmp_path):
    from app.cli import main

    out = tmp_path / "replay"
    rc = main(["train", "grpo", "--model", str(nano), "--data", str(data), "--out", str(out), "--replay-data", str(data),
               "--replay-coef", "0.3", "--replay-batch", "1", "--num-generations", "2", "--per-device-train-batch-size",
               "2", "--max-steps", "2", "--max-new-tokens", "8", "--max-completion-length", "200", "--threads", "1",
               "--save-steps", "0"])  # fmt: skip
    assert rc == 0
    lin = read_lineage(out / "model")
    assert lin["config"]["replay_data"] == [str(data)] and lin["config"]["replay_coef"] == 0.3
    assert lin["data_stats"]["replay"]["trajectories"] == 2
    assert all(math.isfinite(h["replay/nll"]) and h["replay/nll"] > 0 for h in lin["result"]["log"])

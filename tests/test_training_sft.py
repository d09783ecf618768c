"""KT and FI supervised fine-tuning (TRL SFTTrainer + LoRA) on the nano model: the FI loss
a*NLL(turn 1) + (1-a)*NLL(later turns) against a hand computation, real optimizer steps that change the
weights, the KT -> FI adapter chain, lineage, and the CLI."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from training_support import nano_model, safetensors_state, write_dataset

from training.configs import SFTConfig
from training.lineage import LINEAGE_FILE, read_lineage
from training.sft import TurnWeightedCollator, TurnWeightedSFTTrainer, train_sft, turn_index, turn_weights

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    return nano_model(tmp_path_factory)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("sft_data") / "annotation", n=4)


def _cfg(**kw) -> SFTConfig:
    base = dict(
        per_device_train_batch_size=2, max_steps=3, threads=1, logging_steps=1, save_steps=0, learning_rate=1e-2
    )
    return SFTConfig(**(base | kw))


def test_turn_index_and_weights_mark_each_assistant_turn():
    x = -100
    labels = torch.tensor([[x, x, 5, 6, x, x, 7, x, 8, 9, x], [x, 1, 2, x, x, x, x, x, x, x, x]])
    assert turn_index(labels).tolist() == [
        [-1, -1, 0, 0, -1, -1, 1, -1, 2, 2, -1],
        [-1, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1],
    ]
    w = turn_weights(labels, 0.9)
    assert w[0].tolist() == pytest.approx([0, 0, 0.9, 0.9, 0, 0, 0.1, 0, 0.1, 0.1, 0])
    assert w[1].tolist() == pytest.approx([0, 0.9, 0.9, 0, 0, 0, 0, 0, 0, 0, 0])


def test_fi_loss_equals_the_hand_computed_weighted_nll(nano, data, tmp_path):
    import trl
    from peft import LoraConfig

    from training.datasets import fi_examples, load_sources, to_hf_dataset
    from training.sft import load_policy_model

    rows = fi_examples(load_sources([str(data)], build_dir=tmp_path))[:2]
    ds = to_hf_dataset([{"messages": r["messages"], "images": r["images"]} for r in rows])
    model, processor, _ = load_policy_model(str(nano), None, trainable_adapter=True, merge_adapter=False)
    collator = TurnWeightedCollator(processor, max_length=4096, assistant_only_loss=True, first_turn_weight=0.9)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "o"),
        assistant_only_loss=True,
        report_to="none",
        max_steps=1,
        remove_unused_columns=False,
        bf16=False,
        gradient_checkpointing=False,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=SFTConfig().lora_targets, task_type="CAUSAL_LM")
    trainer = TurnWeightedSFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=processor, data_collator=collator, peft_config=lora
    )
    batch = collator([ds[0], ds[1]])
    labels, weights = batch["labels"], batch["loss_weights"]
    assert (turn_index(labels).max(dim=1).values == 2).all()  # fast answer, tool call, answer
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        # by hand: plain logits, log-softmax, the NLL of every next token, weighted per turn
        plain = {k: v for k, v in batch.items() if k not in ("labels", "loss_weights")}
        logits = trainer.model(**plain).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = labels[:, 1:]
    turn = turn_index(labels)[:, 1:]
    nll_1 = nll_later = 0.0
    n = 0
    for b in range(target.shape[0]):
        for t in range(target.shape[1]):
            if target[b, t] == -100:
                continue
            nll = -logp[b, t, target[b, t]].item()
            n += 1
            if turn[b, t] == 0:
                nll_1 += nll
            else:
                nll_later += nll
    manual = (0.9 * nll_1 + 0.1 * nll_later) / n
    assert loss == pytest.approx(manual, rel=1e-4)
    assert n == int((labels != -100).sum()) and weights.sum().item() == pytest.approx(
        0.9 * (turn_index(labels) == 0).sum().item() + 0.1 * (turn_index(labels) > 0).sum().item(), rel=1e-5
    )


def test_kt_then_fi_real_steps_change_the_adapter_and_record_lineage(nano, data, tmp_path):
    kt = train_sft(_cfg(stage="kt", data=[str(data)], model=str(nano), out=str(tmp_path / "kt")))
    assert (
        kt.name == "adapter"
        and (kt / "adapter_model.safetensors").is_file()
        and not (kt / "training_args.bin").exists()
    )
    kt_state = safetensors_state(kt)
    lora_b = [v for k, v in kt_state.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero: the steps moved it
    lin = read_lineage(kt)
    assert lin["stage"] == "kt" and lin["kind"] == "lora-adapter" and lin["result"]["steps"] == 3
    assert all(math.isfinite(h["loss"]) for h in lin["result"]["log"])
    assert lin["data"][0]["manifest_sha256"] and lin["base_model"]["weights_sha256"]["model.safetensors"]
    assert lin["config"]["lora_rank"] == 16 and lin["config"]["weight_decay"] == 0.05

    fi = train_sft(
        _cfg(stage="fi", data=[str(data)], model=str(nano), adapter=str(kt), out=str(tmp_path / "fi"), merge=True)
    )
    fi_state = safetensors_state(fi)
    assert fi_state.keys() == kt_state.keys()  # the same adapter kept training
    assert any(not torch.equal(fi_state[k], kt_state[k]) for k in kt_state)
    lin = read_lineage(fi)
    assert lin["stage"] == "fi" and lin["parent_adapter"]["lineage"]["stage"] == "kt"
    assert all(math.isfinite(h["loss"]) and "nll/turn1" in h for h in lin["result"]["log"])
    merged = tmp_path / "fi" / "merged"
    assert (merged / "model.safetensors").is_file() and (merged / LINEAGE_FILE).is_file()


def test_full_parameter_sft_writes_a_model_folder(nano, data, tmp_path):
    out = train_sft(
        _cfg(
            stage="fi",
            data=[str(data)],
            model=str(nano),
            out=str(tmp_path / "full"),
            use_lora=False,
            max_steps=2,
            learning_rate=1e-3,
        )
    )
    assert out.name == "model"
    before, after = safetensors_state(nano), safetensors_state(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert read_lineage(out)["kind"] == "full-model"


def test_cli_train_sft_and_its_errors(nano, data, tmp_path, capsys):
    from app.cli import main

    rc = main(["train", "sft", "--stage", "kt", "--model", str(nano), "--data", str(data), "--out", str(tmp_path / "cli"),
               "--max-steps", "1", "--per-device-train-batch-size", "2", "--threads", "1", "--save-steps", "0"])  # fmt: skip
    assert rc == 0 and "saved" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "adapter" / LINEAGE_FILE).read_text())["config"]["max_steps"] == 1
    assert main(["train", "sft", "--stage", "xx", "--model", str(nano), "--data", str(data)]) == 2
    assert main(["train", "sft", "--model", str(nano), "--data", str(tmp_path / "nothing")]) == 2
    assert "neither a dataset folder" in capsys.readouterr().err
    assert (
        main(["train", "sft", "--model", str(tmp_path / "no-model"), "--data", str(data), "--out", str(tmp_path / "x")])
        == 2
    )
    assert "no config.json" in capsys.readouterr().err


def test_shipped_accelerate_configs_load():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).resolve().parents[1] / "training" / "accelerate"
    configs = {p.stem: load_config_from_file(str(p)) for p in sorted(folder.glob("*.yaml"))}
    assert configs.keys() == {"multi_gpu", "zero2", "zero3"}
    assert configs["multi_gpu"].distributed_type == "MULTI_GPU"
    assert [configs[k].deepspeed_config["zero_stage"] for k in ("zero2", "zero3")] == [2, 3]
    assert all(c.mixed_precision == "bf16" for c in configs.values())

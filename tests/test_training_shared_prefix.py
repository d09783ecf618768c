"""The shared prompt prefix of an SFT batch computed once (training/shared_prefix.py): the loss and every
gradient equal the plain forward's, for KT and FI batches of both nano architectures, and the prefix stops
where examples differ, at the first image and before the first supervised target."""

from __future__ import annotations

import os

import pytest
import torch
from training_support import nano_model, write_dataset

from training.datasets import fi_examples, kt_examples, load_sources, to_hf_dataset
from training.sft import TurnWeightedCollator, TurnWeightedSFTTrainer, load_policy_model
from training.shared_prefix import prefill_shared_prefix, shared_prefix_length

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

X = -100


def test_prefix_stops_where_rows_differ_at_images_and_before_supervised_targets():
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7, 8]])
    none = torch.full_like(ids, X)
    assert shared_prefix_length(ids, none, stop_token_ids=[]) == 4  # rows differ at 4
    assert shared_prefix_length(ids, none, stop_token_ids=[3]) == 2  # image token at 2
    labels = torch.tensor([[X, X, X, 4, 5, 6], [X, X, X, X, 7, 8]])
    assert shared_prefix_length(ids, labels, stop_token_ids=[]) == 2  # position 2's logits predict supervised 3
    assert shared_prefix_length(ids[:1], none[:1], stop_token_ids=[]) == 0  # one row: nothing to share
    same = torch.tensor([[1, 2, 3], [1, 2, 3]])
    assert shared_prefix_length(same, torch.full_like(same, X), stop_token_ids=[]) == 2  # a suffix is always left


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("prefix_data") / "annotation", n=4)


def _loss_and_grads(trainer, batch, share: bool):
    trainer.share_prefix = share
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "internvl"])
@pytest.mark.parametrize("stage", ["kt", "fi"])
def test_shared_prefix_gives_the_plain_loss_and_gradients(arch, stage, data, tmp_path, tmp_path_factory):
    import trl

    nano = nano_model(tmp_path_factory, arch)
    sources = load_sources([str(data)], build_dir=tmp_path)
    rows = (kt_examples if stage == "kt" else fi_examples)(sources)[:3]
    ds = to_hf_dataset([{"messages": r["messages"], "images": r["images"]} for r in rows])
    model, processor, _ = load_policy_model(str(nano), None, trainable_adapter=False, merge_adapter=False)
    model.float().train()
    collator = TurnWeightedCollator(processor, max_length=4096, assistant_only_loss=True, first_turn_weight=0.9)
    args = trl.SFTConfig(output_dir=str(tmp_path / "o"), assistant_only_loss=True, report_to="none", max_steps=1,
                         remove_unused_columns=False, bf16=False, gradient_checkpointing=False)  # fmt: skip
    trainer = TurnWeightedSFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=processor, data_collator=collator
    )
    batch = collator([ds[i] for i in range(len(ds))])
    if stage == "kt":
        batch.pop("loss_weights")  # KT is TRL's plain NLL
    stop = [model.config.image_token_id, getattr(model.config, "vision_start_token_id", None)]
    p = shared_prefix_length(batch["input_ids"], batch["labels"], [t for t in stop if t is not None])
    assert p > 0.5 * batch["input_ids"].shape[1] if stage == "kt" else p > 100  # the system prompt at least
    with torch.no_grad():
        suffix, used = prefill_shared_prefix(trainer.model, dict(batch))
    assert used == p and suffix["input_ids"].shape[1] == batch["input_ids"].shape[1] - p

    assert trainer._can_share_prefix()  # one process, no gradient checkpointing
    trainer.args.gradient_checkpointing = True  # which re-runs the forward without a cache: no sharing
    assert not trainer._can_share_prefix()
    trainer.args.gradient_checkpointing = False

    plain_loss, plain = _loss_and_grads(trainer, batch, share=False)
    shared_loss, shared = _loss_and_grads(trainer, batch, share=True)
    assert shared_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain.keys() == shared.keys() and len(plain) > 10
    for name, g in plain.items():
        torch.testing.assert_close(shared[name], g, rtol=1e-4, atol=1e-6, msg=name)

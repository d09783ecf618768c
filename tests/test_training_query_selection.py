"""DT-GRPO's query selection (training/query_selection.py): the fast-answer P(spoof) read in batches over the
shared prompt prefix is the class-token score of each query, and ``--select-band`` trains on exactly the
queries inside the band, with what it kept in the lineage."""

from __future__ import annotations

import os

import pytest
import torch
from training_support import nano_model, write_dataset

from core.mllm.processor import load_model_and_processor
from core.mllm.scoring import class_token_score
from training.datasets import grpo_queries, load_sources
from training.lineage import read_lineage
from training.query_selection import _inputs, fast_answer_p_spoof, select_uncertain

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("select_data") / "annotation", n=6)


def _rows(data, tmp_path):
    return grpo_queries(load_sources([str(data)], build_dir=tmp_path))


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "internvl"])
def test_batched_fast_answer_score_is_each_querys_class_token_score(arch, tmp_path_factory, data, tmp_path):
    lm = load_model_and_processor(nano_model(tmp_path_factory, arch))
    rows = _rows(data, tmp_path)
    assert len(rows) == 6  # one a face (images are stored by content)
    batched = fast_answer_p_spoof(lm.model, lm.processor, rows, batch_size=4)  # 4 + 2: a short last batch
    for row, p in zip(rows, batched, strict=True):
        inp = _inputs(row, lm.processor)
        assert p == pytest.approx(class_token_score(lm.model, lm.processor, inp.text, inp.images, "").p_spoof, abs=1e-5)
    assert len(set(round(p, 6) for p in batched)) > 1  # the faces differ, so do their scores
    assert not lm.model.training


def test_batched_score_reads_the_class_token_when_the_tags_are_several_tokens(monkeypatch, data, tmp_path):
    # A vocabulary without the tags as single tokens (as Qwen's): the score is read after the tokens both
    # tags start with, not at the prompt's last position.
    import core.mllm.nano as nano

    split = [t for t in nano.NANO_PROTOCOL_TOKENS if t not in ("<Real>", "<Spoof>")] + ["<"]
    monkeypatch.setattr(nano, "NANO_PROTOCOL_TOKENS", split)
    lm = load_model_and_processor(nano.build_nano(tmp_path / "split_tags"))
    assert lm.processor.tokenizer.tokenize("<Spoof>") == ["<", "Spoof", ">"]
    rows = _rows(data, tmp_path / "build")
    for row, p in zip(rows, fast_answer_p_spoof(lm.model, lm.processor, rows, batch_size=4), strict=True):
        inp = _inputs(row, lm.processor)
        assert p == pytest.approx(class_token_score(lm.model, lm.processor, inp.text, inp.images, "").p_spoof, abs=1e-5)


def test_select_uncertain_keeps_the_band_and_says_what_it_kept():
    rows = [{"label": lab, "id": i} for i, lab in enumerate(["real", "spoof", "spoof", "real", "spoof"])]
    p = [0.001, 0.02, 0.5, 0.985, 0.9999]
    kept, stats = select_uncertain(rows, p, 0.01)
    assert [r["id"] for r in kept] == [1, 2, 3]
    assert stats == {"band": 0.01, "candidates": 5, "kept": 3, "kept_labels": {"spoof": 2, "real": 1},
                     "candidate_labels": {"real": 2, "spoof": 3}, "kept_p_spoof": [0.02, 0.985]}  # fmt: skip
    assert select_uncertain(rows, p, 0.0)[1]["kept"] == 5
    none, stats = select_uncertain(rows, [0.001] * 5, 0.01)  # a model sure of every face
    assert none == [] and stats["kept"] == 0 and stats["kept_p_spoof"] is None
    for bad in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="band"):
            select_uncertain(rows, p, bad)


def test_cli_train_grpo_select_band_trains_on_the_uncertain_queries(tmp_path_factory, data, tmp_path):
    from app.cli import main

    nano = nano_model(tmp_path_factory)
    lm = load_model_and_processor(nano)
    p = fast_answer_p_spoof(lm.model, lm.processor, _rows(data, tmp_path))
    doubt = sorted(min(x, 1 - x) for x in p)  # distance of each query's P(spoof) from a sure verdict
    args = ["train", "grpo", "--model", str(nano), "--data", str(data), "--num-generations", "2",
            "--per-device-train-batch-size", "2", "--max-steps", "1", "--max-new-tokens", "8",
            "--max-completion-length", "200", "--threads", "1", "--save-steps", "0"]  # fmt: skip
    # A band outside [0, 0.5) is refused before anything loads; one that no query reaches, before any rollout.
    assert main([*args, "--out", str(tmp_path / "bad"), "--select-band", "0.7"]) == 2
    assert not (tmp_path / "bad").exists()
    assert main([*args, "--out", str(tmp_path / "none"), "--select-band", str(doubt[-1] + 1e-4)]) == 2
    assert not (tmp_path / "none" / "model").exists()
    # A band between the scores: exactly the queries at or beyond it are trained on, and the lineage says so.
    band = (doubt[2] + doubt[3]) / 2
    out = tmp_path / "some"
    assert main([*args, "--out", str(out), "--select-band", str(band)]) == 0
    sel = read_lineage(out / "model")["data_stats"]["query_selection"]
    assert sel["candidates"] == 6 and sel["kept"] == 3 and sel["band"] == pytest.approx(band)
    assert sum(sel["kept_labels"].values()) == 3

"""Batched, concurrent evaluation with the hf policy (issue #16): several investigations, each its own run of
the one agent loop, have their turns generated together in left-padded batches; greedy decoding gives the
same trajectories and scores as one investigation at a time, the class score of a generated answer comes
from the decoding step that produced it (no second forward pass), and every image is processed once."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from mllm_support import direct_p_spoof
from PIL import Image
from transformers import LogitsProcessorList

from app.cli import main as cli_main
from core import agent, protocol
from core.agent import AgentConfig
from core.evaluation.manifest import read_manifest
from core.evaluation.scoring import FaceCache, Variant, score_variant
from core.faces import prepare_face
from core.mllm.forcing import ForcedTurns
from core.mllm.nano import build_nano
from core.policies.hf import HFPolicy
from core.registry import ToolRegistry
from core.trajectory import to_messages

FAST = protocol.format_fast_answer("spoof", "The face looks flat.")
CALL = protocol.format_tool_call_turn("Check for moire.", protocol.ToolCall("FFTTool", {}))
ANSWER = protocol.format_answer_turn("Periodic peaks: a screen.", "spoof")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def nano_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nano_batched")
    return {arch: build_nano(root / arch, arch) for arch in ("qwen2_5_vl", "internvl")}


def faces(n: int):
    """n different real-photo faces: the astronaut shifted and scaled (different pixels, different prompts)."""
    import skimage.data

    rgb = skimage.data.astronaut()
    return [prepare_face(rgb[4 * i : 512 - 8 * i, 6 * i : 512 - 4 * i].copy()) for i in range(n)]


def run_together(policy, face_list, configs=None) -> list:
    """Each face's investigation in its own thread (a stream), as `tarfas eval --concurrency N` runs them."""
    out = [None] * len(face_list)
    configs = configs or [None] * len(face_list)

    def one(i):
        with policy.stream():
            out[i] = agent.run(face_list[i], policy, configs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(face_list))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def same_trajectory(a, b, tol=1e-4):
    assert [t.text for t in a.turns] == [t.text for t in b.turns]
    assert [sorted(t.notes) for t in a.turns] == [sorted(t.notes) for t in b.turns]  # same format
    for ta, tb in zip(a.turns, b.turns):
        assert (ta.score_spoof is None) == (tb.score_spoof is None)
        if ta.score_spoof is not None:
            assert ta.score_spoof == pytest.approx(tb.score_spoof, abs=tol)
        for k in ("new_tokens", "stopped_by", "prompt_tokens"):
            assert ta.notes.get(k) == tb.notes.get(k)
    assert (a.status, a.error, a.final is None) == (b.status, b.error, b.final is None)
    if a.final is not None:
        assert a.final.verdict == b.final.verdict and a.final.score_spoof == pytest.approx(b.final.score_spoof, abs=tol)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "internvl"])
def test_batched_free_generation_equals_one_at_a_time(arch, nano_dirs):
    # An untrained model breaks the protocol: every turn runs to the token budget or a stop, and is fed back.
    face_list = faces(4)
    seq = HFPolicy.load(nano_dirs[arch], max_new_tokens=10)
    alone = [agent.run(f, seq) for f in face_list]
    together_policy = HFPolicy.load(nano_dirs[arch], max_new_tokens=10)
    together = run_together(together_policy, face_list)
    for a, b in zip(alone, together):
        same_trajectory(a, b)
    assert max(together_policy.batch_sizes) == 4 and set(seq.batch_sizes) == {1}
    assert all(t.notes["batch_size"] >= 1 for tr in together for t in tr.turns)
    assert len({len(t.turns) for t in together}) >= 1 and all(t.turns for t in together)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "internvl"])
def test_generated_answers_are_scored_from_the_generation_and_batched_equals_sequential(arch, nano_dirs):
    face_list = faces(3)

    def policy():
        p = HFPolicy.load(nano_dirs[arch], max_new_tokens=48)
        p.generation_kwargs["logits_processor"] = LogitsProcessorList([ForcedTurns(p.tokenizer, [FAST, CALL, ANSWER])])
        return p

    # different tools offered: different system prompts, so the batch's rows are left-padded
    configs = [AgentConfig(allowed_tools=tools) for tools in (None, ["FFTTool"], ["FFTTool", "LBPTool"])]
    seq = policy()
    alone = [agent.run(f, seq, c) for f, c in zip(face_list, configs)]
    assert len({t.turns[0].notes["prompt_tokens"] for t in alone}) == 3
    assert all(t.status == "completed" and t.final.source == "answer" for t in alone)
    assert [t.text for t in alone[0].turns] == [FAST, CALL, ANSWER]  # generated, not put in the prompt
    for tr in alone:
        for t in (tr.turns[0], tr.turns[2]):
            assert t.notes["score_pass"] == "generation" and t.notes["forced_prefix"] is False
            assert 0.0 < t.score_spoof < 1.0
    # the score read at the generating step equals a separate forward pass over prompt + prefix
    tr = alone[0]
    before = type(tr)(policy="hf", crop=tr.crop)
    before.turns = tr.turns[:2]
    system = protocol.system_prompt(ToolRegistry(None).schemas())  # face 0: all tools
    messages = to_messages(before, system=system, next_prompt=True)
    assert tr.final.score_spoof == pytest.approx(
        direct_p_spoof(seq, messages, ANSWER[: ANSWER.index("<Spoof>")]), abs=1e-5
    )
    first = to_messages(type(tr)(policy="hf", crop=tr.crop), system=system, next_prompt=True, next_kind="fast")
    assert tr.fast_score == pytest.approx(direct_p_spoof(seq, first, ""), abs=1e-5)
    assert len({round(t.final.score_spoof, 6) for t in alone}) == 3  # each face its own score

    batched = policy()
    together = run_together(batched, face_list, configs)
    for a, b in zip(alone, together):
        same_trajectory(a, b)
    assert max(batched.batch_sizes) == 3


def test_each_image_is_processed_once_per_investigation(nano_dirs, face):
    policy = HFPolicy.load(nano_dirs["qwen2_5_vl"], max_new_tokens=4, scripted_prefix=[FAST, CALL, None, ANSWER])
    traj = agent.run(face, policy)
    cache = policy.processor.image_processor
    turns, images = len(traj.turns), 1 + len(traj.tool_turns)
    assert turns >= 4 and images == 2
    assert cache.misses == images  # the face and the FFT image, once each
    assert cache.hits >= turns - 1  # later turns (and the score's forward passes) reuse them


def write_rows(tmp_path, n: int) -> list:
    from conftest import write_manifest

    rows = []
    for i, f in enumerate(faces(n)):
        p = tmp_path / f"face{i}.png"
        Image.fromarray(f.crop).save(p)
        rows.append({"path": str(p), "label": "spoof" if i % 2 else "real", "domain": "d"})
    return read_manifest(write_manifest(tmp_path / "m.csv", rows))


def test_score_variant_with_concurrency_gives_the_sequential_scores(nano_dirs, tmp_path):
    rows = write_rows(tmp_path, 5)

    def policy():
        p = HFPolicy.load(nano_dirs["qwen2_5_vl"], max_new_tokens=48)
        p.generation_kwargs["logits_processor"] = LogitsProcessorList([ForcedTurns(p.tokenizer, [FAST, CALL, ANSWER])])
        return p

    one = score_variant(rows, FaceCache(), policy(), Variant("main", None, 3), progress=False)
    batched_policy = policy()
    many = score_variant(rows, FaceCache(), batched_policy, Variant("main", None, 3), progress=False, concurrency=4)
    assert list(one) == list(many) == [r.path for r in rows]  # row order kept
    for p in one:
        a, b = one[p], many[p]
        assert a.score_spoof == pytest.approx(b.score_spoof, abs=1e-4) and a.tool_calls == b.tool_calls == ["FFTTool"]
        assert a.fast_score == pytest.approx(b.fast_score, abs=1e-4) and a.error is None
    assert max(batched_policy.batch_sizes) == 4
    with pytest.raises(ValueError, match="concurrency"):
        score_variant(rows, FaceCache(), batched_policy, Variant("main", None, 3), progress=False, concurrency=0)


def test_cli_eval_with_concurrency_and_no_verdict_exit_status(nano_dirs, tmp_path, capsys):
    rows = write_rows(tmp_path, 3)
    manifest = tmp_path / "m.csv"
    # an untrained nano model never gives a verdict: the table is printed, and the exit status says so
    rc = cli_main(["eval", str(manifest), "--policy", "hf", "--model", str(nano_dirs["qwen2_5_vl"]),
                   "--max-new-tokens", "4", "--threshold", "0.5", "--concurrency", "3"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and "reached no verdict on any of the 3 images" in err
    assert len(rows) == 3
    assert cli_main(["eval", str(manifest), "--concurrency", "0"]) == 2
    assert "--concurrency must be >= 1" in capsys.readouterr().err


def test_a_failing_batch_fails_each_of_its_investigations_and_keeps_their_turns(nano_dirs):
    policy = HFPolicy.load(nano_dirs["qwen2_5_vl"], max_new_tokens=4, scripted_prefix=[FAST])
    policy.generation_kwargs["bogus_option"] = np.zeros(1)  # generate() refuses unknown kwargs
    out = run_together(policy, faces(2))
    for traj in out:
        assert traj.status == "failed" and "bogus_option" in traj.error
        assert traj.turns and traj.turns[0].fast is not None  # the scripted fast answer is kept


# --- the batcher itself -----------------------------------------------------------------------------------
def test_batcher_waits_for_open_streams_and_runs_them_together():
    from core.mllm.batching import RequestBatcher

    seen = []
    batcher = RequestBatcher(lambda items: seen.append(sorted(items)) or [i * 10 for i in items], max_wait_s=5)
    results, opened = {}, threading.Barrier(4)

    def stream(k):
        with batcher.stream():
            opened.wait()  # all four streams are open before the first request
            results[k] = [batcher.submit(k) for _ in range(3)]

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {k: [10 * k] * 3 for k in range(4)}
    assert seen == [[0, 1, 2, 3]] * 3 and batcher.batch_sizes == [4, 4, 4]  # lock step, no partial batch


def test_batcher_without_streams_runs_at_once_and_errors_reach_every_caller():
    from core.mllm.batching import RequestBatcher

    def run(items):
        if "bad" in items:
            raise RuntimeError("the model failed")
        return items

    batcher = RequestBatcher(run, max_batch=2, idle_exit_s=0.2)
    assert batcher.submit("a") == "a" and batcher.batch_sizes == [1]
    with pytest.raises(RuntimeError, match="the model failed"):
        batcher.submit("bad")
    import time

    time.sleep(0.5)  # the idle worker has ended (it would hold the model); the next request starts another
    assert batcher._worker is None and batcher.submit("b") == "b"


def test_the_shared_prefix_cache_changes_nothing_but_the_work(nano_dirs):
    face_list = faces(2)

    def policy(prefix_cache):
        p = HFPolicy.load(nano_dirs["qwen2_5_vl"], max_new_tokens=48, prefix_cache=prefix_cache)
        p.generation_kwargs["logits_processor"] = LogitsProcessorList([ForcedTurns(p.tokenizer, [FAST, CALL, ANSWER])])
        return p

    cached, plain = policy(True), policy(False)
    for a, b in zip(run_together(cached, face_list), [agent.run(f, plain) for f in face_list]):
        same_trajectory(a, b, tol=1e-5)
    assert len(cached._prefixes) == 1 and not plain._prefixes  # one system prompt, computed once

"""What a valid investigation is (core.protocol.investigation_error, the inference parsers), and the batched
evaluation of trained checkpoints through the agent loop (training/policy_eval.py)."""

from __future__ import annotations

import pytest
import torch

from core import protocol
from core.protocol import ToolCall, investigation_error, is_valid_investigation

torch.set_num_threads(1)

FAST = protocol.format_fast_answer("spoof", "flat texture at a glance")
CALL = protocol.format_tool_call_turn("check the spectrum for moire", ToolCall("FFTTool", {}))
ANSWER = protocol.format_answer_turn("periodic peaks: a screen replay", "spoof")


def test_a_valid_investigation_runs_from_the_fast_answer_to_one_answer():
    assert investigation_error([FAST, ANSWER]) is None  # no tool is fine
    assert is_valid_investigation([FAST, CALL, CALL, CALL, ANSWER])


@pytest.mark.parametrize(
    "turns,why",
    [
        ([], "no turns"),
        (["<Spoof> flat"], "turn 1 (fast answer)"),
        ([FAST], "no <answer> turn"),
        ([FAST, CALL], "no <answer> turn"),
        ([FAST, "<think>open", ANSWER], "turn 2"),  # <think> left open
        ([FAST, '<think>x</think><tool_call>{"arguments": {}}</tool_call>', ANSWER], "turn 2"),  # name skipped
        ([FAST, CALL, CALL, CALL, CALL, ANSWER], "over the limit of 3"),
        ([FAST, ANSWER, ANSWER], "more turns follow"),
        ([FAST, FAST, ANSWER], "turn 2"),
    ],
)
def test_each_protocol_break_is_named(turns, why):
    error = investigation_error(turns)
    assert error is not None and why in error
    assert not is_valid_investigation(turns)


def test_tool_names_and_the_limit_are_checked_when_given():
    assert "unknown tool 'FFTTool'" in investigation_error([FAST, CALL, ANSWER], tool_names=["HOGTool"])
    assert investigation_error([FAST, CALL, ANSWER], tool_names=["FFTTool"]) is None
    assert "over the limit of 0" in investigation_error([FAST, CALL, ANSWER], max_tool_calls=0)


# --- the batched evaluator on the nano model ----------------------------------------------------------
@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    from core.mllm.nano import build_nano
    from core.mllm.processor import load_model_and_processor

    return load_model_and_processor(build_nano(tmp_path_factory.mktemp("nano") / "m"))


def test_batched_greedy_generation_equals_one_at_a_time(nano, crop):
    """Left padding and concatenated image tensors give each row the tokens it gets alone."""
    from core.mllm.messages import to_processor_inputs
    from training.policy_eval import batched_generate

    proc = nano.processor
    prompts = []
    for extra in ("", " Please look closely at the whole face and the borders."):
        msgs = [
            {
                "role": "user",
                "content": [{"type": "image", "image": crop}, {"type": "text", "text": "Is it real?" + extra}],
            }
        ]
        inp = to_processor_inputs(msgs, proc, add_generation_prompt=True)
        enc = proc(text=[inp.text], images=inp.images, return_tensors="pt")
        fields = {k: v for k, v in enc.items() if k in ("pixel_values", "image_grid_thw")}
        prompts.append((enc["input_ids"][0].tolist(), inp.images, fields))
    gen = batched_generate(nano.model, proc, temperature=0.0, max_new_tokens=12)
    together = gen(*map(list, zip(*prompts, strict=True)))
    alone = [gen([ids], [imgs], [f])[0] for ids, imgs, f in prompts]
    assert len(prompts[0][0]) != len(prompts[1][0])
    assert [ids for ids, _ in together] == [ids for ids, _ in alone]
    assert all(0 < len(ids) <= 12 for ids, _ in together)


def test_an_untrained_model_is_measured_as_invalid_and_unscored(nano, crop):
    from training.policy_eval import evaluate_policy, metrics

    res = evaluate_policy(nano.model, nano.processor, [crop, crop], ["real", "spoof"], temperature=1.0,
                          max_new_tokens=8, batch_size=2)  # fmt: skip
    assert [r.label for r in res] == ["real", "spoof"]
    assert all(not r.format_ok and r.format_error.startswith("turn 1") and r.verdict is None for r in res)
    m = metrics(res)
    assert m["n"] == 2 and m["format_ok"] == 0.0 and m["accuracy"] == 0.0 and m["no_verdict"] == 2
    assert m["auc"] == 0.5  # every image unscored: chance
    assert m["mean_reward"] == pytest.approx(0.1 * -1 + 0.5 * -1)  # both format terms -1 (eq. 14), no tool term


def test_apcer_and_bpcer_show_verdicts_skewed_to_one_class():
    from training.policy_eval import ImageResult, metrics

    res = [
        ImageResult("real", "real", 0.1, True, None, "answer", 1),
        ImageResult("real", None, None, False, "turn 1: no class", None, 0),  # no verdict: a BPCER error
        ImageResult("spoof", "real", 0.4, True, None, "answer", 1),
        ImageResult("spoof", "real", 0.3, True, None, "answer", 1),
        ImageResult("spoof", "spoof", 0.8, True, None, "answer", 1),
        ImageResult("spoof", "real", 0.2, True, None, "answer", 1),
    ]
    m = metrics(res)
    assert m["apcer"] == pytest.approx(3 / 4) and m["bpcer"] == pytest.approx(1 / 2)
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert metrics(res[:2])["apcer"] is None  # no attack among the images


def test_paired_bootstrap_needs_the_same_images():
    from training.policy_eval import ImageResult, paired_bootstrap

    a = [
        ImageResult("real", "real", 0.1, True, None, "answer", 1, reward=0.58),
        ImageResult("spoof", "real", 0.4, True, None, "answer", 1, reward=0.0),
    ]
    b = [
        ImageResult("real", "real", 0.2, True, None, "answer", 1, reward=0.58),
        ImageResult("spoof", "spoof", 0.9, True, None, "answer", 1, reward=0.58),
    ]
    ci = paired_bootstrap(a, b, n=200)
    assert ci["delta_acc_ci95"][0] >= 0 and ci["delta_acc_ci95"][1] <= 1
    assert ci["delta_reward_ci95"][0] >= 0 and ci["delta_reward_ci95"][1] == pytest.approx(0.58)  # b never worse
    assert (
        paired_bootstrap([a[0]], [ImageResult("real", "real", 0.2, True, None, "answer", 1)])["delta_reward_ci95"]
        is None
    )
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(a, b[::-1])


def test_draws_bootstrap_averages_each_face_over_its_draws_before_resampling_faces():
    from training.policy_eval import ImageResult, draws_bootstrap

    def r(label, verdict, ok, reward):
        return ImageResult(label, verdict, 0.5, ok, None if ok else "turn 2: no answer", "answer", 1, reward=reward)

    # model a: face 0 right once in two draws, face 1 always wrong; model b: both faces always right, one bad format
    a = [
        [r("real", "real", True, 0.58), r("spoof", "real", True, 0.0)],
        [r("real", "spoof", True, 0.0), r("spoof", "real", True, 0.0)],
    ]
    b = [[r("real", "real", True, 0.58), r("spoof", "spoof", True, 0.58)], [r("real", "real", False, -0.5), r("spoof", "spoof", True, 0.58)]]  # fmt: skip
    out = draws_bootstrap(a, b, n=500)
    assert out["images"] == 2 and out["draws"] == [2, 2]
    assert out["accuracy"] == [0.25, 1.0] and out["delta_accuracy"] == 0.75
    assert out["format_ok"] == [1.0, 0.75] and out["delta_format_ok"] == -0.25
    assert out["mean_reward"] == [0.145, 0.31] and out["delta_mean_reward"] == pytest.approx(0.165)
    # per-face differences in accuracy are 0.5 and 1.0: every resample of faces lies between them
    assert 0.5 <= out["delta_accuracy_ci95"][0] <= out["delta_accuracy_ci95"][1] <= 1.0
    with pytest.raises(ValueError, match="same images"):
        draws_bootstrap(a, [d[::-1] for d in b])
    with pytest.raises(ValueError, match="at least one draw"):
        draws_bootstrap(a, [])


def test_compare_cli_finds_no_difference_between_a_model_and_itself(tmp_path_factory, fasdev, capsys):
    import json

    from training_support import nano_model

    from training.cli.compare import main

    nano = nano_model(tmp_path_factory)
    assert main([str(nano), str(nano), "--manifest", str(fasdev / "manifest.csv"), "--faces", "2", "--draws", "2",
                 "--max-new-tokens", "8", "--workers", "1"]) == 0  # fmt: skip
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["images"] == 2 and line["draws"] == [2, 2]
    for key in ("format_ok", "mean_reward", "accuracy"):  # the same weights and seeds: the same investigations
        assert line[key][0] == line[key][1] and line[f"delta_{key}_ci95"] == [0.0, 0.0]
    assert main([str(nano), str(nano), "--manifest", str(fasdev / "manifest.csv"), "--draws", "0"]) == 2

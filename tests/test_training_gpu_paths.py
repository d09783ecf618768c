"""The GPU paths of training, checked on the CPU (issue #16): the exact sampling kwargs each backend gets
(vLLM's SamplingParams vs transformers' GenerationConfig), the load dtype and mixed-precision flags, the
training config built before the weights load (DeepSpeed ZeRO-3), the attention implementation, the vLLM
engine options, the stop strings shared by inference and rollouts, and annotation's tool-call limit."""

from __future__ import annotations

import os

import pytest
import torch
from training_support import nano_model, write_dataset

from core import protocol
from core.agent import AgentConfig, run
from core.mllm.processor import load_processor, vision_token_ids
from training.configs import GRPOConfig, SFTConfig
from training.rollout import TokenPolicy, face_from_image, stop_length

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# vllm.SamplingParams fields (vLLM 0.22-0.31, the versions TRL 1.16 supports); vLLM is not installed here.
VLLM_SAMPLING_FIELDS = {
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "top_k", "min_p",
    "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
    "detokenize", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    "output_kind", "structured_outputs", "logit_bias", "allowed_token_ids", "extra_args", "bad_words",
}  # fmt: skip


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    return nano_model(tmp_path_factory)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("gpu_paths_data") / "annotation", n=2)


# --- 1. sampling kwargs per backend -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "internvl"])
def test_vllm_sampling_kwargs_are_sampling_params_and_ban_the_vision_tokens(arch, tmp_path_factory):
    from training.grpo import sampling_kwargs

    tok = load_processor(nano_model(tmp_path_factory, arch)).tokenizer
    vision = vision_token_ids(tok)
    assert vision  # the image pad / context tokens (and InternVL's <img> </img>)
    kw = sampling_kwargs(GRPOConfig(use_vllm=True, max_new_tokens=77), tok)
    assert kw == {
        "max_tokens": 77,
        "bad_words": tok.convert_ids_to_tokens(vision),
        "stop": ["</tool_call>", "</answer>", "</reason>"],
        "include_stop_str_in_output": True,
    }
    assert set(kw) <= VLLM_SAMPLING_FIELDS and "max_new_tokens" not in kw and "suppress_tokens" not in kw
    # vLLM turns each bad word into ids with tokenizer.encode(word, add_special_tokens=False) and bans a
    # single-token word outright: each must be exactly one vision token.
    assert [tok.encode(w, add_special_tokens=False) for w in kw["bad_words"]] == [[i] for i in vision]
    import json

    json.dumps(kw)  # server mode posts it as JSON to /v1/completions


def test_transformers_sampling_kwargs_build_trls_generation_config(nano):
    from transformers import GenerationConfig

    from training.grpo import sampling_kwargs

    tok = load_processor(nano).tokenizer
    kw = sampling_kwargs(GRPOConfig(use_vllm=False, max_new_tokens=33), tok)
    assert kw == {"max_new_tokens": 33, "suppress_tokens": vision_token_ids(tok)}
    gc = GenerationConfig(**{"do_sample": True, "max_new_tokens": 4096, **kw})  # TRL: its defaults, then ours
    assert gc.max_new_tokens == 33 and gc.suppress_tokens == vision_token_ids(tok)
    assert gc.stop_strings is None  # generate() would need the tokenizer; rollouts cut at the stop string


# --- 2. the load dtype and mixed-precision flags -------------------------------------------------------
@pytest.mark.parametrize(
    "device, precision, use_lora, deepspeed, bf16_ok, expected",
    [
        # full-parameter without DeepSpeed: fp32 master weights, bf16/fp16 autocast compute
        ("cuda", "auto", False, False, True, {"dtype": "float32", "bf16": True, "fp16": False}),
        ("cuda", "bf16", False, False, True, {"dtype": "float32", "bf16": True, "fp16": False}),
        ("cuda", "fp16", False, False, True, {"dtype": "float32", "bf16": False, "fp16": True}),
        ("cuda", "auto", False, False, False, {"dtype": "float32", "bf16": False, "fp16": False}),
        ("cuda", "fp32", False, False, True, {"dtype": "float32", "bf16": False, "fp16": False}),
        # full-parameter with DeepSpeed: its optimizer keeps the fp32 master copies
        ("cuda", "auto", False, True, True, {"dtype": "bfloat16", "bf16": True, "fp16": False}),
        ("cuda", "fp16", False, True, True, {"dtype": "float16", "bf16": False, "fp16": True}),
        ("cuda", "fp32", False, True, True, {"dtype": "float32", "bf16": False, "fp16": False}),
        # LoRA: the frozen base in the compute dtype (PEFT keeps the adapter in fp32)
        ("cuda", "auto", True, False, True, {"dtype": "bfloat16", "bf16": True, "fp16": False}),
        ("cuda", "auto", True, True, True, {"dtype": "bfloat16", "bf16": True, "fp16": False}),
        ("cuda", "fp32", True, False, True, {"dtype": "float32", "bf16": False, "fp16": False}),
        # CPU: auto is fp32
        ("cpu", "auto", False, False, False, {"dtype": "float32", "bf16": False, "fp16": False}),
        ("cpu", "auto", True, False, False, {"dtype": "float32", "bf16": False, "fp16": False}),
    ],
)
def test_precision_plan_table(device, precision, use_lora, deepspeed, bf16_ok, expected):
    from training.sft import precision_plan

    got = precision_plan(device, precision, use_lora=use_lora, deepspeed=deepspeed, bf16_supported=bf16_ok)
    assert got == expected


def test_precision_plan_rejects_unknown_precision():
    from training.sft import precision_plan

    with pytest.raises(ValueError, match="precision must be"):
        precision_plan("cuda", "int8", use_lora=False, deepspeed=False)


def test_training_dtype_reads_deepspeed_from_the_built_config(monkeypatch):
    from types import SimpleNamespace

    import training.sft as sft

    monkeypatch.setattr(sft, "_device", lambda: "cuda")
    monkeypatch.setattr(sft, "_bf16_supported", lambda: True)
    plain, ds = SimpleNamespace(deepspeed_plugin=None, deepspeed=None), SimpleNamespace(deepspeed_plugin=object())
    assert sft.training_dtype(plain, "auto", use_lora=False) == "float32"
    assert sft.training_dtype(ds, "auto", use_lora=False) == "bfloat16"
    assert sft.training_dtype(plain, "auto", use_lora=True) == "bfloat16"
    assert sft.precision_flags("auto") == {"bf16": True, "fp16": False}


def test_bf16_on_a_cpu_asks_the_trainer_for_cpu_autocast(monkeypatch, tmp_path):
    import trl

    import training.sft as sft

    monkeypatch.setattr(sft, "_device", lambda: "cpu")
    monkeypatch.setattr(sft, "_bf16_supported", lambda: False)
    assert sft.precision_flags("auto") == {"bf16": False, "fp16": False}  # auto stays fp32 on a CPU
    flags = sft.precision_flags("bf16")
    assert flags == {"bf16": True, "fp16": False, "use_cpu": True}
    args = trl.SFTConfig(output_dir=str(tmp_path), report_to="none", **flags)  # transformers accepts it
    assert args.bf16 and args.use_cpu
    assert isinstance(sft.cpu_has_native_bf16(), bool)


def test_full_parameter_nano_weights_stay_fp32_under_bf16_autocast():
    # Why fp32 master weights: AdamW's first step moves every weight by ~lr. At lr 1e-6 a bf16 weight keeps
    # almost none of those updates; an fp32 one keeps them all.
    torch.manual_seed(0)
    w = torch.randn(10_000) * 0.02
    step = torch.full_like(w, 1e-6)
    assert ((w.bfloat16() - step.bfloat16()) != w.bfloat16()).float().mean() < 0.05
    assert ((w - step) != w).float().mean() > 0.99


# --- 3-5. the config before the model; attention; vLLM engine options ------------------------------------
class _Stop(Exception):
    pass


def _record(monkeypatch, module, config_name: str, trainer_attr: str):
    """Patch trl.<config_name> to record when it is built, the model loader to record its kwargs, and the
    trainer to record its args and stop the run."""
    import trl

    import training.grpo as grpo
    import training.sft as sft

    events, seen = [], {}
    real_config = getattr(trl, config_name)

    class Recording(real_config):
        def __post_init__(self):
            super().__post_init__()
            events.append("config")

    real_loader = sft.load_policy_model

    def loader(*args, **kwargs):
        events.append("load")
        seen["load_kwargs"] = kwargs
        return real_loader(*args, **kwargs)

    def trainer(**kwargs):
        seen["trainer_kwargs"] = kwargs
        raise _Stop

    monkeypatch.setattr(trl, config_name, Recording)
    monkeypatch.setattr(module, "load_policy_model", loader)
    monkeypatch.setattr(module, trainer_attr, trainer)
    assert module in (grpo, sft)
    return events, seen


def test_grpo_builds_its_trl_config_first_and_passes_dtype_attention_and_vllm_options(
    nano, data, tmp_path, monkeypatch
):
    import training.grpo as grpo

    events, seen = _record(monkeypatch, grpo, "GRPOConfig", "DTGRPOTrainer")
    cfg = GRPOConfig(model=str(nano), data=[str(data)], out=str(tmp_path / "g"), num_generations=2,
                     per_device_train_batch_size=2, max_steps=1, max_new_tokens=9, attn_implementation="eager",
                     vllm_max_model_length=8192, vllm_tensor_parallel_size=2, vllm_gpu_memory_utilization=0.45,
                     precision="fp32", threads=1)  # fmt: skip
    with pytest.raises(_Stop):
        grpo.train_grpo(cfg)
    assert events == ["config", "load"]  # ZeRO-3 init needs DeepSpeed registered before from_pretrained
    assert seen["load_kwargs"] == {"trainable_adapter": False, "merge_adapter": True, "dtype": "float32",
                                   "attn_implementation": "eager"}  # fmt: skip
    kw = seen["trainer_kwargs"]
    args = kw["args"]
    assert (args.vllm_max_model_length, args.vllm_tensor_parallel_size, args.vllm_gpu_memory_utilization) == (
        8192,
        2,
        0.45,
    )
    assert args.generation_kwargs == {
        "max_new_tokens": 9,
        "suppress_tokens": vision_token_ids(kw["processing_class"].tokenizer),
    }
    assert args.bf16 is False and args.fp16 is False
    assert kw["model"].dtype == torch.float32 and kw["model"].config._attn_implementation == "eager"


def test_grpo_with_vllm_passes_sampling_params_kwargs(nano, data, tmp_path, monkeypatch):
    import training.grpo as grpo

    _, seen = _record(monkeypatch, grpo, "GRPOConfig", "DTGRPOTrainer")
    cfg = GRPOConfig(model=str(nano), data=[str(data)], out=str(tmp_path / "v"), num_generations=2,
                     per_device_train_batch_size=2, max_steps=1, max_new_tokens=21, use_vllm=True, threads=1)  # fmt: skip
    with pytest.raises(_Stop):
        grpo.train_grpo(cfg)
    tok = seen["trainer_kwargs"]["processing_class"].tokenizer
    gk = seen["trainer_kwargs"]["args"].generation_kwargs
    assert gk == {"max_tokens": 21, "bad_words": tok.convert_ids_to_tokens(vision_token_ids(tok)),
                  "stop": list(protocol.STOP_STRINGS), "include_stop_str_in_output": True}  # fmt: skip
    assert seen["trainer_kwargs"]["args"].use_vllm is True


def test_sft_builds_its_trl_config_first_and_passes_dtype_and_attention(nano, data, tmp_path, monkeypatch):
    import training.sft as sft

    events, seen = _record(monkeypatch, sft, "SFTConfig", "TurnWeightedSFTTrainer")
    cfg = SFTConfig(model=str(nano), data=[str(data)], out=str(tmp_path / "s"), use_lora=False, max_steps=1,
                    attn_implementation="sdpa", threads=1)  # fmt: skip
    with pytest.raises(_Stop):
        sft.train_sft(cfg)
    assert events == ["config", "load"]
    assert seen["load_kwargs"] == {"trainable_adapter": False, "merge_adapter": True, "dtype": "float32",
                                   "attn_implementation": "sdpa"}  # fmt: skip
    assert seen["trainer_kwargs"]["model"].config._attn_implementation == "sdpa"


def test_attn_implementation_flags_and_the_hf_policy(nano):
    from app.cli import build_parser
    from core.policies import load_policy

    parser = build_parser()
    for cmd in ("sft", "grpo"):
        args = parser.parse_args(["train", cmd, "--attn-implementation", "eager"])
        assert args.attn_implementation == "eager"
        assert parser.parse_args(["train", cmd]).attn_implementation is None
    args = parser.parse_args(["train", "grpo", "--vllm-max-model-length", "8192", "--vllm-tensor-parallel-size", "2"])
    assert (args.vllm_max_model_length, args.vllm_tensor_parallel_size) == (8192, 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "sft", "--attn-implementation", "flash"])
    policy = load_policy("hf", model=str(nano), max_new_tokens=4, attn_implementation="eager")
    assert policy.model.config._attn_implementation == "eager"


def test_hf_options_carry_attn_implementation():
    from app.commands.policy import HFOptions

    assert HFOptions(model="m").attn_implementation is None
    assert HFOptions(model="m", attn_implementation="sdpa").attn_implementation == "sdpa"


# --- 6. stop strings: one constant, inference and rollouts ---------------------------------------------
def test_one_stop_string_constant_for_inference_and_rollouts():
    from core.policies import hf, openai_chat
    from training import rollout

    assert protocol.STOP_STRINGS == ("</tool_call>", "</answer>", "</reason>")
    assert hf.STOP_STRINGS is protocol.STOP_STRINGS
    assert openai_chat.STOP_STRINGS is protocol.STOP_STRINGS
    assert rollout.STOP_STRINGS is protocol.STOP_STRINGS


def test_stop_length_cuts_after_the_first_stop_string(nano):
    tok = load_processor(nano).tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")

    def ids(text):
        return tok.encode(text, add_special_tokens=False)

    fast = ids("<Spoof><reason>Flat.</reason>")
    assert stop_length(fast + ids(" more <answer>x</answer>"), tok, eos) == len(fast)
    assert stop_length(fast + [eos] + ids("junk"), tok, eos) == len(fast) + 1  # a sampled end of turn stays
    assert stop_length(ids("<think>a</think>"), tok, eos) == len(ids("<think>a</think>"))  # no stop: all
    assert stop_length([], tok, eos) == 0


def test_rollout_turns_end_at_the_stop_string_as_at_inference(nano, crop):
    # The transformers sampler in TRL cannot stop at strings: a turn that runs on past its closing tag is cut
    # there, so the rollout holds the same turns as a sampler that stopped (vLLM, the hf policy).
    processor = load_processor(nano)
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    fast = protocol.format_fast_answer("spoof", "Flat, paper-like face.")
    answer = protocol.format_answer_turn("Flat.", "spoof")
    turns = [fast + " and then <think>more</think>", answer + "\nuser: hi"]
    queue = list(turns)

    def generate(ids, images, fields):
        return tok.encode(queue.pop(0), add_special_tokens=False) + [eos], None

    policy = TokenPolicy(generate, processor, max_completion_tokens=4096)
    traj = run(face_from_image(crop), policy, AgentConfig(max_tool_calls=0))
    assert traj.status == "completed" and traj.final.verdict == "spoof"
    r = policy.rollout(traj)
    # Cut after the token that completes the closing tag (vLLM and StopStringCriteria keep that whole token:
    # here ">\n", so the text may run on by whitespace the parser ignores).
    assert [t.rstrip() for t in r.texts] == [fast, answer]
    sampled = tok.decode([i for i, m in zip(r.completion_ids, r.mask, strict=True) if m])
    assert (
        sampled.replace("\n", "") == (fast + answer).replace("\n", "")
        and "and then" not in sampled
        and "user" not in sampled
    )
    assert r.completion_ids.count(eos) >= 2


# --- 7. annotation's tool-call limit is the loop's ------------------------------------------------------
def test_annotation_tool_limit_defaults_to_the_agent_loops():
    from training.annotate import AnnotateConfig
    from training.annotate.conversation import default_tool_limit

    assert AgentConfig().max_tool_calls == 3
    assert AnnotateConfig().tool_limit == AgentConfig().max_tool_calls == default_tool_limit()
    assert AnnotateConfig(max_tool_calls=5).tool_limit == 5  # --max-tool-calls still changes it
    assert AnnotateConfig(max_turns=2).tool_limit == 1  # and the last turn must answer


def test_annotate_image_uses_the_loops_limit_by_default(crop, monkeypatch):
    from training.annotate import conversation
    from training.annotators import Hint

    seen = {}

    def fake_run(face, policy, config, **kwargs):
        seen["max_tool_calls"] = config.max_tool_calls
        raise _Stop

    monkeypatch.setattr(conversation.agent, "run", fake_run)
    with pytest.raises(_Stop):
        conversation.annotate_image(crop, Hint("spoof"), object())
    assert seen["max_tool_calls"] == 3


# --- 8. batched evaluation: the generate call of a batch, and concurrent investigations -------------------
def test_batched_generate_gets_padded_rows_with_their_attention_mask_and_the_shared_prefix_cache(
    nano, crop, monkeypatch
):
    import threading

    from core.policies.hf import HFPolicy

    policy = HFPolicy.load(nano, max_new_tokens=3)
    seen, real_generate = [], policy.model.generate

    def recording_generate(**kwargs):  # records what the real generate() gets, then runs it
        seen.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})
        seen[-1]["cache_length"] = kwargs["cache"].get_seq_length() if "cache" in kwargs else None
        return real_generate(**kwargs)

    monkeypatch.setattr(policy.model, "generate", recording_generate)
    face = face_from_image(crop)
    tool_sets = [None, ["FFTTool"], ["FFTTool", "LBPTool"]]  # different system prompts: different lengths
    lengths = {}
    # All three streams open before any turn is submitted, and the batch waits for all three however long a
    # loaded machine takes to encode a prompt (the default wait, 0.5 s, is a latency bound, not part of this test)
    policy._batcher.max_wait_s = 60.0
    ready = threading.Barrier(len(tool_sets))

    def one(tools):
        with policy.stream():
            ready.wait()
            t = run(face, policy, AgentConfig(max_tool_calls=0, max_format_errors=0, allowed_tools=tools))
            lengths[str(tools)] = t.turns[0].notes["prompt_tokens"]

    threads = [threading.Thread(target=one, args=(t,)) for t in tool_sets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = seen[0]
    n = sorted(lengths.values())
    width = n[-1]
    assert len(set(n)) == 3 and first["input_ids"].shape == (3, width)
    # the rows share the start of the system prompt: its KV is computed once and handed to generate as a
    # cache; each row's padding sits right after it, so the shared part has the same columns in every row
    shared = first["cache_length"]
    assert 16 <= shared < n[0]
    assert (first["input_ids"][:, :shared] == first["input_ids"][0, :shared]).all()
    for row in range(3):
        mask = first["attention_mask"][row]
        pads = int((mask == 0).sum())
        assert width - pads in n
        assert (mask[:shared] == 1).all() and (mask[shared : shared + pads] == 0).all()
        assert (mask[shared + pads :] == 1).all()
        assert (first["input_ids"][row, shared : shared + pads] == policy.tokenizer.pad_token_id).all()
        assert (first["mm_token_type_ids"][row, shared : shared + pads] == 0).all()
    assert sorted(width - int((first["attention_mask"][r] == 0).sum()) for r in range(3)) == n
    image_id = policy.processor.image_token_id
    assert int((first["input_ids"] == image_id).sum()) == 3 * 64  # one face per row, 64 tokens each
    assert first["pixel_values"].shape[0] == 3 * 256 and first["image_grid_thw"].tolist() == [[1, 16, 16]] * 3
    options = {k: v for k, v in first.items() if not torch.is_tensor(v) and k not in ("cache", "cache_length")}
    assert options == {
        "max_new_tokens": 3, "do_sample": False, "temperature": None, "top_p": None, "top_k": None,
        "stop_strings": list(protocol.STOP_STRINGS), "tokenizer": policy.tokenizer,
        "suppress_tokens": vision_token_ids(policy.tokenizer), "pad_token_id": policy.tokenizer.pad_token_id,
    }  # fmt: skip
    assert policy.batch_sizes[0] == 3


def test_internvl_batches_are_left_padded_without_a_prefix_cache(tmp_path_factory, crop, monkeypatch):
    import threading

    from core.policies.hf import HFPolicy

    policy = HFPolicy.load(nano_model(tmp_path_factory, "internvl"), max_new_tokens=3)
    seen, real_generate = [], policy.model.generate
    monkeypatch.setattr(policy.model, "generate", lambda **kw: seen.append(kw) or real_generate(**kw))
    face = face_from_image(crop)

    def one(tools):
        with policy.stream():
            run(face, policy, AgentConfig(max_tool_calls=0, max_format_errors=0, allowed_tools=tools))

    threads = [threading.Thread(target=one, args=(t,)) for t in (None, ["FFTTool"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = seen[0]
    assert "cache" not in first and first["input_ids"].shape[0] == 2
    short = int(first["attention_mask"].sum(1).argmin())
    pads = int((first["attention_mask"][short] == 0).sum())
    assert pads > 0 and (first["attention_mask"][short, :pads] == 0).all()  # left padding
    assert (first["input_ids"][short, :pads] == policy.tokenizer.pad_token_id).all()


def test_a_lone_investigation_is_generated_unpadded(nano, crop, monkeypatch):
    from core.policies.hf import HFPolicy

    policy = HFPolicy.load(nano, max_new_tokens=3)
    seen, real_generate = [], policy.model.generate

    def recording_generate(**kwargs):  # the cache's length before generate appends to it
        seen.append(dict(kwargs, cache_length=kwargs["cache"].get_seq_length()))
        return real_generate(**kwargs)

    monkeypatch.setattr(policy.model, "generate", recording_generate)
    traj = run(face_from_image(crop), policy, AgentConfig(max_tool_calls=0, max_format_errors=0))
    assert seen[0]["input_ids"].shape == (1, traj.turns[0].notes["prompt_tokens"])
    assert bool(seen[0]["attention_mask"].all()) and policy.batch_sizes[:1] == [1]
    # the text before the face image (system prompt, tool schemas) comes from the prefix cache
    vision_start = policy.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    first_image = int((seen[0]["input_ids"][0] == vision_start).nonzero()[0])
    assert seen[0]["cache_length"] == first_image

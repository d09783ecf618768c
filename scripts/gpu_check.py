"""The GPU check of issue #16, run by ``scripts/gpu-check.sh``: one command, one JSON line of figures.

On a machine with CUDA (and the image's torch) it builds the nano models and a Qwen2.5-VL of the 7B's shape
with random weights, made on the GPU in bf16 (never downloaded), and measures:

- ``nano``: building the nano models (both architectures);
- ``nano_policy`` / ``qwen7b_policy``: the hf policy (bf16 on the GPU) through a 4-turn investigation (fast
  answer, two tool calls, answer; generated token by token, core.mllm.forcing) - seconds and tokens/s;
- ``nano_train`` / ``qwen7b_train``: one KT, one FI and one DT-GRPO step each, through training.sft and
  training.grpo (the 7B with LoRA, its base in bf16: training.sft.precision_plan);
- ``nano_eval`` / ``qwen7b_eval``: evaluation throughput, one investigation at a time vs batched.

Without CUDA (``CUDA_VISIBLE_DEVICES=""``) the nano parts run on the CPU and every 7B part is reported as
``{"skipped": "no CUDA"}``. Parts run in that order within ``--budget-s`` (default 450 s; the shell script
kills at 8 minutes); a part that would start past it is skipped, one that fails is reported with its error
and the rest still run. Logs go to stderr; the last line of stdout is the JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import protocol  # noqa: E402

FAST = protocol.format_fast_answer("spoof", "The face looks flat, with a paper-like surface and no depth cues.")
CALL_FFT = protocol.format_tool_call_turn(
    "I look for the periodic peaks of a print or a screen in the spectrum.", protocol.ToolCall("FFTTool", {})
)
CALL_LBP = protocol.format_tool_call_turn(
    "The spectrum is ambiguous; I check the micro-texture of the skin.", protocol.ToolCall("LBPTool", {})
)
ANSWER = protocol.format_answer_turn("Periodic peaks and a flat texture: a recaptured print.", "spoof")
TURNS = [FAST, CALL_FFT, CALL_LBP, ANSWER]  # the 4-turn investigation

# Qwen2.5-VL-7B-Instruct's config.json (text and vision towers), without downloading it.
QWEN7B_TEXT = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)  # fmt: skip
QWEN7B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
    hidden_act="silu", in_channels=3,
)  # fmt: skip


def log(msg: str) -> None:
    print(f"[gpu-check] {msg}", file=sys.stderr, flush=True)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- models ------------------------------------------------------------------------------------------
def build_nanos(out: Path) -> dict:
    from core.mllm.nano import build_nano

    return {arch: build_nano(out / f"nano_{arch}", arch) for arch in ("qwen2_5_vl", "internvl")}


# --rehearse-7b: the same parts on the CPU with the 7B's config scaled down (to check the code path without a GPU).
REHEARSAL_TEXT = dict(
    vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
)  # fmt: skip
REHEARSAL_VISION = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1]
)


def qwen7b_config(tokenizer, rehearsal: bool = False):
    """The 7B's config, with the special-token ids of ``tokenizer`` (the nano tokenizer: ids < its vocabulary,
    which is smaller than the 7B's embedding table; the shapes, and so the cost, are the 7B's)."""
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text = dict(QWEN7B_TEXT, eos_token_id=ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    vision = dict(QWEN7B_VISION)
    if rehearsal:
        text.update(REHEARSAL_TEXT)
        vision.update(REHEARSAL_VISION)
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )  # fmt: skip


def make_qwen7b(config, device: str):
    """The model of ``config`` with random weights, made directly on ``device`` (bf16 on a GPU)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32
        )
    ids = config.get_text_config()
    model.generation_config.eos_token_id = [ids.eos_token_id, ids.pad_token_id]
    model.generation_config.pad_token_id = ids.pad_token_id
    model.generation_config.do_sample = False
    return model.eval()


def build_qwen7b(folder: Path, device: str = "cuda", rehearsal: bool = False):
    """A 7B-shaped Qwen2.5-VL with random weights (:func:`make_qwen7b`), and a folder with its config,
    tokenizer, processor and chat template but no weights (what training reads besides the model)."""
    from core.mllm.nano import build_tokenizer
    from core.mllm.processor import install_remote_code

    tok = build_tokenizer("qwen2_5_vl")
    config = qwen7b_config(tok, rehearsal)
    model = make_qwen7b(config, device)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    processor_7b(tok).save_pretrained(folder)
    install_remote_code(folder, "qwen2_5_vl")
    return model, folder


def processor_7b(tokenizer):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from core.mllm.processor import make_processor
    from core.mllm.template import attach_chat_template

    processor = make_processor("qwen2_5_vl", Qwen2VLImageProcessorPil(), tokenizer)
    attach_chat_template(processor, "qwen2_5_vl")
    return processor


# --- measurements ------------------------------------------------------------------------------------
def face_list(n: int):
    import skimage.data

    from core.faces import prepare_face

    rgb = skimage.data.astronaut()
    return [prepare_face(rgb[(5 * i) % 40 : 472 + (5 * i) % 40, (9 * i) % 40 : 472 + (9 * i) % 40]) for i in range(n)]


def forced(policy) -> None:
    from transformers import LogitsProcessorList

    from core.mllm.forcing import ForcedTurns

    policy.generation_kwargs["logits_processor"] = LogitsProcessorList([ForcedTurns(policy.tokenizer, TURNS)])


def investigation(policy) -> dict:
    """One 4-turn investigation (after a warm-up): seconds, generated tokens, tokens/s."""
    from core import agent

    face = face_list(1)[0]
    agent.run(face, policy)  # warm-up (kernels, caches)
    sync()
    t = time.perf_counter()
    traj = agent.run(face, policy)
    sync()
    seconds = time.perf_counter() - t
    new = sum(x.notes.get("new_tokens", 0) for x in traj.turns)
    gen_s = sum(x.notes.get("generate_ms", 0.0) for x in traj.turns) / 1e3
    return {
        "turns": len(traj.turns), "status": traj.status, "verdict": traj.final.verdict if traj.final else None,
        "seconds": round(seconds, 3), "new_tokens": new, "tokens_per_s": round(new / gen_s, 1) if gen_s else None,
        "prompt_tokens_last": traj.turns[-1].notes.get("prompt_tokens"),
        "score_pass": traj.turns[-1].notes.get("score_pass"),
    }  # fmt: skip


def eval_throughput(make_policy, n_one: int, n_batch: int, concurrency: int) -> dict:
    """Investigations per second one at a time (``n_one`` faces) and with ``concurrency`` streams (``n_batch``)."""
    from core import agent

    one, many = make_policy(), make_policy()
    faces = face_list(max(n_one, n_batch))
    agent.run(faces[0], one)  # warm-up
    sync()
    t = time.perf_counter()
    for f in faces[:n_one]:
        agent.run(f, one)
    sync()
    one_s = (time.perf_counter() - t) / n_one
    todo, lock = list(faces[:n_batch]), threading.Lock()

    def stream():
        with many.stream():
            while True:
                with lock:
                    if not todo:
                        return
                    f = todo.pop()
                agent.run(f, many)

    sync()
    t = time.perf_counter()
    threads = [threading.Thread(target=stream) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    sync()
    batch_s = (time.perf_counter() - t) / n_batch
    return {
        "one_at_a_time_s_per_image": round(one_s, 3), "batched_s_per_image": round(batch_s, 3),
        "concurrency": concurrency, "images": n_batch, "ratio": round(one_s / batch_s, 2),
        "mean_batch": round(sum(many.batch_sizes) / max(len(many.batch_sizes), 1), 2),
    }  # fmt: skip


def write_data(folder: Path, n: int = 4) -> Path:
    """A dataset folder of ``n`` scripted trajectories and their queries (real agent loop, real tools)."""
    import numpy as np
    import skimage.data

    from core.agent import AgentConfig, run
    from core.dataset import DatasetWriter
    from core.faces import prepare_face
    from core.policies import ScriptedPolicy
    from core.samples import simulate_print

    base = skimage.data.astronaut()
    rng = np.random.default_rng(0)
    with DatasetWriter(folder, source="annotation", created_by="gpu-check") as w:
        for i in range(n):
            label = "real" if i % 2 == 0 else "spoof"
            img = np.clip(base.astype(np.float32) * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)
            face = prepare_face(simulate_print(img) if label == "spoof" else img, on_no_face="whole")
            replies = [
                protocol.format_fast_answer(label, f"first look {i}"),
                protocol.format_tool_call_turn("check the spectrum", protocol.ToolCall("FFTTool", {})),
                protocol.format_answer_turn("the spectrum agrees", label),
            ]
            w.add_trajectory(run(face, ScriptedPolicy(replies), AgentConfig(), label=label), id=f"t{i}", label=label)
            w.add_query(face.crop, label, id=f"q{i}")
    return folder


@contextlib.contextmanager
def preloaded(config, device: str, processor):
    """training.sft / training.grpo get a fresh random model of ``config``, made on ``device``, instead of
    loading weights from the folder (a 7B's 16 GB would take minutes to write and read)."""
    import gc

    import torch

    import training.grpo as grpo
    import training.sft as sft

    def load(model_dir, adapter, **_kwargs):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the previous stage's model (and its LoRA) is gone
        return make_qwen7b(config, device).train(), processor, "qwen2_5_vl"

    saved = sft.load_policy_model, grpo.load_policy_model
    sft.load_policy_model = grpo.load_policy_model = load
    try:
        yield
    finally:
        sft.load_policy_model, grpo.load_policy_model = saved


def train_steps(model_dir: Path, data: Path, out: Path, *, lora: bool, threads: int, max_length: int | None) -> dict:
    """One KT, one FI and one DT-GRPO step: seconds and loss / reward of each."""
    import json as _json

    from training.configs import GRPOConfig, SFTConfig
    from training.grpo import train_grpo
    from training.sft import train_sft

    res = {}
    common = dict(model=str(model_dir), data=[str(data)], max_steps=1, logging_steps=1, save_steps=0, threads=threads)
    for stage in ("kt", "fi"):
        sync()
        t = time.perf_counter()
        dest = train_sft(
            SFTConfig(stage=stage, out=str(out / stage), use_lora=lora, per_device_train_batch_size=2,
                      max_length=max_length, **common)
        )  # fmt: skip
        sync()
        lineage = _json.loads((dest / "tarfas_lineage.json").read_text())
        res[stage] = {"seconds": round(time.perf_counter() - t, 2), "loss": lineage["result"]["train_loss"]}
    sync()
    t = time.perf_counter()
    dest = train_grpo(
        GRPOConfig(out=str(out / "grpo"), use_lora=lora, num_generations=2, per_device_train_batch_size=2,
                   max_new_tokens=16, max_completion_length=1024, **common)
    )  # fmt: skip
    sync()
    lineage = _json.loads((dest / "tarfas_lineage.json").read_text())
    log_ = lineage["result"]["log"]
    res["grpo"] = {"seconds": round(time.perf_counter() - t, 2), "reward": log_[-1].get("reward") if log_ else None}
    return res


# --- the run -----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="working folder (default: a temporary one, removed at the end)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="parts that would start after this are skipped")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--no-7b", action="store_true", help="skip the 7B parts even with CUDA")
    ap.add_argument(
        "--rehearse-7b", action="store_true",
        help="run the 7B parts on the CPU with a scaled-down 7B config (checks their code path without a GPU)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    big_device = "cuda" if cuda else "cpu"
    report: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
    }
    with contextlib.ExitStack() as stack:
        work = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        state: dict = {}

        def part(name: str, fn, needs_cuda: bool = False) -> None:
            if needs_cuda and not cuda and not args.rehearse_7b:
                report[name] = {"skipped": "no CUDA"}
            elif needs_cuda and args.no_7b:
                report[name] = {"skipped": "--no-7b"}
            elif time.perf_counter() - t_start > args.budget_s:
                report[name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            else:
                log(f"{name} ...")
                t = time.perf_counter()
                try:
                    report[name] = fn()
                except Exception as exc:  # reported; the other parts still run
                    traceback.print_exc(file=sys.stderr)
                    report[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                log(f"{name}: {time.perf_counter() - t:.1f} s")

        def nano():
            t = time.perf_counter()
            state["nano"] = build_nanos(work)
            state["data"] = write_data(work / "data")
            return {"seconds": round(time.perf_counter() - t, 2), "archs": sorted(state["nano"])}

        def nano_hf():
            from core.policies.hf import HFPolicy

            p = HFPolicy.load(state["nano"]["qwen2_5_vl"], max_new_tokens=64)
            forced(p)
            return {"dtype": p.lm.dtype, "device": p.lm.device, **investigation(p)}

        def nano_train():
            return train_steps(state["nano"]["qwen2_5_vl"], state["data"], work / "nano_train", lora=True,
                               threads=args.threads, max_length=None)  # fmt: skip

        def nano_eval():
            from core.policies.hf import HFPolicy

            def make():
                p = HFPolicy.load(state["nano"]["qwen2_5_vl"], max_new_tokens=64)
                forced(p)
                return p

            return eval_throughput(make, 2, 16, 8) if cuda else eval_throughput(make, 1, 4, 4)

        def build7b():
            sync()
            t = time.perf_counter()
            state["7b"], state["7b_dir"] = build_qwen7b(work / "qwen7b", big_device, rehearsal=not cuda)
            sync()
            n = sum(p.numel() for p in state["7b"].parameters())
            return {"seconds": round(time.perf_counter() - t, 2), "parameters_b": round(n / 1e9, 3),
                    "shape": "7B" if cuda else "rehearsal (scaled down, CPU)",
                    "gpu_memory_gb": round(torch.cuda.memory_allocated() / 2**30, 1) if cuda else None}  # fmt: skip

        def policy7b():
            from core.mllm.nano import build_tokenizer
            from core.mllm.processor import LoadedModel
            from core.policies.hf import HFPolicy

            if "7b" not in state:
                raise RuntimeError("the 7B model was not built")
            processor = processor_7b(build_tokenizer("qwen2_5_vl"))
            dtype = "bfloat16" if cuda else "float32"
            p = HFPolicy(LoadedModel(state["7b"], processor, "qwen2_5_vl", big_device, dtype), max_new_tokens=64)
            forced(p)
            return p

        def qwen7b_policy():
            return {"dtype": str(next(state["7b"].parameters()).dtype), **investigation(policy7b())}

        def qwen7b_eval():
            return eval_throughput(policy7b, 2, 16 if cuda else 4, 8 if cuda else 4)

        def qwen7b_train():
            from core.mllm.nano import build_tokenizer

            if "7b" not in state:
                raise RuntimeError("the 7B model was not built")
            config = state.pop("7b").config  # freed: each stage makes its own (LoRA wraps it in place)
            processor = processor_7b(build_tokenizer("qwen2_5_vl"))
            with preloaded(config, big_device, processor):
                return train_steps(state["7b_dir"], state["data"], work / "qwen7b_train", lora=True,
                                   threads=args.threads, max_length=4096)  # fmt: skip

        part("nano", nano)
        part("nano_policy", nano_hf)
        part("nano_train", nano_train)
        part("nano_eval", nano_eval)
        part("qwen7b_build", build7b, needs_cuda=True)
        part("qwen7b_policy", qwen7b_policy, needs_cuda=True)
        part("qwen7b_eval", qwen7b_eval, needs_cuda=True)
        part("qwen7b_train", qwen7b_train, needs_cuda=True)
        if cuda:
            report["gpu_peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    errors = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    report["ok"] = not errors
    print(json.dumps(report, default=str), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""MLLM benchmark: the nano models (both architectures) on one CPU thread.

    .venv/bin/python benchmarks/bench_mllm.py [--repeats R] [--new-tokens N]

Prints, per architecture: build time of `init-nano`, decode throughput (tokens/s, prompt = the real
first-turn conversation with the face image, N new tokens forced), prefill time of that prompt, the
class-token scoring pass, and the latency of one whole investigation through the agent loop (fast
answer + 1 tool call + 1 freely generated turn of <= 64 tokens + final answer; forced turns for the
untrained model, scores from the model). Medians over R repeats. The nano model is tiny, so these
figures measure the pipeline overhead (processor, template, agent loop), not a real 7B model.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import skimage.data  # noqa: E402

from core import agent, protocol  # noqa: E402
from core.faces import prepare_face  # noqa: E402
from core.mllm.messages import encode, to_processor_inputs  # noqa: E402
from core.mllm.nano import build_nano  # noqa: E402
from core.mllm.scoring import class_token_score  # noqa: E402
from core.policies.hf import HFPolicy  # noqa: E402
from core.registry import ToolRegistry  # noqa: E402
from core.trajectory import Trajectory, to_messages  # noqa: E402

FAST = protocol.format_fast_answer("spoof", "The face looks flat.")
CALL = protocol.format_tool_call_turn("Check for moire.", protocol.ToolCall("FFTTool", {}))
ANSWER = protocol.format_answer_turn("Periodic peaks: a screen.", "spoof")


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    face = prepare_face(skimage.data.astronaut())
    system = protocol.system_prompt(ToolRegistry(None).schemas())
    print(f"torch threads: {torch.get_num_threads()}; repeats: {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("qwen2_5_vl", "internvl"):
            t0 = time.perf_counter()
            folder = build_nano(Path(tmp) / arch, arch)
            build_s = time.perf_counter() - t0
            policy = HFPolicy.load(folder, max_new_tokens=64, scripted_prefix=[FAST, CALL, None, ANSWER])
            model, processor = policy.model, policy.processor
            n_params = sum(p.numel() for p in model.parameters())
            traj = Trajectory(policy="hf", crop=face.crop)
            inp = to_processor_inputs(to_messages(traj, system=system, next_prompt=True, next_kind="fast"), processor)
            batch = encode(processor, inp)
            n_prompt = batch["input_ids"].shape[1]

            def decode():
                with torch.no_grad():
                    model.generate(
                        **batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
                    )

            def prefill():
                with torch.no_grad():
                    model(**batch, logits_to_keep=1)

            decode()  # warm-up
            gen_ms = _median_ms(decode, args.repeats)
            prefill_ms = _median_ms(prefill, args.repeats)
            score_ms = _median_ms(lambda: class_token_score(model, processor, inp.text, inp.images, ""), args.repeats)
            results = []

            def investigation():
                results.append(agent.run(face, policy))

            inv_ms = _median_ms(investigation, args.repeats)
            last = results[-1]
            new_tok = sum(t.notes.get("new_tokens", 0) for t in last.turns)
            print(
                f"{arch:11s} {n_params / 1e6:.2f}M params, init-nano {build_s:.2f} s | prompt {n_prompt} tokens: prefill "
                f"{prefill_ms:.1f} ms | decode {args.new_tokens} tokens {gen_ms:.0f} ms = "
                f"{args.new_tokens / (gen_ms / 1e3):.0f} tokens/s (incl. prefill) | class-token score {score_ms:.1f} ms | "
                f"investigation ({len(last.turns)} turns, {new_tok} generated tokens, status {last.status}) {inv_ms:.0f} ms median"
            )


if __name__ == "__main__":
    main()

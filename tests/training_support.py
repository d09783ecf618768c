"""Helpers for the training tests: small dataset folders in the shared format (core/dataset.py), written
from trajectories the real agent loop produced with scripted replies, and a nano model built once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skimage.data

from core import protocol
from core.agent import AgentConfig, run
from core.dataset import DatasetWriter
from core.faces import prepare_face
from core.policies import ScriptedPolicy
from core.protocol import ToolCall
from core.samples import simulate_print

TOOLS = ["FFTTool", "LBPTool", "HOGTool", "EdgeDetectionTool", "WaveletTransformTool"]


def faces(n: int = 4):
    """(FaceCrop, label) pairs: the astronaut as real, simulated prints of it as spoof."""
    base = skimage.data.astronaut()
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = np.clip(base.astype(np.float32) * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)
        label = "real" if i % 2 == 0 else "spoof"
        if label == "spoof":
            img = simulate_print(img)
        out.append((prepare_face(img, on_no_face="whole"), label))
    return out


def scripted_trajectory(face, label: str, i: int, *, wrong_final: bool = False):
    tool = TOOLS[i % len(TOOLS)]
    final = ("real" if label == "spoof" else "spoof") if wrong_final else label
    replies = [
        protocol.format_fast_answer(label, f"first look {i}"),
        protocol.format_tool_call_turn(f"check with {tool}", ToolCall(tool, {})),
        protocol.format_answer_turn(f"{tool} agrees", final),
    ]
    return run(face, ScriptedPolicy(replies), AgentConfig(), label=label)


def write_dataset(
    folder: Path, *, source: str = "annotation", n: int = 4, queries: bool = True, wrong_final_every: int = 0
) -> Path:
    """A dataset folder of ``n`` scripted trajectories (+ their queries)."""
    with DatasetWriter(folder, source=source, created_by="tests") as w:
        for i, (face, label) in enumerate(faces(n)):
            wrong = bool(wrong_final_every) and i % wrong_final_every == wrong_final_every - 1
            w.add_trajectory(scripted_trajectory(face, label, i, wrong_final=wrong), id=f"t{i}", label=label)
            if queries:
                w.add_query(face.crop, label, id=f"q{i}")
    return folder


_NANO: dict[str, Path] = {}


def nano_model(tmp_path_factory, arch: str = "qwen2_5_vl") -> Path:
    """A nano model folder built once per test session (core.mllm.nano: the real architecture, toy size)."""
    if arch not in _NANO:
        from core.mllm.nano import build_nano

        _NANO[arch] = build_nano(tmp_path_factory.mktemp(f"nano_{arch}"), arch)
    return _NANO[arch]


def safetensors_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out

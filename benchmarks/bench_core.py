"""Core speed benchmark: each visual tool, and a whole expert-policy investigation, on one CPU thread.

    .venv/bin/python benchmarks/bench_core.py [--images N] [--repeats R]

Targets: each tool <= 10 ms median on a 224x224 crop; a whole `expert` investigation (YuNet face
detection and crop + fast answer + exactly 3 tool calls + final) <= 40 ms median per image, model load
and image decoding excluded; the shipped weights <= 20 MB. Prints medians and the ratio to each target
(< 1.0 meets it). Uses fas-dev and fas-train images when ../shared/data is present, else the
public-domain astronaut portrait of scikit-image.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)

import cv2  # noqa: E402

cv2.setNumThreads(1)

from core import agent, faces  # noqa: E402
from core.agent import AgentConfig  # noqa: E402
from core.policies.expert import ExpertPolicy  # noqa: E402
from core.registry import ToolRegistry  # noqa: E402

TOOL_TARGET_MS = 10.0
INVESTIGATION_TARGET_MS = 40.0
WEIGHTS_TARGET_MB = 20.0
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MANIFESTS = [DATA / "fas-dev" / "manifest.csv", DATA / "fas-train" / "manifest.csv"]


def _images(n: int) -> list[tuple[str, bytes]]:
    if all(m.exists() for m in MANIFESTS):
        from core.evaluation.manifest import read_manifest

        rows = [r for m in MANIFESTS for r in read_manifest(m)]
        rows = random.Random(0).sample(rows, min(n, len(rows)))
        return [(r.rel_path, r.path.read_bytes()) for r in rows]
    import io

    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, format="PNG")
    return [("astronaut.png", buf.getvalue())] * n


def bench_tools(crop, repeats: int) -> dict[str, float]:
    reg = ToolRegistry()
    out = {}
    for name in reg.names:
        args = {"bbox": [56, 72, 168, 184]} if name == "ZoomInTool" else {}
        reg.execute(name, args, crop)  # warm-up (caches, lazy imports)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            reg.execute(name, args, crop)
            times.append((time.perf_counter() - t0) * 1e3)
        out[name] = statistics.median(times)
    return out


def bench_investigations(images, policy) -> dict[str, float]:
    config = AgentConfig(max_tool_calls=3)
    total, face_ms, load_ms, tool_calls = [], [], [], []
    # warm-up: first call loads the detector and initialises torch kernels
    rgb = faces.load_image(images[0][1])
    agent.run(faces.prepare_face(rgb, on_no_face="whole"), policy, config, registry=ToolRegistry(readers=policy.bank))
    for name, data in images:
        t0 = time.perf_counter()
        rgb = faces.load_image(data, name=name)
        t1 = time.perf_counter()
        face = faces.prepare_face(rgb, on_no_face="whole")
        t2 = time.perf_counter()
        traj = agent.run(face, policy, config, registry=ToolRegistry(readers=policy.bank))
        t3 = time.perf_counter()
        assert traj.final is not None, traj.error
        load_ms.append((t1 - t0) * 1e3)
        face_ms.append((t2 - t1) * 1e3)
        total.append((t3 - t1) * 1e3)
        tool_calls.append(traj.tool_calls_used)
    return {
        "decode_ms": statistics.median(load_ms),
        "face_ms": statistics.median(face_ms),
        "investigation_ms": statistics.median(total),
        "mean_tool_calls": sum(tool_calls) / len(tool_calls),
        "n": len(images),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--weights", default=None, help="expert weights folder (default: the shipped assets/experts)")
    args = ap.parse_args()

    images = _images(args.images)
    crop = faces.prepare_face(faces.load_image(images[0][1]), on_no_face="whole").crop
    source = "fas-dev + fas-train" if all(m.exists() for m in MANIFESTS) else "skimage astronaut"
    print(
        f"one thread (torch {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}); images from {source}"
    )
    print(f"\n{'tool':<24}{'median ms':>10}{'target':>8}{'ratio':>8}")
    for name, ms in bench_tools(crop, args.repeats).items():
        print(f"{name:<24}{ms:>10.2f}{TOOL_TARGET_MS:>8.0f}{ms / TOOL_TARGET_MS:>8.2f}")

    t0 = time.perf_counter()
    policy = ExpertPolicy.load(args.weights)
    load_s = time.perf_counter() - t0
    print(f"\nexpert policy [{policy.version}] loaded in {load_s * 1e3:.0f} ms (excluded); {len(images)} images")
    print(f"{'whole investigation':<44}{'median ms':>10}{'target':>8}{'ratio':>8}{'face ms':>9}{'tools/img':>10}")
    for label, pol in [
        ("exactly 3 tool calls (the target's setting)", ExpertPolicy(policy.bank, min_tool_calls=3)),
        ("adaptive (default: stops when decisive)", policy),
    ]:
        r = bench_investigations(images, pol)
        ms = r["investigation_ms"]
        print(
            f"{label:<44}{ms:>10.1f}{INVESTIGATION_TARGET_MS:>8.0f}{ms / INVESTIGATION_TARGET_MS:>8.2f}{r['face_ms']:>9.1f}{r['mean_tool_calls']:>10.2f}"
        )
    print(f"(face detection and crop included; image decode excluded: median {r['decode_ms']:.1f} ms)")
    from core.experts import DEFAULT_DIR

    mb = sum(p.stat().st_size for p in Path(args.weights or DEFAULT_DIR).glob("*.safetensors")) / 1e6
    print(
        f"\n{'shipped weights (assets/experts/*.safetensors)':<44}{mb:>8.1f} MB{WEIGHTS_TARGET_MB:>8.0f}{mb / WEIGHTS_TARGET_MB:>8.2f}"
    )


if __name__ == "__main__":
    main()

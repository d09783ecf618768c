"""Servers that tests start on 127.0.0.1: a free port, and `transformers serve` of a local model."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def transformers_serve(model_dir: Path, workdir: Path, *, start_timeout_s: float = 90) -> Iterator[str]:
    """``transformers serve MODEL_DIR`` on 127.0.0.1:<free port>, offline, one thread; yields the
    ``/v1`` base URL and always stops the server. ``--trust-remote-code`` loads tarfas's
    torchvision-free processor: without it the server silently drops every image."""
    exe = Path(sys.executable).with_name("transformers")
    port = free_port()
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", HF_HOME=str(workdir / "hf")
    )
    log_path = workdir / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(exe), "serve", str(model_dir), "--trust-remote-code", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "transformers serve did not start:\n" + log_path.read_text(errors="replace")[-3000:]
                    )
                time.sleep(0.25)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

"""A workbench's runner in its own process, for test_kill.py to kill (SIGKILL) at any point.

``kill_worker.py DATA_DIR FOLDER N CONCURRENCY DELAY_S`` submits N uploads (the PNG files of FOLDER, in
name order, cycled) and reports on stdout, one line each, as soon as it is true:

- ``ack <case id> <run id> <file name>``: the upload is acknowledged (``Runner.submit`` returned);
- ``turns <run id> <n>``: the first n turns of the run are committed;
- ``done <run id> <state>``: the job ended.

Then it waits to be killed. DELAY_S is the model's time per turn (slow: most uploads wait in the queue).

``kill_worker.py serve`` is the same, forked: it imports everything once, says ``ready``, then for each
line ``DATA_DIR FOLDER N CONCURRENCY DELAY_S`` on stdin forks a worker (a real process, killed by its pid),
says ``child <pid>``, and ``exit <pid> <code>`` once it is gone. Only one worker at a time: no thread
runs in the server, so a fork copies no lock held by another thread.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

_out = threading.Lock()


def say(*words) -> None:
    with _out:
        sys.stdout.write(" ".join(map(str, words)) + "\n")
        sys.stdout.flush()


def main(data_dir: str, folder: str, n: int, concurrency: int, delay_s: float) -> None:
    import torch

    from app.runner import Runner, RunSettings
    from faults.support import TOOL_TURNS, Replay
    from storage.db import open_storage

    torch.set_num_threads(1)
    files = sorted(Path(folder).glob("*.png"))
    policy = Replay(TOOL_TURNS, delay_s=delay_s, on_turn=lambda run, k: say("turns", run, k))
    runner = Runner(open_storage(data_dir), concurrency=concurrency, policy_loader=lambda name, **kw: policy)
    settings = RunSettings.make("scripted", max_tool_calls=2)
    jobs = []
    for i in range(n):
        path = files[i % len(files)]
        job = runner.submit(path.read_bytes(), filename=path.name, user="ana", settings=settings)
        if job.state == "error":
            say("refused", path.name, job.error.replace("\n", " "))
            continue
        say("ack", job.case_id, job.investigation_id, path.name)
        jobs.append(job)
    for job in jobs:
        job.wait()
        say("done", job.investigation_id, job.state)
    time.sleep(600)


def serve() -> None:
    import os

    import torch

    import app.runner  # noqa: F401 (imported once, here: each forked worker starts with it)
    import faults.support  # noqa: F401
    import storage.db  # noqa: F401

    torch.set_num_threads(1)
    say("ready")
    for line in sys.stdin:
        args = line.split()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                main(args[0], args[1], int(args[2]), int(args[3]), float(args[4]))
            finally:
                os._exit(1)
        say("child", pid)
        _, status = os.waitpid(pid, 0)
        say("exit", pid, os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))

"""A runner whose files may not grow past a size (RLIMIT_FSIZE: a write past it fails with EFBIG, as on a
full disk), for test_disk_full.py.

``disk_worker.py DATA_DIR FOLDER LIMIT:COUNT ...`` investigates the last PNG of FOLDER with no limit, then,
phase by phase, sets the file size limit to LIMIT bytes and submits the next COUNT PNGs of FOLDER one at a
time (as the server does: from a file, copied into the store). LIMIT 0: no limit (space was freed);
``+N``: N bytes more than the database's largest file has now (and room for one upload's file), so that
the next few commits fill it. Each upload is reported on stdout when it ended:

- ``refused <file name> <message>``: ``Runner.submit`` refused it (nothing is to be stored);
- ``ack <case id> <run id> <file name> <job state> <message or ->``: acknowledged, and how its job ended.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def say(*words) -> None:
    print(" ".join(str(w).replace("\n", " ") for w in words), flush=True)


def main(data_dir: str, folder: str, *phases: str) -> None:
    import torch

    from app.runner import Runner, RunSettings
    from faults.support import TOOL_TURNS, Replay
    from storage.db import open_storage

    torch.set_num_threads(1)
    files = sorted(Path(folder).glob("*.png"))
    policy = Replay(TOOL_TURNS)
    runner = Runner(open_storage(data_dir), concurrency=1, policy_loader=lambda name, **kw: policy)
    settings = RunSettings.make("scripted", max_tool_calls=2)

    def upload(path: Path) -> None:
        job = runner.submit(path, filename=path.name, user="ana", settings=settings)
        if job.case_id is None:
            say("refused", path.name, job.error)
            return
        job.wait(120)
        say("ack", job.case_id, job.investigation_id, path.name, job.state, job.error or "-")

    upload(files[-1])
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    queue = iter(files)
    for phase in phases:
        limit_text, count = phase.split(":")
        limit = int(limit_text)
        if limit_text.startswith("+"):
            db = Path(data_dir) / "tarfas.db"
            sizes = [p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists()]
            limit = max(limit + max(sizes), 3 * max(p.stat().st_size for p in files) // 2)  # room for a file
        count = int(count)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit or hard, hard))
        for _ in range(count):
            upload(next(queue))
    runner.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])

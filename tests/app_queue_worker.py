"""Run by test_app_queue_crash.py in its own process: a runner with one worker and a slow policy takes
N uploads; each line "ack <case id> <run id>" on stdout is an upload acknowledged (``Runner.submit``
returned). Then it waits to be killed, with most uploads still queued."""

from __future__ import annotations

import sys
import time

from storage_support import ANSWER_SPOOF, FAST_SPOOF, astronaut_png

from core.policies import PolicyOutput, ScriptedPolicy


class SlowPolicy(ScriptedPolicy):
    """A scripted answer that takes its time: one upload is investigated while the others wait."""

    def next_turn(self, conversation) -> PolicyOutput:
        time.sleep(0.5)
        return self._replies[len(conversation.trajectory.turns)]


def main(data_dir: str, n: int) -> None:
    import torch

    from app.runner import Runner
    from storage.db import open_storage

    torch.set_num_threads(1)
    storage = open_storage(data_dir)
    runner = Runner(storage, concurrency=1, policy_loader=lambda name, **kw: SlowPolicy([FAST_SPOOF, ANSWER_SPOOF]))
    data = astronaut_png()
    for i in range(n):
        job = runner.submit(data, filename=f"upload-{i}.png", user="ana")
        print("ack", job.case_id, job.investigation_id, flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

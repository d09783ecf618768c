"""Run by test_app_crash.py in its own process: serve the workbench on the given port with a policy
that answers twice and then hangs, so the test can kill the app in the middle of an investigation."""

from __future__ import annotations

import sys
import time

from storage_support import FAST_SPOOF, ZOOM

from core.policies import PolicyOutput, ScriptedPolicy


class SlowPolicy(ScriptedPolicy):
    """Two scripted turns, then a model that never answers (until the process is killed)."""

    def next_turn(self, conversation) -> PolicyOutput:
        if len(conversation.trajectory.turns) >= 2:
            time.sleep(600)
        return self._replies[len(conversation.trajectory.turns)]


def main(data_dir: str, port: int) -> None:
    import torch

    from app.server import serve

    torch.set_num_threads(1)
    serve(data_dir, host="127.0.0.1", port=port, policy_loader=lambda name, **kw: SlowPolicy([FAST_SPOOF, ZOOM]))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

"""Run by test_storage_crash.py in its own process: open the data directory (and the database URL, if
given), open a case and start an investigation whose policy hangs at its third turn, so the test can
kill this process mid-run."""

from __future__ import annotations

import sys
import time

import skimage.data
from storage_support import FAST_SPOOF, ZOOM, astronaut_png

from core.agent import investigate
from core.faces import prepare_face
from core.policies import PolicyOutput, ScriptedPolicy
from storage.cases import create_case
from storage.db import open_storage
from storage.investigations import InvestigationRecorder


class SlowPolicy(ScriptedPolicy):
    """Two scripted turns, then a model that never answers (until the process is killed)."""

    def next_turn(self, conversation) -> PolicyOutput:
        if self.calls >= 2:
            time.sleep(600)
        return super().next_turn(conversation)


def main(data_dir: str, url: str | None = None) -> None:
    storage = open_storage(data_dir, url=url)
    with storage.sessions.begin() as s:
        case = create_case(s, storage.files, astronaut_png(), filename="suspect.png", user="ana")
    face = prepare_face(skimage.data.astronaut())
    recorder = InvestigationRecorder(storage.sessions, storage.files, case.id, user="ana")
    for _ in recorder.record(investigate(face, SlowPolicy([FAST_SPOOF, ZOOM]), image_sha256=case.image_sha256)):
        pass


if __name__ == "__main__":
    main(*sys.argv[1:3])

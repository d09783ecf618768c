"""Reviewers racing on one case, for test_reviewers.py: ``reviewer_worker.py DATA_DIR INVESTIGATION PROCESS
THREADS GO_FILE`` runs THREADS reviewers (named ``p<PROCESS>t<i>``); it says ``ready`` once connected, and
they all save the moment GO_FILE exists. Each loads the review, saves its own state on the version it loaded, and on a conflict
(ConcurrentReviewError: someone saved in between) loads again and retries. Reports
``saved <reviewer> <version> <attempts>`` or ``error <reviewer> <type> <message>``."""

from __future__ import annotations

import os
import sys
import threading
import time


def main(data_dir: str, inv_id: str, process: str, threads: int, go_file: str) -> None:
    from storage.db import open_storage
    from storage.errors import ConcurrentReviewError
    from storage.reviews import NO_REVIEW, load_review, submit_review

    storage = open_storage(data_dir)
    out = threading.Lock()

    def say(*words):
        with out:
            print(*words, flush=True)

    def reviewer(name: str, k: int) -> None:
        while not os.path.exists(go_file):
            time.sleep(0.002)
        for attempt in range(1, 200):
            try:
                with storage.sessions.begin() as s:
                    current = load_review(s, inv_id)
                    state = submit_review(
                        s,
                        inv_id,
                        reviewer=name,
                        verdict=("spoof", "real", "unsure")[k % 3],
                        notes=f"reviewed by {name}",
                        flags={0: ["wrong_reasoning"]} if k % 2 else {},
                        expected_version=current.version if current else NO_REVIEW,
                    )
                say("saved", name, state.version, attempt)
                return
            except ConcurrentReviewError:
                continue
            except Exception as exc:  # noqa: BLE001 (reported, and the test fails)
                say("error", name, type(exc).__name__, str(exc).replace("\n", " ")[:300])
                return
        say("error", name, "GaveUp", "no save in 200 attempts")

    with storage.sessions() as s:
        load_review(s, inv_id)  # connected
    say("ready")
    pool = [threading.Thread(target=reviewer, args=(f"p{process}t{i}", i)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    storage.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])

"""Batch the model calls of concurrent investigations.

Each investigation stays one run of the agent loop (core.agent) in its own thread; only the policy's
``generate`` calls meet here. A worker thread takes the waiting requests and runs them as one batch.
Callers that announce themselves as a *stream* (``with batcher.stream():`` around a run of
investigations, as ``tarfas eval --concurrency N`` does) are waited for, so that N streams advance in
lock step with batches of N; without streams (the app, one CLI investigation) a request runs as soon as
the model is free, together with whatever else queued meanwhile.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Slot:
    item: Any
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class RequestBatcher:
    """``submit(item)`` blocks until ``run(items)`` (a list in, a list of results in the same order out)
    has run the batch that holds ``item``; an exception of ``run`` is raised in every caller of that batch."""

    def __init__(
        self, run: Callable[[list], list], *, max_batch: int = 16, max_wait_s: float = 0.5, idle_exit_s: float = 5.0
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self.idle_exit_s = idle_exit_s  # the worker ends when idle (it holds the model), and restarts on demand
        self._cv = threading.Condition()
        self._queue: list[_Slot] = []
        self._streams = 0
        self._worker: threading.Thread | None = None
        self.batch_sizes: list[int] = []  # of every batch run (bounded), for notes and benchmarks

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """Announce a caller that will keep submitting (one investigation after another): batches wait
        for every open stream (at most ``max_wait_s``) before they run."""
        with self._cv:
            self._streams += 1
        try:
            yield
        finally:
            with self._cv:
                self._streams -= 1
                self._cv.notify_all()

    def submit(self, item):
        slot = _Slot(item)
        with self._cv:
            self._queue.append(slot)
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="tarfas-batcher", daemon=True)
                self._worker.start()
            self._cv.notify_all()
        slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _take(self) -> list[_Slot] | None:
        with self._cv:
            idle_until = time.monotonic() + self.idle_exit_s
            while not self._queue:
                left = idle_until - time.monotonic()
                if left <= 0:
                    self._worker = None  # under the lock: the next submit starts a new worker
                    return None
                self._cv.wait(left)
            deadline = time.monotonic() + self.max_wait_s
            while len(self._queue) < min(self.max_batch, max(self._streams, 1)):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if len(self.batch_sizes) > 10_000:
                del self.batch_sizes[:5_000]
            self.batch_sizes.append(len(batch))
            try:
                results = self._run([s.item for s in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} requests gave {len(results)} results")
            except BaseException as exc:  # every caller of the batch gets it; the worker goes on
                for s in batch:
                    s.error = exc
            else:
                for s, r in zip(batch, results):
                    s.result = r
            for s in batch:
                s.done.set()

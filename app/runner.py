"""The background investigation queue of the workbench.

A bounded pool of worker threads runs investigations while the UI stays responsive. Each job reads
the upload, prepares the face, opens the case and runs :func:`core.agent.investigate` inside a
:class:`storage.investigations.InvestigationRecorder`, so every turn is committed as it happens. Its
events are kept on the :class:`Job` and fanned out to any number of readers (a UI stream, a test, a
benchmark), each of which sees every event from the start.

Every new investigation (re-runs included) uses the workbench's active calibration profile
(:mod:`storage.calibration`) when it was fitted for the job's policy and version; an active profile that
does not fit is not applied, and the run says so in a note (kept with it, shown with its verdict).

Bad input (not an image, too large, no face) ends the job with a clear message before anything is
written. An accepted upload is recorded before :meth:`Runner.submit` returns (its case, its bytes in the
file store and a queued run with its settings: :func:`storage.investigations.queue_run`), so a crash
loses no acknowledged upload. At startup, runs left ``running`` by a dead process are marked
``interrupted``; they and failed runs can be re-run on exactly the same crop with :meth:`Runner.rerun`.
Runs left queued by a dead process are run again (:attr:`Runner.requeued`), or, when they cannot be (their
image is gone or no longer reads), recorded ``interrupted`` with the reason. ``.tmp-*`` files that a
kill during a write left in the file store are swept.

A server's runner has a :class:`app.policy_catalog.PolicyCatalog`: every submit, re-run, re-queued run and
policy load goes through it, so a policy name the server does not offer, or keyword arguments from the
browser, are refused here whatever the UI sent; a policy that fails to load is reported to the analyst
without the reason (which may name paths or variables), and logged with it. Uploads are bounded: files
per request and bytes per request (:meth:`Runner.submit_files`), bytes per file, and investigations
waiting or running in the whole server (``max_queue``). An upload on disk is copied into the file store
in chunks (:meth:`storage.filestore.FileStore.stage`), never held whole in a request's memory.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import faces
from core.agent import AgentConfig, investigate
from core.calibration import ProfileError
from core.errors import ImageTooLargeError, NoFaceError, TarfasError
from core.events import Event, InvestigationFinished
from core.policies import load_policy, readers_for
from core.policies.calibrated import calibrate
from core.registry import ToolRegistry
from storage.calibration import active_profile
from storage.cases import create_case, get_case
from storage.db import Storage
from storage.errors import CalibrationError, NotFoundError, StorageBusyError, StorageFullError
from storage.filestore import StagedFile
from storage.investigations import (
    InvestigationRecorder,
    claim_queued,
    end_queued,
    face_of,
    get_investigation,
    load_trajectory,
    mark_interrupted,
    queue_run,
)
from storage.models import QueuedRun

from .limits import DEFAULT_CONCURRENCY
from .policy_catalog import PolicyCatalog

log = logging.getLogger("tarfas.runner")


class UploadRefused(TarfasError):
    """Work this server will not take now (too many files or bytes in one request, the queue is full);
    nothing of it was written. The message is for the analyst."""


class PolicyUnavailable(TarfasError):
    """A policy the server offers could not be loaded (the server log says why; the analyst is not told)."""


@dataclass(frozen=True)
class RunSettings:
    """What the analyst chose in the settings: the policy by name (plus its keyword arguments, e.g.
    ``model``/``adapter``/``base_url`` for language-model policies) and the agent's limits."""

    policy: str = "expert"
    policy_kwargs: tuple[tuple[str, Any], ...] = ()  # hashable: it keys the policy cache
    max_tool_calls: int = 3
    tools: tuple[str, ...] | None = None  # None = all six tools
    on_no_face: str = "error"  # or "whole": analyse the whole image when no face is found

    @classmethod
    def make(cls, policy: str = "expert", policy_kwargs: dict | None = None, **kw) -> RunSettings:
        kwargs = tuple(sorted((k, v) for k, v in (policy_kwargs or {}).items() if v not in (None, "")))
        if kw.get("tools") is not None:
            kw["tools"] = tuple(kw["tools"])
        return cls(policy, kwargs, **kw)

    def to_stored(self) -> dict:
        """What a queued run keeps of these settings (with the policy's name, :meth:`from_stored` gives them back)."""
        return {
            "policy_kwargs": dict(self.policy_kwargs),
            "max_tool_calls": self.max_tool_calls,
            "allowed_tools": list(self.tools) if self.tools is not None else None,
            "on_no_face": self.on_no_face,
        }

    @classmethod
    def from_stored(cls, policy: str, stored: dict) -> RunSettings:
        return cls.make(
            policy,
            stored.get("policy_kwargs"),
            max_tool_calls=int(stored.get("max_tool_calls", 3)),
            tools=stored.get("allowed_tools"),
            on_no_face=stored.get("on_no_face", "error"),
        )

    def agent_config(self) -> AgentConfig:
        return AgentConfig(
            max_tool_calls=self.max_tool_calls,
            allowed_tools=list(self.tools) if self.tools else None,
            extra={"on_no_face": self.on_no_face},
        )


class Job:
    """One investigation in the queue. Readers call :meth:`stream` to get every event, from the first,
    as it happens; the job keeps them, so a reader that comes late misses nothing."""

    def __init__(self, *, filename: str | None, user: str, settings: RunSettings):
        self.id = uuid.uuid4().hex
        self.filename = filename
        self.user = user
        self.settings = settings
        self.state = "queued"  # queued -> running -> done | error
        self.error: str | None = None  # a message for the analyst (bad input, storage failure)
        self.error_type: str | None = None
        self.case_id: str | None = None
        self.investigation_id: str | None = None
        self.submitted_at = time.perf_counter()
        self.events: list[Event] = []
        self._cond = threading.Condition()

    @property
    def finished(self) -> bool:
        return self.state in ("done", "error")

    @property
    def trajectory(self):
        """The finished trajectory (None until the investigation ended, or when the job failed early)."""
        last = self.events[-1] if self.events else None
        return last.trajectory if isinstance(last, InvestigationFinished) else None

    def stream(self, timeout: float | None = None) -> Iterator[Event]:
        """Every event of the job, blocking until the next one arrives; ends when the job ends.
        ``timeout``: give up (TimeoutError) when nothing happened for this many seconds."""
        for batch in self.stream_batches(timeout):
            yield from batch

    def stream_batches(self, timeout: float | None = None) -> Iterator[list[Event]]:
        """Like :meth:`stream`, but each item is every event that has arrived since the last one: a UI
        redraws once per batch instead of once per event when the policy is faster than the screen."""
        i = 0
        while True:
            with self._cond:
                while i >= len(self.events) and not self.finished:
                    if not self._cond.wait(timeout):
                        raise TimeoutError(f"no news from job {self.id} for {timeout} s")
                new, done = self.events[i:], self.finished
            if new:
                yield new
            i += len(new)
            if done:
                return

    def wait(self, timeout: float | None = None) -> Job:
        with self._cond:
            if not self._cond.wait_for(lambda: self.finished, timeout):
                raise TimeoutError(f"job {self.id} did not finish within {timeout} s")
        return self

    def _push(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def _set(self, **fields) -> None:
        with self._cond:
            for k, v in fields.items():
                setattr(self, k, v)
            self._cond.notify_all()


PolicyLoader = Callable[..., Any]


class Runner:
    """A bounded worker pool for investigations, with loaded policies cached by name and arguments.

    ``policy_loader`` builds a policy from its name and keyword arguments (default
    :func:`core.policies.load_policy`); each distinct (name, kwargs) is loaded once and shared.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        policy_loader: PolicyLoader = load_policy,
        max_bytes: int = faces.DEFAULT_MAX_BYTES,
        max_pixels: int = faces.DEFAULT_MAX_PIXELS,
        catalog: PolicyCatalog | None = None,
        max_files: int | None = None,
        max_request_bytes: int | None = None,
        max_queue: int | None = None,
    ):
        """``catalog``: the policies this server offers (None: any name ``policy_loader`` builds, with any
        arguments; for library use and tests). ``max_files``/``max_request_bytes``: per call of
        :meth:`submit_files`; ``max_bytes``: per file; ``max_queue``: investigations waiting or running
        at once in this runner (None: no bound)."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.storage = storage
        self.concurrency = concurrency
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.catalog = catalog
        self.max_files = max_files
        self.max_request_bytes = max_request_bytes
        self.max_queue = max_queue
        self._active = 0  # jobs queued or running (refused ones never count)
        self._active_lock = threading.Lock()
        self._loader = policy_loader
        self._policies: dict[tuple, Any] = {}
        self._policy_lock = threading.Lock()
        # Jobs are not kept here: each belongs to whoever submitted it (a UI stream), so the events and
        # images of finished investigations are freed with it in a long-running server.
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="tarfas-investigation")
        # Runs left 'running' by a process that is gone (crash, kill) are marked now, before new work;
        # runs it left queued are this runner's now, and queued again first.
        with storage.sessions.begin() as s:
            self.recovered = mark_interrupted(s)
            claimed = [
                (r.id, r.case_id, r.rerun_of, r.policy, dict(r.settings or {}), r.source, r.queued_by)
                for r in claim_queued(s)
            ]
        self.swept = storage.files.sweep_temp()  # debris of writes a kill cut short
        self.requeued: list[str] = []  # ids of the runs queued again at startup (they run like any other)
        for run in claimed:
            self._requeue(*run)

    # --- policies -----------------------------------------------------------------------------
    def check(self, settings: RunSettings) -> None:
        """Refuse (:class:`app.policy_catalog.PolicyRefused`) settings whose policy this server does not offer."""
        self._resolve(settings)

    def _resolve(self, settings: RunSettings) -> tuple[str, dict]:
        if self.catalog is None:
            return settings.policy, dict(settings.policy_kwargs)
        return self.catalog.resolve(settings.policy, dict(settings.policy_kwargs))

    def policy(self, settings: RunSettings):
        kind, kwargs = self._resolve(settings)
        key = (settings.policy, settings.policy_kwargs)
        with self._policy_lock:
            if key not in self._policies:
                try:
                    self._policies[key] = self._loader(kind, **kwargs)
                except Exception as exc:  # noqa: BLE001 (its text may name paths or variables: the log has it)
                    log.warning(
                        "policy %r (%s) could not be loaded: %s: %s", settings.policy, kind, type(exc).__name__, exc
                    )
                    raise PolicyUnavailable(
                        f"policy {settings.policy!r} could not be loaded on this server; whoever runs the server "
                        "can read why in its log"
                    ) from None
            return self._policies[key]

    def calibrated(self, settings: RunSettings) -> tuple[Any, str | None]:
        """``(policy, note)`` for a new investigation: the settings' policy under the active calibration
        profile when the profile was fitted for it (same name and version, features of this expert bank),
        else the policy as it is, with a note in words of the active profile that was not applied."""
        policy = self.policy(settings)
        try:
            with self.storage.sessions() as s:
                profile = active_profile(s)
        except (CalibrationError, NotFoundError) as exc:  # e.g. a profile changed in the database
            return policy, f"The active calibration profile was not applied: {_sentence(exc)}{_own_threshold(policy)}"
        if profile is None:
            return policy, None
        key = (settings.policy, settings.policy_kwargs, profile.id)
        with self._policy_lock:
            cached = self._policies.get(key)
        if cached is not None:
            return cached, None
        try:
            policy_c = calibrate(policy, profile, readers_for(policy))
        except ProfileError as exc:
            name = f" ({profile.name!r})" if profile.name else ""
            return policy, (
                f"The active calibration profile {profile.id}{name} was not applied to this investigation: "
                f"{_sentence(exc)}{_own_threshold(policy)}"
            )
        with self._policy_lock:
            return self._policies.setdefault(key, policy_c), None

    @staticmethod
    def registry(policy) -> ToolRegistry:
        """The tools a policy investigates with; their images are read by the policy's expert bank, else
        the shipped one (:func:`core.policies.readers_for`: none when no weights are installed)."""
        return ToolRegistry(readers=readers_for(policy))

    # --- jobs ---------------------------------------------------------------------------------
    def submit_files(
        self, files: list[tuple[str | Path, str]], *, user: str, settings: RunSettings | None = None
    ) -> list[Job]:
        """Queue one investigation per ``(path, name)`` of an upload request, copying each file into the
        file store in chunks. The whole request is refused (:class:`UploadRefused`, nothing written) when
        it has more files or bytes than this server takes per request, when the queue has no room for
        all of it, or when its policy is not offered; a file that is refused on its own (too large, not
        an image, no face) ends its job with the reason and the others go on."""
        settings = settings or RunSettings()
        self.check(settings)
        n = len(files)
        if self.max_files is not None and n > self.max_files:
            log.warning("upload of %d files by %s refused: more than --max-files %d", n, user, self.max_files)
            raise UploadRefused(
                f"{n} images were sent at once; this workbench takes at most {self.max_files} per upload. "
                "Send them in smaller batches."
            )
        if self.max_request_bytes is not None:
            total = sum(_size(path) for path, _ in files)
            if total > self.max_request_bytes:
                log.warning("upload of %d files (%d bytes) by %s refused: more than --max-request-mb", n, total, user)
                raise UploadRefused(
                    f"these {n} images are {total / 2**20:.0f} MiB together; this workbench takes at most "
                    f"{self.max_request_bytes / 2**20:.0f} MiB per upload. Send them in smaller batches."
                )
        self._reserve(n)
        return [self._submit(Path(path), filename=name, user=user, settings=settings) for path, name in files]

    def submit(
        self, data: bytes | str | Path, *, filename: str | None, user: str, settings: RunSettings | None = None
    ) -> Job:
        """Queue an investigation of uploaded image bytes, or of the image file at a path (copied into
        the file store in chunks). Returns once the upload is recorded (its case and a queued run,
        committed: a crash from then on loses nothing) or refused (bad input, a policy this server does
        not offer, a full queue: nothing written, the job ends with the message); the investigation runs
        in the background."""
        try:
            self._reserve(1)
        except UploadRefused as exc:
            job = Job(filename=filename, user=user, settings=settings or RunSettings())
            self._fail(job, exc)
            return job
        return self._submit(data, filename=filename, user=user, settings=settings)

    def _submit(self, data: bytes | Path, *, filename: str | None, user: str, settings: RunSettings | None) -> Job:
        """:meth:`submit` once a queue slot is reserved (released here when the job is refused)."""
        job = Job(filename=filename, user=user, settings=settings or RunSettings())
        staged: StagedFile | None = None
        try:
            # Everything that can refuse the input runs before anything is recorded.
            self.check(job.settings)
            if isinstance(data, (str, Path)):
                staged = self._stage(Path(data), job)
                face = self._prepare(staged.read_bytes(), job)  # the bytes that will be stored, read once here
                stored: bytes | StagedFile = staged
            else:
                stored = bytes(data)
                face = self._prepare(stored, job)
            with self.storage.sessions.begin() as s:
                case = create_case(s, self.storage.files, stored, filename=job.filename, user=job.user)
                run = queue_run(
                    s,
                    case.id,
                    policy=job.settings.policy,
                    settings=job.settings.to_stored(),
                    user=user,
                    source=filename,
                )
                image_sha = case.image_sha256
            job._set(case_id=case.id, investigation_id=run.id)
        except Exception as exc:  # noqa: BLE001 (every failure becomes a message on the job)
            self._release()
            self._fail(job, exc)
            return job
        finally:
            if staged is not None:
                staged.discard()  # refused: the copy goes; stored: already moved into place (a no-op)
        self._start(self._run_queued, job, face, image_sha)
        return job

    def rerun(self, investigation_id: str, *, user: str, settings: RunSettings | None = None) -> Job:
        """Queue a new investigation of the same crop as ``investigation_id`` (e.g. one that was
        interrupted or failed); the new run points back to the old one. Default settings: the old
        run's policy (by the name it was queued under) and limits. A policy this server does not offer,
        or a full queue, ends the job with the reason and records nothing."""
        with self.storage.sessions() as s:
            inv = get_investigation(s, investigation_id)
            case_id, source = inv.case_id, inv.source
            if settings is None:
                params = dict(inv.params or {})
                queued = s.get(QueuedRun, investigation_id)
                name = queued.policy if queued is not None else inv.policy
                settings = RunSettings.make(
                    # A scripted run (tests, replays) has spent its replies: re-run it with the default.
                    name if name != "scripted" else "expert",
                    max_tool_calls=int(params.get("max_tool_calls", 3)),
                    tools=params.get("allowed_tools"),
                    on_no_face=params.get("on_no_face", "error"),
                )
        job = Job(filename=source, user=user, settings=settings)
        try:
            self.check(settings)
            self._reserve(1)
        except TarfasError as exc:
            self._fail(job, exc)
            return job
        try:
            run = self._queue_rerun(case_id, investigation_id, settings, user, source)
        except BaseException:
            self._release()
            raise
        job.case_id, job.investigation_id = case_id, run.id
        self._start(self._run_rerun, job, investigation_id)
        return job

    def _queue_rerun(self, case_id: str, investigation_id: str, settings: RunSettings, user: str, source):
        with self.storage.sessions.begin() as s:
            run = queue_run(
                s,
                case_id,
                policy=settings.policy,
                settings=settings.to_stored(),
                user=user,
                source=source,
                rerun_of=investigation_id,
            )
        return run

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    # --- the queue's bound ----------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Investigations queued or running now."""
        return self._active

    def _reserve(self, n: int, *, force: bool = False) -> None:
        """Take ``n`` places in the queue, or refuse (UploadRefused) when they would exceed ``max_queue``
        (``force``: runs already acknowledged, re-queued at startup, always get theirs)."""
        with self._active_lock:
            if not force and self.max_queue is not None and self._active + n > self.max_queue:
                room = max(0, self.max_queue - self._active)
                log.warning(
                    "%d investigation(s) refused: %d queued or running, --max-queue %d", n, self._active, self.max_queue
                )
                raise UploadRefused(
                    f"the workbench is busy: {_count(self._active, 'investigation')} waiting or running and it takes at most "
                    f"{self.max_queue} at a time"
                    + (f", so it has room for {room} more now" if room else "")
                    + ". Nothing was recorded; try again when some have finished"
                    + (" or send fewer images." if room else ".")
                )
            self._active += n

    def _release(self) -> None:
        with self._active_lock:
            self._active = max(0, self._active - 1)

    def _start(self, fn, job: Job, *args) -> None:
        """Run ``fn(job, *args)`` on the pool; its queue place is freed when it ends (or is cancelled)."""
        self._pool.submit(fn, job, *args).add_done_callback(lambda _: self._release())

    # --- workers ------------------------------------------------------------------------------
    def _stage(self, path: Path, job: Job) -> StagedFile:
        """Copy an upload into the file store (not yet under its name), refusing a file over the size
        limit before reading it."""
        name = job.filename or "the upload"
        try:
            size = path.stat().st_size
        except OSError:
            raise UploadRefused(f"{name} could not be read from the upload; send it again") from None
        if size > self.max_bytes:
            raise ImageTooLargeError(f"{name} is {size / 2**20:.1f} MiB; the limit is {self.max_bytes / 2**20:.0f} MiB")
        try:
            return self.storage.files.stage(path)
        except OSError as exc:  # its text names server paths: the log has it, the analyst gets the gist
            log.warning("upload %s could not be copied into the file store: %s", name, exc)
            raise UploadRefused(f"{name} could not be copied into the case store; send it again") from None

    def _prepare(self, data: bytes, job: Job):
        rgb = faces.load_image(
            data, name=job.filename or "the upload", max_bytes=self.max_bytes, max_pixels=self.max_pixels
        )
        return faces.prepare_face(rgb, on_no_face=job.settings.on_no_face)

    def _run_queued(
        self, job: Job, face, image_sha: str, *, rerun_of: str | None = None, source: str | None = None
    ) -> None:
        job._set(state="running")
        try:
            policy, note = self.calibrated(job.settings)  # a re-run is a new investigation: today's profile
            self._investigate(
                job,
                face,
                policy,
                job.settings.agent_config(),
                image_sha,
                rerun_of=rerun_of,
                source=source,
                note=note,
            )
        except Exception as exc:  # noqa: BLE001 (every failure becomes a message on the job)
            self._abort(job, exc)

    def _run_rerun(self, job: Job, investigation_id: str) -> None:
        try:
            with self.storage.sessions() as s:
                old = load_trajectory(s, self.storage.files, investigation_id)
            face = face_of(old)
        except Exception as exc:  # noqa: BLE001
            self._abort(job, exc)
            return
        self._run_queued(job, face, old.image_sha256, rerun_of=investigation_id, source=old.source)

    def _requeue(
        self,
        run_id: str,
        case_id: str,
        rerun_of: str | None,
        policy: str,
        stored: dict,
        source: str | None,
        user: str,
    ) -> None:
        """Queue again a run that a dead process left queued; when it cannot run any more, record it
        interrupted with the reason."""
        try:
            settings = RunSettings.from_stored(policy, stored)
            self.check(settings)  # e.g. a policy no longer offered since the restart
        except Exception as exc:  # noqa: BLE001 (stored settings this version cannot read)
            self._end_run(run_id, "interrupted", _lost(exc))
            return
        job = Job(filename=source, user=user, settings=settings)
        job.case_id, job.investigation_id = case_id, run_id
        self.requeued.append(run_id)
        self._reserve(1, force=True)
        if rerun_of is not None:
            self._start(self._run_rerun, job, rerun_of)
        else:
            self._start(self._run_recovered_upload, job)

    def _run_recovered_upload(self, job: Job) -> None:
        try:
            with self.storage.sessions() as s:
                image_sha = get_case(s, job.case_id).image_sha256
            face = self._prepare(self.storage.files.read(image_sha), job)
        except Exception as exc:  # noqa: BLE001 (the image is gone, altered, or no longer accepted)
            self._abort(job, exc, status="interrupted", message=_lost(exc))
            return
        self._run_queued(job, face, image_sha)

    def _investigate(
        self,
        job: Job,
        face,
        policy,
        config,
        image_sha: str,
        *,
        rerun_of: str | None = None,
        source: str | None = None,
        note: str | None = None,
    ) -> None:
        recorder = InvestigationRecorder(
            self.storage.sessions,
            self.storage.files,
            job.case_id,
            user=job.user,
            rerun_of=rerun_of,
            queued_id=job.investigation_id,
        )
        events = investigate(
            face,
            policy,
            config,
            registry=self.registry(policy),
            source=source or job.filename,
            image_sha256=image_sha,
            meta={"calibration_note": note} if note else None,
            trajectory_id=job.investigation_id,  # the queued run's id
        )
        for event in recorder.record(events):
            if job.investigation_id is None:
                job.investigation_id = recorder.investigation_id
            job._push(event)
        job._set(state="done")

    def _end_run(self, run_id: str, status: str, message: str) -> None:
        """Record a queued run that will not start (refused, or lost to a restart) as ended, with why."""
        try:
            with self.storage.sessions.begin() as s:
                end_queued(s, run_id, status=status, error=message)
        except (StorageFullError, StorageBusyError) as exc:  # expected: one line; re-run at the next start
            log.warning("could not record the end of queued run %s: %s", run_id, exc)
        except Exception:  # noqa: BLE001 (storage is down: the run stays queued and is re-run at the next start)
            log.exception("could not record the end of queued run %s", run_id)

    def _abort(self, job: Job, exc: Exception, *, status: str = "failed", message: str | None = None) -> None:
        """Fail the job, and record its queued run as ended (``status``) with the same message."""
        run_id = job.investigation_id
        record = (lambda text: self._end_run(run_id, status, text)) if run_id is not None else None
        self._fail(job, exc, message=message, record=record)

    @staticmethod
    def _fail(
        job: Job, exc: Exception, *, message: str | None = None, record: Callable[[str], None] | None = None
    ) -> None:
        override = message
        # Expected errors (bad input, a missing case) are one log line; anything else logs its traceback.
        if isinstance(exc, (TarfasError, ValueError)):
            message = str(exc)
            log.warning("job %s (%s) refused: %s: %s", job.id, job.filename or "no file name", type(exc).__name__, exc)
        else:
            message = f"{type(exc).__name__}: {exc}"
            log.error("job %s (%s) failed", job.id, job.filename or "no file name", exc_info=exc)
        if isinstance(exc, NoFaceError):
            message += " Tick 'analyse the whole image when no face is found' to investigate it anyway."
        message = override or message
        if record is not None:  # a recorded run that failed before it started is not left queued
            record(message)
        job._set(state="error", error=message, error_type=type(exc).__name__)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun} is" if n == 1 else f"{n} {noun}s are"


def _size(path) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0  # refused on its own, with the others' fate unchanged


def _lost(exc: Exception) -> str:
    return f"the workbench restarted before this queued run started, and it cannot run again: {_sentence(exc)}"


def _sentence(exc: Exception) -> str:
    text = str(exc).strip()
    return text if text.endswith(".") else text + "."


def _own_threshold(policy) -> str:
    t = getattr(policy, "threshold", None)
    return f" This verdict uses the policy's own threshold{f' {t:.3f}' if t is not None else ''}."


__all__ = ["DEFAULT_CONCURRENCY", "Job", "PolicyUnavailable", "RunSettings", "Runner", "UploadRefused"]

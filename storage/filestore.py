"""Content-addressed file store: every file is stored once, named by the SHA-256 of its bytes.

The hash is the evidence shown to the analyst ("the image you uploaded has SHA-256 ..."), so reading a
file checks it again: a file edited on disk is reported, never silently served.

An upload on disk is copied in, not read whole: :meth:`FileStore.stage` copies it in chunks into a
temporary file of the store while hashing it, so the bytes checked and the bytes stored are the same
and the copy holds one chunk at a time; :meth:`FileStore.put` then moves it into place.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from core.dataset import png_bytes
from core.faces import sha256_bytes

from .errors import NotFoundError, StorageFullError, TamperedFileError

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def _tmp_prefix() -> str:
    # Names the writer (".tmp-<host>+<pid>+"), so a sweep at startup removes a dead writer's debris at once.
    return f".tmp-{socket.gethostname()}+{os.getpid()}+"


def _raise_if_full(exc: BaseException, root: Path) -> None:
    """A write the disk refused (full, over a quota or a file size limit) as a StorageFullError."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        raise StorageFullError(
            f"cannot write to the file store at {root}: {exc.strerror} (the disk is full, or a quota or file size "
            "limit is reached); nothing was stored. Free some space and try again."
        ) from exc


def _writer_gone(name: str) -> bool:
    """True when the ``.tmp-*`` file ``name`` was written by a process of this host that no longer runs."""
    host, _, rest = name[len(".tmp-") :].partition("+")
    pid = rest.partition("+")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


CHUNK = 1 << 20  # bytes copied and hashed at a time


class StagedFile:
    """A copy of a file inside the store, hashed, not yet under its name: ``put`` it (the case keeps it)
    or ``discard`` it (refused input); either way no ``.tmp-*`` file stays. ``len()`` is its size."""

    def __init__(self, path: Path, sha256: str, size: int):
        self.path, self.sha256, self.size = path, sha256, size

    def __len__(self) -> int:
        return self.size

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()  # a no-op once put() moved it into place


class FileStore:
    """Files under ``root/ab/cd/<sha256>`` (two shard levels keep directories small)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        if not isinstance(sha, str) or not _SHA_RE.match(sha):
            # Also what keeps a crafted name from escaping the store ("../../etc/passwd").
            raise ValueError(f"not a SHA-256 hex digest: {sha!r}")
        return self.root / sha[:2] / sha[2:4] / sha

    def __contains__(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def stage(self, source: str | Path) -> StagedFile:
        """Copy the file at ``source`` into a temporary file of the store, hashing it on the way (memory
        stays at one chunk). Use the result as a context manager so that a refused file is removed."""
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=_tmp_prefix())
        h, size = hashlib.sha256(), 0
        try:
            with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            _raise_if_full(exc, self.root)
            raise
        return StagedFile(Path(tmp), h.hexdigest(), size)

    def put(self, data: bytes | StagedFile) -> str:
        """Store ``data`` (bytes, or a file :meth:`stage` copied in, which is moved into place) and return
        its SHA-256. Storing the same bytes again is a no-op."""
        if isinstance(data, StagedFile):
            return self._put_staged(data)
        data = bytes(data)
        sha = sha256_bytes(data)
        dest = self.path(sha)
        if dest.is_file():
            return sha
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temp file in the same directory, then rename: a crash leaves either no file or
        # the whole file, never a truncated one under a valid name.
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=_tmp_prefix())
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            _raise_if_full(exc, self.root)
            raise
        return sha

    def _put_staged(self, staged: StagedFile) -> str:
        dest = self.path(staged.sha256)
        if dest.is_file():
            staged.discard()
            return staged.sha256
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staged.path, dest)  # same file system: atomic, and already fsynced by stage()
        except FileNotFoundError:
            if not dest.is_file():
                raise
        return staged.sha256

    def sweep_temp(self, *, older_than_s: float = 60.0) -> list[Path]:
        """Delete the ``.tmp-*`` files that a process killed while writing left behind (run at startup);
        returns them. A file whose writer (named in it) was a process of this host that is gone goes at
        once; any other file younger than ``older_than_s`` is left: another process sharing the store may
        be writing it now (it goes at the next start)."""
        cutoff = time.time() - older_than_s
        swept = []
        for path in [*self.root.glob(".tmp-*"), *self.root.glob("*/*/.tmp-*")]:
            try:
                if path.is_file() and (_writer_gone(path.name) or path.stat().st_mtime <= cutoff):
                    path.unlink()
                    swept.append(path)
            except FileNotFoundError:  # renamed into place or swept by another process meanwhile
                continue
        return swept

    def put_png(self, image: np.ndarray) -> str:
        """Store a uint8 gray or RGB array as PNG (lossless: it reads back equal) and return its SHA-256."""
        return self.put(png_bytes(image))

    def read(self, sha: str) -> bytes:
        """The stored bytes, after checking that they still hash to ``sha``."""
        path = self.path(sha)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(
                f"file {sha} is not in the file store at {self.root}; was the data directory moved or pruned?"
            ) from None
        actual = sha256_bytes(data)
        if actual != sha:
            raise TamperedFileError(
                f"stored file {path} was modified after it was stored: it hashes to {actual}, not {sha}. "
                "Do not use it as evidence; restore it from a backup."
            )
        return data

    def read_png(self, sha: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(self.read(sha))))

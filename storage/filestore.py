"""Content-addressed file store: every file is stored once, named by the SHA-256 of its bytes.

The hash is the evidence shown to the analyst ("the image you uploaded has SHA-256 ..."), so reading a
file checks it again: a file edited on disk is reported, never silently served.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from core.dataset import png_bytes
from core.faces import sha256_bytes

from .errors import NotFoundError, TamperedFileError

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


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

    def put(self, data: bytes) -> str:
        """Store ``data`` and return its SHA-256. Storing the same bytes again is a no-op."""
        data = bytes(data)
        sha = sha256_bytes(data)
        dest = self.path(sha)
        if dest.is_file():
            return sha
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temp file in the same directory, then rename: a crash leaves either no file or
        # the whole file, never a truncated one under a valid name.
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha

    def sweep_temp(self, *, older_than_s: float = 60.0) -> list[Path]:
        """Delete the ``.tmp-*`` files that a process killed while writing left behind (run at startup);
        returns them. Files younger than ``older_than_s`` are left: another process sharing the store
        may be writing them now (they go at the next start)."""
        cutoff = time.time() - older_than_s
        swept = []
        for path in self.root.glob("*/*/.tmp-*"):
            try:
                if path.is_file() and path.stat().st_mtime <= cutoff:
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

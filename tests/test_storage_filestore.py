"""The content-addressed file store: each file stored once under its SHA-256, written atomically,
and checked again on every read so that evidence changed on disk is never served silently."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from storage_support import noise_image

from storage.errors import NotFoundError, TamperedFileError
from storage.filestore import FileStore


def test_put_returns_the_sha256_and_files_are_sharded_by_it(tmp_path):
    store = FileStore(tmp_path / "files")
    sha = store.put(b"evidence")
    assert sha == hashlib.sha256(b"evidence").hexdigest()
    assert store.path(sha) == tmp_path / "files" / sha[:2] / sha[2:4] / sha
    assert store.path(sha).read_bytes() == b"evidence"
    assert sha in store and store.read(sha) == b"evidence"


def test_the_same_bytes_are_stored_once(tmp_path):
    store = FileStore(tmp_path)
    assert store.put(b"same") == store.put(b"same")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1  # and no temp file left behind


def test_png_images_read_back_equal(tmp_path):
    store = FileStore(tmp_path)
    rgb, gray = noise_image(1), noise_image(2, shape=(20, 30))
    sha_rgb, sha_gray = store.put_png(rgb), store.put_png(gray)
    assert np.array_equal(store.read_png(sha_rgb), rgb)
    assert np.array_equal(store.read_png(sha_gray), gray)
    assert store.put_png(rgb.copy()) == sha_rgb  # deterministic encoding: same pixels, same file


def test_a_file_changed_on_disk_is_reported_as_tampered(tmp_path):
    store = FileStore(tmp_path)
    sha = store.put(b"original evidence")
    store.path(sha).write_bytes(b"edited evidence")
    with pytest.raises(TamperedFileError, match="modified after it was stored"):
        store.read(sha)


def test_missing_files_and_names_that_are_not_hashes_are_refused(tmp_path):
    store = FileStore(tmp_path)
    with pytest.raises(NotFoundError, match="not in the file store"):
        store.read("0" * 64)
    with pytest.raises(ValueError, match="not a SHA-256"):
        store.path("../../etc/passwd")

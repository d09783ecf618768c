"""Typed errors of the storage layer. Each says what happened and what the person can do about it."""

from __future__ import annotations

from core.errors import TarfasError


class StorageError(TarfasError):
    """Base class of storage errors."""


class NotFoundError(StorageError, LookupError):
    """A case, investigation, review or stored file that does not exist."""


class StorageFullError(StorageError):
    """The disk that holds the database or the file store is full (or refuses to grow a file): the write
    was not made, and nothing of the change it belonged to was saved."""


class StorageBusyError(StorageError):
    """Another process held the database's write lock for longer than this one waits; nothing was saved."""


class TamperedFileError(StorageError):
    """A stored file's bytes no longer hash to the name it was stored under: the evidence changed on disk."""


class ConcurrentReviewError(StorageError):
    """Someone else saved the review after this analyst loaded it; nothing was overwritten."""


class InvalidReviewError(StorageError, ValueError):
    """A review with an unknown verdict, flag or turn."""


class AuditLogImmutableError(StorageError):
    """An attempt to change or delete an audit event. The audit log is append-only."""


class InvestigationStateError(StorageError):
    """Events arrived in an order the recorder cannot store (e.g. a turn before its investigation)."""


class InvalidCaseError(StorageError, ValueError):
    """A case field set to a value it cannot take (e.g. an unknown attack type)."""


class CalibrationError(StorageError):
    """A calibration profile that cannot be stored, found or used as asked."""


class TamperedProfileError(CalibrationError):
    """A stored profile's JSON no longer hashes to its id: it was changed in the database."""


class CalibrationImmutableError(CalibrationError):
    """An attempt to change or delete a stored profile or an activation. Both are append-only."""

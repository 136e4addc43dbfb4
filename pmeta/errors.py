"""Typed exceptions. Every error pmeta raises on bad input derives from :class:`PmetaError`.

A serving layer maps them to HTTP status codes: input errors (``InvalidHistory``, ``InvalidData``,
``InvalidConfig``) to 400/422, ``BankNotFound`` to 404, ``BankIntegrityError``, ``BankBusy`` and
``BankUnavailable`` to 5xx.
The CLI prints ``str(error)`` on one line and exits with code 2.
"""

from __future__ import annotations


class PmetaError(Exception):
    """Base class of every error pmeta raises on purpose."""


class InvalidHistory(PmetaError, ValueError):
    """A user history does not follow the history.json schema (or names unknown items)."""


class InvalidRequest(PmetaError, ValueError):
    """A call's arguments are wrong (a non-positive ``top``, candidate ids not in the catalogue, ...)."""


class InvalidData(PmetaError, ValueError):
    """A dataset directory or file is missing, unreadable or not in the announced format."""


class InvalidConfig(PmetaError, ValueError):
    """A configuration file or option has a wrong name, type or value."""


class BankNotFound(PmetaError, FileNotFoundError):
    """The path is not a pmeta bank, or the bank has no active version."""


class BankIntegrityError(PmetaError):
    """A bank file does not match its recorded checksum, or the bank's records disagree."""


class BankBusy(PmetaError):
    """Another process is publishing a version into the same bank right now."""


class BankUnavailable(PmetaError):
    """The bank's metadata database cannot be reached or used now (server down, no permission)."""


class TrainingDiverged(PmetaError, FloatingPointError):
    """Meta-training produced a non-finite loss or gradient (no bank version is published)."""

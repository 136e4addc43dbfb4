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


class ModesUnavailable(InvalidData):
    """A sampled candidate mode (uni99, pop99) cannot draw its 99 negatives for a test user of this
    dataset. ``modes`` holds the modes it can still be evaluated in; the message ends with the advice
    to pass them (``evaluate this dataset with --mode uni99,full``), so a caller can retry with them."""

    def __init__(self, reason: str, modes: tuple[str, ...]):
        self.reason, self.modes = reason, tuple(modes)
        super().__init__(f"{reason}; evaluate this dataset with --mode {','.join(self.modes)}")

    def __reduce__(self):  # keep ``reason`` and ``modes`` through pickling (the default passes the message alone)
        return type(self), (self.reason, self.modes)


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

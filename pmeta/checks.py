"""Checks of the library API's plain arguments: paths and whole numbers.

Path arguments are checked before any file-system call.

``Path(3)`` raises a bare ``TypeError`` and a NUL byte a ``ValueError`` only at the first system call;
:func:`as_path` turns both into the typed error the calling function already raises for a missing
file (``InvalidHistory`` for a history, ``InvalidConfig`` for a config file, ...), and
:func:`os_error_message` words an ``OSError`` (a name too long, a read-only file system) for one line.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InvalidRequest, PmetaError


def as_path(value: object, what: str, error: type[PmetaError]) -> Path:
    """``value`` as a ``Path`` when it is a ``str`` or an ``os.PathLike`` of ``str`` without NUL bytes, else ``error``."""
    if not isinstance(value, (str, os.PathLike)):
        raise error(f"{what} must be a path (a str or os.PathLike), not {type(value).__name__}")
    try:
        path = Path(value)
    except TypeError:  # an os.PathLike whose __fspath__ gives bytes (or nothing usable)
        raise error(f"{what} must be a path of str (its __fspath__ gives no str)") from None
    if "\x00" in str(path):
        raise error(f"{what} contains a NUL byte: {str(path)[:80]!r}")
    return path


def os_error_message(error: OSError) -> str:
    """An ``OSError``'s reason on one line (``strerror`` without the path, which the caller names)."""
    if error.strerror:
        return error.strerror
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def request_int(value: object, name: str, minimum: int, maximum: int | None = None, error: type[PmetaError] = InvalidRequest) -> int:
    """``value`` when it is an ``int`` (not a ``bool``) in ``[minimum, maximum]``, else one line of ``error``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
        shown = repr(value)[:40] if isinstance(value, (int, float, str)) else type(value).__name__
        raise error(f"{name} must be a whole number {bounds}, got {shown}")
    return value

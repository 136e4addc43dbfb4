"""Checks of the library API's plain arguments: paths and whole numbers.

The public functions that take a path pass it through :func:`as_path` before their first file-system
call. ``Path(3)`` raises a bare ``TypeError`` at once, and a path with a NUL byte raises a bare
``ValueError`` only at that first call; :func:`as_path` turns both into the typed error the calling
function already raises for a missing file (``InvalidHistory`` for a history, ``InvalidConfig`` for a
config file, ...). :func:`os_error_message` words an ``OSError`` for one line, and
:func:`is_path_error` tells an error about the path (the caller's) from one about the machine.
"""

from __future__ import annotations

import errno
import operator
import os
from pathlib import Path

import numpy as np

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


#: ``errno`` values that describe the path a caller chose (a name too long, a read-only or virtual file
#: system, no permission), as opposed to the machine's state (a full disk, an I/O error): only these
#: become the caller's typed error; the others propagate as the ``OSError`` they are.
PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ENOENT, errno.ENOTDIR, errno.EROFS, errno.EACCES, errno.EPERM, errno.ELOOP, errno.EISDIR})


def is_path_error(error: OSError) -> bool:
    """Whether ``error`` is about the path itself (see :data:`PATH_ERRNOS`)."""
    return error.errno in PATH_ERRNOS


def os_error_message(error: OSError) -> str:
    """An ``OSError``'s reason on one line (``strerror`` without the path, which the caller names)."""
    if error.strerror:
        return error.strerror
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def request_int(value: object, name: str, minimum: int, maximum: int | None = None, error: type[PmetaError] = InvalidRequest) -> int:
    """``value`` as an ``int`` when it is a whole number in ``[minimum, maximum]`` (an ``int`` or a
    scalar with ``__index__``, such as ``numpy.int64`` or a 0-d integer tensor; never a ``bool``, a
    boolean array or tensor, a float, or an array with dimensions), else one line of ``error``."""
    number: int | None = None
    dtype = str(getattr(value, "dtype", ""))
    if not isinstance(value, (bool, np.bool_)) and dtype not in ("bool", "torch.bool") and getattr(value, "ndim", 0) == 0:
        try:
            number = operator.index(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            number = None
    if number is None or number < minimum or (maximum is not None and number > maximum):
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
        raise error(f"{name} must be a whole number {bounds}, got {_shown(value if number is None else number)}")
    return number


def _shown(value: object) -> str:
    """``value`` in a message: its repr for plain and numpy scalars, else its type's name."""
    return repr(value)[:40] if isinstance(value, (int, float, str, np.generic)) else type(value).__name__


def request_bool(value: object, name: str, error: type[PmetaError] = InvalidRequest) -> bool:
    """``value`` as a ``bool`` when it is ``True`` / ``False`` (or a ``numpy.bool_``), else one line of ``error``
    (``0`` / ``1`` / ``"yes"`` are refused: a flag read from a form or a file should be parsed by the caller)."""
    if not isinstance(value, (bool, np.bool_)):
        raise error(f"{name} must be True or False, got {_shown(value)}")
    return bool(value)

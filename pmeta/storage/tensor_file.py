"""Writing safetensors files so that a failed write is the ``OSError`` it is.

``safetensors`` reports a failed write (a full disk, a file-size limit, an I/O error) as its own
``SafetensorError``, which is not an ``OSError``: callers that tell the machine's errors from bad
input, and the CLI that prints an ``OSError`` in one line, would not recognise it.
:func:`save_tensors` and :func:`as_os_error` give it back its ``errno``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # torch loads only when a file is written: `import pmeta` and `pmeta --help` stay light
    import torch

_OS_ERROR = re.compile(r"\(os error (\d+)\)")


@contextmanager
def as_os_error(path: str | Path) -> Iterator[None]:
    """Re-raise a ``SafetensorError`` that carries an operating-system error (``... (os error 28)``)
    as ``OSError(errno, strerror, path)``; any other ``SafetensorError`` passes through."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        found = _OS_ERROR.search(str(error))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from error


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, with a failed write raised as ``OSError`` (see :func:`as_os_error`)."""
    from safetensors.torch import save_file

    with as_os_error(path):
        save_file(dict(tensors), str(path), metadata=metadata)

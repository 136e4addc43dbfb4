"""An evaluation's ``--out`` folder: checked before any work starts, each file replaced atomically,
and the previous run's files that this run does not rewrite removed (a plot or a predictions file
left from another run, beside a new report, would describe that other run)."""

from __future__ import annotations

import fnmatch
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InvalidConfig


def check_out_dir(out: Path) -> None:
    """InvalidConfig, before any data is read, when ``out`` cannot become the report folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidConfig(f"--out {out} is a file, not a folder")
    if not out.exists() and not out.parent.is_dir():
        raise InvalidConfig(f"--out {out}: the folder {out.parent} does not exist")
    target = out if out.exists() else out.parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise InvalidConfig(f"--out {out}: {target} is not writable")


@contextmanager
def replaced(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it when the block succeeds, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    with replaced(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def remove_stale(folder: Path, patterns: Iterable[str], written: Iterable[Path]) -> list[Path]:
    """Remove the files of ``folder`` that match ``patterns`` (the kinds of file a run writes) but
    were not ``written`` by this run; returns them. Other files are never touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    keep = {Path(p).resolve() for p in written}
    patterns = list(patterns)
    removed = []
    for entry in folder.iterdir():
        if entry.is_file() and any(fnmatch.fnmatch(entry.name, p) for p in patterns) and entry.resolve() not in keep:
            entry.unlink()
            removed.append(entry)
    return removed

"""Checksummed manifests for bank version folders.

A version folder holds its data files and ``manifest.json``::

    {"format": "pmeta-bank/1", "version": "<id>",
     "files": {"tensors.safetensors": {"sha256": "<hex>", "bytes": 1234}, ...}}

File names are POSIX paths relative to the folder. The manifest's own sha256 is recorded in the
metadata database, so a check covers both the manifest and every file it lists: a flipped byte
anywhere, a truncated or missing file, or a file that was added after publishing is detected
before any file is parsed.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from pmeta.errors import BankIntegrityError

MANIFEST_NAME = "manifest.json"
FORMAT = "pmeta-bank/1"
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks. Raises ``OSError`` if unreadable."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Every entry below ``directory`` that is not a directory, keyed by its relative POSIX name.

    Symbolic links are listed (not followed), so that a check can reject them. Raises ``OSError``
    for a folder that cannot be listed (``os.walk`` would skip it, and what it holds with it).
    """
    root = Path(directory)
    found: dict[str, Path] = {}
    for current, dirnames, filenames in os.walk(root, followlinks=False, onerror=_raise):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(current, d))]:
            full = Path(current) / name
            found[full.relative_to(root).as_posix()] = full
    return found


def empty_folders(directory: str | os.PathLike[str]) -> list[str]:
    """Folders below ``directory`` with no file anywhere inside them, by relative POSIX name.

    A version's files imply its folders; a folder that holds no file is not part of any version
    (a writer only makes folders to put files in), so a check reports it like an unlisted file.
    Raises ``OSError`` for a folder that cannot be listed.
    """
    root = Path(directory)
    empty: list[str] = []
    for current, dirnames, filenames in os.walk(root, topdown=False, followlinks=False, onerror=_raise):  # children first
        here = Path(current)
        if here == root or filenames:
            continue
        # os.walk lists a link to a folder among the folders; a link is something, not emptiness
        if all(not (here / d).is_symlink() and (here / d).relative_to(root).as_posix() in empty for d in dirnames):
            empty.append(here.relative_to(root).as_posix())
    return sorted(empty)


def _raise(error: OSError) -> None:
    raise error


def write_manifest(directory: str | os.PathLike[str], version_id: str) -> str:
    """Write ``manifest.json`` listing every file in ``directory``; return the manifest's sha256.

    The manifest is flushed and fsynced before returning. Raises ``ValueError`` if the folder
    already has a manifest or holds something other than regular files and directories
    (symbolic links, sockets, ...).
    """
    root = Path(directory)
    files = list_files(root)
    if MANIFEST_NAME in files:
        raise ValueError(f"{root} already has a {MANIFEST_NAME}")
    empty = empty_folders(root)
    if empty:
        raise ValueError(f"{root / empty[0]} is an empty folder; a bank version holds files only")
    entries: dict[str, dict[str, object]] = {}
    for name, full in sorted(files.items()):
        info = full.lstat()
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{full} is not a regular file; a bank version holds regular files only")
        entries[name] = {"sha256": sha256_file(full), "bytes": info.st_size}
    manifest = {"format": FORMAT, "version": version_id, "files": entries}
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    with open(root / MANIFEST_NAME, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return hashlib.sha256(data).hexdigest()


def check_dir(
    directory: str | os.PathLike[str], manifest_sha256: str, *, label: str | None = None
) -> dict[str, str | None]:
    """Check a version folder without raising: ``{file name: None if fine, else the problem}``.

    The problem strings are full sentences naming the file as ``<label>/<name>`` (``label``
    defaults to ``versions/<folder name>``). When the manifest itself is missing, unreadable or
    does not match ``manifest_sha256``, only ``manifest.json`` is reported, since its listing
    cannot be trusted.
    """
    root = Path(directory)
    label = label if label is not None else f"versions/{root.name}"

    def where(name: str) -> str:
        return f"bank file {label}/{name}"

    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file() or manifest_path.is_symlink():
        return {MANIFEST_NAME: f"{where(MANIFEST_NAME)} is missing"}
    data = manifest_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest_sha256:
        return {MANIFEST_NAME: f"{where(MANIFEST_NAME)} does not match its checksum"}
    try:
        manifest = json.loads(data)
        listed = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(listed, dict):
            raise ValueError("unexpected format")
        if not all(isinstance(entry, dict) for entry in listed.values()):
            raise ValueError("unexpected file entry")
    except (ValueError, KeyError, TypeError, AttributeError):
        return {MANIFEST_NAME: f"{where(MANIFEST_NAME)} is not a {FORMAT} manifest"}
    if manifest.get("version") != root.name:
        return {MANIFEST_NAME: f"{where(MANIFEST_NAME)} describes version {manifest.get('version')!r}"}

    report: dict[str, str | None] = {MANIFEST_NAME: None}
    try:
        present, empty = list_files(root), empty_folders(root)
    except OSError as error:  # a folder inside that cannot be listed: what it holds cannot be checked
        name = Path(error.filename).relative_to(root).as_posix() if error.filename and Path(error.filename).is_relative_to(root) else "."
        key, shown = ("./", f"bank folder {label}/") if name == "." else (name + "/", f"{where(name)}/")
        return {**report, key: f"{shown} cannot be listed ({error.strerror or error}), so what it holds cannot be checked"}
    for name, entry in sorted(listed.items()):
        full = present.get(name)
        if full is None:
            report[name] = f"{where(name)} is missing"
            continue
        info = full.lstat()
        if not stat.S_ISREG(info.st_mode):
            report[name] = f"{where(name)} is not a regular file"
        elif info.st_size != entry.get("bytes"):
            report[name] = f"{where(name)} does not match its recorded size ({info.st_size} != {entry.get('bytes')} bytes)"
        elif sha256_file(full) != entry.get("sha256"):
            report[name] = f"{where(name)} does not match its checksum"
        else:
            report[name] = None
    for name in sorted(set(present) - set(listed) - {MANIFEST_NAME}):
        report[name] = f"{where(name)} is not listed in the manifest"
    for name in empty:
        report[name + "/"] = f"{where(name)}/ is an empty folder, not listed in the manifest"
    return report


def verify_dir(
    directory: str | os.PathLike[str], manifest_sha256: str, *, label: str | None = None
) -> list[str]:
    """Verify a version folder against its manifest; return the names of the verified files.

    Checks the manifest's own sha256 against ``manifest_sha256``, every listed file's size and
    sha256, and that no unlisted file exists. Raises :class:`~pmeta.errors.BankIntegrityError`
    at the first problem, with a message naming the offending file, e.g.
    ``bank file versions/<id>/tensors.safetensors does not match its checksum``.
    """
    report = check_dir(directory, manifest_sha256, label=label)
    for problem in report.values():
        if problem is not None:
            raise BankIntegrityError(problem)
    return [name for name in report if name != MANIFEST_NAME]


def verified_entries(directory: str | os.PathLike[str], manifest_sha256: str, *, label: str | None = None) -> dict[str, str]:
    """Verify a version folder (as :func:`verify_dir`) and return ``{file name: sha256}`` from its
    manifest, read again and checked against ``manifest_sha256`` so that the sums returned are the
    recorded ones. Raises :class:`~pmeta.errors.BankIntegrityError` naming the offending file."""
    verify_dir(directory, manifest_sha256, label=label)
    root = Path(directory)
    label = label if label is not None else f"versions/{root.name}"
    data = (root / MANIFEST_NAME).read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest_sha256:
        raise BankIntegrityError(f"bank file {label}/{MANIFEST_NAME} does not match its checksum")
    return {name: str(entry["sha256"]) for name, entry in json.loads(data)["files"].items()}

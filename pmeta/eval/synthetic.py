"""A synthetic ml-100k-layout dataset cut from the shipped ml-latest-small, to exercise transfer here.

ml-100k and ml-1m are not on these machines. :func:`write_ml100k_like` writes ``u.data`` (tab
separated, integer stars) and ``u.item`` (latin-1, ``|`` separated, 19 genre flags) for a subset of
ml-latest-small's users, with users and items renumbered 1..n, titles kept (titles that latin-1
cannot hold get ``?`` and so no longer match the bank's), genres mapped to ml-100k's 19 flags and
half stars floored (4.5 -> 4, 3.5 -> 3: the positives, rating >= 4, are unchanged).

Users are placed so that the target's coldstart-v1 test users (the first 20% of the seeded
permutation) are users the bank built on ml-latest-small *held out*: the transfer numbers are on
users no bank has seen. The target's train users (what the ID-based baselines fit) are the bank's
train users. This is a check of the transfer path, not a different MovieLens release: its numbers
are labelled "synthetic ml-100k layout" wherever they appear.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.movielens import ML100K_GENRES
from ..data.types import Dataset
from .protocol import MIN_POSITIVES, split_users

_GENRE_ALIASES = {"Children": "Children's"}


def write_ml100k_like(source: Dataset, out: Path, users: int = 300, seed: int = 0, rename_every: int = 0, test_fraction: float = 0.2) -> dict:
    """Write the dataset into ``out``; returns a summary (users, items, test users, renamed titles,
    and ``user_map``: target user id -> source user id).

    ``rename_every`` > 0 appends " [alt]" to every n-th title, so that those items do not match a
    bank built on ``source`` (the unseen-item path of the transfer).
    """
    train_users, test_users = split_users(source, seed=seed, test_fraction=test_fraction)
    positives = source.positives_by_user()
    eligible_test = [int(u) for u in test_users if len(positives.get(int(u), ())) >= MIN_POSITIVES]
    n_test = round(test_fraction * users)
    if n_test > len(eligible_test) or users - n_test > len(train_users):
        raise ValueError(f"the source has too few users for a {users}-user target")
    chosen_test, chosen_train = eligible_test[:n_test], [int(u) for u in train_users[: users - n_test]]
    # The target's own split: the first n_test ids of the seeded permutation of its sorted ids.
    new_ids = np.array(sorted(str(i) for i in range(1, users + 1)))
    permuted = np.random.default_rng(seed).permutation(new_ids)
    assignment = dict(zip(permuted[:n_test], chosen_test)) | dict(zip(permuted[n_test:], chosen_train))
    source_to_new = {src: int(new) for new, src in assignment.items()}

    r = source.ratings
    keep = np.isin(r.user, np.array(list(source_to_new), dtype=np.int64))
    items = np.unique(r.item[keep])
    item_to_new = {int(i): n + 1 for n, i in enumerate(items)}
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for u, i, rating, ts in zip(r.user[keep], r.item[keep], r.rating[keep], r.timestamp[keep]):
        lines.append(f"{source_to_new[int(u)]}\t{item_to_new[int(i)]}\t{max(1, int(np.floor(rating)))}\t{int(ts)}")
    (out / "u.data").write_text("\n".join(lines) + "\n", encoding="latin-1")
    catalog, renamed, lossy = source.catalog, 0, 0
    movie_lines = []
    for i in items:
        title = catalog.titles[int(i)]
        encoded = title.encode("latin-1", errors="replace").decode("latin-1")
        lossy += encoded != title
        if rename_every and item_to_new[int(i)] % rename_every == 0:
            encoded += " [alt]"
            renamed += 1
        genres = {_GENRE_ALIASES.get(g, g) for g in catalog.genres[int(i)]}
        flags = "|".join("1" if g in genres else "0" for g in ML100K_GENRES)
        movie_lines.append(f"{item_to_new[int(i)]}|{encoded.replace('|', '/')}|01-Jan-1995||http://example.invalid/|{flags}")
    (out / "u.item").write_bytes(("\n".join(movie_lines) + "\n").encode("latin-1"))
    user_map = {str(new): source.ratings.user_ids[src] for src, new in source_to_new.items()}
    return {"users": users, "items": len(items), "test_users": n_test, "renamed_titles": renamed, "titles_not_latin1": lossy, "user_map": user_map}

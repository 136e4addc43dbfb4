"""Cross-validation of the onboarding init over the *train* users of coldstart-v1 (never the test users).

    python benchmarks/onboarding_cv.py [--folds 4] [--ease-lambda 500] [--rank 32]

The train users of the shipped sample are split into folds; on each, EASE and the onboarding regression
(:mod:`pmeta.bank.onboarding`) are fitted on the other folds and the held-out fold is ranked with the
protocol's own candidates and metrics (support = first K positives, query = positives 6..15). Rows: EASE
alone, the exact combined matrix at γ = 1 and γ = 0.5, and its rank-``--rank`` factorisation (what a bank's
towers start from). This is the check that chose the design; the bank itself chooses λ, a and γ on its own
split of the train users.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.utils.extmath import randomized_svd

from pmeta.bank import onboarding
from pmeta.data import load_sample
from pmeta.eval.baselines import EASEBaseline, positive_matrix
from pmeta.eval.protocol import draw_candidates, item_rating_counts, make_cases, metrics_from_ranks, rank_positives, split_users

MODES = ("uni99", "pop99", "full")
KS = (1, 3, 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--ease-lambda", type=float, default=500.0)
    parser.add_argument("--lam", type=float, default=10.0, help="ridge λ of the onboarding regression")
    parser.add_argument("--weight", type=float, default=1.0, help="weight a of the regression against EASE")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    started = time.perf_counter()
    dataset = load_sample()
    train, _ = split_users(dataset, 0)
    positives = dataset.positives_by_user()
    n_items = len(dataset.catalog)
    popularity = item_rating_counts(dataset)
    folds = np.array_split(np.random.default_rng(args.seed).permutation(np.sort(train)), args.folds)
    results: dict[tuple[str, int, str], list[tuple[float, float]]] = {}

    for f, held_out in enumerate(folds):
        fit_users = np.concatenate([fold for j, fold in enumerate(folds) if j != f])
        matrix = positive_matrix(dataset, fit_users)
        kept = np.flatnonzero(matrix.sum(0) > 0)
        position = np.full(n_items, -1, dtype=np.int64)
        position[kept] = np.arange(len(kept))
        ease = EASEBaseline.closed_form(matrix[:, kept].T @ matrix[:, kept], args.ease_lambda)
        del matrix
        x, y = onboarding.episodes([positives[int(u)] for u in fit_users if int(u) in positives], position)
        w, mean = onboarding.ridge(x, y, args.lam)
        combined, bias = onboarding.combine(ease, w, mean, x, args.weight)
        u, sigma, vt = randomized_svd(combined, n_components=args.rank, random_state=0)
        history, item = u * sigma, vt.T

        def scorer(rows_of, exponent, with_bias=True):
            def score(support: np.ndarray) -> np.ndarray:
                rows = position[support]
                rows = rows[rows >= 0]
                scores = np.full(n_items, -1e9)
                kept_scores = (bias if with_bias else 0.0) + (rows_of(rows).sum(0) / len(rows) ** exponent if len(rows) else 0.0)
                scores[kept] = kept_scores
                return scores

            return score

        models = {
            f"EASE (λ={args.ease_lambda:g})": scorer(lambda rows: ease[rows], 1.0, with_bias=False),
            "onboarding, exact, γ=1": scorer(lambda rows: combined[rows], 1.0),
            "onboarding, exact, γ=0.5": scorer(lambda rows: combined[rows], 0.5),
            f"onboarding, rank {args.rank}, γ=1": scorer(lambda rows: history[rows] @ item.T, 1.0),
            f"onboarding, rank {args.rank}, γ=0.5": scorer(lambda rows: history[rows] @ item.T, 0.5),
        }
        cases = {k: make_cases(dataset, held_out, k) for k in KS}
        candidates = draw_candidates(cases[max(KS)], MODES, popularity)
        for name, score in models.items():
            for k in KS:
                for case in cases[k]:
                    scores = score(case.support)
                    for mode in MODES:
                        metrics = metrics_from_ranks(rank_positives(scores, case.query, candidates[(case.user, mode)]))
                        results.setdefault((name, k, mode), []).append((metrics["hr@10"], metrics["ndcg@10"]))

    users = len(results[(next(iter(models)), KS[0], MODES[0])])
    print(f"onboarding init, {args.folds}-fold CV over {len(train)} train users of ml-latest-small ({users} with >= 6 positives), "
          f"λ={args.lam:g}, a={args.weight:g}; HR@10 / nDCG@10; {time.perf_counter() - started:.0f} s\n")
    print("| model | " + " | ".join(f"{m} K={k}" for m in MODES for k in KS) + " |")
    print("|---|" + "---|" * (len(MODES) * len(KS)))
    for name in models:
        cells = [np.mean(results[(name, k, m)], axis=0) for m in MODES for k in KS]
        print(f"| {name} | " + " | ".join(f"{hr:.3f} / {nd:.3f}" for hr, nd in cells) + " |")


if __name__ == "__main__":
    main()

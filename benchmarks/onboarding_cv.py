"""Cross-validation of the onboarding init over the *train* users of coldstart-v1 (never the test users).

    python benchmarks/onboarding_cv.py [--data DIR] [--folds 4] [--ease-lambda 500] [--lam 10] [--weight 1] [--rank 32[,64,...]] [--rbf 0.1:0.3,0.1:1]
                                       [--later 0.3:10,1:30 [--later-stride 2] [--later-last 200]]
                                       [--rp3beta 0.7:1,0.5:0.3] [--pop-penalty 0.1,0.3] [--dlae 0.5,0.9] [--rated 500,2000]

The train users of coldstart-v1 (the shipped sample, or ``--data``: any MovieLens release) are split into folds; on each, EASE and the onboarding regression
(:mod:`pmeta.bank.onboarding`) are fitted on the other folds and the held-out fold is ranked with the
protocol's own candidates and metrics (support = first K positives, query = positives 6..15). Rows: EASE
alone, ItemKNN (the protocol's baseline, fitted on the same fold), the exact combined matrix at γ = 1 and
γ = 0.5, and its rank-``--rank`` factorisation (what a bank's towers start from; one pair of rows per rank
of a comma-separated list). This is the check that chose the design; the bank itself chooses λ, a and γ on its own
split of the train users.

``--rbf bw:c,...`` adds a *nonlinear* onboarding regression per pair: kernel ridge over the same episodes
with the kernel ``x·x' + c·exp((cos(xF, x'F) − 1)/bw)`` (:func:`episode_kernel`; ``F`` = unit-norm rank-64
item factors of the fit users' rating matrix), i.e. the linear regression plus a smooth similarity of
the supports' mean item factors, combined with EASE exactly as the linear one (a, σ). It is the check
behind docs/movielens.md's "a nonlinear onboarding regression: tried, no gain".

``--later ω:λ,...`` adds the regression fitted with *more data* per pair: besides the protocol's
episodes (the first K positives → positives 6..15), episodes taken later in the fit users' histories
(positives s..s+K−1 → positives s+5..s+14 for s = stride, 2·stride, … ≤ ``--later-last``), weighted ω
and centred on their own mean (:func:`later_episodes`, :func:`later_ridge`), combined with EASE as
the others. It is the check behind docs/movielens.md's "later episodes: tried, not robust".

``--rp3beta β:c,...`` adds RP3beta (:func:`rp3beta`: the two-step random walk item → user → item of the
fit users' positives, α = 1, the arriving item's degree raised to −β) alone at γ = 1, and added with
weight c to the exact combined matrix at γ = 0.5, each first divided by the spread (standard
deviation) of its scores over the fit users' episodes. ``--pop-penalty d,...`` subtracts
``d·log(1 + ratings of the item)`` from that spread-scaled combined score. Both are the checks behind
docs/movielens.md's "RP3beta, a popularity penalty: tried, not adopted".

``--dlae p,...`` adds EDLAE (:func:`edlae`; Steck 2020, "Autoencoders that don't overfit towards the
identity"): EASE trained as a denoising autoencoder whose inputs drop each item with probability p,
which in closed form is EASE with each item's own regulariser raised by ``p/(1 − p)·(XᵀX)_jj`` (a
new user's support is a heavily dropped history). Two rows per p: EDLAE alone at γ = 1, and the
combined matrix with EDLAE in place of EASE at γ = 0.5. p = 0 is EASE. It is the check behind
docs/movielens.md's "EDLAE: tried, not adopted".

``--rated λ,...`` adds EASE fitted on *every rating* of the fit users (:func:`rated_matrix`; a 1-star
rating counts as much as a 5-star one) over the same items as the other rows (those some fit user
liked), alone at γ = 1 and in place of EASE in the combined matrix at γ = 0.5. Every candidate the
protocol ranks against a query positive is an item the user never rated, so what a user will rate
at all (exposure) is part of the question; the support and the query stay positives. Where every
rating is a positive the rows at λ = ``--ease-lambda`` are the EASE and exact γ = 0.5 rows. It is
the check behind docs/movielens.md's "EASE on every rating: tried, not adopted" (stop 63).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import scipy.sparse as sp
from sklearn.utils.extmath import randomized_svd

from pmeta.bank import onboarding
from pmeta.data import load_sample
from pmeta.data.movielens import LAYOUTS as FORMATS, read_movielens
from pmeta.eval.baselines import EASEBaseline, ItemKNNBaseline, indicator_matrix, positive_matrix
from pmeta.eval.protocol import QUERY_START, QUERY_STOP, draw_candidates, item_rating_counts, make_cases, metrics_from_ranks, rank_positives, split_users

MODES = ("uni99", "pop99", "full")
KS = (1, 3, 5)


def unit_embedding(rows: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """(len(rows), r) unit-norm mean item factors ``xF / |xF|`` of episodes' support rows."""
    embedded = rows @ factors
    return embedded / (np.linalg.norm(embedded, axis=1, keepdims=True) + 1e-9)


def episode_kernel(x: np.ndarray, x_unit: np.ndarray, train_x: np.ndarray, train_unit: np.ndarray, bandwidth: float, weight: float) -> np.ndarray:
    """(len(x), len(train_x)) kernel ``x·x' + weight · exp((cos(xF, x'F) − 1)/bandwidth)`` between
    episodes' support rows, given their :func:`unit_embedding` (weight 0: the linear kernel of
    :func:`pmeta.bank.onboarding.ridge`)."""
    linear = x @ train_x.T
    if weight == 0.0:
        return linear
    return linear + weight * np.exp((x_unit @ train_unit.T - 1.0) / bandwidth)


def later_episodes(positives: list[np.ndarray], position: np.ndarray, stride: int, last: int, sizes=onboarding.SUPPORT_SIZES) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Sparse (X, Y) of protocol-shaped episodes from later in each history: for every start
    s = stride, 2·stride, … ≤ ``last`` that leaves a query, X = 1/K on positives s..s+K−1 and
    Y = 1 on positives s+5..s+14 (kept columns only, as :func:`pmeta.bank.onboarding.episodes`)."""
    n = int(position.max()) + 1 if len(position) else 0
    x_rows, x_cols, x_values, y_rows, y_cols = [], [], [], [], []
    episode = 0
    for items in positives:
        for start in range(stride, min(last, len(items) - QUERY_START - 1) + 1, stride):
            query = position[items[start + QUERY_START : start + QUERY_STOP]]
            query = query[query >= 0]
            if len(query) == 0:
                continue
            for k in sizes:
                support = position[items[start : start + k]]
                support = support[support >= 0]
                if len(support) == 0:
                    continue
                x_rows += [episode] * len(support)
                x_cols += support.tolist()
                x_values += [1.0 / len(support)] * len(support)
                y_rows += [episode] * len(query)
                y_cols += query.tolist()
                episode += 1
    x = sp.csr_matrix((np.asarray(x_values, np.float32), (x_rows, x_cols)), shape=(episode, n))
    y = sp.csr_matrix((np.ones(len(y_rows), np.float32), (y_rows, y_cols)), shape=(episode, n))
    return x, y


def later_ridge(x: np.ndarray, y: np.ndarray, later_x: sp.csr_matrix, later_y: sp.csr_matrix, weight: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(W, ȳ): the onboarding ridge over the protocol's episodes (X, Y) and, weighted ``weight``, the
    later ones, each group centred on its own mean; ȳ is the protocol episodes' (the bias a new user
    starts from). Primal ``(XᵀX + ω·X'ᵀX' + λI)⁻¹ (Xᵀ(Y − ȳ) + ω·X'ᵀ(Y' − ȳ'))`` in float64."""
    mean = y.mean(0)
    gram = (x.T @ x).astype(np.float64)
    target = (x.T @ (y - mean)).astype(np.float64)
    if weight and later_x.shape[0]:
        later_mean = np.asarray(later_y.mean(0), np.float64).ravel()
        gram += weight * (later_x.T @ later_x).toarray()
        target += weight * ((later_x.T @ later_y).toarray() - np.outer(np.asarray(later_x.sum(0), np.float64).ravel(), later_mean))
    gram[np.diag_indices_from(gram)] += lam
    return np.linalg.solve(gram, target).astype(np.float32), mean.astype(np.float32)


def rp3beta(matrix: np.ndarray, beta: float) -> np.ndarray:
    """(items, items) RP3beta weights of a 0/1 user × item matrix: ``W[i, j] = Σ_u P(u | i) P(j | u) / deg(j)^β``
    (each step uniform over the edges of the node it leaves; α = 1), with a zero diagonal."""
    user_degree = np.maximum(matrix.sum(1, keepdims=True), 1.0)
    item_degree = np.maximum(matrix.sum(0), 1.0)
    weights = (matrix.T / item_degree[:, None]) @ (matrix / user_degree)
    weights /= item_degree[None, :] ** beta
    np.fill_diagonal(weights, 0.0)
    return weights


def edlae(gram: np.ndarray, lam: float, dropout: float) -> np.ndarray:
    """EDLAE's weights (zero diagonal): :meth:`EASEBaseline.closed_form` with the diagonal regulariser
    ``λ + p/(1 − p)·G_jj`` instead of λ, i.e. column j minimises ``‖X_j − X B_j‖² + Σ_i Λ_i B_ij²``
    with ``B_jj = 0``, Λ = λ + p/(1 − p)·diag(G). ``dropout`` p = 0 gives EASE."""
    emphasised = gram.astype(np.float64, copy=True)
    emphasised[np.diag_indices_from(emphasised)] += dropout / (1.0 - dropout) * np.diag(gram)
    return EASEBaseline.closed_form(emphasised, lam)


def rated_matrix(dataset, users: np.ndarray) -> np.ndarray:
    """Dense 0/1 matrix (len(users), n_items): 1 where the user rated the item at any rating."""
    return indicator_matrix(dataset.rated_by_user(), users, len(dataset.catalog))


def number_list(text: str) -> list[float]:
    """``--pop-penalty``: comma-separated finite numbers, each >= 0."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = [-1.0]
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers >= 0 separated by commas, got {text!r}")
    return values


def lambda_list(text: str) -> list[float]:
    """``--rated``: comma-separated ridge weights λ, each > 0 (:func:`number_list`, above 0)."""
    values = number_list(text)
    if min(values) <= 0.0:
        raise argparse.ArgumentTypeError(f"expected numbers > 0 separated by commas, got {text!r}")
    return values


def dropout_list(text: str) -> list[float]:
    """``--dlae``: comma-separated dropout probabilities, each in [0, 1) (:func:`number_list`, below 1)."""
    values = number_list(text)
    if max(values) >= 1.0:
        raise argparse.ArgumentTypeError(f"expected probabilities in [0, 1) separated by commas, got {text!r}")
    return values


def number_pairs(text: str) -> list[tuple[float, float]]:
    """``--later`` (ω:λ) and ``--rp3beta`` (β:c): comma-separated pairs of finite numbers, each > 0."""
    try:
        pairs = [tuple(float(v) for v in part.split(":")) for part in text.split(",")]
    except ValueError:
        pairs = [()]
    if any(len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair) for pair in pairs):
        raise argparse.ArgumentTypeError(f"expected pairs of numbers > 0 (a:b) separated by commas, got {text!r}")
    return pairs


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def rank_list(text: str) -> list[int]:
    """``--rank``: one rank or a comma-separated list, each a whole number >= 1."""
    try:
        ranks = [int(part) for part in text.split(",")]
    except ValueError:
        ranks = []
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1 separated by commas, got {text!r}")
    return ranks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--ease-lambda", type=float, default=500.0)
    parser.add_argument("--lam", type=float, default=10.0, help="ridge λ of the onboarding regression")
    parser.add_argument("--weight", type=float, default=1.0, help="weight a of the regression against EASE")
    parser.add_argument("--rank", type=rank_list, default=[32], help="rank of the factorisation, or a comma-separated list of ranks (each >= 1)")
    parser.add_argument("--data", default=None, help="a MovieLens directory (default: the shipped sample)")
    parser.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="the release's layout (default: detected)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rbf", default="", help="comma-separated bw:c pairs of nonlinear-kernel rows (e.g. 0.1:0.3,0.1:1)")
    parser.add_argument("--later", type=number_pairs, default=[], help="comma-separated ω:λ pairs of rows fitted with later episodes too (e.g. 0.3:10,1:30)")
    parser.add_argument("--later-stride", type=positive_int, default=2, help="positions between the starts of later episodes")
    parser.add_argument("--later-last", type=positive_int, default=200, help="the last start position of a later episode")
    parser.add_argument("--rp3beta", type=number_pairs, default=[], help="comma-separated β:c pairs of RP3beta rows, alone and added with weight c (e.g. 0.7:1,0.5:0.3)")
    parser.add_argument("--pop-penalty", type=number_list, default=[], help="comma-separated weights d of rows with d·log(1 + ratings) subtracted (e.g. 0.1,0.3)")
    parser.add_argument("--rated", type=lambda_list, default=[], help="comma-separated λ of EASE rows fitted on every rating of the fit users, not only their positives (e.g. 200,500,1000)")
    parser.add_argument("--dlae", type=dropout_list, default=[], help="comma-separated dropout probabilities p of EDLAE rows, alone and in place of EASE in the combined matrix (e.g. 0.5,0.9)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    ranks = args.rank
    dataset = load_sample() if args.data is None else read_movielens(args.data, args.format)
    train, _ = split_users(dataset, 0)
    positives = dataset.positives_by_user()
    n_items = len(dataset.catalog)
    popularity = item_rating_counts(dataset)
    folds = np.array_split(np.random.default_rng(args.seed).permutation(np.sort(train)), args.folds)
    results: dict[tuple[str, int, str], list[tuple[float, float]]] = {}
    capped: set[int] = set()  # ranks above a fold's number of kept items (they keep every factor)

    for f, held_out in enumerate(folds):
        fit_users = np.concatenate([fold for j, fold in enumerate(folds) if j != f])
        matrix = positive_matrix(dataset, fit_users)
        kept = np.flatnonzero(matrix.sum(0) > 0)
        position = np.full(n_items, -1, dtype=np.int64)
        position[kept] = np.arange(len(kept))
        gram = matrix[:, kept].T @ matrix[:, kept]
        ease = EASEBaseline.closed_form(gram, args.ease_lambda)
        fit_positives = [positives[int(u)] for u in fit_users if int(u) in positives]
        x, y = onboarding.episodes(fit_positives, position)
        w, mean = onboarding.ridge(x, y, args.lam)
        combined, bias = onboarding.combine(ease, w, mean, x, args.weight)
        # a rank-r prefix of it is the rank-r SVD; a rank above the kept items' count keeps all of them
        u, sigma, vt = randomized_svd(combined, n_components=min(max(ranks), min(combined.shape)), random_state=0)
        knn = ItemKNNBaseline().fit(dataset, fit_users)
        graphs = {beta: rp3beta(matrix[:, kept], beta) for beta in sorted({beta for beta, _ in args.rp3beta})}
        log_count = np.log1p(matrix[:, kept].sum(0))
        if args.rbf:
            _, singular, item_vt = randomized_svd(matrix[:, kept], n_components=64, random_state=0)
            factors = item_vt.T * singular**0.5
            factors /= np.linalg.norm(factors, axis=1, keepdims=True) + 1e-9
            x_unit = unit_embedding(x, factors)  # the training episodes', once per fold
        del matrix
        history, item = u * sigma, vt.T
        sigma_b = max(float((x @ ease).std()), 1e-9)

        def scorer(rows_of, exponent, with_bias=True, bias_of=None):
            def score(support: np.ndarray) -> np.ndarray:
                rows = position[support]
                rows = rows[rows >= 0]
                scores = np.full(n_items, -1e9)
                kept_scores = ((bias if bias_of is None else bias_of) if with_bias else 0.0) + (rows_of(rows).sum(0) / len(rows) ** exponent if len(rows) else 0.0)
                scores[kept] = kept_scores
                return scores

            return score

        def kernel_scorer(bandwidth: float, weight: float):
            gram = episode_kernel(x, x_unit, x, x_unit, bandwidth, weight)
            alpha, mean = onboarding.dual_ridge(gram, y, args.lam)
            sigma_k = max(float((gram @ alpha).std()), 1e-9)  # the σ_W of onboarding.combine
            del gram

            def score(support: np.ndarray) -> np.ndarray:
                rows = position[support]
                rows = rows[rows >= 0]
                scores = np.full(n_items, -1e9)
                row = np.zeros((1, len(kept)), np.float32)
                if len(rows):
                    row[0, rows] = 1.0 / len(rows)
                predicted = mean + episode_kernel(row, unit_embedding(row, factors), x, x_unit, bandwidth, weight)[0] @ alpha
                scores[kept] = row[0] @ ease / sigma_b + args.weight * predicted / sigma_k
                return scores

            return score

        models = {
            f"EASE (λ={args.ease_lambda:g})": scorer(lambda rows: ease[rows], 1.0, with_bias=False),
            "ItemKNN": lambda support: knn.score(support, len(support)),
            "onboarding, exact, γ=1": scorer(lambda rows: combined[rows], 1.0),
            "onboarding, exact, γ=0.5": scorer(lambda rows: combined[rows], 0.5),
        }
        capped.update(rank for rank in ranks if rank > len(sigma))
        for rank in ranks:
            for exponent in (1.0, 0.5):
                models[f"onboarding, rank {rank}, γ={exponent:g}"] = scorer(lambda rows, r=rank: history[rows, :r] @ item[:, :r].T, exponent)
        for pair in filter(None, args.rbf.split(",")):
            bandwidth, weight = (float(v) for v in pair.split(":"))
            models[f"kernel ridge, linear + {weight:g}·RBF(bw={bandwidth:g}), γ=1"] = kernel_scorer(bandwidth, weight)
        if args.rbf:
            models["kernel ridge, linear only (= exact, γ=1)"] = kernel_scorer(1.0, 0.0)
        if args.later:
            later_x, later_y = later_episodes(fit_positives, position, args.later_stride, args.later_last)
            for weight, lam in args.later:
                later_w, later_mean = later_ridge(x, y, later_x, later_y, weight, lam)
                later_combined, later_bias = onboarding.combine(ease, later_w, later_mean, x, args.weight)
                for exponent in (1.0, 0.5):
                    models[f"onboarding + later episodes (ω={weight:g}, λ={lam:g}), γ={exponent:g}"] = scorer(lambda rows, m=later_combined: m[rows], exponent, bias_of=later_bias)
        if args.rp3beta or args.pop_penalty:
            spread = max(float((x @ combined + bias).std()), 1e-9)  # the blends' scale: scores over the fit episodes
            for beta, graph in graphs.items():
                models[f"RP3beta (β={beta:g}), γ=1"] = scorer(lambda rows, g=graph: g[rows], 1.0, with_bias=False)
            for beta, weight in args.rp3beta:
                graph_spread = max(float((x @ graphs[beta]).std()), 1e-9)
                blended = combined / spread + weight * graphs[beta] / graph_spread
                models[f"onboarding + {weight:g}·RP3beta (β={beta:g}), γ=0.5"] = scorer(lambda rows, m=blended: m[rows], 0.5, bias_of=bias / spread)
            for penalty in args.pop_penalty:
                models[f"onboarding − {penalty:g}·log(1 + ratings), γ=0.5"] = scorer(lambda rows: combined[rows] / spread, 0.5, bias_of=bias / spread - penalty * log_count)
        for dropout in args.dlae:
            denoising = edlae(gram, args.ease_lambda, dropout)
            models[f"EDLAE (p={dropout:g}), γ=1"] = scorer(lambda rows, m=denoising: m[rows], 1.0, with_bias=False)
            denoising_combined, denoising_bias = onboarding.combine(denoising, w, mean, x, args.weight)
            models[f"onboarding with EDLAE (p={dropout:g}), γ=0.5"] = scorer(lambda rows, m=denoising_combined: m[rows], 0.5, bias_of=denoising_bias)
        if args.rated:
            rated = rated_matrix(dataset, fit_users)[:, kept]
            rated_gram = rated.T @ rated
            del rated
            for lam in args.rated:
                exposure = EASEBaseline.closed_form(rated_gram, lam)
                models[f"EASE on every rating (λ={lam:g}), γ=1"] = scorer(lambda rows, m=exposure: m[rows], 1.0, with_bias=False)
                exposure_combined, exposure_bias = onboarding.combine(exposure, w, mean, x, args.weight)
                models[f"onboarding with EASE on every rating (λ={lam:g}), γ=0.5"] = scorer(lambda rows, m=exposure_combined: m[rows], 0.5, bias_of=exposure_bias)
            del rated_gram
        del gram
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
    print(f"onboarding init, {args.folds}-fold CV over {len(train)} train users of {dataset.name} ({dataset.format}; {users} with >= 6 positives), "
          f"λ={args.lam:g}, a={args.weight:g}; HR@10 / nDCG@10; {time.perf_counter() - started:.0f} s\n")
    print("| model | " + " | ".join(f"{m} K={k}" for m in MODES for k in KS) + " | nDCG@10, mean | full nDCG@10, mean over K |")
    print("|---|" + "---|" * (len(MODES) * len(KS) + 2))
    for name in models:
        cells = [np.mean(results[(name, k, m)], axis=0) for m in MODES for k in KS]
        ndcg = [nd for _, nd in cells]
        print(f"| {name} | " + " | ".join(f"{hr:.3f} / {nd:.3f}" for hr, nd in cells) + f" | {np.mean(ndcg):.4f} | {np.mean(ndcg[-len(KS):]):.4f} |")
    if capped:
        print(f"\nRank {', '.join(map(str, sorted(capped)))} is above the number of items with train positives in a fold; there it keeps all of them (the exact rows).")


if __name__ == "__main__":
    main()

"""Serving variants of the anchors' item bias, and collaborative-side inner steps on top of it, scored on validation users taken from the train users (never the test users).

    python benchmarks/anchor_bias_variants.py [--preset small] [--data DIR] [--format auto] [--seed 0] [--fold 0] [--anchors 4,8,16,32,64] [--threads 1] [--out variants.md]

It does what a build does before it chooses γ (:func:`pmeta.bank.build.collaborative_init`): the
onboarding model and the time prior are chosen on EASE's split of the train users, the fit users are
clustered into anchors, and each validation user retrieves anchors from its first K positives (K = 1,
3, 5). Then, instead of the γ grid alone, it scores these variants of the offset added to the base
scores, by nDCG@10 per K and candidate mode (the build's criterion is the mean over all of them):

* ``gamma``: the shipped form, γ · fused offset of the top ``config.top_k`` anchors at τ = ``config.temperature``;
* ``shrink``: γ · K / (K + κ) · the same offset (less weight for short histories);
* ``top_k`` and ``tau``: other retrieval breadths and fusion temperatures;
* ``gamma rho``: γ · the same offset (γ = 0, 1, 1.5, 2) plus ρ · each anchor's *onboarding intercept* (:func:`intercepts`):
  the share of the anchor's users whose positives 6..15 (the onboarding regression's targets, the
  protocol's query window) include an item, minus that share over all fit users, in the units the
  regression's intercept ȳ has in the base scores (a/σ_W over the scores' scale), fused like the
  log ratio; ρ = 1 replaces the global intercept with the retrieved anchors';
* ``bayes``: no key retrieval; every anchor weighted by its posterior given the support under a
  mixture of multinomials (prior = its share of users, likelihood = Π over the support of its
  smoothed item shares), the offset being the log-ratio of the mixture's predictive distribution;
* ``local``: a *time-local* anchor bias: each anchor's log ratio computed from its users' positives
  weighted by a Gaussian kernel of bandwidth h_a around the user's time t (the K-th support
  positive's, as the time prior), against the same over all fit users
  (:func:`time_local_ratio`), fused like the shipped one; alone (γ_t) and beside the shipped
  offset (γ = 1, 1.5 plus γ_t). It asks whether *what this cluster liked at this time* carries what
  neither the all-time cluster shares nor the global time prior do;
* ``mix``, ``pseudo`` and ``clip``: other smoothings of the shipped log ratio, which may lift niche
  items on a handful of a cluster's ratings (:func:`smoothed_ratio`): a larger share ν of the
  global distribution mixed in; a Dirichlet prior of ``m`` pseudo-ratings drawn from the global
  distribution, so that an anchor's estimate is shrunk the more, the fewer ratings stand behind it;
  the shipped ratio clipped to ±c. They ask whether the bias's full-ranking cost comes from noisy
  lifts of rare items;
* ``cooc``: a *cluster-local co-occurrence* offset (the "global + local" item-item idea of
  GLSLIM, Christakopoulou & Karypis 2016): per anchor, what its users who share the support's items
  liked, ``c_a(j) = Σ_{u ∈ a} |S ∩ P_u| · 1[j ∈ P_u]``, against the same over every fit user, as a
  smoothed log ratio (:func:`cooccurrence_ratio`), fused like the shipped one; alone (γ_l) and
  beside the shipped offset (γ = 1.5 plus γ_l). Unlike the shipped bias it depends on *which*
  items the user liked, even at K = 1, so it is a signal of co-occurrence within a cluster rather
  than popularity within it;
* ``loo gamma``: a *per-user* γ, chosen from the γ grid by the user's own support: each support
  item is scored from the others (base scores plus γ times the offset their key retrieves, the
  others excluded, softmax over the catalogue), and the γ with the highest leave-one-out
  log-likelihood is the user's (:func:`loo_log_likelihood`), optionally shrunk half-way towards the
  shipped γ; a K = 1 support has nothing to leave out and keeps the shipped γ. It asks whether the
  support tells *which* users the cluster statistics fit: the one kind of personalization of the
  bias that needs no training;
* ``cf step``: on top of the shipped offset at the best γ of the grid, inner steps on a personal
  collaborative-side vector — the user's vector in the head's rank-``config.cf_rank`` collaborative
  space (``c`` of :mod:`pmeta.tasks.ranking`) — by gradient descent on the inner loop's support loss
  (softmax cross-entropy of the support items against the catalogue, the support excluded from the
  normaliser): ``s ← s + α (y − p) V Vᵀ``, with ``y`` the support's indicator over K, ``p`` the
  softmax of the current scores and ``V`` the matrix's item factors. It is the collaborative
  counterpart of the adapter's inner steps, with the step size α as the only (grid-chosen) parameter;
* ``cf step learned``: one such step with a learned preconditioner, ``s ← s + (y − p) V W Vᵀ``, W
  diagonal (Meta-SGD: one step size per dimension) or full r × r (Meta-Curvature), fitted (L-BFGS,
  ridge λ) to the query's softmax cross-entropy on half the validation users and scored on the
  other half, both ways (2-fold cross-fitting by user, seeded): a meta-learned step that could do
  what no single α does.

``--anchors 4,8,16,32,64`` scores only the γ grid, once per anchor count (the fit users clustered
into that many anchors, everything else as above), and prints the best γ of each count: the
validation read of the number of anchors (:func:`anchor_count_rows`).

``--fold F`` (0–4) makes the F-th fifth of EASE's seeded permutation of the train users the
validation users (fold 0 is the build's own split; EASE's λ is still tuned on fold 0's split), so a
variant chosen on fold 0 can be checked on users it was not chosen on.

It prints a markdown table (and writes it to ``--out``); it is the check behind docs/movielens.md's
"tried on validation users, not adopted" note.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy import sparse

from pmeta import load_config
from pmeta.bank import build, onboarding
from pmeta.config import BankConfig
from pmeta.data import load_sample, read_movielens
from pmeta.errors import InvalidConfig
from pmeta.eval.baselines import validation_split
from pmeta.eval.protocol import MODES, QUERY_START, QUERY_STOP, draw_candidates, mean_ndcg
from pmeta.fusion import anchor_bias
from pmeta.models.encoder import FunctionalEncoder
from pmeta.progress import Progress
from pmeta.tasks import ranking, time_prior

KS = (1, 3, 5)


def bayes_offsets(supports: list[np.ndarray], positives: list[np.ndarray], assignment: np.ndarray, anchors: int, n_items: int, mix: float) -> np.ndarray:
    """(U, N) log-ratio of the mixture's predictive distribution to the global one, per support."""
    shares, overall = anchor_bias.shares(positives, assignment, anchors, n_items)
    smoothed = (1.0 - mix) * shares + mix * overall + anchor_bias.EPSILON
    log_prior = np.log(np.bincount(assignment, minlength=anchors) / len(assignment) + 1e-12)
    out = []
    for support in supports:
        log_post = log_prior + np.log(smoothed[:, support]).sum(1)
        weights = np.exp(log_post - log_post.max())
        out.append(np.log(weights @ smoothed / weights.sum()) - np.log(overall + anchor_bias.EPSILON))
    return np.asarray(out)


def time_local_ratio(items: np.ndarray, times: np.ndarray, anchor_of: np.ndarray, anchors: int, n_items: int, t: float, bandwidth_days: float) -> np.ndarray:
    """(A_n, N) :func:`pmeta.fusion.anchor_bias.log_ratio` at time ``t``: positive events (``items``,
    ``times`` in seconds, ``anchor_of`` the anchor of each event's user) count with weight
    ``exp(−(t − τ)² / 2h²)``; an infinite bandwidth gives the shipped all-time ratio."""
    weights = np.ones(len(times)) if np.isinf(bandwidth_days) else np.exp(-0.5 * ((np.asarray(times, dtype=np.float64) - t) / (bandwidth_days * time_prior.DAY)) ** 2)
    counts = np.bincount(np.asarray(anchor_of, dtype=np.int64) * n_items + items, weights=weights, minlength=anchors * n_items).reshape(anchors, n_items)
    return anchor_bias.ratio_of_shares(*anchor_bias.shares_of_counts(counts))


def smoothed_ratio(positives: list[np.ndarray], assignment: np.ndarray, anchors: int, n_items: int, mix: float = anchor_bias.MIX, pseudo: float = 0.0, clip: float = float("inf")) -> np.ndarray:
    """(A_n, N) the anchors' log ratio with another smoothing: ``log(q_a + ε) − log(p + ε)``,
    ``q_a = (1 − ν) (c_a + m p) / (n_a + m) + ν p`` (``c_a`` the anchor's counts, ``n_a`` their sum,
    ``m`` = ``pseudo``), clipped to ±``clip``. ν = :data:`~pmeta.fusion.anchor_bias.MIX`, m = 0 and
    no clip give the shipped :func:`~pmeta.fusion.anchor_bias.log_ratio`."""
    per_anchor, overall = anchor_bias.shares(positives, assignment, anchors, n_items)
    totals = np.bincount(assignment, weights=[len(np.unique(items)) for items in positives], minlength=anchors)[:, None]  # n_a
    kept = totals / np.maximum(totals + pseudo, 1e-300)  # (c_a + m p) / (n_a + m) = kept · p_a + (1 − kept) · p
    shrunk = kept * per_anchor + (1.0 - kept) * overall
    ratio = np.log((1.0 - mix) * shrunk + mix * overall + anchor_bias.EPSILON) - np.log(overall + anchor_bias.EPSILON)
    return np.clip(ratio, -clip, clip)


def cooccurrence_ratio(support: np.ndarray, liked, assignment: np.ndarray, anchors: int, pseudo: float, mix: float = anchor_bias.MIX) -> np.ndarray:
    """(A_n, N) each anchor's log ratio of the support's co-occurrences: ``c_a(j) = Σ_{u ∈ a} |S ∩
    P_u| · 1[j ∈ P_u]`` (``liked``: the fit users' (U, N) 0/1 matrix, scipy sparse or dense; ``S`` the
    support), ``g`` the same over every user as a share, ``q_a = (1 − ν) (c_a + m g) / (n_a + m) +
    ν g`` (``n_a = Σ_j c_a(j)``, ``m`` = ``pseudo``), ``log(q_a + ε) − log(g + ε)``. An anchor none of
    whose users share a support item gets 0."""
    support = np.unique(np.asarray(support, dtype=np.int64))
    overlap = np.asarray(liked[:, support].sum(1), dtype=np.float64).ravel()  # (U,) |S ∩ P_u|
    members = np.zeros((anchors, len(overlap)))
    members[np.asarray(assignment, dtype=np.int64), np.arange(len(overlap))] = overlap
    counts = np.asarray(liked.T.dot(members.T)).T  # (A_n, N): Σ_{u∈a} overlap_u · liked[u]
    total = counts.sum()
    if total <= 0:
        return np.zeros_like(counts)
    overall = counts.sum(0) / total
    n = counts.sum(1, keepdims=True)
    local = (counts + pseudo * overall) / np.maximum(n + pseudo, 1e-300)
    local[n[:, 0] == 0] = overall
    return np.log((1.0 - mix) * local + mix * overall + anchor_bias.EPSILON) - np.log(overall + anchor_bias.EPSILON)


def intercepts(positives: list[np.ndarray], assignment: np.ndarray, anchors: int, n_items: int) -> np.ndarray:
    """(A_n, N) ``ȳ_a − ȳ``: per anchor, the share of its users whose positives 6..15 include each
    item, minus that share over every user. Users with at most 5 positives count nowhere; an anchor
    without such users gets 0."""
    counts, users = np.zeros((anchors, n_items)), np.zeros(anchors)
    for items, anchor in zip(positives, assignment):
        if len(items) <= QUERY_START:
            continue
        np.add.at(counts[int(anchor)], np.unique(np.asarray(items[QUERY_START:QUERY_STOP], dtype=np.int64)), 1.0)
        users[int(anchor)] += 1
    overall = counts.sum(0) / max(users.sum(), 1.0)
    return np.where(users[:, None] > 0, counts / np.maximum(users, 1.0)[:, None] - overall, 0.0)


def intercept_unit(base: build.OnboardingScores, fit_positives: list[np.ndarray]) -> float:
    """The base scores' units of the onboarding regression's intercept ȳ (the mean target row of its
    episodes): its bias is ``a/σ_W · ȳ``, read back by least squares, over the scores' scale."""
    _, targets = onboarding.episodes(fit_positives, base.position)
    mean = targets.mean(0)
    return float(base.bias @ mean / max(float(mean @ mean), 1e-12)) / base.scale


def loo_log_likelihood(support: np.ndarray, t: float, scores, offset_of, gammas) -> np.ndarray:
    """(len(gammas),) the support's leave-one-out log-likelihood at each γ: item ``support[j]``
    scored by a softmax over the catalogue of ``scores(rest, t) + γ · offset_of(rest)``, ``rest`` the
    other support items (excluded from the softmax), summed over j. Empty for a support of one."""
    support = np.asarray(support, dtype=np.int64)
    totals = np.zeros(len(gammas))
    if len(support) < 2:
        return totals
    for j in range(len(support)):
        rest = np.delete(support, j)
        base, offset = scores(rest, t), offset_of(rest)
        for g, gamma in enumerate(gammas):
            logits = base + gamma * offset
            logits[rest] = -np.inf
            top = logits.max()
            totals[g] += logits[support[j]] - top - np.log(np.exp(logits - top).sum())
    return totals


def support_direction(scores: np.ndarray, supports: list, item_factors: np.ndarray) -> np.ndarray:
    """(U, r) minus the support loss's gradient on each user's collaborative vector ``c`` (scores
    ``s = c Vᵀ + …``, (U, N)): ``(y − p) V``, ``y`` the support's indicator over K, ``p`` the softmax
    of the scores with the support excluded from the normaliser."""
    target = np.zeros_like(scores)
    logits = scores.copy()
    for i, support in enumerate(supports):
        target[i, support] = 1.0 / len(support)
        logits[i, support] = -np.inf
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return (target - p) @ item_factors


def collaborative_steps(scores: np.ndarray, support: np.ndarray, item_factors: np.ndarray, alpha: float, steps: int) -> np.ndarray:
    """``steps`` gradient steps of size α on the user's collaborative vector, as item scores:
    ``s ← s + α (y − p) V Vᵀ`` (the support loss's gradient through ``s = c Vᵀ``)."""
    for _ in range(steps):
        scores = scores + alpha * (support_direction(scores[None, :], [support], item_factors)[0] @ item_factors.T)
    return scores


def learned_step(scores: np.ndarray, supports: list, queries: list, users: np.ndarray, item_factors: np.ndarray, diagonal: bool, ridge: float, seed: int = 0) -> np.ndarray:
    """Scores after one step ``s + (y − p) V W Vᵀ`` with W fitted on the other fold's users (2 folds by user)."""
    s = torch.from_numpy(scores)
    factors = torch.from_numpy(item_factors)
    excluded, query = torch.zeros_like(s, dtype=torch.bool), torch.zeros_like(s)
    for i, (support, positives) in enumerate(zip(supports, queries)):
        excluded[i, support] = True
        query[i, positives] = 1.0 / len(positives)
    direction = torch.from_numpy(support_direction(scores, supports, item_factors))  # (U, r)

    def stepped(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return s[rows] + (direction[rows] @ (torch.diag(w) if diagonal else w)) @ factors.T

    order = np.random.default_rng(seed).permutation(np.unique(users))
    out = scores.copy()
    for held in (set(order[: len(order) // 2]), set(order[len(order) // 2 :])):
        fit = torch.tensor([i for i, u in enumerate(users) if u not in held])
        scored = torch.tensor([i for i, u in enumerate(users) if u in held])
        r = factors.shape[1]
        w = torch.zeros(r if diagonal else (r, r), dtype=s.dtype, requires_grad=True)
        optimizer = torch.optim.LBFGS([w], max_iter=100, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            log_p = torch.log_softmax(stepped(w, fit).masked_fill(excluded[fit], float("-inf")), -1)
            loss = -(log_p.masked_fill(query[fit] == 0, 0.0) * query[fit]).sum(-1).mean() + ridge * (w**2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        out[scored.numpy()] = stepped(w.detach(), scored).numpy()
    return out


def anchor_count_rows(counts, inputs_for, queries: np.ndarray, score, top_k: int, tau: float, weights=anchor_bias.WEIGHTS) -> list[tuple[str, dict]]:
    """One row per anchor count: the γ of ``weights`` with the best mean (ties to the smaller γ, as
    the build chooses) for offsets retrieved from ``inputs_for(count)``'s anchors, named
    ``anchors=N gamma=G`` (N the anchors k-means made: a count above the fit users' is capped, so two
    such counts get the same name). ``score(offsets, weight)`` is main's scorer."""
    out = []
    for count in counts:
        inputs = inputs_for(count)
        offsets = anchor_bias.offsets(queries, inputs.centroids, inputs.ratio, inputs.sizes, top_k, tau)
        grid = [(gamma, score(offsets, lambda k, g=gamma: g)) for gamma in weights]
        gamma, best = max(grid, key=lambda row: (row[1]["mean"], -row[0]))
        out.append((f"anchors={len(inputs.centroids)} gamma={gamma:g}", best))
    return out


def counts_list(text: str) -> tuple[int, ...]:
    """``--anchors``: comma-separated positive anchor counts."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of anchor counts: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"anchor counts must be at least 1: {text!r}")
    return counts


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, BankConfig]:
    """(the arguments, the preset's config with ``--seed`` as its seed: the build whose user split and
    EASE split are scored); exits with a one-line error on a bad preset."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--data", type=Path, help="a MovieLens directory (default: the shipped sample)")
    parser.add_argument("--format", default="auto", help="the MovieLens layout of --data (auto, ml-latest, ml-100k, ml-1m)")
    parser.add_argument("--seed", type=int, default=0, help="the build seed: its test users are left out, its train users split as that build splits them")
    parser.add_argument("--fold", type=int, default=0, choices=range(5), help="which fifth of the train users validates (0: the build's split)")
    parser.add_argument("--anchors", type=counts_list, help="score only the γ grid for each of these anchor counts (e.g. 4,8,16,32,64)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.preset, overrides={"seed": args.seed})
    except InvalidConfig as error:
        parser.error(str(error))
    return args, config


def main() -> None:
    args, config = parse()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    dataset = read_movielens(args.data, args.format) if args.data else load_sample()
    positives, rated = dataset.positives_by_user(), dataset.rated_by_user()
    train_users, _, _ = build.user_split(dataset, config)
    train_users = build.with_positives(train_users, positives, config.min_positives)
    item_text = build.catalog_embeddings(FunctionalEncoder(config.encoder), dataset.catalog.texts(), Progress(False)).cpu()

    ease = build.init_ease(dataset, config, train_users)
    if args.fold:  # after EASE's own λ tuning, which stays on fold 0
        ease.validation_split = lambda users: validation_split(users, ease.validation_fraction, ease.validation_seed, args.fold)
    split = build.fit_onboarding(dataset, config, ease, train_users, positives, rated)
    cases, base = split.validation_scorer(dataset, positives)
    if base is None:
        raise SystemExit("no validation user of EASE's split has 6 positives: nothing to score")
    h, beta, pseudo = (365.0, 0.0, 0.0) if config.time_prior_weight == 0.0 else build.choose_time_prior(dataset, config, split.fit_users, cases, base)[:3]
    fit_positives = [positives[int(u)] for u in split.fit_users]
    inputs = build.anchor_bias_inputs(dataset, config, split.fit_users, base, h, beta, fit_positives, item_text, pseudo)

    rows = list(time_prior.supports(cases, KS))
    queries = np.stack([inputs.key(support) for _, support, _, _ in rows])
    bases = [inputs.scores(support, t) for _, support, t, _ in rows]
    candidates = draw_candidates([case for case, _ in cases], MODES, inputs.popularity)

    by_k = {k: [i for i, row in enumerate(rows) if len(row[1]) == k] for k in KS}

    def score(offsets: np.ndarray, weight) -> dict:
        """nDCG@10 per (K, mode) and the mean over them, with offset ``weight(K) * offsets``."""
        cells = {}
        for k in KS:
            cells[k] = mean_ndcg(((rows[i][0], bases[i] + weight(k) * offsets[i], rows[i][3]) for i in by_k[k]), candidates, MODES)
        return {"mean": float(np.mean([cells[k]["mean"] for k in KS])), "cells": cells}

    def retrieved(per_anchor: np.ndarray, top_k: int = config.top_k, tau: float = config.temperature) -> np.ndarray:
        return anchor_bias.offsets(queries, inputs.centroids, per_anchor, inputs.sizes, top_k, tau)

    if args.anchors:
        def inputs_for(count: int) -> build.AnchorBiasInputs:
            return build.anchor_bias_inputs(dataset, config.model_copy(update={"anchors": count}), split.fit_users, base, h, beta, fit_positives, item_text, pseudo)

        report(args, config, dataset, cases, h, beta, started, anchor_count_rows(args.anchors, inputs_for, queries, score, config.top_k, config.temperature), "the anchor count")
        return

    shipped = retrieved(inputs.ratio)
    results = [(f"gamma={g:g}", score(shipped, lambda k, g=g: g)) for g in anchor_bias.WEIGHTS]
    unit = intercept_unit(base, fit_positives)
    fused_intercept = unit * retrieved(intercepts(fit_positives, inputs.assignment, len(inputs.centroids), len(dataset.catalog)))
    results += [(f"gamma={g:g} rho={r:g}", score(g * shipped + r * fused_intercept, lambda k: 1.0)) for g in (0.0, 1.0, 1.5, 2.0) for r in (0.25, 0.5, 1.0)]
    results += [(f"shrink gamma={g:g} kappa={c:g}", score(shipped, lambda k, g=g, c=c: g * k / (k + c))) for c in (1.0, 2.0, 4.0) for g in (1.5, 2.0, 3.0)]
    for top_k in sorted({1, 8, 16} - {config.top_k}):
        offsets = retrieved(inputs.ratio, top_k)
        results += [(f"top_k={top_k} gamma={g:g}", score(offsets, lambda k, g=g: g)) for g in (1.0, 1.5, 2.0)]
    for tau in (0.02, 0.1, 0.2):
        offsets = retrieved(inputs.ratio, tau=tau)
        results += [(f"tau={tau:g} gamma={g:g}", score(offsets, lambda k, g=g: g)) for g in (1.0, 1.5, 2.0)]
    for mix in (anchor_bias.MIX, 0.3):
        offsets = bayes_offsets([support for _, support, _, _ in rows], fit_positives, inputs.assignment, len(inputs.centroids), len(dataset.catalog), mix)
        results += [(f"bayes mix={mix:g} gamma={g:g}", score(offsets, lambda k, g=g: g)) for g in (0.5, 1.0, 1.5, 2.0)]

    n_anchors, n_items = len(inputs.centroids), len(dataset.catalog)
    smoothings = [(f"mix={m:g}", {"mix": m}) for m in (0.3, 0.5)] + [(f"pseudo m={m:g}", {"pseudo": m}) for m in (300.0, 1000.0, 3000.0)] + [(f"clip c={c:g}", {"clip": c}) for c in (1.0, 2.0)]
    for name, options in smoothings:
        offsets = retrieved(smoothed_ratio(fit_positives, inputs.assignment, n_anchors, n_items, **options))
        results += [(f"{name} gamma={g:g}", score(offsets, lambda k, g=g: g)) for g in (1.0, 1.5, 2.0, 3.0)]

    positive_times = dataset.positive_times_by_user()
    event_items, event_times, event_anchor = [], [], []
    for user, anchor in zip(split.fit_users, inputs.assignment):
        items, first = np.unique(positives[int(user)], return_index=True)  # a repeated item counts once, at its first time
        event_items.append(items)
        event_times.append(positive_times[int(user)][first])
        event_anchor.append(np.full(len(items), int(anchor)))
    event_items, event_times, event_anchor = (np.concatenate(x) for x in (event_items, event_times, event_anchor))
    for days in (365.0, 1095.0, 3650.0):
        local = np.stack([
            anchor_bias.offsets(queries[i : i + 1], inputs.centroids, time_local_ratio(event_items, event_times, event_anchor, len(inputs.centroids), len(dataset.catalog), rows[i][2], days), inputs.sizes, config.top_k, config.temperature)[0]
            for i in range(len(rows))
        ])
        results += [(f"local h={days:g} gamma_t={g:g}", score(local, lambda k, g=g: g)) for g in (0.5, 1.0, 1.5, 2.0)]
        results += [(f"local h={days:g} gamma={g:g} gamma_t={gt:g}", score(g * shipped + gt * local, lambda k: 1.0)) for g in (1.0, 1.5) for gt in (0.5, 1.0)]

    liked = sparse.csr_matrix((np.ones(len(event_items)), (np.repeat(np.arange(len(fit_positives)), [len(np.unique(p)) for p in fit_positives]), event_items)), shape=(len(fit_positives), n_items))
    for pseudo in (300.0, 3000.0):
        cooc = np.stack([
            anchor_bias.offsets(queries[i : i + 1], inputs.centroids, cooccurrence_ratio(rows[i][1], liked, inputs.assignment, n_anchors, pseudo), inputs.sizes, config.top_k, config.temperature)[0]
            for i in range(len(rows))
        ])
        results += [(f"cooc m={pseudo:g} gamma_l={g:g}", score(cooc, lambda k, g=g: g)) for g in (0.5, 1.0, 1.5, 2.0)]
        results += [(f"cooc m={pseudo:g} gamma=1.5 gamma_l={gl:g}", score(1.5 * shipped + gl * cooc, lambda k: 1.0)) for gl in (0.5, 1.0)]

    best = max((r for r in results if r[0].startswith("gamma=") and " rho=" not in r[0]), key=lambda r: r[1]["mean"])[0]
    gamma = float(best.split("=")[1])
    gammas = np.asarray(anchor_bias.WEIGHTS, dtype=np.float64)

    def offset_of(support: np.ndarray) -> np.ndarray:  # what the serving path retrieves for this support
        return anchor_bias.offsets(inputs.key(support)[None], inputs.centroids, inputs.ratio, inputs.sizes, config.top_k, config.temperature)[0]

    chosen = np.array([gammas[int(np.argmax(loo_log_likelihood(row[1], row[2], inputs.scores, offset_of, gammas)))] if len(row[1]) > 1 else gamma for row in rows])
    for share in (1.0, 0.5):
        per_user = share * chosen + (1.0 - share) * gamma
        results.append((f"{best} loo gamma share={share:g}", score(per_user[:, None] * shipped, lambda k: 1.0)))
    _, _, vt = ranking.svd(base.matrix, config.cf_rank)
    factors = np.zeros((len(dataset.catalog), vt.shape[0]))
    factors[base.kept] = vt.T
    base_scores = np.stack(bases)
    shipped_scores = base_scores + gamma * shipped
    for steps in (1, 3):
        for alpha in (0.5, 2.0, 8.0):
            stepped = np.stack([collaborative_steps(shipped_scores[i], rows[i][1], factors, alpha, steps) for i in range(len(rows))])
            results.append((f"{best} cf step steps={steps} alpha={alpha:g}", score(stepped - base_scores, lambda k: 1.0)))
    users = np.array([row[0] for row in rows])
    for diagonal in (True, False):
        for ridge in (1e-3, 1e-2):
            stepped = learned_step(shipped_scores, [row[1] for row in rows], [row[3] for row in rows], users, factors, diagonal, ridge, config.seed)
            results.append((f"{best} cf step learned W={'diagonal' if diagonal else 'full'} ridge={ridge:g}", score(stepped - base_scores, lambda k: 1.0)))

    report(args, config, dataset, cases, h, beta, started, results, "serving variants")


def report(args: argparse.Namespace, config: BankConfig, dataset, cases: list, h: float, beta, started: float, results: list[tuple[str, dict]], what: str) -> None:
    """Print the markdown table of ``results`` (and write it to ``--out``)."""
    head = [
        f"Anchors' item bias, {what} on {len(cases)} validation users of EASE's split of the train users (fold {args.fold}) "
        f"({dataset.name}, preset {args.preset}: {'the anchors of each row' if args.anchors else f'{config.anchors} anchors'}, top {config.top_k}, τ = {config.temperature:g}; "
        f"time prior h = {h:g} days, β = {beta:g}); nDCG@10; {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), {time.perf_counter() - started:.0f} s.",
        "",
        "| variant | mean | " + " | ".join(f"{mode} K={k}" for k in KS for mode in MODES) + " |",
        "|---|---|" + "---|" * (len(KS) * len(MODES)),
    ]
    lines = [f"| {name} | {r['mean']:.4f} | " + " | ".join(f"{r['cells'][k][mode]:.4f}" for k in KS for mode in MODES) + " |" for name, r in results]
    text = "\n".join(head + lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

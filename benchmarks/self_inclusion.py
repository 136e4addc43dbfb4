"""How much a train user's own ratings inflate the fixed score terms that meta-training scores them with.

    python benchmarks/self_inclusion.py --bank BANK [--data DIR] [--users 40] [--seed 0] [--folds 5] [--threads 1]

The time prior (``head/time_*``) and the anchors' item bias (``anchor_bias``) are built from
every train user's ratings, and meta-training adds them to the scores of those same train users'
episodes: a train user's query items are then partly predicted by that user's own ratings, which a
held-out user's prior and bias never contain. This script recomputes both tensors from the bank's
train users (and checks the recomputation equals the stored tensors), then compares, on each train
user's query window (positives 6..15, as the protocol asks a test user at K = 5):

* the time prior term β·log p_i(t) in-sample (as meta-training sees it) against leave-self-out (the
  prior rebuilt without the user's ratings), on ``--users`` sampled train users with at least 6
  positives, and the prior alone as a full-ranking ranker of those items both ways;
* the anchor item bias γ·ratio[a, i] of the user's own anchor in-sample against leave-self-out (the
  user's positives removed from the anchor's counts), on every train user with a query window.

Beside both, the cross-fitted value (``crossfit_folds = --folds``, :mod:`pmeta.bank.crossfit`): what
meta-training scores the user with when the build cross-fits, counted without the user's fold.

It reads the bank and the data only; it changes nothing. A finding of the stop-21 review.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pmeta.bank import crossfit
from pmeta.bank.bank import BUILD_FILE, TENSORS_FILE
from pmeta.data import load_sample
from pmeta.data.movielens import read_movielens
from pmeta.eval.protocol import metrics_from_ranks, rank_positives
from pmeta.fusion import anchor_bias
from pmeta.storage import BankStore
from pmeta.tasks import time_prior

QUERY = slice(5, 15)  # positives 6..15: the onboarding regression's targets and the protocol's window at K = 5


def time_prior_inflation(dataset, train: np.ndarray, stored: dict[str, np.ndarray], h: float, beta: float | list[float], users: int, seed: int, folds: int, fit_seed: int, kind: str = "exponential") -> dict:
    """``stored``: the bank's time prior tensors (their names without ``head/``); ``kind``: theirs
    (:data:`pmeta.tasks.time_prior.KINDS`), and so are the ones rebuilt here, with the bank's
    pseudo-ratings m (``time_pseudo_ratings``, 0 without). ``beta``: one β, or one per history size
    (each user here is read at their fifth positive, so β_5)."""
    weights, beta = beta, float(time_prior.weight_of(torch.tensor(beta, dtype=torch.float64), [5])[0])
    pseudo = float(stored["time_pseudo_ratings"]) if "time_pseudo_ratings" in stored else 0.0
    positives, times, rated = dataset.positives_by_user(), dataset.positive_times_by_user(), dataset.rated_by_user()
    items, stamps = time_prior.rating_events(dataset, train)
    owner = dataset.ratings.user[np.isin(dataset.ratings.user, train)]  # rating_events keeps the file order
    prior = time_prior.build(items, stamps, len(dataset.catalog), h, kind, pseudo)
    probe = np.linspace(float(stamps.min()), float(stamps.max()), 9)  # the stored and the rebuilt log prior at nine times
    difference = float((time_prior.log_prior_at({k: torch.as_tensor(v) for k, v in stored.items()}, probe) - time_prior.log_prior_at(prior, probe)).abs().max())
    eligible = [u for u in train if len(positives[u]) >= 6]
    sample = np.random.default_rng(seed).choice(eligible, min(users, len(eligible)), replace=False)
    fit = crossfit.build(folds, fit_seed, train, (dataset.ratings.user, dataset.ratings.item, dataset.ratings.timestamp), [positives[u] for u in train], len(dataset.catalog), h, weights, None, 1, 0.0, kind=kind, pseudo_ratings=pseudo)
    inside, outside, crossed, ndcg_inside, ndcg_outside = [], [], [], [], []
    for user in sample:
        t, query = times[user][4], positives[user][QUERY]
        kept = owner != user
        row_in = time_prior.log_prior_at(prior, [t])[0].numpy().astype(np.float64)
        row_out = time_prior.log_prior_at(time_prior.build(items[kept], stamps[kept], len(dataset.catalog), h, kind, pseudo), [t])[0].numpy().astype(np.float64)
        inside.append(beta * row_in[query].mean())
        outside.append(beta * row_out[query].mean())
        crossed.append(float(fit.prior([int(user)], [t], "cpu", [5])[0, query].double().mean()))
        never = np.setdiff1d(np.arange(len(dataset.catalog)), rated[user])
        negatives = np.broadcast_to(never, (len(query), len(never)))
        ndcg_inside.append(metrics_from_ranks(rank_positives(row_in, query, negatives))["ndcg@10"])
        ndcg_outside.append(metrics_from_ranks(rank_positives(row_out, query, negatives))["ndcg@10"])
    gap = np.asarray(inside) - np.asarray(outside)
    return {"recomputed_max_abs_difference": difference, "users": len(sample), "beta_log_prior_in_sample": float(np.mean(inside)),
            "beta_log_prior_leave_self_out": float(np.mean(outside)), "mean_gap": float(gap.mean()), "median_gap": float(np.median(gap)),
            "beta_log_prior_cross_fitted": float(np.mean(crossed)), "cross_fitted_minus_leave_self_out": float(np.mean(np.asarray(crossed) - np.asarray(outside))),
            "prior_ndcg10_in_sample": float(np.mean(ndcg_inside)), "prior_ndcg10_leave_self_out": float(np.mean(ndcg_outside))}  # fmt: skip


def anchor_bias_inflation(dataset, train: np.ndarray, tensors: dict, gamma: float, folds: int, fit_seed: int) -> dict:
    positives = dataset.positives_by_user()
    item_keys, centroids = tensors["item_keys"], tensors["anchor_keys"]
    keys = np.stack([item_keys[positives[u]].mean(0) for u in train])
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    assignment = (keys @ centroids.T).argmax(1)
    n_items, n_anchors = len(dataset.catalog), len(centroids)
    ratio = anchor_bias.log_ratio([positives[u] for u in train], assignment, n_anchors, n_items)
    difference = float(np.abs(tensors["anchor_bias"] - gamma * ratio).max())
    counts = np.zeros((n_anchors, n_items))
    for user, anchor in zip(train, assignment):
        np.add.at(counts[anchor], np.unique(positives[user]), 1.0)
    fit = crossfit.build(folds, fit_seed, train, (dataset.ratings.user, dataset.ratings.item, dataset.ratings.timestamp), [positives[u] for u in train], n_items, None, 0.0, assignment, n_anchors, gamma)
    inside, outside, crossed = [], [], []
    for user, anchor in zip(train, assignment):
        query = positives[user][QUERY]
        if len(query) == 0:
            continue
        without = counts.copy()
        np.add.at(without[anchor], np.unique(positives[user]), -1.0)
        ratio_out = anchor_bias.ratio_of_shares(*anchor_bias.shares_of_counts(without))
        inside.append(gamma * ratio[anchor, query].mean())
        outside.append(gamma * ratio_out[anchor, query].mean())
        crossed.append(float(fit.own_bias([int(user)], torch.tensor([int(anchor)]))[0, query].double().mean()))
    gap = np.asarray(inside) - np.asarray(outside)
    return {"recomputed_max_abs_difference": difference, "users": len(inside), "offset_in_sample": float(np.mean(inside)),
            "offset_leave_self_out": float(np.mean(outside)), "mean_gap": float(gap.mean()), "sd_gap": float(gap.std()),
            "offset_cross_fitted": float(np.mean(crossed)), "cross_fitted_minus_leave_self_out": float(np.mean(np.asarray(crossed) - np.asarray(outside)))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None, help="the MovieLens folder the bank was built on (default: the shipped sample)")
    parser.add_argument("--users", type=int, default=40, help="train users sampled for the time prior (one table rebuild each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5, help="folds of the cross-fitted values (crossfit_folds), >= 2")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reader = BankStore(args.bank).open()
    tensors = {k: v.numpy() for k, v in reader.read_tensors(TENSORS_FILE).items()}
    record = reader.read_json(BUILD_FILE)
    dataset = load_sample() if args.data is None else read_movielens(args.data)
    index = {u: i for i, u in enumerate(dataset.ratings.user_ids)}
    positives = dataset.positives_by_user()
    minimum = int(reader.record["config"].get("min_positives", 2))  # the build's train users with positives (build.with_positives)
    train = np.array(sorted(index[u] for u in record["train_users"] if len(positives.get(index[u], ())) >= minimum))
    chosen = record["collaborative_init"]
    report = {"bank": str(args.bank), "version": reader.id, "train_users": len(train), "folds": args.folds}
    fit_seed = int(reader.record["config"].get("seed", 0)) + 5  # as the build seeds its folds (pmeta.bank.build.training_priors)
    prior = chosen.get("time_prior", {})
    stored = {k.removeprefix("head/"): v for k, v in tensors.items() if k.startswith("head/time_")}
    if not time_prior.weights_off(prior.get("weight", 0.0)):
        report["time_prior"] = {"bandwidth_days": prior["bandwidth_days"], "beta": prior["weight"],
                                **time_prior_inflation(dataset, train, stored, prior["bandwidth_days"], prior["weight"], args.users, args.seed, args.folds, fit_seed, time_prior.kind_of(stored))}  # fmt: skip
    bias = chosen.get("anchor_bias", {})
    if bias.get("weight", 0.0) > 0:
        report["anchor_bias"] = {"gamma": bias["weight"], **anchor_bias_inflation(dataset, train, tensors, bias["weight"], args.folds, fit_seed)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""What each part of a bank transferred to another catalogue contributes there, on the target's *train* users.

    python benchmarks/transfer_parts.py --bank BANK --data TARGET_DIR [--format auto] [--source-data DIR]
                                        [--seed 0] [--users N] [--method pmeta-no-steps] [--shrink 300,1000,3000] [--target-prior] [--target-bias] [--threads 1]

``pmeta eval movielens --data TARGET_DIR --bank BANK`` serves a bank built on one MovieLens release on
another one's catalogue (:mod:`pmeta.eval.transfer`). This script scores that transferred bank with one
part at a time taken away or changed, on the target's coldstart-v1 *train* users of ``--seed`` (the
bank never saw the target, and the target's test users are not scored; pop99's sampling weights count
every rating in the file, as the protocol defines), under the protocol's three modes and K = 1, 3, 5:

* ``as served``: what ``pmeta eval`` scores;
* ``no time prior``: β = 0;
* ``all-time popularity``: the time prior replaced, in every period, by the all-time share of the
  bank's train users' ratings (the same β);
* ``prior shrunk, m = …``: each period's distribution shrunk towards that share by m pseudo-ratings
  (m = 0 is the bank's prior), so that periods in which the bank's train users rated little lean on
  the all-time share: for an exponential prior its exact read with ``head/time_pseudo_ratings``
  (:mod:`pmeta.tasks.time_prior`), for the older Gaussian tables :func:`shrunk_prior`;
* ``no anchor bias``, ``item bias at its median``, ``no collaborative embeddings`` (the towers'
  collaborative rows zero: text only), ``anchors retrieved by text keys`` (every item's retrieval key
  projected from its text, as an unmatched item's is, instead of its collaborative key row);
* ``prior counted on the target`` (``--target-prior``): the time prior counted again on the target's
  own train users' ratings with the bank's h, m and β (:func:`pmeta.eval.transfer.recounted_prior`,
  what ``pmeta eval movielens --transfer-prior target`` serves), in two folds so that no scored user's
  ratings are counted: the train users are halved at random (``--seed``), each half is scored with
  the prior counted on the other half's ratings, and the two halves' metrics are pooled by user;
* ``prior and anchors' item bias counted on the target`` (``--target-bias``): the same two folds,
  the anchors' item bias counted on the other half too: each of its users falls into the bank's
  anchor nearest its key, and each anchor's log ratio of its users' positives, times the bank's γ,
  replaces the source's (:func:`pmeta.eval.transfer.recounted_anchor_bias`);
* and, for reference, no bank at all: EASE fitted on the bank's own train users of the source data
  (λ: the bank's choice, or ``--source-ease-lambda``) and read through the same title match
  (:class:`SourceEASE`): how much of the source's item-item structure holds on the target at all.

The prior variants and the EASE row read the bank's train users in its source data (``--source-data``,
default the shipped sample, which must be the data the bank was built on: its fingerprint is
checked); the prior variants also check that the prior rebuilt from them equals the stored one. It
reads the bank and the data only; it changes nothing.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from dataclasses import replace

import numpy as np
import torch

from pmeta.bank.bank import Bank
from pmeta.bank.build import fixed_bandwidth, with_positives
from pmeta.bank.model import PmetaModel
from pmeta.config import MAX_SEED
from pmeta.data import load_sample
from pmeta.data.movielens import LAYOUTS as FORMATS, read_movielens
from pmeta.errors import PmetaError
from pmeta.eval import neural  # noqa: F401  (registers the bank methods)
from pmeta.eval.baselines import BASELINES, EASEBaseline, EvalContext
from pmeta.eval.protocol import MIN_POSITIVES, evaluate, split_users
from pmeta.eval.transfer import match_items, recounted_anchor_bias, transfer_model
from pmeta.tasks import time_prior

MODES = ("uni99", "pop99", "full")
KS = (1, 3, 5)


def shrunk_prior(items: np.ndarray, times: np.ndarray, n_items: int, bandwidth_days: float, pseudo: float, causal: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(grid, log prior) of :func:`pmeta.tasks.time_prior.table` with each period's distribution
    ``(Σ_r w_r·1[item_r = i] + m·p_i) / (Σ_r w_r + m)``: m = ``pseudo`` ratings of the all-time share
    p_i added to the kernel-weighted counts (m = 0: the table; m = inf: p_i in every period);
    ``causal``: the kernel counts only ratings at or before each grid point, as the bank's table."""
    grid, table = time_prior.table(items, times, n_items, bandwidth_days, causal)
    if pseudo == 0:
        return grid, table
    times = np.asarray(times, dtype=np.float64)
    items = np.asarray(items, dtype=np.int64)
    overall = np.bincount(items, minlength=n_items).astype(np.float64)
    overall /= overall.sum()
    out = np.empty_like(table)
    for row, point in enumerate(grid):
        if math.isinf(pseudo):
            local = overall
        else:
            weights = np.exp(-0.5 * ((times - point) / (bandwidth_days * time_prior.DAY)) ** 2)
            if causal:
                weights = np.where(times <= point, weights, 0.0)
            local = (np.bincount(items, weights=weights, minlength=n_items) + pseudo * overall) / (weights.sum() + pseudo)
        out[row] = np.log((1.0 - time_prior.GLOBAL_MIX) * local + time_prior.GLOBAL_MIX * overall + time_prior.EPSILON)
    return grid, out


def without(model: PmetaModel, part: str, prior: dict[str, torch.Tensor] | None = None) -> PmetaModel:
    """A copy of ``model`` with one part changed (the model itself untouched): ``"time prior"`` (β = 0),
    ``"prior"`` (the time prior tensors ``prior`` (:func:`pmeta.tasks.time_prior.build`, any kind)
    instead of the stored ones, same β), ``"anchor bias"`` (zero),
    ``"item bias"`` (every item at the median), ``"collaborative"`` (history and item embeddings zero),
    ``"keys"`` (each item's retrieval key projected from its text: ``item_text @ key_projection``)."""
    head, extra = dict(model.t.head), {}
    if part == "time prior":
        head["time_weight"] = torch.zeros_like(head["time_weight"])
    elif part == "prior":
        head = {**time_prior.without_prior(head, keep_weight=True), **prior}
    elif part == "anchor bias":
        extra["anchor_bias"] = torch.zeros_like(model.t.anchor_bias)
    elif part == "item bias":
        head["item_bias"] = torch.full_like(head["item_bias"], float(head["item_bias"].median()))
    elif part == "collaborative":
        for key in ("history_embedding", "item_embedding"):
            head[key] = torch.zeros_like(head[key])
    elif part == "keys":
        extra["item_keys"] = model.t.item_text.float() @ model.t.key_projection
    else:
        raise ValueError(f"unknown part {part!r}")
    return PmetaModel(model.config, model.encoder, model.item_texts, replace(model.t, head=head, **extra), index=model.index)


def bank_train_users(bank: Bank, source) -> np.ndarray:
    """The dense indexes in ``source`` of the users the bank learned from (its build record's train
    users with enough positives: what its time prior counted and its EASE was fitted on)."""
    if bank.record.get("dataset_fingerprint") != source.fingerprint:
        raise SystemExit("--source-data is not the data this bank was built on (its fingerprint differs); pass that data")
    record_users = bank.build_record.get("train_users", [])
    ids = {u: i for i, u in enumerate(source.ratings.user_ids)}
    missing = [u for u in record_users if u not in ids]
    if missing or not record_users:
        raise SystemExit(f"--source-data is not the data this bank was built on ({len(missing)} of its {len(record_users)} train users are not in it)")
    return with_positives(np.array(sorted(ids[u] for u in record_users), dtype=np.int64), source.positives_by_user(), bank.model.config.min_positives)


class SourceEASE:
    """EASE fitted on the source data, scoring a target catalogue through the title match
    (``matched[j]``: target item j's source item, −1 if none): a target support is read as its matched
    source items, a matched target item gets its source item's score, an unmatched one the lowest."""

    name = "source EASE"
    bytes_per_user = 0

    def __init__(self, ease: EASEBaseline, matched: np.ndarray) -> None:
        self.ease, self.matched = ease, np.asarray(matched, dtype=np.int64)

    def score(self, support_items: np.ndarray, k: int) -> np.ndarray:
        support = np.unique(self.matched[np.asarray(support_items, dtype=np.int64)])  # a film listed twice in the target counts once
        source_scores = self.ease.score(support[support >= 0], k)
        return np.where(self.matched >= 0, source_scores[np.maximum(self.matched, 0)], source_scores.min() - 1.0)


def variants(bank: Bank, source, shrink: list[float]) -> dict[str, PmetaModel]:
    """The rows' source-catalogue models, in order; the prior rows only when the bank has a time prior,
    the anchor-bias row only when it has an anchor bias, the collaborative row only when it has towers'
    rows, the text-keys row only when its retrieval keys are collaborative (with a text projection)."""
    model, head = bank.model, bank.model.t.head
    rows = {"as served": model}
    kind = time_prior.kind_of(head)
    if kind is not None:
        train = bank_train_users(bank, source)
        # the grid's choice (onboarding init), else the fixed bandwidth of the inits without the grid
        h = float(bank.build_record.get("collaborative_init", {}).get("time_prior", {}).get("bandwidth_days") or fixed_bandwidth(model.config))
        items, stamps = time_prior.rating_events(source, train)
        rebuilt = time_prior.build(items, stamps, len(source.catalog), h, kind)
        # equal up to the last bits of exp/log, which may differ between the CPU that built the bank and this one
        if any(head[k].shape != v.shape or not torch.allclose(head[k].double(), v.double(), rtol=1e-5, atol=1e-3 if k == "time_grid" else 1e-5) for k, v in rebuilt.items()):
            raise SystemExit("the time prior rebuilt from --source-data differs from the bank's; pass the data the bank was built on")
        rows["no time prior"] = without(model, "time prior")
        flat = shrunk_prior(items, stamps, len(source.catalog), h, math.inf)[1][:1]
        rows["all-time popularity"] = without(model, "prior", {"time_grid": torch.tensor([float(stamps.min()), float(stamps.max())], dtype=torch.float64), "time_log_prior": torch.from_numpy(np.repeat(flat, 2, axis=0)), "time_causal": torch.tensor(1.0)})
        for pseudo in shrink:
            if kind == "exponential":  # read exactly with m pseudo-ratings (time_prior's head/time_pseudo_ratings)
                shrunk = {**rebuilt, "time_pseudo_ratings": torch.tensor(float(pseudo), dtype=torch.float64)}
            else:
                shrunk = {**rebuilt, "time_log_prior": torch.from_numpy(shrunk_prior(items, stamps, len(source.catalog), h, pseudo, kind == "gaussian")[1])}
            rows[f"prior shrunk, m = {pseudo:g}"] = without(model, "prior", shrunk)
    if model.t.anchor_bias is not None:
        rows["no anchor bias"] = without(model, "anchor bias")
    rows["item bias at its median"] = without(model, "item bias")
    if "item_embedding" in head:
        rows["no collaborative embeddings"] = without(model, "collaborative")
    if model.t.item_keys is not None and model.t.key_projection is not None:
        rows["anchors retrieved by text keys"] = without(model, "keys")
    return rows


def bank_gamma(bank: Bank) -> float:
    """γ of the bank's anchors' item bias (its build record's choice; 0 when it has none)."""
    return float(bank.build_record.get("collaborative_init", {}).get("anchor_bias", {}).get("weight") or 0.0) if bank.model.t.anchor_bias is not None else 0.0


def target_prior_rows(bank: Bank, target, train: np.ndarray, users: np.ndarray, method: str, seed: int, bias: bool = False) -> list[dict]:
    """``evaluate``'s rows for the bank transferred with its time prior counted on the target's train
    users, in two folds: ``train`` halved at random (``seed``), the scored ``users`` of each half
    ranked with the prior counted on the other half's ratings; HR@10 and nDCG@10 pooled by user.
    With ``bias`` the anchors' item bias is counted on that other half too, on its users with the
    bank's ``min_positives`` as a build counts it (:func:`pmeta.eval.transfer.recounted_anchor_bias`,
    at the bank's γ)."""
    half = np.zeros(len(train), dtype=bool)
    half[np.random.default_rng(seed).permutation(len(train))[: len(train) // 2]] = True
    totals: dict[tuple, list[float]] = {}
    positives = target.positives_by_user() if bias else None
    for fold in (half, ~half):
        counted, scored = np.asarray(train)[~fold], np.asarray(users)[np.isin(users, np.asarray(train)[fold])]
        if len(scored) == 0:
            continue
        events = time_prior.rating_events(target, counted)
        transferred, _ = transfer_model(bank.model, bank.catalog, target.catalog, prior_events=events)
        if bias:  # counted on the users a build counts it on: those with the bank's min_positives
            kept = with_positives(counted, positives, bank.model.config.min_positives)
            counted_bias = recounted_anchor_bias(transferred, [positives[int(u)] for u in kept], bank_gamma(bank))
            transferred = PmetaModel(transferred.config, transferred.encoder, transferred.item_texts, replace(transferred.t, anchor_bias=counted_bias), index=transferred.index)
        scorer = BASELINES[method].create(EvalContext(target, train, seed=seed, model=transferred))
        for row in evaluate(scorer, target, scored, ks=KS, modes=MODES, seed=seed):
            total = totals.setdefault((row["k"], row["mode"]), [0.0, 0.0, 0])
            total[0] += row["hr@10"] * row["users"]
            total[1] += row["ndcg@10"] * row["users"]
            total[2] += row["users"]
    return [{"k": k, "mode": mode, "hr@10": hr / n, "ndcg@10": ndcg / n, "users": n} for (k, mode), (hr, ndcg, n) in totals.items()]


def number_list(text: str) -> list[float]:
    """``--shrink``: comma-separated finite numbers > 0 (empty: none)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = [-1.0]
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers > 0 separated by commas, got {text!r}")
    return list(dict.fromkeys(values))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", required=True)
    parser.add_argument("--data", required=True, help="the target MovieLens directory (another catalogue than the bank's)")
    parser.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    parser.add_argument("--source-data", default=None, help="the MovieLens directory the bank was built on (default: the shipped sample)")
    parser.add_argument("--seed", type=int, default=0, help="coldstart-v1 seed of the target's split; its train users are scored")
    parser.add_argument("--users", type=int, default=None, help="score only the first N train users (quick runs)")
    parser.add_argument("--method", default="pmeta-no-steps", choices=["pmeta-no-steps", "pmeta"])
    parser.add_argument("--shrink", type=number_list, default=[300.0, 1000.0, 3000.0], help="pseudo-rating counts m of the shrunk-prior rows")
    parser.add_argument("--source-ease-lambda", type=float, default=None, help="λ of the source EASE row (default: the bank's EASE λ, else 500)")
    parser.add_argument("--target-prior", action="store_true", help="add the row with the time prior counted on the target's train users (two folds)")
    parser.add_argument("--target-bias", action="store_true", help="add the row with the time prior and the anchors' item bias counted on the target's train users (two folds)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.users is not None and args.users < 1 or args.threads < 1:
        parser.error("--users and --threads must be whole numbers >= 1")
    if args.source_ease_lambda is not None and not (math.isfinite(args.source_ease_lambda) and args.source_ease_lambda > 0):
        parser.error("--source-ease-lambda must be a finite number > 0")
    if not 0 <= args.seed <= MAX_SEED:
        parser.error(f"--seed must be in 0..{MAX_SEED}")
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    try:
        bank = Bank.open(args.bank)
        source = load_sample() if args.source_data is None else read_movielens(args.source_data)
        target = read_movielens(args.data, args.format)
    except PmetaError as error:  # a missing or damaged bank or dataset: one line, no traceback
        raise SystemExit(f"error: {error}") from None
    if bank.catalog.item_ids == target.catalog.item_ids:
        raise SystemExit("the target has the bank's own catalogue; this script is for another release")
    # the rows a bank cannot give are refused before anything is fitted or scored
    if (args.target_prior or args.target_bias) and time_prior.kind_of(bank.model.t.head) != "exponential":
        raise SystemExit(f"{'--target-prior' if args.target_prior else '--target-bias'} needs a bank with the exact (exponential) time prior")
    if args.target_bias and bank_gamma(bank) == 0.0:
        raise SystemExit("--target-bias needs a bank with an anchors' item bias")
    train, _ = split_users(target, seed=args.seed, test_fraction=bank.config.test_fraction)
    users = np.asarray(train)[: args.users]
    lam = args.source_ease_lambda or float(bank.build_record.get("collaborative_init", {}).get("ease_lambda") or 500.0)
    scorers = dict(variants(bank, source, args.shrink))
    scorers[f"no bank: EASE (λ = {lam:g}) fitted on the bank's train users of the source"] = SourceEASE(EASEBaseline(lam=lam).fit(source, bank_train_users(bank, source)), match_items(bank.catalog, target.catalog))
    if args.target_prior:
        scorers["prior counted on the target's train users (two folds)"] = "target prior"
    if args.target_bias:
        scorers["prior and anchors' item bias counted on the target's train users (two folds)"] = "target bias"
    lines, scored = [], 0
    for name, model in scorers.items():
        if isinstance(model, str):
            rows = target_prior_rows(bank, target, train, users, args.method, args.seed, bias=model == "target bias")
        else:
            if isinstance(model, SourceEASE):
                scorer = model
            else:
                transferred, summary = transfer_model(model, bank.catalog, target.catalog)
                scorer = BASELINES[args.method].create(EvalContext(target, train, seed=args.seed, model=transferred))
            rows = evaluate(scorer, target, users, ks=KS, modes=MODES, seed=args.seed)
        cells = {(row["k"], row["mode"]): (row["hr@10"], row["ndcg@10"]) for row in rows}
        ndcg = [cells[(k, mode)][1] for mode in MODES for k in KS]
        lines.append(f"| {name} | " + " | ".join(f"{cells[(k, mode)][0]:.3f} / {cells[(k, mode)][1]:.3f}" for mode in MODES for k in KS) + f" | {np.mean(ndcg):.4f} | {np.mean(ndcg[-len(KS):]):.4f} |")
        scored = rows[0]["users"]
    print(
        f"{args.method} of {bank.record.get('dataset_name')} bank {bank.version} on {target.name} ({target.format}), train users of seed {args.seed} "
        f"({scored} with >= {MIN_POSITIVES} positives); {summary['matched_items']} of {summary['target_items']} items matched; HR@10 / nDCG@10; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, {time.perf_counter() - started:.0f} s\n"
    )
    print("| bank | " + " | ".join(f"{m} K={k}" for m in MODES for k in KS) + " | nDCG@10, mean | full nDCG@10, mean over K |")
    print("|---|" + "---|" * (len(MODES) * len(KS) + 2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Use a bank on a catalogue it was not built on, by matching items through their text.

A bank learns three things per item of its own catalogue: a bias and two collaborative
embeddings (history and item side). Everything else — the encoder, the prompt/LoRA anchors, the
projections of the text part — works on text and carries over to any catalogue. For a new
catalogue:

* each target item is matched to the bank item with the same normalised title (case-folded,
  whitespace collapsed; MovieLens titles carry the year, "Heat (1995)"); a target item left
  unmatched is then matched through the *other names* the titles carry, within the same year
  (:func:`title_names`, :func:`match_items`): ml-100k's "Star Wars (1977)" is ml-latest's "Star
  Wars: Episode IV - A New Hope (1977)", "Seven (Se7en) (1995)" is "Seven (a.k.a. Se7en) (1995)";
  only a unique candidate that no other match has taken is accepted;
* the target's text embeddings are computed by the same frozen encoder (cached on disk by content);
* a matched item takes the bank's bias, collaborative rows, time-prior column, retrieval key row
  and anchors' item-bias column; an unseen item has zero collaborative rows (its score comes from
  the text part alone), the bank's median bias and median time prior, a key row projected from its
  text embedding (the bank's ``key_projection``) and no anchor item bias.

In a bank with text retrieval keys, anchor retrieval needs no mapping at all.

The time prior is a count, not something the bank learned: what the bank's train users rated up to
a user's time. On another catalogue it can be counted again on that catalogue's own ratings
(``prior_events``: the target's train users' ratings, what its ID baselines train on), with the
bank's h, m and β: :func:`transfer_model` then keeps none of the source's counts. Without
``prior_events`` the source's prior is read through the title match (the pure transfer). The bank's
β was chosen against the bank's other scores on the source; :func:`tuned_prior` chooses h and β
again on a tenth of the target's train users held out as validation users, as the target's
baselines tune themselves (popularity-time's h on a tenth, EASE's λ on a fifth), over the build's
grids (:data:`TUNED_BANDWIDTHS`, :data:`TUNED_WEIGHTS`).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import replace

import numpy as np
import torch

from ..bank.model import PmetaModel
from ..data.types import Catalog
from ..errors import InvalidConfig, InvalidData
from ..progress import Progress
from ..tasks import time_prior

_SPACES = re.compile(r"\s+")
_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")
_PARENTHESES = re.compile(r"\(([^()]*)\)")
_WORDS = re.compile(r"\w+")
_AKA = re.compile(r"^\s*a\.?k\.?a\.?\s+", re.IGNORECASE)


def normalise_title(title: str) -> str:
    return _SPACES.sub(" ", title).strip().casefold()


def _words(text: str) -> frozenset[str]:
    """The case-folded words of ``text``, accents removed ("Léon" = "Leon"), as a set (word order and
    MovieLens' trailing articles, "Boot, Das", do not matter)."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return frozenset(_WORDS.findall(plain.casefold()))


def title_names(title: str) -> tuple[str | None, set[frozenset[str]], set[frozenset[str]]]:
    """(year, names, series names) of a MovieLens title: the year in its trailing "(YYYY)" (None
    without one); the word sets of the names it carries (the main title and each parenthesised
    alternative, "a.k.a." dropped); and, for a "Series: Episode - Subtitle" title, the word sets of
    the part before the colon and the part after the dash, a weaker kind of name that is tried only
    when the first kind finds nothing. "Star Wars: Episode IV - A New Hope (1977)" → ("1977",
    {star wars episode iv a new hope}, {star wars} and {a new hope})."""
    match = _YEAR.search(title)
    year = match.group(1) if match else None
    body = title[: match.start()] if match else title
    alternatives = [_AKA.sub("", part) for part in _PARENTHESES.findall(body)]
    main = _PARENTHESES.sub(" ", body)
    series: list[str] = []
    if ":" in main:
        head, tail = main.split(":", 1)
        series = [head, tail.rsplit(" - ", 1)[-1] if " - " in tail else tail]
    names = {words for words in map(_words, [main, *alternatives]) if words}
    return year, names, {words for words in map(_words, series) if words} - names


def match_items(source: Catalog, target: Catalog) -> np.ndarray:
    """For each target item, the index of the source item it is, or -1 (unseen).

    First by the same normalised title; when several source items share a title (remakes listed
    with the same year), the first one is used. Then a target item still unmatched is matched
    through :func:`title_names`, in two tiers: a source item of the same year that shares one of
    its names (main title or alternative) with it, else one that shares a name when series names
    count on either side. A tier matches only when it finds exactly one source item that no exact
    match has taken, and a source item claimed by two different target titles goes to neither.
    """
    by_title: dict[str, int] = {}
    for index, title in enumerate(source.titles):
        by_title.setdefault(normalise_title(title), index)
    matched = np.array([by_title.get(normalise_title(t), -1) for t in target.titles], dtype=np.int64)
    taken = set(matched[matched >= 0].tolist())
    tiers: tuple[dict, dict] = ({}, {})  # (year, name) -> source items: by names; by names and series names
    for index, title in enumerate(source.titles):
        year, names, series = title_names(title)
        if year is not None and index not in taken:
            for tier, words in zip(tiers, (names, names | series)):
                for name in words:
                    tier.setdefault((year, name), set()).add(index)
    claims: dict[int, dict[str, list[int]]] = {}  # source item -> target title -> target positions
    for position in np.flatnonzero(matched < 0):
        year, names, series = title_names(target.titles[position])
        if year is None:
            continue
        for tier, words in zip(tiers, (names, names | series)):
            candidates = set().union(*(tier.get((year, name), set()) for name in words))
            if candidates:
                if len(candidates) == 1:
                    claims.setdefault(candidates.pop(), {}).setdefault(normalise_title(target.titles[position]), []).append(int(position))
                break
    for index, by_target in claims.items():
        if len(by_target) == 1:  # one target title (a catalogue may list the same film twice)
            matched[next(iter(by_target.values()))] = index
    return matched


def require_exponential(head: dict[str, torch.Tensor]) -> None:
    """InvalidConfig unless ``head`` holds an exact (exponential) time prior: the only kind that stores
    its h, so the only one that can be counted again on another catalogue's ratings."""
    kind = time_prior.kind_of(head)
    if kind != "exponential":
        raise InvalidConfig("this bank has no time prior to count on the target" if kind is None else f"this bank's time prior is of the older {kind!r} kind, which cannot be counted again; rebuild the bank")


def recounted_prior(head: dict[str, torch.Tensor], items: np.ndarray, times: np.ndarray, n_items: int, bandwidth_days: float | None = None) -> dict[str, torch.Tensor]:
    """The time-prior tensors of ``head`` (an exact exponential prior) counted again on the rating
    events (``items`` indexes into a catalogue of ``n_items``, ``times`` seconds) with its own m and
    h (or ``bandwidth_days``); no weight (β stays the head's). Raises InvalidConfig for a head without
    a prior or with an older kind (whose h the head does not store) and InvalidData without a
    timestamped rating."""
    require_exponential(head)
    items, times = np.asarray(items, dtype=np.int64), np.asarray(times, dtype=np.float64)
    keep = np.isfinite(times)
    if not keep.any():
        raise InvalidData("the target's train users have no timestamped rating to count the time prior on")
    if items.size and (items.min() < 0 or items.max() >= n_items):
        raise InvalidData(f"rating events name items outside the target's {n_items} items")
    h = float(head["time_bandwidth"]) / time_prior.DAY if bandwidth_days is None else bandwidth_days
    prior = time_prior.decayed(items[keep], times[keep], n_items, h)
    if "time_pseudo_ratings" in head:
        prior["time_pseudo_ratings"] = head["time_pseudo_ratings"]
    return prior


def transfer_model(model: PmetaModel, source: Catalog, target: Catalog, progress: Progress | None = None, prior_events: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[PmetaModel, dict]:
    """A PmetaModel that ranks ``target``'s items with ``model``'s bank; returns (model, match summary).

    ``prior_events``: (item indexes into ``target``, timestamps) of the ratings to count the time
    prior on instead of reading the source's through the title match (:func:`recounted_prior`; the
    caller passes the target's *train* users' ratings, never a scored user's)."""
    from ..bank.build import catalog_embeddings

    matched = match_items(source, target)
    texts = target.texts()
    item_text = catalog_embeddings(model.encoder, texts, progress or Progress(False))
    head = {k: v for k, v in model.t.head.items()}
    kind = time_prior.kind_of(head)
    known = torch.from_numpy(matched >= 0)
    rows = torch.from_numpy(np.where(matched >= 0, matched, 0))
    bias = model.t.head["item_bias"]
    head["item_bias"] = torch.where(known, bias[rows], bias.median())
    for key in ("history_embedding", "item_embedding"):
        if key in head:
            head[key] = torch.where(known[:, None], head[key][rows], torch.zeros(()))
    if prior_events is not None:  # counted on the target's own ratings: every item has its column, none of the source's counts is kept
        recounted = recounted_prior(head, *prior_events, len(target))
        head = {**time_prior.without_prior(head, keep_weight=True), **recounted}
    elif kind is not None:  # the time prior's columns follow the items; an unseen item gets the median of the user's row, as its bias
        columns = torch.where(known, rows, -1)
        if "time_columns" in head:  # a bank transferred twice: the first map, followed
            columns = torch.where(columns >= 0, head["time_columns"][columns.clamp_min(0)], -1)
        head["time_columns"] = columns
    extra = {}
    if model.t.item_keys is not None:  # collaborative keys: a matched item keeps its row, an unseen one is projected from its text
        projected = item_text.float() @ model.t.key_projection if model.t.key_projection is not None else torch.zeros(len(target), model.t.item_keys.shape[1])
        extra["item_keys"] = torch.where(known[:, None], model.t.item_keys[rows], projected)
    if model.t.anchor_bias is not None:  # an anchor's item bias follows matched items; unseen items get 0 (no evidence)
        extra["anchor_bias"] = torch.where(known[None, :], model.t.anchor_bias[:, rows], torch.zeros(()))
    tensors = replace(model.t, item_text=item_text, head=head, **extra)
    summary = {"source_items": len(source), "target_items": len(target), "matched_items": int(known.sum()), "unseen_items": int((~known).sum()), "time_prior": "none" if kind is None else "target" if prior_events is not None else "source"}
    return PmetaModel(model.config, model.encoder, texts, tensors, index=model.index), summary


#: The h (days) and β grids :func:`tuned_prior` chooses from: the build's
#: (:data:`~pmeta.tasks.time_prior.BANDWIDTHS`, :data:`~pmeta.tasks.time_prior.WEIGHTS`). Stop 57's
#: four targets all chose ends of them (h = 60 days, β = 5); stop 58 read grids widened at those
#: ends (h from 30 days, β up to 50) on fresh targets, under a rule fixed before the read (kept only
#: if no pmeta or pmeta-no-steps cell fell after Holm and the mean nDCG@10 did not fall): on ml-100k
#: seeds 3 and 4 pop99 K = 5 nDCG@10 fell by 0.006 (after Holm), so these stay.
#: :func:`tuned_prior` takes other grids for such reads.
TUNED_BANDWIDTHS = time_prior.BANDWIDTHS
TUNED_WEIGHTS = time_prior.WEIGHTS


def grid_edges(choice: dict) -> list[str]:
    """The ends of the grid a :func:`tuned_prior` choice sits on ("the smallest h tried", "the
    largest h tried", "the largest β tried"; none when β = 0). Choices recorded before the grids
    were (stop 57) are read against the build's grids."""
    if not choice.get("weight"):
        return []
    bandwidths = choice.get("bandwidths", time_prior.BANDWIDTHS)
    weights = choice.get("weights", time_prior.WEIGHTS)
    edges = []
    if choice["bandwidth_days"] == min(bandwidths):
        edges.append("the smallest h tried")
    if choice["bandwidth_days"] == max(bandwidths):
        edges.append("the largest h tried")
    if choice["weight"] == max(weights):
        edges.append("the largest β tried")
    return edges


def tuned_prior(model: PmetaModel, dataset, train_users: np.ndarray, validation_fraction: float = 0.1, seed: int = 0, bandwidths=TUNED_BANDWIDTHS, weights=TUNED_WEIGHTS) -> tuple[PmetaModel, dict]:
    """``model`` (a bank transferred to ``dataset``'s catalogue, with an exponential prior) with its
    time prior counted on ``train_users``' ratings at the h and β chosen on the target: a tenth of
    the train users (``validation_fraction``, drawn with ``seed``: the run's) are held out as
    validation users (:func:`~pmeta.eval.baselines.validation_split`, as the baselines tune), and
    :func:`~pmeta.tasks.time_prior.choose` picks h of ``bandwidths`` and β of ``weights`` (β = 0:
    no prior) by nDCG@10 over K = 1, 3, 5 and the modes on the validation users, over the
    transferred model's scores without the prior (no inner steps) plus the prior counted on the
    other train users; m stays the bank's. Returns (model, choice: h in days, β, m, the grids, the
    validation users held out and those of them with a case (≥ 6 positives), each grid point's mean
    nDCG@10). Raises InvalidData when no validation user has the positives a case needs."""
    from .baselines import validation_split
    from .neural import PmetaNoSteps

    head = model.t.head
    require_exponential(head)  # before any scoring
    fit_users, validation_users = validation_split(train_users, validation_fraction, seed)
    cases = time_prior.validation_cases(dataset, validation_users)
    if not cases:
        raise InvalidData(f"none of the target's {len(validation_users)} validation users has the positives a case needs; the time prior cannot be tuned on it")
    without = time_prior.without_prior(head)
    scorer = PmetaNoSteps(_with_head(model, without))
    m = float(head["time_pseudo_ratings"]) if "time_pseudo_ratings" in head else 0.0
    events = time_prior.rating_events(dataset, fit_users)
    h, beta, m, scores = time_prior.choose(lambda support: scorer.score(support, len(support)), cases, events, len(dataset.catalog), bandwidths=tuple(bandwidths), weights=tuple(weights), pseudo_ratings=(m,), seed=seed)
    choice = {"bandwidth_days": h, "weight": beta, "pseudo_ratings": m, "bandwidths": [float(b) for b in bandwidths], "weights": [float(w) for w in weights], "validation_users": len(validation_users), "validation_cases": len(cases), "scores": {key: round(row["mean"], 6) for key, row in scores.items()}}
    if time_prior.weights_off(beta):
        return _with_head(model, without), choice
    items, times = time_prior.rating_events(dataset, train_users)
    prior = recounted_prior(head, items, times, len(dataset.catalog), bandwidth_days=h)
    return _with_head(model, {**without, **time_prior.head_entries(prior, beta)}), choice


def recounted_anchor_bias(model: PmetaModel, positives: list[np.ndarray], gamma: float) -> torch.Tensor:
    """The anchors' item bias (A_n, N) of ``model`` (a bank transferred to a catalogue of N items)
    counted again on users of that catalogue: ``positives[u]`` are user u's liked item indexes (the
    target's *train* users, never a scored user); each user is assigned to the bank's nearest anchor
    by the retrieval key serving would give them (:meth:`PmetaModel.user_keys`, top 1 of the bank's
    index), and each anchor's log ratio of its users' positives to every counted user's
    (:func:`pmeta.fusion.anchor_bias.log_ratio`) is multiplied by ``gamma``, the bank's γ (the stored
    bias carries it). An anchor no counted user falls into gets 0; users without a key count
    nowhere. Raises InvalidData when no user has a key.

    ``benchmarks/transfer_parts.py --target-bias`` measures it on a target's train users; ``pmeta
    eval`` does not serve it (stop 63: +4.9% mean nDCG@10 beside the counted prior on ml-100k's train
    users, +2.6% on ml-1m's, under the +3% on both that an option needed; docs/transfer.md)."""
    from ..bank.model import UserInput
    from ..fusion import anchor_bias

    liked = [np.unique(np.asarray(items, dtype=np.int64)) for items in positives]
    n_items = len(model.item_texts)
    if any(len(items) and (items.min() < 0 or items.max() >= n_items) for items in liked):
        raise InvalidData(f"positives name items outside the target's {n_items} items")
    keys = model.user_keys([UserInput(liked_items=items.tolist()) for items in liked])
    keyed = np.flatnonzero(np.linalg.norm(keys, axis=1) > 0)
    if len(keyed) == 0:
        raise InvalidData("none of the target's train users has a retrieval key to count the anchors' item bias with")
    _, nearest = model.index.search(keys[keyed], 1)
    anchors = model.t.anchor_keys.shape[0]
    ratio = anchor_bias.log_ratio([liked[i] for i in keyed], nearest[:, 0], anchors, n_items)
    return float(gamma) * torch.from_numpy(ratio).to(model.t.item_text.device)


def _with_head(model: PmetaModel, head: dict[str, torch.Tensor]) -> PmetaModel:
    """``model`` with the head tensors ``head`` (the model itself untouched)."""
    return PmetaModel(model.config, model.encoder, model.item_texts, replace(model.t, head=head), index=model.index)

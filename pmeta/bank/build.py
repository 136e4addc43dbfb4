"""Bank build: dataset → held-out split → item tower → anchors → three meta-training stages → a new
immutable bank version (see :mod:`pmeta.storage`)."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from ..adapt.strategies import get_strategy
from ..config import BankConfig
from ..data.types import Dataset
from ..errors import InvalidConfig, InvalidData, InvalidRequest
from ..eval.baselines import EASEBaseline, positive_matrix
from ..eval.protocol import QUERY_START, metrics_from_ranks, rank_positives, split_users
from ..fusion import anchor_bias
from ..fusion.index import AnchorIndex
from ..models.encoder import FunctionalEncoder
from ..models.personal import init_adapter
from ..progress import Progress
from ..tasks import ranking, time_prior
from . import calibrate, crossfit, distributed, onboarding
from .episodes import EpisodeSampler, fixed_episode, query_tensors
from .meta_train import Checkpoint, anchor_stage, global_stage, meta_train, pretrain_towers, stack_stage
from .model import PmetaModel, Tensors, UserInput


@dataclass
class BuildResult:
    version: str
    seconds: float
    validation: dict[str, dict[str, float]]
    train_users: int
    test_users: int


def cache_dir() -> Path:
    return Path(os.environ.get("PMETA_CACHE_DIR", Path.home() / ".cache" / "pmeta"))


def catalog_embeddings(encoder: FunctionalEncoder, texts: list[str], progress: Progress) -> torch.Tensor:
    """Frozen sentence embeddings of the catalogue texts, cached on disk (safetensors) by content.

    The cache key is the sha256 of the encoder's word-embedding table and every text, so a changed
    model or catalogue never reuses stale vectors.
    """
    from safetensors.torch import load_file

    from ..storage.tensor_file import save_tensors

    digest = hashlib.sha256()
    digest.update(encoder.weights["embeddings.word_embeddings.weight"].detach().cpu().numpy().tobytes()[:1 << 20])  # a GPU build holds it on the device
    digest.update(str(encoder.shape).encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    path = cache_dir() / "item-embeddings" / f"{digest.hexdigest()}.safetensors"
    if path.exists():
        try:
            cached = load_file(str(path))["embeddings"]
            if cached.shape == (len(texts), encoder.shape.hidden):
                return cached
        except Exception:  # a corrupt cache entry is recomputed, never trusted
            pass
    with progress.task("embedding catalogue", len(texts)) as bar:
        embeddings = encoder.sentence_embeddings(texts, batch_size=128, progress=bar.advance).cpu()  # cached and returned on the CPU
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors({"embeddings": embeddings.contiguous()}, tmp)
        os.replace(tmp, path)
    except OSError:  # a full or read-only cache disk: caching is an optimisation only
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return embeddings


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def choose_anchors(keys: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (FAISS) over unit user keys: (centroids (count, d), assignment (n,))."""
    count = max(1, min(count, len(keys)))
    kmeans = faiss.Kmeans(keys.shape[1], count, niter=25, seed=seed, spherical=True, min_points_per_centroid=1, verbose=False)
    kmeans.train(np.ascontiguousarray(keys, dtype=np.float32))
    centroids = _unit(kmeans.centroids.copy())
    _, assignment = AnchorIndex.build(centroids, kind="flat").search(keys, 1)
    return centroids, assignment[:, 0]


#: L2 weight of the ridge map from text embeddings to collaborative key rows.
KEY_RIDGE = 1.0


def anchor_keys(item_text: torch.Tensor, cf_factors, config: BankConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The retrieval key space (``config.key_space``): (item key rows (N, r), text → key projection
    (d, r)), or (None, None) for keys in the text space.

    Collaborative keys are the history factors of the towers' closed-form init (the rows a user's
    collaborative vector pools), so users who liked items that the same train users liked get close
    keys. A ridge map fitted on the items with factors carries a text embedding into that space: it
    gives the rows of items no train user liked, and keys to free texts."""
    if config.key_space == "text" or cf_factors is None:
        return None, None
    history = (cf_factors[0] if isinstance(cf_factors, tuple) else cf_factors).float()
    known = history.abs().sum(1) > 0
    x, y = item_text[known].float(), history[known]
    projection = torch.linalg.solve(x.T @ x + KEY_RIDGE * torch.eye(x.shape[1]), x.T @ y)
    rows = torch.where(known[:, None], history, item_text.float() @ projection)
    return rows.contiguous(), projection.contiguous()


def prompt_from_text(encoder: FunctionalEncoder, texts: list[str], length: int, layer: int, max_tokens: int) -> torch.Tensor:
    """Initial soft prompt: the hidden states, at the prompt layer, of the first ``length`` tokens of ``texts``."""
    ids, mask = encoder.tokenize([" | ".join(texts)], max_tokens)
    hidden = encoder.lower(ids, mask, layer)[0]
    rows = hidden[1 : 1 + length]  # skip [CLS]
    if rows.shape[0] < length:
        rows = torch.cat([rows, hidden[: length - rows.shape[0]]])
    return rows.clone()


ValidationSet = tuple[list[UserInput], list[np.ndarray], list[int]]  # (inputs, queries, users) of one support size


def validation_sets(positives: dict[int, np.ndarray], users: np.ndarray, texts: list[str], ks: tuple[int, ...] = (1, 3, 5), times: dict[int, np.ndarray] | None = None) -> dict[int, ValidationSet]:
    """The validation users' fixed episodes for each support size K (the same query items, 6..15)."""
    return {k: fixed_episode(positives, users, texts, k=k, times=times) for k in ks}


def validation_loss(model: PmetaModel, inputs: list[UserInput], queries: list[np.ndarray], rated: dict[int, np.ndarray], users: list[int]):
    """A checkpoint for early stopping: the mean query cross-entropy of validation users after the
    serving path (retrieve, fuse, inner steps), with support = first 5 positives, query = 6..15."""
    if not inputs:
        return None
    device = model.t.item_text.device
    targets, mask, exclude = (t.to(device) for t in query_tensors(queries, [rated[u] for u in users], len(model.item_texts)))

    def loss() -> float:
        personal, batch, _ = model.personalize(inputs)
        with torch.no_grad():
            return float(ranking.softmax_loss(model.scores(batch, personal), targets, mask, exclude)) / len(inputs)

    return loss


def validation_ranking(model: PmetaModel, sets: dict[int, ValidationSet], rated: dict[int, np.ndarray]):
    """A checkpoint for early stopping on the metric the evaluation reports: minus the full-ranking
    nDCG@10 of validation users after the serving path, averaged over the support sizes K of ``sets``."""
    if not any(inputs for inputs, _, _ in sets.values()):
        return None

    def loss() -> float:
        return -float(np.mean([validate(model, *sets[k][:2], rated, sets[k][2])["ndcg@10"] for k in sets]))

    return loss


@torch.no_grad()
def validate(model: PmetaModel, inputs: list[UserInput], queries: list[np.ndarray], rated: dict[int, np.ndarray], users: list[int], batch: int = 32) -> dict[str, float]:
    """Full-ranking HR@10, nDCG@10 and MRR on validation users (support = first K positives,
    query = 6..15), with the protocol's own rank and metric definitions."""
    if not inputs:
        return {"users": 0}
    per_user = []
    for start in range(0, len(inputs), batch):
        chunk = inputs[start : start + batch]
        personal, user_batch, _ = model.personalize(chunk)
        scores = model.final_scores(user_batch, personal).cpu().numpy()
        for row, user in enumerate(users[start : start + batch]):
            never_rated = np.setdiff1d(np.arange(scores.shape[1]), rated[user])
            query = queries[start + row]
            ranks = rank_positives(scores[row], query, np.broadcast_to(never_rated, (len(query), len(never_rated))))
            per_user.append(metrics_from_ranks(ranks))
    return {"users": len(per_user), **{name: float(np.mean([m[name] for m in per_user])) for name in ("hr@10", "ndcg@10", "mrr")}}


def user_split(dataset: Dataset, config: BankConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, test) users of a build: the protocol's test users for ``config.seed``
    (:func:`pmeta.eval.protocol.split_users`), and ``config.validation_fraction`` of the rest drawn
    for the bank's early stopping."""
    train_all, test_users = split_users(dataset, seed=config.seed, test_fraction=config.test_fraction)
    shuffled = np.random.default_rng(config.seed + 1).permutation(train_all)
    n_val = int(round(config.validation_fraction * len(shuffled)))
    return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val]), test_users


#: Events of a user's history that :func:`history_keys` hashes (their earliest, by time).
HISTORY_KEY_EVENTS = 8


def history_keys(dataset: Dataset, users) -> list[str]:
    """A key per user of ``users`` (in order) that does not depend on the catalogue: a hash of the
    (timestamp, whole stars) pairs of their earliest :data:`HISTORY_KEY_EVENTS` ratings (whole stars:
    a copy that floors half stars, as ml-100k's layout does, keeps its keys). The build record
    keeps its train users' keys so that an evaluation on another catalogue (a transfer, or the same
    data with one item added) can refuse test users the bank trained on; item ids and titles are
    left out on purpose, since they change with the catalogue. Empty when the dataset has no
    timestamps (all equal): rating values alone would not tell users apart."""
    ratings = dataset.ratings
    if len(ratings) == 0 or ratings.timestamp.min() == ratings.timestamp.max():
        return []
    order = np.lexsort((ratings.rating, ratings.timestamp, ratings.user))
    users_sorted = ratings.user[order]
    starts = np.searchsorted(users_sorted, np.asarray(users, dtype=np.int64))
    keys = []
    for user, start in zip(np.asarray(users, dtype=np.int64), starts):
        rows = order[start : start + HISTORY_KEY_EVENTS]
        rows = rows[ratings.user[rows] == user]
        events = ",".join(f"{int(t)}:{int(np.floor(r))}" for t, r in zip(ratings.timestamp[rows], ratings.rating[rows]))
        keys.append(hashlib.sha256(events.encode()).hexdigest()[:16])
    return keys


def anchor_bias_scale_entry(config: BankConfig) -> dict[str, torch.Tensor]:
    """``{"anchor_bias_scale": (S,)}`` for a bank with the anchors' item bias whose
    ``config.anchor_bias_size_scale`` is not 1 throughout (read per user by :func:`pmeta.tasks.time_prior.weight_of`), else empty."""
    scale = tuple(float(v) for v in config.anchor_bias_size_scale)
    if all(v == 1.0 for v in scale):
        return {}
    return {"anchor_bias_scale": torch.tensor(scale, dtype=torch.float32)}


def init_ease(dataset: Dataset, config: BankConfig, train_users: np.ndarray) -> EASEBaseline:
    """EASE as the collaborative init takes it: ``config.ease_lambda``, else tuned over ``config.ease_lambdas``
    on EASE's own split of ``train_users``, then refitted on all of them."""
    return EASEBaseline(lam=config.ease_lambda, lambdas=config.ease_lambdas).fit(dataset, train_users)


def with_positives(users: np.ndarray, positives: dict[int, np.ndarray], minimum: int) -> np.ndarray:
    """The ``users`` with at least ``minimum`` positives: the train users a build learns from."""
    return np.array([u for u in users if len(positives.get(int(u), ())) >= minimum], dtype=np.int64)


def load_encoder(config: BankConfig) -> FunctionalEncoder:
    """The build's frozen encoder, after checking that ``config.prompt_layer`` is one of its layers."""
    encoder = FunctionalEncoder(config.encoder, device=distributed.device_of(config.device))
    layers = encoder.shape.layers
    if not 0 <= config.prompt_layer < layers:
        raise InvalidConfig(
            f"prompt_layer = {config.prompt_layer}, but the encoder {config.encoder!r} has {layers} layers: "
            f"choose 0 to {layers - 1} (the prompt enters that layer and LoRA applies from it up)"
        )
    return encoder


def build_model(dataset: Dataset, config: BankConfig, progress: Progress | None = None, encoder: FunctionalEncoder | None = None) -> tuple[PmetaModel, dict]:
    """Meta-train a model on the dataset's train users. Returns (model, build record).

    ``encoder`` is the one :func:`load_encoder` returns for ``config`` (loaded here when None)."""
    progress = progress or Progress(False)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    catalog = dataset.catalog
    train_users, val_users, test_users = user_split(dataset, config)
    positives = dataset.positives_by_user()
    times = dataset.positive_times_by_user()
    rated = dataset.rated_by_user()

    encoder = encoder or load_encoder(config)
    texts = catalog.texts()
    item_text = catalog_embeddings(encoder, texts, progress).cpu()  # the build's numpy steps read it; moved with every tensor below

    train_with_pos = with_positives(train_users, positives, config.min_positives)
    if len(train_with_pos) < 2:
        found = "no train user" if len(train_with_pos) == 0 else "only one train user"
        raise InvalidData(f"the dataset has {found} with enough positive ratings (>= 4 stars) to build a bank; it needs at least 2")
    counts = torch.zeros(len(catalog))
    for u in train_with_pos:
        counts[torch.from_numpy(positives[int(u)])] += 1
    cf_factors, cf_scale, item_bias, cf_record, time_entries = collaborative_init(dataset, config, train_with_pos, positives, rated, progress, times, item_text)
    item_keys, key_projection = anchor_keys(item_text, cf_factors, config)
    key_rows = (item_text if item_keys is None else item_keys).numpy()
    user_keys = _unit(np.stack([key_rows[positives[int(u)]].mean(0) for u in train_with_pos]))
    centroids, assignment = choose_anchors(user_keys, config.anchors, config.seed)
    n_anchors = len(centroids)
    sizes = np.bincount(assignment, minlength=n_anchors)
    gamma = cf_record.get("anchor_bias", {}).get("weight", config.anchor_bias_weight or 0.0)
    bias_of_anchors = None
    if gamma > 0:
        ratio = anchor_bias.log_ratio([positives[int(u)] for u in train_with_pos], assignment, n_anchors, len(catalog))
        bias_of_anchors = torch.from_numpy(gamma * ratio)
    bias_scale = anchor_bias_scale_entry(config) if bias_of_anchors is not None else {}
    if bias_scale:
        cf_record.setdefault("anchor_bias", {"weight": gamma})["size_scale"] = list(config.anchor_bias_size_scale)
    generator = torch.Generator().manual_seed(config.seed)
    targets = encoder.lora_targets(config.prompt_layer, tuple(config.lora_targets))
    popular = [texts[i] for i in torch.argsort(counts, descending=True)[:8].tolist()]
    prompt_init = prompt_from_text(encoder, popular, config.prompt_length, config.prompt_layer, config.max_tokens)
    global_adapter = init_adapter(targets, config.anchor_rank, config.prompt_length, encoder.shape.hidden, generator, prompt_init=prompt_init)
    stack_init = init_adapter(targets, config.stack_rank, config.prompt_length, encoder.shape.hidden, generator, prompt_init=torch.zeros(config.prompt_length, encoder.shape.hidden))
    log_lr = math.log(config.inner_lr)
    tensors = Tensors(
        item_text=item_text,
        head={**ranking.init_head(item_text, counts, cf_factors, cf_scale, item_bias=item_bias, text_log_scale=config.text_log_scale, cf_pool_exponent=cf_record.get("pool_exponent", 1.0)), **time_entries, **bias_scale},
        global_adapter=global_adapter,
        global_step_sizes={k: torch.tensor(log_lr) for k in global_adapter},
        anchors={k: v.unsqueeze(0).repeat(n_anchors, *([1] * v.dim())) for k, v in global_adapter.items()},
        anchor_keys=torch.from_numpy(centroids).float(),
        anchor_sizes=torch.from_numpy(sizes).float(),
        stack_init=stack_init,
        stack_step_sizes={k: torch.tensor(log_lr) for k in stack_init},
        log_temperature=torch.tensor(math.log(config.temperature)),
        item_keys=item_keys,
        key_projection=key_projection,
        anchor_bias=bias_of_anchors,
    ).to(encoder.device)  # every tensor on the build's device (CPU tensors above: counts, PureSVD, inits)
    model = PmetaModel(config, encoder, texts, tensors)
    if config.crossfit_folds:
        model.crossfit = training_priors(dataset, config, train_with_pos, positives, cf_record, time_entries, assignment, n_anchors, gamma, bias_of_anchors).to(encoder.device)
    strategy = get_strategy(config.meta)
    # under torchrun each rank meta-trains on its own shard of users with its own episode stream
    sampler = EpisodeSampler(positives, rated, distributed.shard(train_with_pos), texts, config, seed=distributed.rank_seed(config.seed + 2), times=times)
    val_sets = validation_sets(positives, val_users, texts, times=times)
    val_inputs, val_queries, val_kept = val_sets[5]
    checkpoint = None
    if config.early_stopping:
        measure = validation_ranking(model, val_sets, rated) if config.early_stopping_metric == "ndcg" else validation_loss(model, val_inputs, val_queries, rated, val_kept)
        checkpoint = Checkpoint(measure) if measure is not None else None
    validation: dict[str, dict] = {}
    if checkpoint is not None:
        validation["early_stopping"] = {"metric": config.early_stopping_metric, "start": checkpoint()}
    elif config.early_stopping:  # said in the build record, not silently skipped
        validation["early_stopping"] = {"metric": config.early_stopping_metric, "skipped": "no validation user has the 6 positive ratings a validation case needs"}
    if config.validate_stages:
        validation["start"] = validate(model, val_inputs, val_queries, rated, val_kept)
    losses: dict[str, list[float]] = {}

    def run(stage, steps: int) -> None:
        with progress.task(f"meta-train {stage.name}", steps) as bar:
            losses[stage.name] = meta_train(model, sampler, stage, strategy, steps, distributed.local_batch(config.meta_batch_users), on_step=lambda loss: bar.advance(1, loss=loss), checkpoint=checkpoint)

    with progress.task("fit item/user towers", config.tower_steps) as bar:
        losses["towers"] = pretrain_towers(model, sampler, config, config.tower_steps, distributed.local_batch(config.tower_batch_users), on_step=lambda loss: bar.advance(1, loss=loss), rounds=config.tower_rounds, checkpoint=checkpoint)
    if config.validate_stages:
        validation["towers"] = validate(model, val_inputs, val_queries, rated, val_kept)
    run(global_stage(model, config), config.global_steps)
    if config.validate_stages:
        validation["global"] = validate(model, val_inputs, val_queries, rated, val_kept)
    # Anchors start from the meta-learned global prior (unless that ranks validation users worse than
    # the anchors' current values: early stopping then keeps those, so no step makes the model worse).
    before = (checkpoint.known(), dict(tensors.anchors)) if checkpoint is not None else None
    for key, value in tensors.global_adapter.items():
        tensors.anchors[key] = value.detach().unsqueeze(0).repeat(n_anchors, *([1] * value.dim())).contiguous()
    if before is not None and checkpoint() > before[0]:
        tensors.anchors.update(before[1])
        checkpoint.settle(before[0])
    assignment_by_user = {int(u): int(a) for u, a in zip(train_with_pos, assignment)}
    run(anchor_stage(model, config, assignment_by_user), config.anchor_steps)
    if config.validate_stages:
        validation["anchors"] = validate(model, val_inputs, val_queries, rated, val_kept)
    run(stack_stage(model, config), config.stack_steps)
    validation["final"] = validate(model, val_inputs, val_queries, rated, val_kept)
    if checkpoint is not None:
        validation["early_stopping"]["final"] = checkpoint.known()  # never above "start": every stage keeps its best
    if config.time_prior_weight_served:
        with progress.task("time-prior weight on the served model", 1) as bar:
            per_size, validation["time_prior_served"] = calibrate.choose_served(model, dataset, val_users, config.seed)
            bar.advance(1)
        if per_size is not None:
            # stored as a build stores a chosen β (time_prior.head_entries): equal values as one, 0 throughout as no prior
            device = tensors.head["time_weight"].device
            prior = {k: tensors.head.pop(k) for k in [k for k in tensors.head if k.startswith("time_")] if k != "time_weight"}
            del tensors.head["time_weight"]
            tensors.head.update({k: v.to(device) for k, v in time_prior.head_entries(prior, per_size).items()})
            # the record's "final" (and the build's printed validation HR@10) describe the bank as stored;
            # collaborative_init.time_prior keeps the one β meta-training used
            validation["final_one_weight"] = validation["final"]
            validation["final"] = validate(model, val_inputs, val_queries, rated, val_kept)

    medoids = []
    for a in range(n_anchors):
        members = np.flatnonzero(assignment == a)
        best = members[np.argmax(user_keys[members] @ centroids[a])] if len(members) else None
        medoids.append(dataset.ratings.user_ids[int(train_with_pos[best])] if best is not None else "")
    record = {
        "seconds": time.perf_counter() - started,
        "encoder_fingerprint": encoder.fingerprint(),
        "validation": validation,
        "collaborative_init": cf_record,
        "losses": {k: [float(np.mean(v[i : i + 10])) for i in range(0, len(v), 10)] for k, v in losses.items()},
        "train_users": [dataset.ratings.user_ids[int(u)] for u in train_users],
        "train_history_keys": history_keys(dataset, train_users),
        "validation_users": [dataset.ratings.user_ids[int(u)] for u in val_users],
        "test_users": [dataset.ratings.user_ids[int(u)] for u in test_users],
        "anchors": [{"position": a, "n_users": int(sizes[a]), "label": medoids[a]} for a in range(n_anchors)],
    }
    return model, record


def collaborative_init(dataset: Dataset, config: BankConfig, train_users: np.ndarray, positives: dict[int, np.ndarray], rated: dict[int, np.ndarray], progress: Progress, times: dict[int, np.ndarray] | None = None, item_text: torch.Tensor | None = None):
    """The closed-form init of the towers' collaborative part (``config.cf_init``), from the train users only.

    Returns ((history, item) factors or None, their score scale, an item bias (N,) or None, a
    record for the build file, and the head entries of the time prior ({} without one)).
    ``onboarding`` (:mod:`pmeta.bank.onboarding`) chooses its λ, weight and pooling exponent γ on
    EASE's own split of the train users and refits on all of them; the time prior's bandwidth and
    weight are then chosen on the same split (:func:`choose_time_prior`), and then the weight γ of
    the anchors' item bias (:func:`choose_anchor_bias`; ``item_text`` gives text keys)."""
    n_items = len(dataset.catalog)
    train_positives = [positives[int(u)] for u in train_users]

    def fixed_prior() -> dict[str, torch.Tensor]:  # the other inits: a time prior only when β is set
        return time_prior_entries(dataset, config, train_users, fixed_bandwidth(config), config.time_prior_weight or 0.0, config.time_prior_pseudo_ratings[0])

    if config.cf_rank == 0:
        return None, 1.0, None, {"kind": "none"}, fixed_prior()
    if config.cf_init == "puresvd":
        factors, scale = ranking.pure_svd(train_positives, n_items, config.cf_rank)
        return factors, scale, None, {"kind": "puresvd"}, fixed_prior()
    with progress.task(f"collaborative init ({config.cf_init})", 1) as bar:
        # EASE's λ is tuned on a split of the train users (the baseline's own validation), then refit on all of them
        ease = init_ease(dataset, config, train_users)
        record = {"kind": config.cf_init, "ease_lambda": ease.chosen_lam}
        if config.cf_init == "ease":
            factors, scale = ranking.ease_factors(train_positives, n_items, config.cf_rank, ease.weights, ease.kept_items)
            bar.advance(1)
            return factors, scale, None, record, fixed_prior()
        split = fit_onboarding(dataset, config, ease, train_users, positives, rated)
        chosen = split.chosen
        entries, record["time_prior"] = {}, {"weight": 0.0}
        if config.time_prior_weight != 0.0 or config.anchor_bias_weight is None:
            cases, base = split.validation_scorer(dataset, positives)
            h, weight, pseudo = 365.0, 0.0, 0.0
            if cases and config.time_prior_weight != 0.0 and times is not None:
                h, weight, pseudo, grid = choose_time_prior(dataset, config, split.fit_users, cases, base)
                entries = time_prior_entries(dataset, config, train_users, h, weight, pseudo)
                record["time_prior"] = {"bandwidth_days": h, "weight": list(weight) if isinstance(weight, tuple) else weight, "pseudo_ratings": pseudo, "kind": config.time_prior_kind, "causal": config.time_prior_causal, "validation_ndcg": grid}
            if cases and config.anchor_bias_weight is None and item_text is not None:
                gamma, grid = choose_anchor_bias(dataset, config, split.fit_users, cases, base, h, weight, [positives[int(u)] for u in split.fit_users], item_text, pseudo)
                record["anchor_bias"] = {"weight": gamma, "validation_ndcg": grid}
            del base
        del split, ease
        factors, scale, bias = ranking.matrix_factors(train_positives, n_items, config.cf_rank, chosen.matrix, chosen.kept, chosen.bias, chosen.exponent)
        bar.advance(1)
    record.update(onboarding_lambda=chosen.lam, onboarding_weight=chosen.weight, pool_exponent=chosen.exponent, onboarding_validation_ndcg=chosen.validation)
    return factors, scale, bias, record, entries


@dataclass
class OnboardingSplit:
    """The onboarding model chosen on EASE's own split of the train users (``fit_users`` /
    ``validation_users``): ``fit_ease`` is EASE's item-item matrix B at the chosen λ on the fit users only, ``chosen`` the
    onboarding regression's choice (refit on every train user), :func:`fit_onboarding`."""

    fit_users: np.ndarray
    validation_users: np.ndarray
    fit_ease: np.ndarray
    chosen: onboarding.OnboardingFit

    def validation_scorer(self, dataset: Dataset, positives: dict[int, np.ndarray]) -> tuple[list, "OnboardingScores | None"]:
        """(validation cases, :func:`pmeta.tasks.time_prior.validation_cases` of the validation users;
        the onboarding model refitted on the fit users as their scorer, None without cases): what the
        build's later validation grids (time prior, anchors' item bias) score on."""
        chosen, n_items = self.chosen, len(dataset.catalog)
        cases = time_prior.validation_cases(dataset, self.validation_users)
        if not cases:
            return cases, None
        matrix, bias = onboarding.refit(chosen, [positives[int(u)] for u in self.fit_users], self.fit_ease, n_items)
        base = OnboardingScores(matrix, bias, chosen.kept, chosen.exponent, n_items)
        base.scale = float(np.mean([base(case.support).std() for case, _ in cases])) or 1.0
        return cases, base


def fit_onboarding(dataset: Dataset, config: BankConfig, ease: EASEBaseline, train_users: np.ndarray, positives: dict[int, np.ndarray], rated: dict[int, np.ndarray]) -> OnboardingSplit:
    """Choose the onboarding regression's λ, weight and pooling exponent (:func:`pmeta.bank.onboarding.fit`,
    grids unless fixed in ``config``) on ``ease``'s split of the train users (``ease`` fitted on them)."""
    fit_users, validation_users = ease.validation_split(train_users)
    kept = ease.kept_items
    fit_matrix = positive_matrix(dataset, fit_users)[:, kept]
    fit_ease = EASEBaseline.closed_form(fit_matrix.T @ fit_matrix, ease.chosen_lam)
    del fit_matrix
    chosen = onboarding.fit(
        [positives[int(u)] for u in fit_users],
        fit_ease,
        [positives[int(u)] for u in validation_users],
        [rated[int(u)] for u in validation_users],
        [positives[int(u)] for u in train_users],
        ease.weights,
        kept,
        len(dataset.catalog),
        lambdas=(config.onboarding_lambda,) if config.onboarding_lambda is not None else onboarding.LAMBDAS,
        weights=(config.onboarding_weight,) if config.onboarding_weight is not None else onboarding.WEIGHTS,
        exponents=(config.cf_pool_exponent,) if config.cf_pool_exponent is not None else onboarding.EXPONENTS,
    )
    return OnboardingSplit(fit_users, validation_users, fit_ease, chosen)


def fixed_bandwidth(config: BankConfig) -> float:
    """The time prior's bandwidth (days) of the inits without its grid (puresvd, ease): the config's, else 365."""
    return config.time_prior_bandwidth or 365.0


def training_priors(dataset: Dataset, config: BankConfig, train_with_pos: np.ndarray, positives: dict[int, np.ndarray], cf_record: dict, time_entries: dict, assignment: np.ndarray | None, n_anchors: int, gamma: float, bias_of_anchors: torch.Tensor | None = None) -> crossfit.CrossFit:
    """The cross-fitted training priors (:mod:`pmeta.bank.crossfit`): the same time prior (h, β, m) and
    anchors' bias (γ, anchors) as the bank's (``time_entries``, ``bias_of_anchors``), per fold of
    ``train_with_pos`` without that fold."""
    weight = time_entries["time_weight"].tolist() if "time_weight" in time_entries else 0.0  # one β, or one per history size
    bandwidth = cf_record.get("time_prior", {}).get("bandwidth_days", fixed_bandwidth(config))  # the grid's choice, else the fixed one
    ratings = dataset.ratings
    return crossfit.build(
        config.crossfit_folds,
        config.seed + 5,
        train_with_pos,
        (ratings.user, ratings.item, ratings.timestamp),
        [positives[int(u)] for u in train_with_pos],
        len(dataset.catalog),
        bandwidth,
        weight,
        assignment,
        n_anchors,
        gamma,
        serving_prior=time_entries,
        serving_bias=bias_of_anchors,
        kind=config.time_prior_kind,
        pseudo_ratings=float(time_entries["time_pseudo_ratings"]) if "time_pseudo_ratings" in time_entries else 0.0,
    )


def bank_training_priors(model: PmetaModel, build_record: dict, dataset: Dataset) -> crossfit.CrossFit:
    """The cross-fitted time prior of a built bank, for a training loop run on its train users
    after the build (prompt-MAML's meta-training in ``pmeta eval``): the build's folds, h and β,
    from its build record and ``dataset`` (the one it was built on). No anchor bias: the loops
    that add it (the anchor and stack stages) run only in the build."""
    config = model.config
    ids = {u: i for i, u in enumerate(dataset.ratings.user_ids)}
    positives = dataset.positives_by_user()
    train_with_pos = with_positives(np.array(sorted(ids[u] for u in build_record.get("train_users", []) if u in ids), dtype=np.int64), positives, config.min_positives)
    if len(train_with_pos) < config.crossfit_folds:
        raise InvalidData(f"the bank's build record lists {len(train_with_pos)} train users of this dataset, fewer than its {config.crossfit_folds} cross-fitting folds")
    time_entries = {k: v.detach().cpu() for k, v in model.t.head.items() if k.startswith("time_")}
    return training_priors(dataset, config, train_with_pos, positives, build_record.get("collaborative_init", {}), time_entries, None, 0, 0.0)


def time_prior_entries(dataset: Dataset, config: BankConfig, users: np.ndarray, bandwidth_days: float, weight: float | tuple[float, ...], pseudo_ratings: float = 0.0) -> dict[str, torch.Tensor]:
    """Head entries of a time prior built from ``users``' ratings ({} when β = 0), with m =
    ``pseudo_ratings`` pseudo-ratings of the all-time share (exponential kind)."""
    if time_prior.weights_off(weight):
        return {}
    items, stamps = time_prior.rating_events(dataset, users)
    return time_prior.head_entries(time_prior.build(items, stamps, len(dataset.catalog), bandwidth_days, config.time_prior_kind, pseudo_ratings), weight)


class OnboardingScores:
    """The onboarding model fitted on the fit users of EASE's split, as a scorer of a support: its
    folding-in ``bias + Σ M_j / K^γ`` over the whole catalogue (items outside ``kept`` get the lowest
    bias), divided by ``scale`` (the mean spread over the validation supports, so the head's
    unit-scale terms are weighed as they are in the bank)."""

    def __init__(self, matrix: np.ndarray, bias: np.ndarray, kept: np.ndarray, exponent: float, n_items: int) -> None:
        self.matrix, self.bias, self.kept, self.exponent, self.n_items = matrix, bias, kept, exponent, n_items
        self.position = np.full(n_items, -1, dtype=np.int64)
        self.position[kept] = np.arange(len(kept))
        self.floor = float(bias.min()) if len(bias) else 0.0
        self.scale = 1.0

    def __call__(self, support: np.ndarray) -> np.ndarray:
        cols = self.position[support]
        cols = cols[cols >= 0]
        scores = np.full(self.n_items, self.floor, dtype=np.float64)
        scores[self.kept] = self.bias + (self.matrix[cols].sum(0) / len(cols) ** self.exponent if len(cols) else 0.0)
        return scores / self.scale

    def history_factors(self, rank: int) -> torch.Tensor:
        """(N, rank) history factors ``U Σ`` of the matrix (zero rows outside ``kept``), as
        :func:`pmeta.tasks.ranking.matrix_factors` gives the bank."""
        u, sigma, _ = ranking.svd(self.matrix, rank)
        rows = torch.zeros(self.n_items, len(sigma))
        rows[torch.from_numpy(np.asarray(self.kept, dtype=np.int64))] = torch.from_numpy(np.ascontiguousarray(u * sigma)).float()
        return rows


def choose_time_prior(dataset: Dataset, config: BankConfig, fit_users, cases: list, base: OnboardingScores):
    """(h, β, m, grid scores) of the time prior on EASE's validation split of the train users (``cases``,
    :func:`pmeta.tasks.time_prior.validation_cases`): the base scores are the onboarding model
    fitted on ``fit_users``, the prior counts ``fit_users``' ratings. With
    ``config.time_prior_weight_by_size`` (and β not fixed) β is a tuple, one per history size 1 … 5."""
    bandwidths = (config.time_prior_bandwidth,) if config.time_prior_bandwidth is not None else time_prior.BANDWIDTHS
    weights = (config.time_prior_weight,) if config.time_prior_weight is not None else time_prior.WEIGHTS
    per_size = config.time_prior_weight_by_size and config.time_prior_weight is None
    ks = tuple(range(1, QUERY_START + 1)) if per_size else (1, 3, 5)
    return time_prior.choose(base, cases, time_prior.rating_events(dataset, fit_users), len(dataset.catalog), bandwidths, weights, ks=ks, kind=config.time_prior_kind, pseudo_ratings=config.time_prior_pseudo_ratings, per_size=per_size)


@dataclass
class AnchorBiasInputs:
    """What the anchors' item bias is chosen from (:func:`anchor_bias_inputs`): ``scores(support, t)``
    the base model, ``key(support)`` a unit retrieval key, the fit users' anchors (``centroids``,
    each fit user's ``assignment``, ``sizes``) with their ``ratio`` (:func:`pmeta.fusion.anchor_bias.log_ratio`),
    and ``popularity`` (the fit users' rating counts, for ``pop99``)."""

    scores: Callable[[np.ndarray, float], np.ndarray]
    key: Callable[[np.ndarray], np.ndarray]
    centroids: np.ndarray
    assignment: np.ndarray
    ratio: np.ndarray
    sizes: np.ndarray
    popularity: np.ndarray


def anchor_bias_inputs(dataset: Dataset, config: BankConfig, fit_users, base: OnboardingScores, h: float, beta: float | tuple[float, ...], fit_positives: list[np.ndarray], item_text: torch.Tensor, pseudo_ratings: float = 0.0) -> AnchorBiasInputs:
    """The fit users are clustered as the build clusters the train users (``config.anchors``
    spherical k-means in the ``config.key_space`` space, here from the fit users' own matrix, through
    :func:`anchor_keys`); the base scores are the onboarding model plus the time prior (h, β, m)."""
    n_items = len(dataset.catalog)
    key_rows, _ = anchor_keys(item_text, None if config.key_space == "text" else base.history_factors(config.cf_rank), config)
    rows = (item_text if key_rows is None else key_rows).float().numpy()
    fit_keys = _unit(np.stack([rows[items].mean(0) for items in fit_positives]))
    centroids, assignment = choose_anchors(fit_keys, config.anchors, config.seed)
    ratio = anchor_bias.log_ratio(fit_positives, assignment, len(centroids), n_items)
    sizes = np.bincount(assignment, minlength=len(centroids)).astype(np.float64)
    events = time_prior.rating_events(dataset, fit_users)
    prior = None if time_prior.weights_off(beta) else time_prior.build(events[0], events[1], n_items, h, config.time_prior_kind, pseudo_ratings)
    betas = torch.tensor(beta, dtype=torch.float64)  # one β, or one per history size

    def scores(support: np.ndarray, t: float) -> np.ndarray:
        out = base(support)
        if prior is not None:
            out = out + float(time_prior.weight_of(betas, [len(support)])[0]) * time_prior.log_prior_at(prior, [t])[0].numpy().astype(np.float64)
        return out

    def key(support: np.ndarray) -> np.ndarray:
        return _unit(rows[support].mean(0)[None, :])[0]

    popularity = np.bincount(np.asarray(events[0], dtype=np.int64), minlength=n_items).astype(np.float64)
    return AnchorBiasInputs(scores, key, centroids, assignment, ratio, sizes, popularity)


def choose_anchor_bias(dataset: Dataset, config: BankConfig, fit_users, cases: list, base: OnboardingScores, h: float, beta: float | tuple[float, ...], fit_positives: list[np.ndarray], item_text: torch.Tensor, pseudo_ratings: float = 0.0) -> tuple[float, dict]:
    """(γ, grid scores) of the anchors' item bias on EASE's validation split of the train users:
    a validation user (``cases``) retrieves ``config.top_k`` of the fit users' anchors
    (:func:`anchor_bias_inputs`) at the initial temperature; ``pop99`` samples by the fit users'
    rating counts, as for the time prior."""
    inputs = anchor_bias_inputs(dataset, config, fit_users, base, h, beta, fit_positives, item_text, pseudo_ratings)
    weights = (config.anchor_bias_weight,) if config.anchor_bias_weight is not None else anchor_bias.WEIGHTS
    return anchor_bias.choose(inputs.scores, cases, inputs.key, inputs.centroids, inputs.ratio, inputs.sizes, config.top_k, config.temperature, inputs.popularity, weights)


def build_bank(dataset: Dataset, out: str | Path, config: BankConfig, db_url: str | None = None, progress: Progress | None = None) -> BuildResult:
    """Build and publish a new bank version into ``out``; returns its id and the build record.

    The version becomes active only once every file is written, checksummed and recorded (see
    :mod:`pmeta.storage`); a failed or killed build leaves the previous version active.
    Raises InvalidRequest for a ``dataset`` that is not a Dataset, or an ``out`` that is not a path or
    that the system refuses (a name too long, a read-only folder); InvalidData for a dataset with fewer
    than 2 users with positive ratings; InvalidConfig for a ``config`` that is not a BankConfig or a
    bad ``db_url``; BankNotFound if ``out`` is a file or a non-empty folder that is not a bank;
    BankIntegrityError if the bank's database is of an unknown revision; BankBusy if
    another build is publishing into the same bank; BankUnavailable if the database cannot be reached;
    TrainingDiverged if meta-training produces non-finite values; OSError if a write fails because
    of the machine (a full disk).
    """
    from ..storage import BankStore
    from .bank import BUILD_FILE, CATALOG_FILE, INDEX_FILE, TENSORS_FILE

    if not isinstance(dataset, Dataset):
        raise InvalidRequest(f"dataset must be a pmeta Dataset (pmeta.data.load_sample(), read_movielens(...)), not {type(dataset).__name__}")
    if not isinstance(config, BankConfig):
        raise InvalidConfig(f"config must be a BankConfig (pmeta.load_config(...)), not {type(config).__name__}")
    store = BankStore(out, db_url)  # checks the path's type and the URL; touches nothing on disk
    progress = progress or Progress(False)
    distributed_run = distributed.init_from_env(config.device)
    encoder = load_encoder(config)  # a bad prompt_layer fails here, before the bank folder exists
    if distributed_run and not distributed.is_main():
        # torchrun: ranks > 0 contribute meta-gradients only; rank 0 takes the lock and writes
        model, record = build_model(dataset, config, Progress(False), encoder)
        version = distributed.share_from_main(None)
        distributed.shutdown()
        return BuildResult(version, record["seconds"], record["validation"], len(record["train_users"]), len(record["test_users"]))
    with store.new_version() as writer:  # takes the build lock before any training starts
        model, record = build_model(dataset, config, progress, encoder)
        catalog = dataset.catalog
        writer.write_tensors(TENSORS_FILE, model.t.to_flat())
        writer.write_bytes(INDEX_FILE, model.index.to_bytes())
        writer.write_json(CATALOG_FILE, {"item_ids": catalog.item_ids, "titles": catalog.titles, "genres": catalog.genres})
        writer.write_json(BUILD_FILE, {k: v for k, v in record.items() if k != "test_users"})
        version = writer.publish(
            config=config.model_dump(),
            dataset_name=dataset.name,
            dataset_fingerprint=dataset.fingerprint,
            anchors=record["anchors"],
            held_out_users=record["test_users"],
            notes=f"{dataset.format} {dataset.name}; meta={config.meta}",
        )
    store.close()
    distributed.share_from_main(version)
    distributed.shutdown()
    return BuildResult(version, record["seconds"], record["validation"], len(record["train_users"]), len(record["test_users"]))

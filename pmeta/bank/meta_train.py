"""One meta-training loop for every stage of the bank build and every strategy.

An outer step: sample U users → split support/query → build each user's (init, fixed) adapter for
the stage → ``adapt`` (the same function serving runs) on the support → the strategy's outer loss on
the query → Adam step on the stage's trainable tensors.

Stages differ only in where the init comes from and what is trained:

* ``global``: init = the global adapter; trains it, its step sizes and the ranking head;
* ``anchors``: init = the anchor of the user's cluster; trains the anchors;
* ``stack``: fixed = top-k anchors retrieved by the user's support key and fused with weights
  softmax(sim/τ); init = the stacked adapter; trains the stacked init, its step sizes and τ.

The ``anchors`` and ``stack`` stages add the anchors' item bias (:mod:`pmeta.fusion.anchor_bias`)
to the scores, as serving does: the user's own anchor's, and the retrieved anchors' fused one.
Stage 0 and the ``global`` stage fit the head without it (it is fixed, and those stages have no
anchors), while their early-stopping checkpoint, which serves validation users, includes it.

With ``crossfit_folds`` set, every stage scores a train user with the time prior and anchor bias
counted without that user's fold (:mod:`pmeta.bank.crossfit`, :func:`training_batch`), as serving
scores a new user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..adapt.inner import adapt
from ..adapt.strategies import Strategy
from ..errors import TrainingDiverged
from ..fusion.fuse import fuse_users, fusion_weights
from ..models.personal import Adapter, expand_users, stack
from ..tasks import ranking
from . import distributed
from .episodes import Episode, EpisodeSampler
from .model import PmetaModel


@dataclass
class Stage:
    name: str
    # (init, fixed adapter or None, step sizes, the anchors' item bias (U, N) added to the scores or None)
    build: Callable[[PmetaModel, Episode], tuple[Adapter, Adapter | None, dict[str, torch.Tensor], torch.Tensor | None]]
    param_groups: list[dict]
    pool: np.ndarray | None = None  # users to sample from (None: every train user)


def head_groups(model: PmetaModel, config) -> list[dict]:
    """Adam groups of the ranking head. Adam moves every entry by ~lr per step, so the dense (d, d)
    projections need a far smaller rate than the per-item rows, or the first steps destroy their
    identity initialisation."""
    head = model.t.head
    embeddings = [head[k] for k in ("item_embedding", "history_embedding") if k in head]
    return [
        {"params": [head["user_proj"], head["item_proj"]], "lr": config.projection_lr},
        {"params": [head[k] for k in ("item_bias", "log_scale", "cf_log_scale") if k in head], "lr": config.scalar_lr},
        {"params": embeddings, "lr": config.head_lr, "weight_decay": config.embedding_decay},
    ]


def global_stage(model: PmetaModel, config) -> Stage:
    t = model.t

    def build(m: PmetaModel, episode: Episode):
        return expand_users(t.global_adapter, len(episode.users)), None, t.global_step_sizes, None

    groups = [{"params": list(t.global_adapter.values()), "lr": config.outer_lr}, *head_groups(model, config)]
    if _learns_step_sizes(config):
        groups.append({"params": list(t.global_step_sizes.values()), "lr": config.outer_lr})
    return Stage("global", build, groups)


def without_states(batch: ranking.UserBatch) -> ranking.UserBatch:
    """``batch`` with its encoder states (U, T, d) dropped, keeping the user axis (``batch.users``).

    A fresh empty tensor, not a zero-length slice: a slice is a view that keeps the whole states'
    storage alive, which in stage 0's episode pool held ~200 KB per cached user (3.5 GB of a
    6.2 GB peak on an ml-1m-sized build)."""
    batch.hidden = batch.hidden.new_empty((batch.hidden.shape[0], 0, *batch.hidden.shape[2:]))
    return batch


def pretrain_towers(model: PmetaModel, sampler: EpisodeSampler, config, outer_steps: int, batch_users: int, on_step: Callable[[float], None] | None = None, rounds: int = 4, checkpoint: Checkpoint | None = None) -> list[float]:
    """Stage 0: fit the ranking head (item and user towers) with the adapter frozen at the global
    init and no inner steps.

    With the adapter frozen, a user's pooled encoder output depends only on the support set, so
    the encoder runs once over a fixed pool of ``rounds`` episodes per train user and every head
    step reuses those vectors (the head is a few matrix products): many more steps for the same
    time than running the encoder per step. The meta-learning stages then start from towers that
    already rank well."""
    if outer_steps == 0:  # nothing to fit: skip the encoder passes over the episode pool
        return []
    adapter = model.t.global_adapter
    cached: list[tuple[Episode, ranking.UserBatch, torch.Tensor]] = []
    for _ in range(rounds):
        users = sampler.rng.permutation(sampler.users)
        for start in range(0, len(users), batch_users):
            episode = sampler.episode([int(u) for u in users[start : start + batch_users]])
            batch = training_batch(model, episode)
            with torch.no_grad():
                pooled = model.encoder.upper(batch.hidden, batch.mask, expand_users(adapter, len(episode.users)), model.config.prompt_layer)
            cached.append((episode, without_states(batch), pooled))

    device = model.t.item_text.device

    def episode_loss() -> torch.Tensor:
        episode, batch, pooled = cached[int(sampler.rng.integers(len(cached)))]
        scores = ranking.logits(model.t.head, model.t.item_text, ranking.user_vectors(model.t.head, pooled, batch), batch.prior)
        query = [t.to(device) for t in (episode.query_targets, episode.query_mask, episode.query_exclude)]
        return ranking.softmax_loss(scores, *query) / len(episode.users)

    return _optimize(head_groups(model, config), episode_loss, outer_steps, on_step, checkpoint=checkpoint, every=100)


def anchor_stage(model: PmetaModel, config, assignment: dict[int, int]) -> Stage:
    t = model.t

    def build(m: PmetaModel, episode: Episode):
        idx = torch.tensor([assignment[u] for u in episode.users], dtype=torch.long, device=t.item_text.device)
        if m.crossfit is not None:  # each user's own anchor's item bias, counted without the user's fold
            offset = m.crossfit.own_bias(episode.users, idx)
        else:
            offset = None if t.anchor_bias is None else t.anchor_bias[idx]  # each user's own anchor's item bias
        return {k: v[idx] for k, v in t.anchors.items()}, None, t.global_step_sizes, offset

    pool = distributed.shard(np.array(sorted(assignment), dtype=np.int64))  # this rank's part (all of them in one process)
    return Stage("anchors", build, [{"params": list(t.anchors.values()), "lr": config.outer_lr}], pool)


def stack_stage(model: PmetaModel, config) -> Stage:
    t = model.t

    def build(m: PmetaModel, episode: Episode):
        keys = m.user_keys(episode.support)
        sims, idx = m.retrieve(keys)
        weights = fusion_weights(sims, m.temperature())
        # users without a key get the zero-history prior, as in serving (no build has any: every
        # episode user has liked items with collaborative rows)
        fixed, _ = fuse_users(t.anchors, idx, weights, m.has_key(keys), t.anchor_sizes, config.fusion, config.anchor_rank)
        # the retrieved anchors' fused item bias, as in serving (counted without the user's fold when cross-fitted)
        if m.crossfit is not None:
            offset = m.crossfit.fused_bias(episode.users, idx, weights, m.has_key(keys), t.anchor_sizes)
        else:
            offset = m.anchor_offset(keys, sims, idx)
        return expand_users(t.stack_init, len(episode.users)), fixed, t.stack_step_sizes, offset

    groups = [{"params": list(t.stack_init.values()), "lr": config.outer_lr}, {"params": [t.log_temperature], "lr": config.outer_lr}]
    if _learns_step_sizes(config):
        groups.append({"params": list(t.stack_step_sizes.values()), "lr": config.outer_lr})
    return Stage("stack", build, groups)


def _learns_step_sizes(config) -> bool:
    return config.meta == "maml" and config.inner_steps > 0


def training_batch(model: PmetaModel, episode: Episode) -> ranking.UserBatch:
    """The episode's support batch (:meth:`PmetaModel.user_batch`); with cross-fitting
    (:mod:`pmeta.bank.crossfit`) its time prior is counted without each user's fold."""
    batch = model.user_batch(episode.support)
    if model.crossfit is not None:
        batch.prior = model.crossfit.prior(episode.users, [u.time for u in episode.support], model.t.item_text.device, [len(u.liked_items) for u in episode.support])
    return batch


def outer_step(model: PmetaModel, stage: Stage, strategy: Strategy, episode: Episode, steps: int) -> torch.Tensor:
    """The outer loss of one episode (mean over its users), ready for ``backward``."""
    device = model.t.item_text.device
    batch = training_batch(model, episode)
    init, fixed, step_sizes, offset = stage.build(model, episode)
    batch.prior = ranking.add_prior(batch.prior, offset)
    if strategy.inner_on_query:
        targets, mask = episode.support_and_query
    else:
        targets, mask = model.targets_of(episode.support, model.config.max_history_items)
    targets, mask = targets.to(device), mask.to(device)
    adapted = adapt(init, model.loss_fn(batch, targets, mask), steps, step_sizes, fixed=fixed, create_graph=strategy.second_order)
    query = [t.to(device) for t in (episode.query_targets, episode.query_mask, episode.query_exclude)]

    def query_loss(params: Adapter) -> torch.Tensor:
        full = stack(fixed, params) if fixed is not None else params
        scores = model.scores(batch, full)
        return ranking.softmax_loss(scores, *query)

    return strategy.outer_loss(init, adapted, query_loss) / len(episode.users)


def meta_train(model: PmetaModel, sampler: EpisodeSampler, stage: Stage, strategy: Strategy, outer_steps: int, batch_users: int, on_step: Callable[[float], None] | None = None, checkpoint: Checkpoint | None = None, every: int = 20) -> list[float]:
    """Run ``outer_steps`` Adam steps of ``stage``; returns the outer loss of every step."""

    def episode_loss() -> torch.Tensor:
        return outer_step(model, stage, strategy, sampler.sample(batch_users, stage.pool), model.config.inner_steps)

    return _optimize(stage.param_groups, episode_loss, outer_steps, on_step, checkpoint=checkpoint, every=every)


class Checkpoint:
    """A validation loss for early stopping (lower is better) that remembers its value at the
    tensors' current state.

    Every stage starts where the previous one ended, at that stage's best (restored) tensors, whose
    value :func:`_optimize` already measured: it hands the value on (:meth:`settle`) and the next
    stage reads it (:meth:`known`) instead of measuring the same tensors again (a full-ranking pass
    over every validation user per support size). Calling it measures. Code that changes the
    tensors outside :func:`_optimize` calls it again, or :meth:`settle` when it restores tensors
    whose value it knows."""

    def __init__(self, measure: Callable[[], float]) -> None:
        self.measure = measure
        self.value: float | None = None

    def __call__(self) -> float:
        self.value = float(self.measure())
        return self.value

    def known(self) -> float:
        """The value at the current tensors: remembered, or measured now."""
        return self.value if self.value is not None else self()

    def settle(self, value: float | None) -> None:
        """The tensors are now at a state whose value is ``value`` (None: unknown, measure next time)."""
        self.value = value


def _optimize(groups: list[dict], loss_fn: Callable[[], torch.Tensor], steps: int, on_step: Callable[[float], None] | None, clip: float = 5.0, checkpoint: Checkpoint | Callable[[], float] | None = None, every: int = 25) -> list[float]:
    """AdamW over ``groups`` for ``steps`` calls of ``loss_fn``; the tensors are trainable only meanwhile.

    With ``checkpoint`` (a validation loss, lower is better, measured on validation users that are
    never trained on), the loss is known before training (a :class:`Checkpoint` remembers it from the
    previous stage; a plain callable is called) and measured every ``every`` steps, and the tensors
    end at their best measured values: early stopping, so a stage never leaves the model worse on
    validation users than it found it. With ``steps == 0`` nothing is trained or measured.
    """
    params = [p for group in groups for p in group["params"]]
    distributed.broadcast_(params)  # every rank starts from rank 0's values (no-op in one process)
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint(checkpoint)  # nothing remembered: measured at the start
    if checkpoint is not None and distributed.world_size() > 1:
        checkpoint.settle(None)  # the broadcast may have changed this rank's tensors
    best = None
    if checkpoint is not None and steps > 0:
        best = (checkpoint.known(), [p.detach().clone() for p in params])
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([{**g, "weight_decay": g.get("weight_decay", 0.0)} for g in groups], betas=(0.9, 0.99))
    losses: list[float] = []
    try:
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            loss_value = distributed.average_gradients(params, loss)  # all-reduce across ranks; loss.item() alone
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            if not (np.isfinite(loss_value) and bool(torch.isfinite(norm))):
                if best is not None:  # early stopping: end the stage at its best checkpoint (restored below)
                    break
                if np.isfinite(loss_value):
                    raise TrainingDiverged(f"meta-training produced a non-finite gradient at step {step + 1} (the loss, {loss_value:.4g}, is finite); lower the learning rates or inner_lr, or enable early_stopping")
                raise TrainingDiverged(f"meta-training diverged (loss {loss_value}); lower the learning rates or inner_lr, or enable early_stopping")
            optimizer.step()
            losses.append(loss_value)
            if on_step is not None:
                on_step(losses[-1])
            if best is not None and ((step + 1) % every == 0 or step + 1 == steps):
                for p in params:
                    p.requires_grad_(False)
                current = checkpoint()
                if current < best[0]:
                    best = (current, [p.detach().clone() for p in params])
                for p in params:
                    p.requires_grad_(True)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    if best is not None:
        with torch.no_grad():
            for p, value in zip(params, best[1]):
                p.copy_(value)
    distributed.broadcast_(params)  # ranks end identical even if their checkpoints disagreed
    if best is not None:
        checkpoint.settle(best[0] if distributed.world_size() == 1 else None)
    return losses

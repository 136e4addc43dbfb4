"""Prompt-only MAML (the single-prompt meta-learning of arXiv 2507.16672), as a baseline.

One soft prompt ``P`` (l x d, injected where the bank injects its prompt) is meta-learned with
second-order MAML over episodes of the train users; a new user gets ``steps`` inner gradient steps
on a copy of ``P`` only — no anchors, no retrieval, no LoRA. Everything else is shared with the bank
so that only the personalization mechanism differs: the frozen encoder, the bank's ranking head
(frozen here), the episode sampler, the inner loop (:func:`pmeta.adapt.inner.adapt`), the MAML
strategy and the outer loop (:func:`pmeta.bank.meta_train.meta_train`). The inner step size is one
learned scalar (as in pmeta's stages). Defaults follow the bank's config: prompt length, inner
steps, meta-batch size, outer learning rate, and ``global_steps`` outer steps.

The adapted prompt lives in memory only, so ``bytes_per_user`` is 0 (like pmeta); storing it would
cost ``l * d * 4`` bytes (30 KB for l = 20, d = 384).
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from ..adapt.inner import adapt
from ..adapt.strategies import get_strategy
from ..bank.build import prompt_from_text
from ..bank.episodes import EpisodeSampler
from ..bank.meta_train import Stage, meta_train
from ..config import MAX_BATCH_USERS
from ..data.types import Dataset
from ..errors import InvalidConfig
from ..progress import Progress
from .baselines import Count, EvalContext, PositiveFloat, Seed, register
from .neural import floor_excluded, support_input


@register("prompt-maml")
class PromptMAML:
    uses_time = True  # the support's timestamp reaches the bank's head (its time prior), as for pmeta

    def __init__(self, model, outer_steps: Count | None = None, inner_steps: Count | None = None, batch_users: Annotated[int, Field(ge=1, le=MAX_BATCH_USERS)] | None = None, lr: PositiveFloat | None = None, seed: Seed = 0) -> None:
        if model is None:
            raise InvalidConfig("method 'prompt-maml' needs a bank (its frozen encoder and ranking head); pass --bank")
        config = model.config
        self.model = model
        self.outer_steps = config.global_steps if outer_steps is None else outer_steps
        self.inner_steps = config.inner_steps if inner_steps is None else inner_steps
        self.batch_users = config.meta_batch_users if batch_users is None else batch_users
        self.lr = config.outer_lr if lr is None else lr
        self.seed = seed
        self.prompt = torch.zeros(config.prompt_length, model.encoder.shape.hidden)
        self.log_step_size = torch.tensor(math.log(config.inner_lr))
        self.losses: list[float] = []

    @classmethod
    def create(cls, context: EvalContext) -> "PromptMAML":
        options = {"seed": context.seed, **context.options.get(cls.name, {})}
        return cls(context.model, **options).fit(context.dataset, context.train_users, context.progress)

    def fit(self, dataset: Dataset, train_users: np.ndarray, progress: Progress | None = None) -> "PromptMAML":
        """Meta-learn the prompt on episodes of ``train_users`` (never the test users)."""
        model, config = self.model, self.model.config
        progress = progress or Progress(False)
        torch.manual_seed(self.seed)
        positives, rated, times = dataset.positives_by_user(), dataset.rated_by_user(), dataset.positive_times_by_user()
        users = np.sort(np.asarray(train_users, dtype=np.int64))
        counts = np.zeros(len(model.item_texts))
        for user in users:
            counts[positives.get(int(user), np.zeros(0, dtype=np.int64))] += 1
        popular = [model.item_texts[i] for i in np.argsort(-counts, kind="stable")[:8]]
        self.prompt = prompt_from_text(model.encoder, popular, config.prompt_length, config.prompt_layer, config.max_tokens)
        self.log_step_size = torch.tensor(math.log(config.inner_lr))
        sampler = EpisodeSampler(positives, rated, users, model.item_texts, config, seed=self.seed + 11, times=times)
        params = {"prompt": self.prompt}
        step_sizes = {"prompt": self.log_step_size}

        def build(m, episode):
            count = len(episode.users)
            return {"prompt": self.prompt.unsqueeze(0).expand(count, *self.prompt.shape)}, None, step_sizes, None

        stage = Stage("prompt-maml", build, [{"params": [params["prompt"], self.log_step_size], "lr": self.lr}])
        inner = model.config.inner_steps
        try:
            model.config.inner_steps = self.inner_steps  # meta_train reads the inner steps from the config
            with progress.task("meta-train prompt-maml", self.outer_steps) as bar:
                self.losses = meta_train(model, sampler, stage, get_strategy("maml"), self.outer_steps, self.batch_users, on_step=lambda loss: bar.advance(1, loss=loss))
        finally:
            model.config.inner_steps = inner
        return self

    def score(self, support_items: np.ndarray, k: int, time: float | None = None) -> np.ndarray:
        model = self.model
        user = support_input(model, support_items, time)
        batch = model.user_batch([user])
        targets, mask = model.targets_of([user], model.config.max_history_items)
        init = {"prompt": self.prompt.detach().clone().unsqueeze(0).requires_grad_(True)}
        with torch.enable_grad():
            adapted = adapt(init, model.loss_fn(batch, targets, mask), self.inner_steps, {"prompt": self.log_step_size.detach()})
        scores = model.final_scores(batch, {"prompt": adapted["prompt"].detach()})[0].numpy().astype(np.float64)
        return floor_excluded(scores)

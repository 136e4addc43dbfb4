"""Per-user LoRA trained from scratch on the support set (the OPPU recipe, Tan et al. 2024), as a baseline.

For every user a fresh LoRA (rank 8 on the attention query and value projections of every encoder
layer, as OPPU and PEFT's defaults do; ``layers="bank"`` restricts it to the layers pmeta personalizes,
whose frozen lower layers then run once; ``A ~ N(0, 0.02²)``, ``B = 0``: an exact no-op at the start) is trained
with Adam for ``steps`` steps on the user's support items, with the same softmax loss over the
catalogue that pmeta's inner loop fits. The frozen encoder, the bank's ranking head and the bank's
global prior adapter (the non-personalized model) stay fixed; the user's LoRA is stacked on top of
the prior. Unlike pmeta, this adapter is per-user state that OPPU stores: ``bytes_per_user`` is the
size of the adapter written as a safetensors file.

The bench helper imports :class:`PerUserLoRA` directly: ``fit(support_items) -> adapter``,
``score(support_items, k)`` and ``bytes_per_user``.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import save as save_safetensors

from ..errors import InvalidConfig
from ..models.personal import Adapter, expand_users, stack
from ..tasks import ranking
from .baselines import Count, EvalContext, PositiveFloat, PositiveInt, Seed, register
from .neural import floor_excluded, support_input


@register("per-user-lora")
class PerUserLoRA:
    uses_time = True  # the support's timestamp reaches the bank's head (its time prior), as for pmeta

    def __init__(self, model, rank: PositiveInt = 8, steps: Count = 20, lr: PositiveFloat = 5e-3, targets: Annotated[tuple[Literal["query", "key", "value"], ...], Field(min_length=1)] = ("query", "value"), layers: Literal["all", "bank"] = "all", seed: Seed = 0) -> None:
        if model is None:
            raise InvalidConfig("method 'per-user-lora' needs a bank (its frozen encoder and ranking head); pass --bank")
        if layers not in ("all", "bank"):
            raise InvalidConfig(f"per-user-lora.layers must be 'all' or 'bank', not {layers!r}")
        self.model = model
        self.rank, self.steps, self.lr, self.seed, self.layers = rank, steps, lr, seed, layers
        self.first_layer = 0 if layers == "all" else model.config.prompt_layer  # lowest layer carrying the LoRA
        self.targets = model.encoder.lora_targets(self.first_layer, tuple(targets))
        widest = min(min(d_in, d_out) for _, d_in, d_out in self.targets)
        if rank > widest:  # a LoRA wider than its layer is a full update, and a huge rank a huge allocation
            raise InvalidConfig(f"per-user-lora.rank must be at most {widest} (the smallest targeted layer's width), got {rank}")
        self.base = model.t.global_adapter  # the bank's non-personalized prior, frozen
        self.bytes_per_user = len(save_safetensors(self._fresh(np.zeros(1, dtype=np.int64))))

    @classmethod
    def create(cls, context: EvalContext) -> "PerUserLoRA":
        return cls(context.model, **{"seed": context.seed, **context.options.get(cls.name, {})})

    def _fresh(self, support_items: np.ndarray) -> dict[str, torch.Tensor]:
        """A new LoRA, seeded by (seed, the support items), so results repeat run to run."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(np.asarray(support_items, dtype=np.int64).tobytes()))
        adapter = {}
        for name, d_in, d_out in self.targets:
            adapter[f"{name}.A"] = torch.randn(self.rank, d_in, generator=generator) * 0.02
            adapter[f"{name}.B"] = torch.zeros(d_out, self.rank)
        return adapter

    def _personal(self, lora: dict[str, torch.Tensor]) -> Adapter:
        user = {"prompt": torch.zeros_like(self.base["prompt"]), **lora}
        return stack(expand_users(self.base, 1), {k: v.unsqueeze(0) for k, v in user.items()})

    def batch(self, user) -> "ranking.UserBatch":
        """The user's batch, its hidden states taken below the lowest LoRA layer."""
        return self.model.user_batch([user], layer=self.first_layer)

    def scores(self, batch, lora: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores (1, N) of the frozen model with the user's LoRA, from ``batch`` (see :meth:`batch`)."""
        model, personal = self.model, self._personal(lora)
        stop = model.config.prompt_layer
        if self.first_layer < stop:  # the LoRA layers below the prompt layer
            batch = replace(batch, hidden=model.encoder.layers(batch.hidden, batch.mask, self.first_layer, stop, personal))
        return model.scores(batch, personal)

    def fit(self, support_items: np.ndarray, time: float | None = None) -> dict[str, torch.Tensor]:
        """Train the user's LoRA on the support items; returns it (``{target.A, target.B}``, no user axis)."""
        model = self.model
        user = support_input(model, support_items, time)
        batch = self.batch(user)
        targets, mask = (t.to(batch.hidden.device) for t in model.targets_of([user], model.config.max_history_items))
        lora = {k: v.to(batch.hidden.device).requires_grad_(True) for k, v in self._fresh(support_items).items()}
        optimizer = torch.optim.Adam(list(lora.values()), lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                optimizer.zero_grad(set_to_none=True)
                ranking.softmax_loss(self.scores(batch, lora), targets, mask, batch.exclude).backward()
                optimizer.step()
        return {k: v.detach() for k, v in lora.items()}

    @torch.no_grad()
    def final_scores(self, user, lora: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores (N,) with the user's history items at -inf, as pmeta's ``final_scores``."""
        batch = self.batch(user)
        lora = {k: v.to(batch.hidden.device) for k, v in lora.items()}  # a stored adapter may load on the CPU
        return self.scores(batch, lora)[0].masked_fill(batch.exclude[0], float("-inf"))

    def score(self, support_items: np.ndarray, k: int, time: float | None = None) -> np.ndarray:
        lora = self.fit(support_items, time)
        scores = self.final_scores(support_input(self.model, support_items, time), lora).cpu().numpy().astype(np.float64)
        return floor_excluded(scores)

    def adapter_bytes(self, lora: dict[str, torch.Tensor]) -> bytes:
        """The user's adapter as a safetensors file (what OPPU stores per user)."""
        return save_safetensors({k: v.contiguous() for k, v in lora.items()})

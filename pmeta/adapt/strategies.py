"""Meta-learning strategies: MAML, first-order MAML and Reptile differ only in the outer loss that
reaches the initialisation. One meta-training loop (:mod:`pmeta.bank.meta_train`) uses them.

For an init θ₀, inner steps give θ_n(θ₀) on the support set; L_q is the query loss:

* ``maml``: outer loss L_q(θ_n(θ₀)), differentiated through the inner steps (second order); the
  inner step sizes are learned too.
* ``fomaml``: L_q at θ₀ + stopgrad(θ_n − θ₀): the value of θ_n with the Jacobian dθ_n/dθ₀ taken as
  the identity, so θ₀ receives ∇L_q(θ_n).
* ``reptile``: the inner steps run on support ∪ query, and the init moves towards the adapted
  parameters: the surrogate ½‖θ₀ − stopgrad(θ_n)‖² per user has gradient θ₀ − θ_n.

Tensors outside the adapter (ranking head, fusion temperature) always get the ordinary gradient of
L_q at the (stop-gradient, for Reptile) adapted parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch

from ..models.personal import Adapter

STRATEGIES: dict[str, type["Strategy"]] = {}


def register(name: str):
    def wrap(cls):
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return wrap


class Strategy(ABC):
    name = "base"
    second_order = False  # differentiate through the inner steps
    inner_on_query = False  # the inner steps also fit the query set (Reptile)

    @abstractmethod
    def outer_loss(self, init: Adapter, adapted: Adapter, query_loss: Callable[[Adapter], torch.Tensor]) -> torch.Tensor:
        """The scalar whose gradient is the outer update. ``init``/``adapted`` carry a user axis."""


@register("maml")
class MAML(Strategy):
    second_order = True

    def outer_loss(self, init, adapted, query_loss):
        return query_loss(adapted)


@register("fomaml")
class FirstOrderMAML(Strategy):
    def outer_loss(self, init, adapted, query_loss):
        return query_loss({k: init[k] + (adapted[k] - init[k]).detach() for k in init})


@register("reptile")
class Reptile(Strategy):
    inner_on_query = True

    def outer_loss(self, init, adapted, query_loss):
        head_terms = query_loss({k: v.detach() for k, v in adapted.items()})
        pull = sum(0.5 * (init[k] - adapted[k].detach()).pow(2).sum() for k in init)
        return head_terms + pull


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown meta-learning strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None

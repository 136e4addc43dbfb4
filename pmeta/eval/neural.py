"""The methods that use a bank: pmeta (MAML and Reptile banks), fused anchors without inner steps,
and the frozen backbone zero-shot.

They all score through a :class:`~pmeta.bank.model.PmetaModel` for the evaluated catalogue: the
bank's own model in-domain, or the bank transferred to a new catalogue by item text
(:mod:`pmeta.eval.transfer`). The support items become the same :class:`UserInput` that
``Bank.user_input`` makes of a history.json (liked catalogue items in time order), so the scores are
those of the serving path (``personalize`` then ``final_scores``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..bank.episodes import user_input
from ..bank.model import UserInput
from ..errors import InvalidConfig
from .baselines import EvalContext, register

#: Score given to the support items (``-inf`` in serving: never recommended; never ranked by the protocol).
EXCLUDED_SCORE = -1e30


def floor_excluded(scores: np.ndarray) -> np.ndarray:
    """Excluded items (scored −inf) at :data:`EXCLUDED_SCORE`; NaN stays NaN, so that the protocol's
    check reports a diverged model instead of ranking its items last."""
    return np.where(np.isneginf(scores), EXCLUDED_SCORE, scores)


def support_input(model, support_items: np.ndarray, time: float | None = None) -> UserInput:
    """The support set as serving reads a history.json of these items (``time``: of the latest one)."""
    return user_input(support_items, model.item_texts, time)


def _needs(model, name: str, what: str = "a bank"):
    if model is None:
        raise InvalidConfig(f"method {name!r} needs {what}; pass --bank (or drop it from --methods)")
    return model


class _BankScorer:
    """Serving-path scores of one PmetaModel with a fixed number of inner steps (None: the bank's)."""

    steps: int | None = None
    uses_reptile = False
    uses_time = True  # the support's timestamp reaches the model (its time prior), as a history.json's would
    precision = "float32"

    def __init__(self, model) -> None:
        self.model = model

    @classmethod
    def create(cls, context: EvalContext):
        model = context.reptile_model if cls.uses_reptile else context.model
        return cls(_needs(model, cls.name, "a Reptile bank (--reptile-bank)" if cls.uses_reptile else "a bank"))

    def score(self, support_items: np.ndarray, k: int, time: float | None = None) -> np.ndarray:
        saved, self.model.precision = self.model.precision, self.precision  # the model is shared by methods
        try:
            personal, batch, _ = self.model.personalize([support_input(self.model, support_items, time)], steps=self.steps)
            scores = self.model.final_scores(batch, personal)[0].cpu().numpy().astype(np.float64)
        finally:
            self.model.precision = saved
        return floor_excluded(scores)


@register("pmeta")
class PmetaMAML(_BankScorer):
    """pmeta with the bank's meta-learning (MAML by default): retrieve, fuse, inner steps, rank."""


@register("pmeta-bf16")
class PmetaBF16(_BankScorer):
    """pmeta with the encoder passes under bf16 autocast (``Bank.open(precision="bfloat16")``)."""

    precision = "bfloat16"


@register("pmeta-no-steps")
class PmetaNoSteps(_BankScorer):
    """The fused anchors alone: retrieval and fusion, no inner steps."""

    steps = 0


@register("pmeta-reptile")
class PmetaReptile(_BankScorer):
    """pmeta with a second bank meta-trained with Reptile (same preset otherwise)."""

    uses_reptile = True


@register("backbone")
class BackboneZeroShot:
    """The frozen encoder, no personalization and nothing learned: the cosine between the mean
    sentence embedding of the support items' texts and every item's text embedding."""

    def __init__(self, item_text: torch.Tensor) -> None:
        self.item_text = item_text.cpu().numpy().astype(np.float64)

    @classmethod
    def create(cls, context: EvalContext):
        return cls(_needs(context.model, cls.name).t.item_text)

    def score(self, support_items: np.ndarray, k: int) -> np.ndarray:
        query = self.item_text[np.asarray(support_items, dtype=np.int64)].mean(0)
        query /= max(np.linalg.norm(query), 1e-12)
        scores = self.item_text @ query
        scores[np.asarray(support_items, dtype=np.int64)] = EXCLUDED_SCORE
        return scores

"""Non-neural baselines every MovieLens report carries (PROTOCOL.md): random, popularity, ItemKNN, EASE.

All of them learn from the positives (rating >= 4) of the train users only and score the whole
catalogue from a cold-start user's support items. Usage::

    model = BASELINES["ease"]().fit(dataset, train_users)
    rows = evaluate(model, dataset, test_users)
"""

from __future__ import annotations

import inspect
import typing
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, TypeAdapter, ValidationError

from pmeta.config import MAX_SEED
from pmeta.data.types import Dataset
from pmeta.errors import InvalidConfig
from pmeta.eval.protocol import drawable_modes, evaluate, item_rating_counts, make_cases

# Option types of the methods' constructors: ``--method-option`` values are validated against them
# (:func:`check_options`), so that a value out of range is a config error before anything runs.
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Count = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(gt=0, lt=1)]

#: Baseline classes by name; fill it with :func:`register`.
BASELINES: dict[str, type] = {}

#: Weight of the popularity tie-breaker added to similarity scores (far below any cosine difference that matters).
TIE_BREAK_WEIGHT = 1e-6


@dataclass
class EvalContext:
    """What a method may use to get ready: the dataset, its train users (never the test users), the
    pmeta models (a :class:`~pmeta.bank.model.PmetaModel` for this dataset's catalogue, ``None`` when
    absent), the seed, per-method options and a :class:`~pmeta.progress.Progress`."""

    dataset: Dataset
    train_users: np.ndarray
    seed: int = 0
    model: Any = None  # PmetaModel of the MAML bank (transferred to this catalogue when needed)
    reptile_model: Any = None  # PmetaModel of the Reptile bank
    options: dict[str, dict] = field(default_factory=dict)  # method name -> constructor keyword arguments
    progress: Any = None


def register(name: str) -> Callable[[type], type]:
    """Class decorator: add the class to :data:`BASELINES` under ``name`` and set its ``name``.

    Every method shares one interface: ``create(context) -> scorer`` (a classmethod; the default
    constructs the class with ``context.options[name]`` and calls ``fit(dataset, train_users)``),
    ``score(support_items, k) -> scores over the catalogue``, ``name`` and ``bytes_per_user``.
    ``bytes_per_user`` defaults to 0: these methods score a support set with a model fitted on the
    train users and keep nothing per user; one that stores per-user state declares its size.
    """

    def add(cls: type) -> type:
        if name in BASELINES:
            raise ValueError(f"baseline {name!r} is registered twice")
        cls.name = name
        cls.bytes_per_user = getattr(cls, "bytes_per_user", 0)
        if not hasattr(cls, "create"):
            cls.create = classmethod(_default_create)
        BASELINES[name] = cls
        return cls

    return add


#: Constructor parameters a method receives from the evaluation, never from ``--method-option``.
CONTEXT_PARAMETERS = frozenset({"self", "model", "item_text"})


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for the registered method ``name``, checked against its class's constructor: each
    key must be one of its keyword parameters (not one the evaluation supplies, e.g. ``model``) and
    each value must fit the parameter's annotation, ranges included (pydantic, lax: ``"10"`` is a
    fine int, ``"abc"`` is not a float, a :data:`Seed` lies in 0..2³²−1, a :data:`PositiveFloat`
    is finite). Returns the validated values (a JSON list becomes the annotated tuple);
    raises :class:`~pmeta.errors.InvalidConfig` naming the method, the key and what it accepts."""
    if name not in BASELINES:
        raise InvalidConfig(f"unknown method {name!r}; choose from {', '.join(sorted(BASELINES))}")
    init = BASELINES[name].__init__
    hints = typing.get_type_hints(init, include_extras=True)  # keep the Annotated ranges
    keywords = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [p.name for p in inspect.signature(init).parameters.values() if p.kind in keywords and p.name not in CONTEXT_PARAMETERS]
    out = {}
    for key, value in options.items():
        if key not in accepted:
            raise InvalidConfig(f"method {name!r} has no option {key!r}; it takes {', '.join(accepted) if accepted else 'no options'}")
        try:
            out[key] = TypeAdapter(hints.get(key, Any)).validate_python(value)
        except ValidationError as exc:
            raise InvalidConfig(f"{name}.{key}={value!r}: {exc.errors()[0]['msg']}") from None
    return out


def _default_create(cls, context: EvalContext):
    return cls(**context.options.get(cls.name, {})).fit(context.dataset, context.train_users)


def positive_matrix(dataset: Dataset, users: Sequence[int] | np.ndarray, dtype=np.float32) -> np.ndarray:
    """Dense binary matrix ``X`` (len(users) x n_items): ``X[u, i] = 1`` if user ``users[u]`` rated item ``i`` >= 4."""
    return indicator_matrix(dataset.positives_by_user(), users, len(dataset.catalog), dtype)


def indicator_matrix(items_by_user: dict[int, np.ndarray], users: Sequence[int] | np.ndarray, n_items: int, dtype=np.float32) -> np.ndarray:
    """Dense binary matrix (len(users) x n_items): 1 where ``items_by_user[users[u]]`` holds the item
    (a user absent from it has an empty row)."""
    matrix = np.zeros((len(users), n_items), dtype=dtype)
    for row, user in enumerate(users):
        items = items_by_user.get(int(user))
        if items is not None:
            matrix[row, items] = 1.0
    return matrix


def validation_split(train_users: np.ndarray, fraction: float, seed: int, fold: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(fit_users, validation_users)``: the first ``round(fraction * n)`` of a seeded permutation
    of the sorted train users are validation users (how a baseline tunes itself, never on test users);
    ``fold`` f takes the f-th such slice instead (fold 0 is the first), so the folds are disjoint and
    the fit users are the rest, in permutation order."""
    permuted = np.random.default_rng(seed).permutation(np.sort(np.asarray(train_users, dtype=np.int64)))
    n_validation = round(fraction * len(permuted))
    start, stop = fold * n_validation, (fold + 1) * n_validation
    return np.concatenate([permuted[:start], permuted[stop:]]), permuted[start:stop]


@register("random")
class RandomBaseline:
    """Uniform random scores, drawn from ``default_rng([seed, crc32(support), K])``: a user's scores
    depend on the seed and their own support only, not on which other users, or which other K, a
    run evaluates (one generator shared by the whole run made them depend on both)."""

    def __init__(self, seed: Seed = 0) -> None:
        self.seed = seed
        self.n_items = 0

    def fit(self, dataset: Dataset, train_users: np.ndarray) -> RandomBaseline:
        self.n_items = len(dataset.catalog)
        return self

    def score(self, support_items: np.ndarray, k: int) -> np.ndarray:
        support = zlib.crc32(np.ascontiguousarray(support_items, dtype=np.int64).tobytes())
        return np.random.default_rng([self.seed, support, int(k)]).random(self.n_items)


@register("popularity")
class PopularityBaseline:
    """``score(i) = #train users with a positive (rating >= 4) on i`` — ignores the support set.

    Counting positives rather than all ratings matches what the other baselines learn from; ties (e.g.
    items no train user liked) count against the positive under the protocol's pessimistic ranking.
    """

    def __init__(self) -> None:
        self.counts = np.zeros(0, dtype=np.float64)

    def fit(self, dataset: Dataset, train_users: np.ndarray) -> PopularityBaseline:
        self.counts = positive_matrix(dataset, train_users).sum(axis=0, dtype=np.float64)
        return self

    def score(self, support_items: np.ndarray, k: int) -> np.ndarray:
        return self.counts.copy()


@register("popularity-time")
class TimePopularityBaseline:
    """The time prior alone (:mod:`pmeta.tasks.time_prior`): ``score(i) = log p_i(t)``, the share of
    the train users' ratings given to item i up to the time t of the user's latest support
    interaction (exponential kernel of time constant h days, read exactly at t; ``kind="gaussian"``:
    the gridded half-Gaussian of stop 47, ``"two-sided"``: the kernel of runs before it, which also
    counts later ratings), ignoring which items the support holds.

    pmeta's banks add this prior to their scores; this row shows how much of their quality it
    explains. h is chosen over :data:`~pmeta.tasks.time_prior.BANDWIDTHS` by nDCG@10 over the
    protocol's modes on a split of the train users (as EASE's λ), unless given.
    """

    uses_time = True

    def __init__(self, bandwidth_days: PositiveFloat | None = None, validation_fraction: Fraction = 0.1, validation_seed: Seed = 0, validation_modes: tuple[Literal["uni99", "pop99", "full"], ...] = ("uni99", "pop99", "full"), kind: Literal["exponential", "gaussian", "two-sided"] = "exponential") -> None:
        self.bandwidth_days, self.validation_modes, self.kind = bandwidth_days, tuple(validation_modes), kind
        self.validation_fraction, self.validation_seed = validation_fraction, validation_seed
        self.chosen_bandwidth: float | None = None
        self.validation_scores: dict[str, dict[str, float]] = {}
        self.prior: dict = {}

    @property
    def tuned(self) -> dict:
        """What :meth:`fit` chose, for a report: h in days (``fixed`` when given), and when tuned each
        h's mean validation nDCG@10 over K = 1, 3, 5 and the modes."""
        if self.bandwidth_days is not None:
            return {"bandwidth_days": self.chosen_bandwidth, "fixed": True}
        scores = {key.split(",")[0].removeprefix("h=").removesuffix("d"): row["mean"] for key, row in self.validation_scores.items() if key.endswith("beta=1")}
        return {"bandwidth_days": self.chosen_bandwidth, "validation": f"nDCG@10 over K = 1, 3, 5 and {', '.join(self.validation_modes)}", "scores": scores}

    def fit(self, dataset: Dataset, train_users: np.ndarray) -> TimePopularityBaseline:
        from pmeta.tasks import time_prior

        n_items = len(dataset.catalog)
        self.chosen_bandwidth = self.bandwidth_days
        if self.chosen_bandwidth is None:
            fit_users, validation_users = validation_split(train_users, self.validation_fraction, self.validation_seed)
            zeros = np.zeros(n_items)
            self.chosen_bandwidth, _, _, self.validation_scores = time_prior.choose(lambda support: zeros, time_prior.validation_cases(dataset, validation_users), time_prior.rating_events(dataset, fit_users), n_items, weights=(1.0,), modes=self.validation_modes, kind=self.kind)
        items, times = time_prior.rating_events(dataset, train_users)
        self.prior = time_prior.build(items, times, n_items, self.chosen_bandwidth, self.kind)
        return self

    def score(self, support_items: np.ndarray, k: int, time: float | None = None) -> np.ndarray:
        from pmeta.tasks import time_prior

        return time_prior.log_prior_at(self.prior, [float("nan") if time is None else time])[0].numpy().astype(np.float64)


@register("itemknn")
class ItemKNNBaseline:
    """Item-based nearest neighbours with cosine similarity over co-occurrence of train positives.

    With ``X`` the binary train-user x item positive matrix, ``C = XᵀX`` (co-occurrence counts) and
    ``n_i = C_ii`` (positives of item i)::

        sim(s, j) = C_sj / sqrt(n_s * n_j)          (0 when n_s or n_j is 0)
        score(j)  = Σ_{s ∈ support} sim(s, j) + 1e-6 * n_j / max(n)

    The last term is a popularity tie-breaker. Rows of ``C`` are computed on demand from ``X`` (the
    K support columns times ``X``), so the n_items² similarity matrix is never stored.
    """

    def __init__(self) -> None:
        self.positives = np.zeros((0, 0), dtype=np.float32)
        self.inverse_norms = np.zeros(0, dtype=np.float32)
        self.tie_breaker = np.zeros(0, dtype=np.float64)

    def fit(self, dataset: Dataset, train_users: np.ndarray) -> ItemKNNBaseline:
        self.positives = positive_matrix(dataset, train_users)
        counts = self.positives.sum(axis=0, dtype=np.float64)
        with np.errstate(divide="ignore"):
            self.inverse_norms = np.where(counts > 0, 1.0 / np.sqrt(counts), 0.0).astype(np.float32)
        self.tie_breaker = TIE_BREAK_WEIGHT * counts / max(counts.max(initial=0.0), 1.0)
        return self

    def score(self, support_items: np.ndarray, k: int) -> np.ndarray:
        support = np.asarray(support_items, dtype=np.int64)
        cooccurrence = self.positives[:, support].T @ self.positives  # (K, n_items) rows of XᵀX
        similarity = cooccurrence * self.inverse_norms[support, None] * self.inverse_norms[None, :]
        return similarity.sum(axis=0, dtype=np.float64) + self.tie_breaker


#: EASE's default λ grid. It reaches 100,000: ml-1m's validation users choose 30,000, ml-100k's up
#: to 3,000 and ml-latest-small's 1,000 or less (benchmarks/ease_grid.py; docs/movielens.md).
#: A bank's collaborative init tunes over a narrower grid (pmeta.config.INIT_EASE_LAMBDAS).
EASE_LAMBDAS = (50.0, 100.0, 200.0, 500.0, 1000.0, 3000.0, 10000.0, 30000.0, 100000.0)


@register("ease")
class EASEBaseline:
    """EASE (Steck 2019): a closed-form item-item linear autoencoder with a zero diagonal.

    On the binary train positive matrix ``X`` restricted to the items with at least one train
    positive::

        P = (XᵀX + λI)⁻¹
        B = I - P · diag(1 / diag(P))       (so B_ii = 0)
        score = x_support · B               (x_support: binary vector of the support items)

    Items without train positives get a score below every other item; support items without train
    positives contribute nothing. ``chosen_lam`` is the λ in use. When ``lam`` is None,
    :meth:`fit` tunes λ over ``lambdas``: it carves ``validation_fraction`` of the train users (fixed
    ``validation_seed``), fits on the rest, scores each λ with the protocol itself (``pop99``, K=3,
    nDCG@10 on the validation users; ``full`` on a catalogue too small for 99 negatives, named by
    ``validation_mode``) and refits the best λ on all train users.
    """

    def __init__(
        self,
        lam: PositiveFloat | None = None,
        lambdas: Sequence[PositiveFloat] = EASE_LAMBDAS,
        validation_fraction: Fraction = 0.2,
        validation_seed: Seed = 0,
    ) -> None:
        if lam is None and not lambdas:
            raise InvalidConfig("EASE needs either lam or a non-empty lambdas grid")
        self.lam = lam
        self.lambdas = tuple(float(x) for x in lambdas)
        self.validation_fraction = validation_fraction
        self.validation_seed = validation_seed
        self.validation_scores: dict[float, float] = {}
        self.validation_mode = "pop99"
        self.n_items = 0
        self.chosen_lam = lam
        self.kept_items = np.zeros(0, dtype=np.int64)
        self.kept_position = np.zeros(0, dtype=np.int64)
        self.weights = np.zeros((0, 0), dtype=np.float32)

    @staticmethod
    def closed_form(gram: np.ndarray, lam: float) -> np.ndarray:
        """``B = I - P diag(1/diag P)`` with ``P = (G + λI)⁻¹``, computed in float64, returned as float32."""
        regularized = gram.astype(np.float64, copy=True)
        regularized[np.diag_indices_from(regularized)] += lam
        try:
            weights = np.linalg.inv(regularized)  # P
        except np.linalg.LinAlgError:
            raise InvalidConfig(f"EASE's item-item matrix is singular at λ = {lam:g}: choose a larger lam") from None
        del regularized
        if not np.isfinite(weights).all():
            raise InvalidConfig(f"EASE's item-item matrix is too ill-conditioned at λ = {lam:g}: choose a larger lam")
        weights /= -np.diag(weights)[None, :]  # -P_ij / P_jj, in place to keep one n² float64 buffer
        weights[np.diag_indices_from(weights)] = 0.0
        return weights.astype(np.float32)

    def _fit_fixed(self, dataset: Dataset, train_users: np.ndarray, lam: float) -> None:
        self.fit_matrix(positive_matrix(dataset, train_users), lam)

    def fit_matrix(self, positives: np.ndarray, lam: float) -> None:
        """Fit at ``lam`` on a binary user x item ``positives`` matrix (what :meth:`fit` builds from the
        train users; benchmarks/uni99_ceiling.py adds the test users' histories to it)."""
        self.n_items = positives.shape[1]
        self.kept_items = np.flatnonzero(positives.sum(axis=0) > 0)
        self.kept_position = np.full(self.n_items, -1, dtype=np.int64)
        self.kept_position[self.kept_items] = np.arange(len(self.kept_items))
        kept = positives[:, self.kept_items]
        del positives
        self.weights = self.closed_form(kept.T @ kept, lam)

    def validation_split(self, train_users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(fit_users, validation_users)``: the first ``round(validation_fraction * n)`` of a seeded
        permutation of the sorted train users are validation users."""
        return validation_split(train_users, self.validation_fraction, self.validation_seed)

    def fit(self, dataset: Dataset, train_users: np.ndarray) -> EASEBaseline:
        if self.lam is None:
            fit_users, validation_users = self.validation_split(train_users)
            self.validation_scores = {}
            # pop99, or full ranking on a catalogue too small for pop99's 99 negatives
            (self.validation_mode,) = drawable_modes(make_cases(dataset, validation_users, 3), ("pop99",), item_rating_counts(dataset))
            for lam in self.lambdas:
                self._fit_fixed(dataset, fit_users, lam)
                (row,) = evaluate(self, dataset, validation_users, ks=(3,), modes=(self.validation_mode,), seed=self.validation_seed)
                self.validation_scores[lam] = row["ndcg@10"]
            self.chosen_lam = self.choose(self.validation_scores, self.lambdas)
        else:
            self.chosen_lam = float(self.lam)
        self._fit_fixed(dataset, train_users, self.chosen_lam)
        return self

    @staticmethod
    def choose(scores: dict[float, float], lambdas: Sequence[float]) -> float:
        """The λ of ``lambdas`` with the best validation score in ``scores``; on a tie the stronger
        regularization (also when no validation user has the 6 positives a case needs: every score
        is NaN then, and NaN never compares)."""
        return max(lambdas, key=lambda lam: (np.nan_to_num(scores[lam], nan=-np.inf), lam))

    @property
    def tuned(self) -> dict:
        """What :meth:`fit` chose, for a report: λ (``fixed`` when given), and when tuned every λ's
        validation score and the criterion; ``validation`` is None when no validation user had a case
        (every score NaN: the grid's largest λ was taken)."""
        if self.lam is not None:
            return {"lambda": self.chosen_lam, "fixed": True}
        scored = any(np.isfinite(v) for v in self.validation_scores.values())
        return {
            "lambda": self.chosen_lam,
            "validation": f"{self.validation_mode} K = 3 nDCG@10" if scored else None,
            "scores": {f"{lam:.12g}": self.validation_scores.get(lam) for lam in self.lambdas},
        }

    def score(self, support_items: np.ndarray, k: int) -> np.ndarray:
        rows = self.kept_position[np.asarray(support_items, dtype=np.int64)]
        kept_scores = self.weights[rows[rows >= 0]].sum(axis=0, dtype=np.float64)
        floor = kept_scores.min(initial=0.0) - 1.0
        scores = np.full(self.n_items, floor, dtype=np.float64)
        scores[self.kept_items] = kept_scores
        return scores

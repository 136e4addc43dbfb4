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
from typing import Any, Iterable

import numpy as np
import torch
from pydantic import ValidationError

from ..config import BankConfig
from ..data.history import UserHistory, load_history, parse_history, resolve_history
from ..data.types import POSITIVE_RATING, Catalog
from ..errors import BankIntegrityError, InvalidRequest
from ..fusion.index import AnchorIndex
from ..models.encoder import FunctionalEncoder
from ..storage import BankStore
from .model import PmetaModel, Tensors, UserInput

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
        if not isinstance(top, int) or isinstance(top, bool) or top < 1:
            raise InvalidRequest(f"top must be a positive integer, got {top!r}")
        catalog = self.bank.catalog
        if candidates is None:
            pool = np.flatnonzero(np.isfinite(self.scores))
        else:
            ids = list(candidates)
            unknown = [c for c in ids if c not in catalog.index]
            if unknown:
                raise InvalidRequest(f"{len(unknown)} candidate id(s) not in the catalogue, e.g. {', '.join(map(str, unknown[:5]))}")
            pool = np.array(sorted({catalog.index[c] for c in ids}), dtype=np.int64)
            pool = pool[np.isfinite(self.scores[pool])]
        chosen = pool[np.argsort(-self.scores[pool], kind="stable")[:top]]
        return [Recommendation(catalog.item_ids[i], catalog.titles[i], float(self.scores[i])) for i in chosen]

    def to_dict(self, top: int = 10) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "recommendations": [r.__dict__ for r in self.rank(top)],
            "anchors": self.anchors,
            "timing_ms": {k: round(v, 3) for k, v in self.timing_ms.items()},
        }


class Bank:
    """An opened, verified bank version."""

    def __init__(self, store: BankStore, version: str, config: BankConfig, model: PmetaModel, catalog: Catalog, record: dict) -> None:
        self.store = store
        self.version = version
        self.config = config
        self.model = model
        self.catalog = catalog
        self.record = record

    @classmethod
    def open(cls, path: str | Path, db_url: str | None = None, version: str | None = None, device: str = "cpu") -> "Bank":
        """Open the active (or a given) version; every file is checked against its sha256 first.

        Raises BankNotFound when ``path`` is not a bank, BankIntegrityError when a file was altered.
        """
        store = BankStore(path, db_url)
        reader = store.open(version)
        try:
            config = BankConfig(**reader.record["config"])
        except ValidationError as exc:
            raise BankIntegrityError(f"bank {path} version {reader.id} has a config this pmeta cannot read: {exc.errors()[0]['msg']}") from None
        catalog_data = reader.read_json(CATALOG_FILE)
        catalog = Catalog(catalog_data["item_ids"], catalog_data["titles"], catalog_data["genres"])
        tensors = Tensors.from_flat(reader.read_tensors(TENSORS_FILE))
        index = AnchorIndex.from_bytes(reader.read_bytes(INDEX_FILE))  # checksum verified by store.open
        encoder = shared_encoder(config.encoder, device)
        model = PmetaModel(config, encoder, catalog.texts(), tensors, index=index)
        return cls(store, reader.id, config, model, catalog, reader.record)

    # ------------------------------------------------------------------ histories
    def user_input(self, history: UserHistory, ignore_unknown: bool = False) -> UserInput:
        """What the model reads of a validated history: liked items (rating unset or >= 4) in time order."""
        resolved = resolve_history(history, self.catalog, ignore_unknown=ignore_unknown)
        liked, texts, free, seen = [], [], [], []
        for index, text, rating, _ in resolved.entries:
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
        return UserInput(liked_items=liked, texts=texts, free_texts=free, seen_items=seen)

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
        history.json schema, or a path to such a file. Raises InvalidHistory on bad input."""
        return self.personalize_many([history], steps=steps, ignore_unknown=ignore_unknown)[0]

    def personalize_many(self, histories: list, steps: int | None = None, ignore_unknown: bool = False, batch_size: int = 64) -> list[Personalization]:
        """Personalize many users; each batch of ``batch_size`` users is adapted in one batched pass."""
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
            raise InvalidRequest(f"steps must be a non-negative integer, got {steps!r}")
        parsed = [self.as_history(h) for h in histories]
        out: list[Personalization] = []
        for start in range(0, len(parsed), batch_size):
            chunk = parsed[start : start + batch_size]
            clock = time.perf_counter()
            inputs = [self.user_input(h, ignore_unknown) for h in chunk]
            timings: dict[str, float] = {}
            personal, batch, details = self.model.personalize(inputs, steps, timings)
            t_rank = time.perf_counter()
            scores = self.model.final_scores(batch, personal).numpy()
            timings["score_ms"] = (time.perf_counter() - t_rank) * 1e3
            timings["total_ms"] = (time.perf_counter() - clock) * 1e3
            for row, history in enumerate(chunk):
                anchors = []
                if details["has_key"][row]:
                    for position, weight in zip(details["anchors"][row], details["weights"][row]):
                        anchors.append({"anchor": int(position), "weight": round(float(weight), 6)})
                out.append(
                    Personalization(
                        user_id=history.user_id,
                        adapter={k: v[row].clone() for k, v in personal.items()},
                        anchors=anchors,
                        timing_ms=dict(timings) if len(chunk) == 1 else {k: v / len(chunk) for k, v in timings.items()},
                        scores=scores[row],
                        bank=self,
                    )
                )
        return out

    def info(self) -> dict[str, Any]:
        return {"version": self.version, "items": len(self.catalog), "anchors": int(self.model.t.anchor_keys.shape[0]), "config": self.config.model_dump()}

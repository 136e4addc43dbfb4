"""Serving a text bank: open a verified version once, personalize any number of users in memory.

    bank = TextBank.open("text-bank/")
    p = bank.personalize({"user_id": "u1", "profile": [{"id": "1", "text": "...", "score": "5"}]})
    p.predict("What is the score of the following review ... review: ...", retrieve=2)
    p.export_peft("adapter-dir")

Opening checks every file against its sha256 before anything is parsed (the same
:class:`~pmeta.storage.BankStore` as MovieLens banks); nothing is written per user.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from ..adapt.inner import outside_inference_mode
from ..checks import request_int
from ..config import MAX_INNER_STEPS
from ..data.jsonfile import is_unicode_text
from ..errors import BankIntegrityError, InvalidRequest
from ..fusion.index import AnchorIndex
from ..models.device import cpu_only
from ..models.fingerprint import check_fingerprint
from ..models.personal import Adapter, user_row
from ..storage import BankStore
from .build import BUILD_FILE, INDEX_FILE, TENSORS_FILE, lm_window, load_lm
from .config import TextConfig
from .history import TextHistory, load_text_history, parse_text_history
from .model import TextModel, TextTensors

_LMS: dict[tuple[str, str, tuple], Any] = {}
_LMS_LOCK = threading.Lock()


def shared_lm(config: TextConfig):
    """One causal LM per (name, device, targets) per process, its window the widest its banks need
    (:func:`pmeta.text.build.lm_window`; one copy of the weights, however many banks use it)."""
    key = (config.lm, config.device, tuple(config.lora_targets))
    with _LMS_LOCK:
        if key not in _LMS:
            _LMS[key] = load_lm(config)
        _LMS[key].widen(lm_window(config))
        return _LMS[key]


@dataclass
class TextPersonalization:
    """One user's personal parameters (no user axis), in memory only."""

    user_id: str
    profile: list[dict] = field(repr=False)
    adapter: dict[str, torch.Tensor] = field(repr=False)
    anchors: list[dict[str, Any]]
    timing_ms: dict[str, float]
    bank: "TextBank" = field(repr=False)

    def _batched(self) -> dict[str, torch.Tensor]:
        return {k: v.unsqueeze(0) for k, v in self.adapter.items()}

    def prompt(self, input_text: str, retrieve: int | None = None) -> str:
        retrieve = self.bank.config.retrieve if retrieve is None else retrieve
        retrieve = request_int(retrieve, "retrieve", 0)
        if not isinstance(input_text, str) or not input_text.strip():
            raise InvalidRequest("the input must be a non-empty string")
        if not is_unicode_text(input_text):
            raise InvalidRequest("the input must be valid Unicode text (it holds a lone UTF-16 surrogate)")
        return self.bank.model.query_prompt(input_text, self.profile, retrieve)

    def predict(self, input_text: str, retrieve: int | None = None) -> str:
        """The prediction for ``input_text`` (a label, a rating, or generated text); ``retrieve`` BM25
        profile items go in the prompt (None, the default: the bank's ``retrieve``, as in ``prompt``
        and ``pmeta adapt``; 0: none)."""
        prompt = self.prompt(input_text, retrieve)
        return self.bank.model.predict([prompt], self._batched())[0]

    def export_peft(self, out_dir: str | Path) -> Path:
        """Write the fused + stacked LoRA as a PEFT adapter folder; the soft prompt goes beside it, and
        ``pmeta_export.json`` / README.md record how pmeta predicts (labels, label prior, decode rule)."""
        from ..export import export_peft

        model = self.bank.model
        bias = model.t.label_bias
        prior = {label: round(float(b), 6) for label, b in zip(model.labels, bias.tolist())} if bias is not None and model.labels else None
        spec, config = model.spec, model.config  # what model.predict and prompt() read
        decode = "greedy" if spec.kind == "generation" else (config.rating_decode if spec.kind == "rating" else "argmax")
        prediction = {
            "task": spec.name, "kind": spec.kind, "labels": list(model.labels) or None, "decode": decode,
            "max_new_tokens": config.max_new_tokens if spec.kind == "generation" else None,
            "retrieve": self.bank.config.retrieve, "max_length": model.lm.max_length,
        }
        return export_peft(model.lm, self.adapter, out_dir, str(model.lm.path), label_prior=prior, prediction=prediction)

    def to_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "anchors": self.anchors, "timing_ms": {k: round(v, 3) for k, v in self.timing_ms.items()}}


class TextBank:
    """An opened, verified text bank version."""

    def __init__(self, store: BankStore, version: str, config: TextConfig, model: TextModel, record: dict) -> None:
        self.store = store
        self.version = version
        self.config = config
        self.model = model
        self.record = record
        self.task = config.task

    @classmethod
    @outside_inference_mode  # tensors loaded inside a serving layer's inference mode could not join the inner steps' autograd
    def open(cls, path: str | Path, db_url: str | None = None, version: str | None = None, device: str = "cpu", lm=None) -> "TextBank":
        """Open the active (or a given) version; every file is checked against its sha256 first.

        Raises BankNotFound when ``path`` is not a bank, BankIntegrityError when a file was altered,
        InvalidRequest when the version is not a text bank (the caller's mistake, as
        :meth:`pmeta.Bank.open` of a text bank), InvalidConfig for a device other than the CPU (text
        banks run on the CPU only: see :func:`pmeta.models.device.cpu_only`).
        """
        from ..bank.bank import shared_encoder

        cpu_only(device, "text banks")
        store = BankStore(path, db_url)
        reader = store.open(version)
        raw = reader.record["config"]
        if raw.get("kind") != "text":
            raise InvalidRequest(f"bank {path} version {reader.id} is not a text bank (use pmeta.Bank.open for MovieLens banks)")
        try:
            config = TextConfig(**{**raw, "device": device})
        except ValidationError as exc:
            raise BankIntegrityError(f"bank {path} version {reader.id} has a config this pmeta cannot read: {exc.errors()[0]['msg']}") from None
        tensors = TextTensors.from_flat(reader.read_tensors(TENSORS_FILE))
        index = AnchorIndex.from_bytes(reader.read_bytes(INDEX_FILE))  # checksum verified by store.open
        record = reader.read_json(BUILD_FILE)
        lm = lm or shared_lm(config)
        check_fingerprint(record.get("lm_fingerprint") if isinstance(record, dict) else None, lm.fingerprint, getattr(lm, "path", config.lm), path, reader.id)
        model = TextModel(config, lm, shared_encoder(config.encoder, device), tensors, index)
        return cls(store, reader.id, config, model, {**reader.record, "build": record})

    def history(self, history: TextHistory | dict | list | str | Path) -> tuple[TextHistory, list[dict]]:
        if isinstance(history, (str, Path)):
            return load_text_history(history, self.task)
        if isinstance(history, TextHistory):
            return parse_text_history(history.model_dump(), self.task)
        return parse_text_history(history, self.task)

    def personalize(self, history, steps: int | None = None, max_items: int | None = None) -> TextPersonalization:
        """Retrieve, fuse and adapt for one user; ``history`` is a dict/list/TextHistory or a path.
        ``max_items`` keeps only the most recent profile items. Raises InvalidHistory on bad input."""
        return self.personalize_many([history], steps=steps, max_items=max_items)[0]

    @outside_inference_mode
    def personalize_many(self, histories: list, steps: int | None = None, max_items: int | None = None) -> list[TextPersonalization]:
        from ..bank.bank import each_history

        if steps is not None:
            steps = request_int(steps, "steps", 0, MAX_INNER_STEPS)
        if max_items is not None:
            max_items = request_int(max_items, "max_items", 0)
        parsed = each_history(histories, self.history)
        profiles = [p if max_items is None else p[-max_items:] if max_items > 0 else [] for _, p in parsed]
        clock = time.perf_counter()
        timings: dict[str, float] = {}
        rows: dict[int, tuple[Adapter, list[dict]]] = {}
        # empty profiles (the zero-history prior, whose rank spans every anchor) apart from the others,
        # so the others' inner steps do not run at the prior's padded rank
        for group in ([r for r, p in enumerate(profiles) if p], [r for r, p in enumerate(profiles) if not p]):
            if not group:
                continue
            part: dict[str, float] = {}
            personal, details = self.model.personalize([profiles[r] for r in group], steps, part)
            for key, value in part.items():
                timings[key] = timings.get(key, 0.0) + value
            for i, row in enumerate(group):
                anchors = []
                if details["has_key"][i]:
                    anchors = [{"anchor": int(a), "weight": round(float(w), 6)} for a, w in zip(details["anchors"][i], details["weights"][i])]
                rows[row] = (user_row(personal, i, details["fused_ranks"]), anchors)
        timings["total_ms"] = (time.perf_counter() - clock) * 1e3
        share = max(len(parsed), 1)
        return [TextPersonalization(history.user_id, profiles[row], *rows[row], {k: v / share for k, v in timings.items()}, self) for row, (history, _) in enumerate(parsed)]

    def info(self) -> dict[str, Any]:
        return {"version": self.version, "kind": "text", "task": self.task, "lm": self.config.lm, "anchors": int(self.model.t.anchor_keys.shape[0]), "config": self.config.model_dump()}

"""Use a bank on a catalogue it was not built on, by matching items through their text.

A bank learns three things per item of its own catalogue: a bias and two collaborative
embeddings (history and item side). Everything else — the encoder, the prompt/LoRA anchors, the
projections of the text part — works on text and carries over to any catalogue. For a new
catalogue:

* each target item is matched to the bank item with the same normalised title (case-folded,
  whitespace collapsed; MovieLens titles carry the year, "Heat (1995)");
* the target's text embeddings are computed by the same frozen encoder (cached on disk by content);
* a matched item takes the bank's bias, collaborative rows, time-prior column, retrieval key row
  and anchors' item-bias column; an unseen item has zero collaborative rows (its score comes from
  the text part alone), the bank's median bias and median time prior, a key row projected from its
  text embedding (the bank's ``key_projection``) and no anchor item bias.

In a bank with text retrieval keys, anchor retrieval needs no mapping at all.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import torch

from ..bank.model import PmetaModel
from ..data.types import Catalog
from ..progress import Progress

_SPACES = re.compile(r"\s+")


def normalise_title(title: str) -> str:
    return _SPACES.sub(" ", title).strip().casefold()


def match_items(source: Catalog, target: Catalog) -> np.ndarray:
    """For each target item, the index of the source item with the same normalised title, or -1.

    When several source items share a title (remakes listed with the same year), the first one is used.
    """
    by_title: dict[str, int] = {}
    for index, title in enumerate(source.titles):
        by_title.setdefault(normalise_title(title), index)
    return np.array([by_title.get(normalise_title(t), -1) for t in target.titles], dtype=np.int64)


def transfer_model(model: PmetaModel, source: Catalog, target: Catalog, progress: Progress | None = None) -> tuple[PmetaModel, dict]:
    """A PmetaModel that ranks ``target``'s items with ``model``'s bank; returns (model, match summary)."""
    from ..bank.build import catalog_embeddings

    matched = match_items(source, target)
    texts = target.texts()
    item_text = catalog_embeddings(model.encoder, texts, progress or Progress(False))
    head = {k: v for k, v in model.t.head.items()}
    known = torch.from_numpy(matched >= 0)
    rows = torch.from_numpy(np.where(matched >= 0, matched, 0))
    bias = model.t.head["item_bias"]
    head["item_bias"] = torch.where(known, bias[rows], bias.median())
    for key in ("history_embedding", "item_embedding"):
        if key in head:
            head[key] = torch.where(known[:, None], head[key][rows], torch.zeros(()))
    if "time_log_prior" in head:  # the time prior's columns follow the items; an unseen item gets each period's median, as its bias
        table = head["time_log_prior"]
        head["time_log_prior"] = torch.where(known[None, :], table[:, rows], table.median(dim=1, keepdim=True).values)
    extra = {}
    if model.t.item_keys is not None:  # collaborative keys: a matched item keeps its row, an unseen one is projected from its text
        projected = item_text.float() @ model.t.key_projection if model.t.key_projection is not None else torch.zeros(len(target), model.t.item_keys.shape[1])
        extra["item_keys"] = torch.where(known[:, None], model.t.item_keys[rows], projected)
    if model.t.anchor_bias is not None:  # an anchor's item bias follows matched items; unseen items get 0 (no evidence)
        extra["anchor_bias"] = torch.where(known[None, :], model.t.anchor_bias[:, rows], torch.zeros(()))
    tensors = replace(model.t, item_text=item_text, head=head, **extra)
    summary = {"source_items": len(source), "target_items": len(target), "matched_items": int(known.sum()), "unseen_items": int((~known).sum())}
    return PmetaModel(model.config, model.encoder, texts, tensors, index=model.index), summary

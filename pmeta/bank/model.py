"""The personalization model: encoder + ranking head + anchors + stacked adapter.

This is the one place where a batch of users goes from histories to scores. The bank build
meta-trains its tensors; serving (:class:`pmeta.bank.bank.Bank`) runs the very same methods:

    histories ─► user keys ─► retrieve top-k anchors ─► fuse (exact) adapters and item biases
              ─► adapt stacked adapter ─► user tower ─► scores over the catalogue
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..adapt.inner import adapt
from ..config import BankConfig
from ..fusion import anchor_bias
from ..fusion.fuse import PriorCache, fuse_users, fusion_weights
from ..fusion.index import AnchorIndex
from ..models.encoder import FunctionalEncoder
from ..models.personal import Adapter, Ranks, expand_users, stack
from ..tasks import ranking, time_prior
from .crossfit import CrossFit


def device_clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device's queued work is done. CUDA kernels run
    asynchronously: without the sync a step's kernels are billed to whichever later step waits for
    them (the inner steps' to the scoring's ``.cpu()``). The sync waits for every stream's work on
    the device, so under concurrent threads a call's stage timings include the others' kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class UserInput:
    """What the model reads of one user: liked catalogue items and texts, in time order."""

    liked_items: list[int] = field(default_factory=list)  # catalogue indexes: inner-loop targets, history embeddings
    texts: list[str] = field(default_factory=list)  # the texts the encoder reads (catalogue texts and free texts)
    free_texts: list[str] = field(default_factory=list)  # texts of items outside the catalogue (for the user key)
    seen_items: list[int] = field(default_factory=list)  # every catalogue item in the history: never recommended
    time: float | None = None  # seconds since the epoch of the latest history interaction (the time prior's t); None: unknown


@dataclass
class Tensors:
    """Every learned or cached tensor of a bank version (what the safetensors file holds)."""

    item_text: torch.Tensor  # (N, d) frozen sentence embeddings of the catalogue
    head: ranking.HeadParams
    global_adapter: Adapter  # meta-learned prior (no user axis)
    global_step_sizes: dict[str, torch.Tensor]  # log step sizes of the global stage
    anchors: Adapter  # every anchor's adapter on a leading anchor axis (A_n, ...)
    anchor_keys: torch.Tensor  # (A_n, r) unit keys (the centroids, in the key space of user_keys)
    anchor_sizes: torch.Tensor  # (A_n,) train users per anchor
    stack_init: Adapter  # init of the per-user stacked adapter
    stack_step_sizes: dict[str, torch.Tensor]
    log_temperature: torch.Tensor  # fusion temperature τ = exp(.)
    # the retrieval key space (None: the item text embeddings, as banks before it):
    item_keys: torch.Tensor | None = None  # (N, r) each item's key row; a user's key is the unit mean over liked items
    key_projection: torch.Tensor | None = None  # (d, r) text embedding → key row, for free texts
    anchor_bias: torch.Tensor | None = None  # (A_n, N) each anchor's item-score offset (pmeta.fusion.anchor_bias), γ included

    def to_flat(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in self.to_flat_views().items()}

    def to(self, device: str | torch.device) -> "Tensors":
        """Every tensor on ``device`` (a no-op for tensors already there)."""
        return Tensors.from_flat({k: v.to(device) for k, v in self.to_flat_views().items()})

    def to_flat_views(self) -> dict[str, torch.Tensor]:
        flat = {"item_text": self.item_text, "anchor_keys": self.anchor_keys, "anchor_sizes": self.anchor_sizes, "log_temperature": self.log_temperature}
        for key in OPTIONAL:
            if getattr(self, key) is not None:
                flat[key] = getattr(self, key)
        for prefix, group in [("head", self.head), ("global", self.global_adapter), ("global_lr", self.global_step_sizes), ("anchors", self.anchors), ("stack", self.stack_init), ("stack_lr", self.stack_step_sizes)]:
            for key, value in group.items():
                flat[f"{prefix}/{key}"] = value
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, torch.Tensor]) -> "Tensors":
        def group(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) + 1 :]: v for k, v in flat.items() if k.startswith(prefix + "/")}

        return cls(
            item_text=flat["item_text"],
            head=group("head"),
            global_adapter=group("global"),
            global_step_sizes=group("global_lr"),
            anchors=group("anchors"),
            anchor_keys=flat["anchor_keys"],
            anchor_sizes=flat["anchor_sizes"],
            stack_init=group("stack"),
            stack_step_sizes=group("stack_lr"),
            log_temperature=flat["log_temperature"],
            **{key: flat.get(key) for key in OPTIONAL},
        )


OPTIONAL = ("item_keys", "key_projection", "anchor_bias")  # tensors a bank may lack


class PmetaModel:
    def __init__(self, config: BankConfig, encoder: FunctionalEncoder, item_texts: list[str], tensors: Tensors, index: AnchorIndex | None = None) -> None:
        self.config = config
        self.encoder = encoder
        self.item_texts = item_texts
        self.t = tensors
        self.precision = "float32"  # or "bfloat16": the encoder passes under bf16 autocast (see FunctionalEncoder.autocast)
        self.crossfit: CrossFit | None = None  # set by the build for meta-training only (pmeta.bank.crossfit); never stored
        self.prior_cache = PriorCache()  # the zero-history prior, rebuilt only when the anchors change
        self.index = index if index is not None else AnchorIndex.build(tensors.anchor_keys.detach().cpu().numpy(), kind=config.index, flat_below=config.index_flat_below, seed=config.seed)

    # ------------------------------------------------------------------ inputs
    def user_batch(self, users: list[UserInput], layer: int | None = None) -> ranking.UserBatch:
        """Tokenise each user's history text and run the frozen layers below the prompt layer once.

        ``layer`` stops below another layer instead (0 = token embeddings only: the per-user LoRA
        baseline, which adapts every layer, runs the rest itself)."""
        limit = self.config.max_history_items
        texts = [" | ".join(u.texts[-limit:]) for u in users]
        ids, mask = self.encoder.tokenize(texts, self.config.max_tokens)
        empty = torch.tensor([len(u.texts) == 0 for u in users], device=mask.device)
        mask = mask.masked_fill(empty[:, None], 0)  # an empty history reads no tokens at all
        with self.encoder.autocast(self.precision):
            hidden = self.encoder.lower(ids, mask, self.config.prompt_layer if layer is None else layer)
        width = max([len(u.liked_items[-limit:]) for u in users] + [1])
        history = torch.zeros(len(users), width, dtype=torch.long)
        history_mask = torch.zeros(len(users), width)
        exclude = torch.zeros(len(users), len(self.item_texts), dtype=torch.bool)
        for row, user in enumerate(users):
            liked = user.liked_items[-limit:]
            history[row, : len(liked)] = torch.tensor(liked, dtype=torch.long)
            history_mask[row, : len(liked)] = 1
            if user.seen_items:
                exclude[row, torch.tensor(user.seen_items, dtype=torch.long)] = True
        device = hidden.device
        times = [float("nan") if u.time is None else float(u.time) for u in users]
        prior = time_prior.user_prior(self.t.head, times, [len(u.liked_items) for u in users])
        return ranking.UserBatch(hidden=hidden, mask=mask, history_items=history.to(device), history_mask=history_mask.to(device), exclude=exclude.to(device), prior=None if prior is None else prior.to(device))

    def user_keys(self, users: list[UserInput]) -> np.ndarray:
        """Unit retrieval keys (U, r): the mean of the key rows of the user's liked items.

        Key rows are the bank's ``item_keys`` (the collaborative history factors, see
        :func:`pmeta.bank.build.anchor_keys`) or, in a bank without them, the sentence embeddings of
        the items' texts. Free texts are encoded on the fly (and projected by ``key_projection``):
        the last ``max_history_items`` of them, as many as the user tower reads at most (encoding
        every one of a 10,000-item history of free texts took minutes and gigabytes).
        A user with no liked items, or only items whose rows are zero, gets a zero key (and the
        zero-history prior).
        """
        rows = self.t.item_text if self.t.item_keys is None else self.t.item_keys
        keys = np.zeros((len(users), rows.shape[1]), dtype=np.float32)
        for row, user in enumerate(users):
            parts = []
            if user.liked_items:
                parts.append(rows[torch.tensor(user.liked_items)])
            if user.free_texts:
                texts = self.encoder.sentence_embeddings(user.free_texts[-self.config.max_history_items :])
                parts.append(texts if self.t.key_projection is None else texts.to(self.t.key_projection.dtype) @ self.t.key_projection)
            if parts:
                mean = torch.cat(parts).mean(0)
                keys[row] = (mean / mean.norm().clamp_min(1e-12)).cpu().numpy()
        return keys

    # ------------------------------------------------------------------ personal parameters
    def temperature(self) -> torch.Tensor:
        return self.t.log_temperature.exp()

    def retrieve(self, keys: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        sims, idx = self.index.search(keys, self.config.top_k)
        device = self.t.item_text.device
        return torch.from_numpy(sims).to(device), torch.from_numpy(idx).long().to(device)

    def fused_adapter(self, sims: torch.Tensor, idx: torch.Tensor, has_key: torch.Tensor) -> tuple[Adapter, Ranks | None]:
        """The users' fused anchors, and the ranks padded where the batch mixes users without a key
        (who get the zero-history prior) with users with one (:func:`pmeta.fusion.fuse.fuse_users`)."""
        weights = fusion_weights(sims, self.temperature())
        return fuse_users(self.t.anchors, idx, weights, has_key, self.t.anchor_sizes, self.config.fusion, self.config.anchor_rank, self.prior_cache)

    def has_key(self, keys: np.ndarray) -> torch.Tensor:
        """(U,) bool on the bank's device: users whose key is not zero (they have something to retrieve with)."""
        return torch.from_numpy(np.linalg.norm(keys, axis=1) > 0).to(self.t.item_text.device)

    def anchor_offset(self, keys: np.ndarray, sims: torch.Tensor, idx: torch.Tensor, sizes=None) -> torch.Tensor | None:
        """The users' fused anchor item bias (U, N) (:mod:`pmeta.fusion.anchor_bias`) for their
        ``keys`` and retrieved anchors, or None for a bank without one. Users without a key get every
        anchor weighted by its train users, as the zero-history prior adapter does. ``sizes`` (U,):
        the users' numbers of liked history items, which scale the offset when the bank has
        ``head/anchor_bias_scale`` (serving and validation pass them; meta-training does not)."""
        if self.t.anchor_bias is None:
            return None
        offset = anchor_bias.fused(self.t.anchor_bias, idx, fusion_weights(sims, self.temperature()), self.has_key(keys), self.t.anchor_sizes)
        scale = self.t.head.get("anchor_bias_scale")
        if scale is None or sizes is None:
            return offset
        return time_prior.weight_of(scale, sizes).to(offset.dtype)[:, None] * offset

    # ------------------------------------------------------------------ scores and losses
    def scores(self, batch: ranking.UserBatch, personal: Adapter, head: ranking.HeadParams | None = None) -> torch.Tensor:
        head = self.t.head if head is None else head
        with self.encoder.autocast(self.precision):
            pooled = self.encoder.upper(batch.hidden, batch.mask, personal, self.config.prompt_layer)
        users = ranking.user_vectors(head, pooled, batch)
        return ranking.logits(head, self.t.item_text, users, batch.prior)

    def loss_fn(self, batch: ranking.UserBatch, targets: torch.Tensor, target_mask: torch.Tensor, exclude: torch.Tensor | None = None, head=None):
        exclude = batch.exclude if exclude is None else exclude

        def loss(personal: Adapter) -> torch.Tensor:
            return ranking.softmax_loss(self.scores(batch, personal, head), targets, target_mask, exclude)

        return loss

    @staticmethod
    def targets_of(users: list[UserInput], limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max([len(u.liked_items[-limit:]) for u in users] + [1])
        targets = torch.zeros(len(users), width, dtype=torch.long)
        mask = torch.zeros(len(users), width)
        for row, user in enumerate(users):
            liked = user.liked_items[-limit:]
            targets[row, : len(liked)] = torch.tensor(liked, dtype=torch.long)
            mask[row, : len(liked)] = 1
        return targets, mask

    # ------------------------------------------------------------------ serving path
    @torch.no_grad()
    def fuse(self, users: list[UserInput], batch: ranking.UserBatch, keys: np.ndarray, sims: torch.Tensor, idx: torch.Tensor, has_key: torch.Tensor) -> tuple[Adapter, list]:
        """The retrieved anchors' fused adapter and its ranks (:meth:`fused_adapter`), and their item
        bias added to ``batch.prior``, scaled by each user's history size (:meth:`anchor_offset`): the
        step of :meth:`personalize` between retrieval and the inner steps."""
        batch.prior = ranking.add_prior(batch.prior, self.anchor_offset(keys, sims, idx, [len(u.liked_items) for u in users]))
        return self.fused_adapter(sims, idx, has_key)

    def personalize(self, users: list[UserInput], steps: int | None = None, timings: dict | None = None, adapt_fn=None) -> tuple[Adapter, ranking.UserBatch, dict]:
        """Personal adapters for a batch of users: retrieve, fuse, inner steps on the stacked adapter.

        Users without liked catalogue items get no inner steps (nothing to fit); users without a
        retrieval key (an empty history, or one whose items all have zero key rows, see
        :meth:`user_keys`) get the zero-history prior. Returns (full adapter with user axis, batch, details).
        ``adapt_fn(model, batch, targets, target_mask, init, fused, steps)`` replaces the batched
        inner loop (serving uses it for the ``torch.func.vmap`` variant, see ``bank.adapt_vmap``).
        """
        steps = self.config.inner_steps if steps is None else steps
        device = self.t.item_text.device
        clock = device_clock(device)
        keys = self.user_keys(users)
        batch = self.user_batch(users)
        t_embed = device_clock(device)
        sims, idx = self.retrieve(keys)
        t_retrieve = device_clock(device)
        has_key = self.has_key(keys)
        fused, fused_ranks = self.fuse(users, batch, keys, sims, idx, has_key)
        t_fuse = device_clock(device)
        init = {k: v.detach().clone().requires_grad_(True) for k, v in expand_users(self.t.stack_init, len(users)).items()}
        targets, target_mask = (t.to(self.t.item_text.device) for t in self.targets_of(users, self.config.max_history_items))
        if steps > 0 and bool(target_mask.sum() > 0):
            with torch.enable_grad():
                if adapt_fn is None:
                    adapted = adapt(init, self.loss_fn(batch, targets, target_mask), steps, self.t.stack_step_sizes, fixed=fused)
                else:
                    adapted = adapt_fn(self, batch, targets, target_mask, init, fused, steps)
            # users with nothing to fit keep the init: their loss term is zero, so their gradient is too
        else:
            adapted = init
        personal = {k: v.detach() for k, v in stack(fused, adapted).items()}
        t_adapt = device_clock(device)
        details = {
            "anchors": idx.tolist(),
            "weights": fusion_weights(sims, self.temperature()).tolist(),
            "has_key": has_key.tolist(),
            "fused_ranks": fused_ranks,  # for personal.user_row: drops a user's padding
        }
        if timings is not None:
            timings.update(embed_ms=(t_embed - clock) * 1e3, retrieve_fuse_ms=(t_fuse - t_embed) * 1e3, retrieve_ms=(t_retrieve - t_embed) * 1e3, fuse_ms=(t_fuse - t_retrieve) * 1e3, adapt_ms=(t_adapt - t_fuse) * 1e3)
        return personal, batch, details

    @torch.no_grad()
    def final_scores(self, batch: ranking.UserBatch, personal: Adapter) -> torch.Tensor:
        """Scores (U, N) with history items set to -inf (never recommended)."""
        scores = self.scores(batch, personal)
        return scores.masked_fill(batch.exclude, float("-inf"))


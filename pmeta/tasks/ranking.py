"""Ranking: two towers, each with a text part and a collaborative part, scored by one matrix product.

* **Text part.** User: ``a = norm(enc(history text; personal)) W_user`` — the frozen encoder run with
  the user's personal parameters (prompt + LoRA) over their history text. Item: ``t_i W_item``
  where ``t_i`` is the frozen sentence embedding of the item's text (title + genres).
* **Collaborative part.** User: ``c = Σ_{j∈history} h_j / n^γ`` over the n history items (γ = 1: the
  mean; γ = 0.5, FISM's normalisation, lets a longer history weigh more against the item bias; a
  head without ``cf_pool_exponent`` uses the mean); item: ``e_i``. ``h`` and ``e`` (N, r)
  are learned from the bank's train users, initialised in closed form from an item-item matrix
  ``M ≈ (U Σ) Vᵀ`` (h = U_r Σ_r, e = V_r: the folding-in score ``Σ_j M_ji / n^γ`` at rank r,
  :func:`matrix_factors`): by default EASE's matrix plus the onboarding regression of
  :mod:`pmeta.bank.onboarding`, with its item bias; or EASE's ``B`` alone; or PureSVD of the
  positive-interaction matrix (X ≈ U Σ Vᵀ, h = e = V_r: the folding-in recommender ``x V Vᵀ``).
  Items the bank never saw have zero rows, so a new catalogue still ranks by text.
* **Score**: ``s(u, i) = exp(σ_text)·a·(t_i W_item) + exp(σ_cf)·c·e_i + b_i [+ β·prior_i(t_u)]``,
  the last term when the bank has a time prior (:mod:`pmeta.tasks.time_prior`): what train users
  rated around the time t_u of the user's latest interaction.

Keeping the two parts in separate subspaces avoids cross terms between text and collaborative
vectors. Loss: softmax cross-entropy of each target against the whole catalogue, with ``exclude``
items removed from the normaliser (a target that is itself excluded still competes with the rest,
which is how the inner loop fits a user's own history).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

HeadParams = dict[str, torch.Tensor]


def init_head(item_text: torch.Tensor, item_counts: torch.Tensor, cf_factors: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None, cf_scale: float = 1.0, item_bias: torch.Tensor | None = None, text_log_scale: float = 2.0, cf_pool_exponent: float = 1.0) -> HeadParams:
    """Fresh head for N items: text embeddings (N, d), train counts (N,), and the collaborative init:
    PureSVD factors (N, r) shared by both towers, a (history, item) pair of (N, r) factors, or None.
    ``item_bias`` (N,) replaces the default bias, the standardised log train count;
    ``cf_pool_exponent`` is γ of the collaborative user vector (fixed, not trained)."""
    n, d = item_text.shape
    if item_bias is not None:
        bias = item_bias.clone().float()
    else:
        bias = torch.log1p(item_counts.float())
        bias = (bias - bias.mean()) / bias.std().clamp_min(1e-6)
    params = {
        "user_proj": torch.eye(d),
        "item_proj": torch.eye(d),
        "item_bias": bias,
        "log_scale": torch.tensor(float(text_log_scale)),
    }
    if cf_factors is not None:
        history, item = cf_factors if isinstance(cf_factors, tuple) else (cf_factors, cf_factors)
        params["history_embedding"] = history.clone().float()
        params["item_embedding"] = item.clone().float()
        params["cf_log_scale"] = torch.tensor(float(torch.log(torch.tensor(cf_scale))))
        params["cf_pool_exponent"] = torch.tensor(float(cf_pool_exponent))
    return params


@dataclass
class UserBatch:
    """Everything the user tower and the losses need for U users (padded)."""

    hidden: torch.Tensor  # (U, T, d) encoder states entering the prompt layer
    mask: torch.Tensor  # (U, T) token mask
    history_items: torch.Tensor  # (U, H) catalogue indexes of history items, padded with 0
    history_mask: torch.Tensor  # (U, H) 1 for real history items
    exclude: torch.Tensor  # (U, N) bool: items never recommended / removed from the normaliser
    prior: torch.Tensor | None = None  # (U, N) additive item scores: the weighted time prior (pmeta.tasks.time_prior) plus, once anchors are retrieved, their item bias (pmeta.fusion.anchor_bias); or None

    @property
    def users(self) -> int:
        return self.hidden.shape[0]


def user_vectors(head: HeadParams, pooled: torch.Tensor, batch: UserBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(text part (U, d), collaborative part (U, r) or None) from pooled encoder output (U, d)."""
    text = F.normalize(pooled, dim=-1) @ head["user_proj"]
    if "history_embedding" not in head:
        return text, None
    weights = batch.history_mask.to(text.dtype)
    rows = head["history_embedding"][batch.history_items]  # (U, H, r)
    count = weights.sum(1, keepdim=True).clamp_min(1.0)
    exponent = head.get("cf_pool_exponent")
    cf = (rows * weights[..., None]).sum(1) / (count if exponent is None else count.pow(exponent))
    return text, cf


def pool(rows: torch.Tensor, exponent: float = 1.0) -> torch.Tensor:
    """The collaborative user vector of one history: ``Σ rows / n^γ`` (rows: (n, r))."""
    return rows.sum(0) / max(rows.shape[0], 1) ** exponent


def logits(head: HeadParams, item_text: torch.Tensor, users: tuple[torch.Tensor, torch.Tensor | None], prior: torch.Tensor | None = None) -> torch.Tensor:
    """Scores (U, N) of every catalogue item; ``item_text`` is (N, d); ``prior`` (U, N) is added
    (the weighted time prior of :mod:`pmeta.tasks.time_prior`, plus the anchors' item bias of
    :mod:`pmeta.fusion.anchor_bias` where anchors were retrieved).

    The text part is computed as ``(a W_itemᵀ) Tᵀ`` so the (N, d) item matrix is never formed.
    """
    text, cf = users
    scores = head["log_scale"].exp() * ((text @ head["item_proj"].T) @ item_text.T) + head["item_bias"]
    if cf is not None:
        scores = scores + head["cf_log_scale"].exp() * (cf @ head["item_embedding"].T)
    if prior is not None:
        scores = scores + prior
    return scores


def add_prior(prior: torch.Tensor | None, extra: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of two additive item-score terms (U, N), either of which may be None."""
    if extra is None:
        return prior
    return extra if prior is None else prior + extra


#: Largest |a - b| at which :func:`log_add_exp` uses ``torch.logaddexp`` (whose double backward is
#: NaN past a gap of about 88 in float32: its second derivative overflows ``exp``).
LOGADDEXP_GAP = 60.0


def log_add_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp(a) + exp(b))`` with finite derivatives of every order.

    Where ``|a - b| <= LOGADDEXP_GAP`` it is ``torch.logaddexp`` bit for bit (value and gradients,
    so training is unchanged wherever it did not fail); beyond, ``logsumexp`` of the pair. Each
    branch gets inputs it is finite on (second-order MAML differentiates both: ``torch.where``
    multiplies the unused branch's NaN by a zero gradient, which stays NaN)."""
    a, b = torch.broadcast_tensors(a, b)
    near = (a - b).abs() <= LOGADDEXP_GAP
    exact = torch.logaddexp(torch.where(near, a, 0.0), torch.where(near, b, 0.0))
    stable = torch.logsumexp(torch.stack([a, b]), dim=0)
    return torch.where(near, exact, stable)


def softmax_loss(scores: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of targets (U, Q) against all non-excluded items; the sum over users of per-user means.

    Returning a *sum over users* keeps each user's inner-loop gradient independent of the batch size.
    """
    rest = torch.logsumexp(scores.masked_fill(exclude, float("-inf")), dim=-1, keepdim=True)  # (U, 1)
    target_scores = scores.gather(1, targets)  # (U, Q)
    target_excluded = exclude.gather(1, targets)
    normaliser = torch.where(target_excluded, log_add_exp(target_scores, rest.expand_as(target_scores)), rest.expand_as(target_scores))
    per_target = (normaliser - target_scores) * target_mask
    return (per_target.sum(1) / target_mask.sum(1).clamp_min(1.0)).sum()


def pure_svd(positives: list, n_items: int, rank: int) -> tuple[torch.Tensor, float]:
    """Item factors V_r (n_items, rank) of the binary user × item matrix, and a scale that gives the
    folding-in scores ``mean_j V_j · V_i`` a standard deviation of 1 over items."""
    import numpy as np
    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    rows = np.concatenate([np.full(len(items), u) for u, items in enumerate(positives)])
    cols = np.concatenate(positives)
    matrix = sp.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(positives), n_items))
    matrix.data[:] = 1.0  # duplicates count once
    if min(matrix.shape) < 2:
        from ..errors import InvalidData

        raise InvalidData(f"a collaborative init needs at least 2 train users and 2 items, got {matrix.shape[0]} and {matrix.shape[1]}")
    rank = max(1, min(rank, min(matrix.shape) - 1))
    _, _, vt = svds(matrix, k=rank, random_state=0)
    factors = torch.from_numpy(np.ascontiguousarray(vt.T[:, ::-1])).float()  # (n_items, rank), largest first
    folded = torch.stack([factors[torch.from_numpy(items)].mean(0) for items in positives]) @ factors.T
    return factors, float(1.0 / folded.std().clamp_min(1e-9))


def ease_factors(positives: list, n_items: int, rank: int, weights, kept_items) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """Rank-``rank`` factors of an EASE item-item matrix ``B`` (kept × kept, for ``kept_items``):
    ``B ≈ P Qᵀ`` by randomized SVD, ``P = U Σ`` as history rows and ``Q = V`` as item rows, so the
    folding-in score ``mean_j P_j · Q_i`` approximates EASE's ``x B`` up to the per-user scale.
    Items outside ``kept_items`` get zero rows. Returns ((P, Q) as (n_items, rank)), and the scale
    that gives the folding-in scores a standard deviation of 1 over items."""
    factors, scale, _ = matrix_factors(positives, n_items, rank, weights, kept_items)
    return factors, scale


def matrix_factors(positives: list, n_items: int, rank: int, matrix, kept_items, bias=None, pool_exponent: float = 1.0) -> tuple[tuple[torch.Tensor, torch.Tensor], float, torch.Tensor | None]:
    """Rank-``rank`` factors ``M ≈ P Qᵀ`` (randomized SVD, ``P = U Σ`` history rows, ``Q = V`` item
    rows) of any item-item matrix over ``kept_items`` (an EASE ``B``, or the onboarding matrix of
    :mod:`pmeta.bank.onboarding`), so the folding-in score ``bias_i + Σ_j P_j · Q_i / n^γ``
    approximates ``bias + x M`` (x = 1/n^γ on the history's n items, γ = ``pool_exponent``). Items outside ``kept_items`` get zero rows and the lowest bias.

    Returns ((P, Q) as (n_items, rank)), the scale that gives the folding-in scores of the train
    ``positives`` (bias included) a standard deviation of 1 over items, and the bias over the whole
    catalogue already multiplied by that scale (None without ``bias``)."""
    import numpy as np

    u, sigma, vt = svd(matrix, rank)
    rank = len(sigma)
    history = torch.zeros(n_items, rank)
    item = torch.zeros(n_items, rank)
    kept = torch.from_numpy(np.asarray(kept_items, dtype=np.int64))
    history[kept] = torch.from_numpy(np.ascontiguousarray(u * sigma)).float()
    item[kept] = torch.from_numpy(np.ascontiguousarray(vt.T)).float()
    full_bias = None
    if bias is not None:
        values = torch.from_numpy(np.asarray(bias, dtype=np.float32))
        full_bias = torch.full((n_items,), float(values.min()) if len(values) else 0.0)
        full_bias[kept] = values
    folded = torch.stack([pool(history[torch.from_numpy(items)], pool_exponent) for items in positives]) @ item.T
    if full_bias is not None:
        folded = folded + full_bias
    scale = float(1.0 / folded.std().clamp_min(1e-9))
    return (history, item), scale, None if full_bias is None else full_bias * scale


def svd(matrix, rank: int):
    """(U, Σ, Vᵀ) at rank ``min(rank, columns)`` of an item-item matrix (randomized SVD, seed 0):
    the factorisation behind the collaborative factors and the build's collaborative keys."""
    import numpy as np
    from sklearn.utils.extmath import randomized_svd

    matrix = np.asarray(matrix, dtype=np.float32)
    return randomized_svd(matrix, n_components=max(1, min(rank, matrix.shape[1])), random_state=0)

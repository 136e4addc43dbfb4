"""Fusion of retrieved anchors into one adapter per user, exactly.

For a user with retrieved anchors j = 1..k and weights w_j (softmax of similarity / τ):

* prompt:  P = Σ_j w_j P_j
* LoRA:    ΔW = Σ_j w_j B_j A_j, realised *exactly* by concatenation:
  A_cat = [A_1; …; A_k] (k·r, d_in) and B_cat = [w_1 B_1, …, w_k B_k] (d_out, k·r),
  so B_cat A_cat = Σ_j w_j B_j A_j with no cross terms (unlike PEFT's ``linear`` merge, which
  scales both factors by √w_j).
* ``svd``: the same ΔW truncated to rank r by SVD (B = U_r Σ_r, A = V_rᵀ), the compact option.
  The SVD runs on the small (k·r, k·r) core of the factors, and the backward pass projects onto
  the tangent space of the rank-r matrices (:func:`fuse_svd`) instead of differentiating the SVD:
  SVD's derivative is undefined where singular values repeat, and a ΔW of rank k·r < d has
  d − k·r singular values at zero (meta-training through it got NaN gradients).
"""

from __future__ import annotations

import threading
import weakref

import torch

from ..models.personal import Adapter, Ranks, select_rows


def fusion_weights(similarities: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """Softmax of similarity / τ over the retrieved anchors: (U, k) -> (U, k)."""
    return torch.softmax(similarities / temperature, dim=-1)


def fuse_cat(anchors: Adapter, indexes: torch.Tensor, weights: torch.Tensor) -> Adapter:
    """Exact fusion by concatenation.

    anchors: every anchor's adapter stacked on a leading anchor axis (N, ...);
    indexes: (U, k) anchor positions; weights: (U, k). Returns an adapter with user axis U and
    LoRA rank k·r.
    """
    users, k = indexes.shape
    out: Adapter = {}
    prompts = anchors["prompt"][indexes]  # (U, k, l, d)
    out["prompt"] = torch.einsum("uk,ukld->uld", weights, prompts)
    for key, value in anchors.items():
        if key.endswith(".A"):
            a = value[indexes]  # (U, k, r, d_in)
            out[key] = a.reshape(users, k * a.shape[-2], a.shape[-1])
        elif key.endswith(".B"):
            b = value[indexes] * weights[:, :, None, None]  # (U, k, d_out, r), scaled by w_j
            out[key] = b.permute(0, 2, 1, 3).reshape(users, b.shape[-2], k * b.shape[-1])
    return out


def truncated_svd(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets (U_r (…, d_out, r), σ (…, r), V_r (…, d_in, r)) of ΔW =
    ``b`` @ ``a``, from the SVD of the small core: b = Q_b R_b and aᵀ = Q_a R_a give
    ΔW = Q_b (R_b R_aᵀ) Q_aᵀ (the (d_out, d_in) ΔW is never formed)."""
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.transpose(-1, -2))
    u, s, vh = torch.linalg.svd(r_b @ r_a.transpose(-1, -2))
    return q_b @ u[..., :rank], s[..., :rank], q_a @ vh[..., :rank, :].transpose(-1, -2)


def fuse_svd(anchors: Adapter, indexes: torch.Tensor, weights: torch.Tensor, rank: int) -> Adapter:
    """Fusion truncated to ``rank`` by SVD of the exact ΔW = b a (best rank-r approximation in
    Frobenius norm): B = ΔW V_r = U_r Σ_r and A = V_rᵀ in value.

    Gradients: with U_r, V_r and Σ_r⁺ held constant, A = V_rᵀ + Σ_r⁺ U_rᵀ ΔW (I − V_r V_rᵀ) has the
    same value (U_rᵀ ΔW lies in V_r's span), and d(BA) = dΔW V_r V_rᵀ + U_r U_rᵀ dΔW (I − V_r V_rᵀ):
    the projection onto the tangent space of the rank-r matrices at BA, the derivative of the
    truncation when ΔW has rank ≤ r, which lets the kept subspace turn. (It leaves out the terms
    that couple kept and dropped singular values, which grow as 1/(σ_r − σ_{r+1}).) Directions with
    σ = 0 get no U-side term, so anchors whose B starts at zero still train through dΔW V_r V_rᵀ.
    """
    exact = fuse_cat(anchors, indexes, weights)
    out: Adapter = {"prompt": exact["prompt"]}
    for key in exact:
        if not key.endswith(".A"):
            continue
        target = key[:-2]
        b, a = exact[target + ".B"], exact[target + ".A"]  # (U, d_out, k·r), (U, k·r, d_in)
        with torch.no_grad():
            u, s, v = truncated_svd(b, a, rank)
            kept = s > 1e-6 * s.amax(dim=-1, keepdim=True)  # zero where ΔW = 0 (every σ at zero)
            inverse = torch.where(kept, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
        a_v = a @ v  # (U, k·r, r)
        out[target + ".B"] = b @ a_v
        out[target + ".A"] = v.transpose(-1, -2) + (inverse[..., :, None] * (u.transpose(-1, -2) @ b)) @ (a - a_v @ v.transpose(-1, -2))
    return out


def fuse(anchors: Adapter, indexes: torch.Tensor, weights: torch.Tensor, method: str = "cat", rank: int = 2) -> Adapter:
    if method == "cat":
        return fuse_cat(anchors, indexes, weights)
    if method == "svd":
        return fuse_svd(anchors, indexes, weights, rank)
    raise ValueError(f"unknown fusion {method!r}; choose cat or svd")


def prior_weights(sizes: torch.Tensor) -> torch.Tensor:
    """The zero-history prior's anchor weights (N,): each anchor's share of the train users.
    Raises BankIntegrityError when the sizes do not sum to a positive number (no pmeta build
    writes such a bank; the prior would be NaN)."""
    total = sizes.sum()
    if not bool(total > 0):
        from ..errors import BankIntegrityError

        raise BankIntegrityError(f"the bank's anchor sizes sum to {float(total)}: the zero-history prior needs anchors with train users")
    return sizes / total


def fuse_prior(anchors: Adapter, sizes: torch.Tensor, users: int, cache: PriorCache | None = None) -> Adapter:
    """The zero-history prior for ``users`` users: every anchor fused exactly with
    :func:`prior_weights` of its train users ``sizes`` (N,), built once and shared by the users
    (taken from ``cache`` when it holds the prior of these anchors, see :class:`PriorCache`).

    By concatenation its LoRA rank is N·r, which grows with the bank; where N·r exceeds
    m = min(d_in, d_out), ΔW = Σ_j w_j B_j A_j is kept instead as rank m factors with an identity on
    the narrower side (``A = I``, ``B = ΔW`` when d_in ≤ d_out, else ``B = I``, ``A = ΔW``): the
    same ΔW up to float rounding, at a rank bounded by the layer's width."""
    one = prior_row(anchors, sizes) if cache is None else cache.get(anchors, sizes)
    return {k: v.expand(users, *v.shape[1:]) for k, v in one.items()}


def prior_row(anchors: Adapter, sizes: torch.Tensor) -> Adapter:
    """The zero-history prior of :func:`fuse_prior` for one user (leading axis 1)."""
    ref = anchors["prompt"]
    count = sizes.shape[0]
    weights = prior_weights(sizes).to(ref.device, ref.dtype)[None]
    one = fuse_cat(anchors, torch.arange(count, device=ref.device)[None], weights)
    for key in [k for k in one if k.endswith(".A")]:
        target = key[:-2]
        b, a = one[target + ".B"], one[key]  # (1, d_out, N·r), (1, N·r, d_in)
        d_out, d_in = b.shape[-2], a.shape[-1]
        if a.shape[-2] <= min(d_in, d_out):
            continue
        delta = b @ a
        if d_in <= d_out:
            one[target + ".B"], one[key] = delta, torch.eye(d_in, dtype=a.dtype, device=a.device)[None]
        else:
            one[target + ".B"], one[key] = torch.eye(d_out, dtype=b.dtype, device=b.device)[None], delta
    return one


class PriorCache:
    """The zero-history prior (:func:`prior_row`) of the anchors it was last asked for, reused while
    they are the same tensors, unchanged: one per opened bank, so that serving does not rebuild the
    prior (O(anchors) work) for every batch that holds a user without a key.

    The key is every anchor tensor and the sizes, held by weak reference, with the version counter
    that each in-place write bumps (``Tensor._version``: an optimizer step, ``copy_``), shape, dtype
    and device; anchors replaced or written in place rebuild the prior. Nothing is cached where
    autograd would record through the anchors (meta-training needs the prior's gradient) or in
    inference mode (an inference tensor cannot join a later autograd graph). Thread-safe: one lock
    around the lookup and the build, so concurrent callers build the prior once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: list[tuple] | None = None
        self._prior: Adapter | None = None
        self.builds = 0  # how many times the prior was built (for tests and benchmarks)

    @staticmethod
    def _key_of(anchors: Adapter, sizes: torch.Tensor) -> list[tuple]:
        return [(name, weakref.ref(t), t._version, t.shape, t.dtype, t.device) for name, t in sorted(anchors.items())] + [("sizes", weakref.ref(sizes), sizes._version, sizes.shape, sizes.dtype, sizes.device)]

    @staticmethod
    def _same(key: list[tuple], anchors: Adapter, sizes: torch.Tensor) -> bool:
        tensors = [t for _, t in sorted(anchors.items())] + [sizes]
        if len(key) != len(tensors):
            return False
        return all(ref() is t and (version, shape, dtype, device) == (t._version, t.shape, t.dtype, t.device) for (_, ref, version, shape, dtype, device), t in zip(key, tensors))

    def get(self, anchors: Adapter, sizes: torch.Tensor) -> Adapter:
        """The prior of ``anchors`` and ``sizes`` for one user (leading axis 1), built once while they do not change."""
        if torch.is_inference_mode_enabled() or (torch.is_grad_enabled() and any(t.requires_grad for t in [*anchors.values(), sizes])):
            return prior_row(anchors, sizes)
        with self._lock:
            if self._key is None or self._prior is None or not self._same(self._key, anchors, sizes):
                self._prior = prior_row(anchors, sizes)
                self._key = self._key_of(anchors, sizes)
                self.builds += 1
            return self._prior


def fuse_users(anchors: Adapter, indexes: torch.Tensor, weights: torch.Tensor, has_key: torch.Tensor, sizes: torch.Tensor, method: str = "cat", rank: int = 2, prior: PriorCache | None = None) -> tuple[Adapter, Ranks | None]:
    """Each user's fused anchors: the retrieved ``indexes`` at ``weights`` (U, k) for users with a
    retrieval key (``has_key`` (U,) bool), the zero-history prior (:func:`fuse_prior`) for the
    others. Returns the batched adapter and, unless every user has a key, each LoRA key's width and
    every user's real rank (:func:`~pmeta.models.personal.select_rows`), for
    :func:`~pmeta.models.personal.user_row` to drop a user's padding (``None`` when every user has a key).
    ``prior``: a :class:`PriorCache` to take the prior from (serving keeps one per opened bank)."""
    fused = fuse(anchors, indexes, weights, method, rank)
    if bool(has_key.all()):
        return fused, None
    return select_rows(has_key, fused, fuse_prior(anchors, sizes, len(has_key), prior))

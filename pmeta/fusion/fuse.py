"""Fusion of retrieved anchors into one adapter per user, exactly.

For a user with retrieved anchors j = 1..k and weights w_j (softmax of similarity / τ):

* prompt:  P = Σ_j w_j P_j
* LoRA:    ΔW = Σ_j w_j B_j A_j, realised *exactly* by concatenation:
  A_cat = [A_1; …; A_k] (k·r, d_in) and B_cat = [w_1 B_1, …, w_k B_k] (d_out, k·r),
  so B_cat A_cat = Σ_j w_j B_j A_j with no cross terms (unlike PEFT's ``linear`` merge, which
  scales both factors by √w_j).
* ``svd``: the same ΔW truncated to rank r by SVD (B = U_r Σ_r, A = V_rᵀ), the compact option.
"""

from __future__ import annotations

import torch

from ..models.personal import Adapter

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


def fuse_svd(anchors: Adapter, indexes: torch.Tensor, weights: torch.Tensor, rank: int) -> Adapter:
    """Fusion truncated to ``rank`` by SVD of the exact ΔW (best rank-r approximation in Frobenius norm)."""
    exact = fuse_cat(anchors, indexes, weights)
    out: Adapter = {"prompt": exact["prompt"]}
    for key in exact:
        if not key.endswith(".A"):
            continue
        target = key[:-2]
        delta = exact[target + ".B"] @ exact[target + ".A"]  # (U, d_out, d_in)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        out[target + ".B"] = u[..., :rank] * s[..., None, :rank]
        out[target + ".A"] = vh[..., :rank, :]
    return out


def fuse(anchors: Adapter, indexes: torch.Tensor, weights: torch.Tensor, method: str = "cat", rank: int = 2) -> Adapter:
    if method == "cat":
        return fuse_cat(anchors, indexes, weights)
    if method == "svd":
        return fuse_svd(anchors, indexes, weights, rank)
    raise ValueError(f"unknown fusion {method!r}; choose cat or svd")

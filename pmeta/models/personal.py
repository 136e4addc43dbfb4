"""Personal parameters: a soft prompt plus low-rank LoRA factors, held as a plain dict of tensors.

Layout of one adapter (no user dimension; a batch of users adds a leading dimension U to each):

* ``prompt``: (l, d) soft prompt prepended to the hidden states at the prompt layer;
* ``{target}.A``: (r, d_in) and ``{target}.B``: (d_out, r) for every LoRA target, so that the
  target projection becomes ``x ↦ W₀x + b + B A x``.

Adapters *stack* exactly: prompts add, LoRA factors concatenate along the rank, and
``B_cat A_cat = Σ_j B_j A_j`` (see :func:`stack`).
"""

from __future__ import annotations

import torch

Adapter = dict[str, torch.Tensor]


def lora_keys(targets: list[str]) -> list[str]:
    return [f"{t}.{m}" for t in targets for m in ("A", "B")]


def init_adapter(
    targets: list[tuple[str, int, int]],
    rank: int,
    prompt_length: int,
    hidden: int,
    generator: torch.Generator,
    prompt_init: torch.Tensor | None = None,
    a_std: float = 0.02,
    b_std: float = 0.0,
) -> Adapter:
    """A fresh adapter: prompt from ``prompt_init`` (l, d) or small noise, A ~ N(0, a_std), B ~ N(0, b_std).

    With ``b_std = 0`` the LoRA starts as an exact no-op (the usual LoRA initialisation).
    """
    adapter: Adapter = {}
    if prompt_init is not None:
        adapter["prompt"] = prompt_init.clone().float()
    else:
        adapter["prompt"] = torch.randn(prompt_length, hidden, generator=generator) * 0.02
    for name, d_in, d_out in targets:
        adapter[f"{name}.A"] = torch.randn(rank, d_in, generator=generator) * a_std
        adapter[f"{name}.B"] = torch.randn(d_out, rank, generator=generator) * b_std
    return adapter


def stack(*adapters: Adapter) -> Adapter:
    """Stack adapters exactly: prompts are summed, LoRA factors concatenated along the rank.

    Works with or without a leading user dimension (all arguments must agree). The rank axis is
    the second-to-last axis of ``A`` and the last axis of ``B``. A target that only some adapters
    carry stacks the ones that do (the others contribute a rank-0, i.e. zero, update).
    """
    out: Adapter = {"prompt": sum(a["prompt"] for a in adapters)}
    keys = list(dict.fromkeys(k for a in adapters for k in a if k != "prompt"))
    for key in keys:
        if key.endswith(".A"):
            out[key] = torch.cat([a[key] for a in adapters if key in a], dim=-2)
        elif key.endswith(".B"):
            out[key] = torch.cat([a[key] for a in adapters if key in a], dim=-1)
    return out


Ranks = dict[str, tuple[int, list[int]]]
"""Per LoRA key of a batched adapter: (padded rank width, each user's real rank), see :func:`select_rows`."""


def select_rows(keep: torch.Tensor, a: Adapter, b: Adapter) -> tuple[Adapter, Ranks]:
    """Row-wise choice between two batched adapters: user ``u`` gets ``a``'s row where ``keep[u]``,
    else ``b``'s. Their LoRA ranks may differ; the narrower is padded with zero rank components
    (exact: ``B A`` is unchanged). Also returns each LoRA key's padded width and every user's real
    rank, so :func:`user_row` can drop a user's padding."""
    out: Adapter = {"prompt": torch.where(keep[:, None, None], a["prompt"], b["prompt"])}
    ranks: Ranks = {}
    chosen = keep.tolist()
    for key in a:
        if key == "prompt":
            continue
        x, y = a[key], b[key]
        axis = -2 if key.endswith(".A") else -1
        width = max(x.shape[axis], y.shape[axis])
        ranks[key] = (width, [x.shape[axis] if row else y.shape[axis] for row in chosen])
        x, y = _pad_rank(x, width, axis), _pad_rank(y, width, axis)
        out[key] = torch.where(keep.view(-1, *([1] * (x.dim() - 1))), x, y)
    return out, ranks


def _pad_rank(x: torch.Tensor, width: int, axis: int) -> torch.Tensor:
    missing = width - x.shape[axis]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[axis] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=axis)


def user_row(adapter: Adapter, row: int, leading: Ranks | None = None) -> Adapter:
    """User ``row``'s adapter (no user axis, a copy) from a batched one. ``leading``: the ranks of
    the part that leads each LoRA factor (:func:`select_rows` of the fused anchors, which
    :func:`stack` puts first); the user's zero padding there is dropped, so a user's factors are
    the same whoever else was in the batch."""
    out: Adapter = {}
    for key, value in adapter.items():
        width, real = (leading or {}).get(key, (0, None))
        if real is None or real[row] == width:
            out[key] = value[row].clone()
            continue
        axis = -2 if key.endswith(".A") else -1
        kept = torch.cat([torch.arange(real[row]), torch.arange(width, value.shape[axis])]).to(value.device)
        out[key] = value[row].index_select(axis, kept)
    return out


def expand_users(adapter: Adapter, users: int) -> Adapter:
    """Add a user dimension by broadcasting (no copy; gradients flow back to the shared tensor)."""
    return {k: v.unsqueeze(0).expand(users, *v.shape) for k, v in adapter.items()}


def delta_weight(adapter: Adapter, target: str) -> torch.Tensor:
    """Dense ΔW = B A of one target: (d_out, d_in), or (U, d_out, d_in) with a user dimension."""
    return adapter[f"{target}.B"] @ adapter[f"{target}.A"]


def targets_of(adapter: Adapter) -> list[str]:
    return [k[: -len(".A")] for k in adapter if k.endswith(".A")]


def num_bytes(adapter: Adapter) -> int:
    return sum(v.numel() * v.element_size() for v in adapter.values())

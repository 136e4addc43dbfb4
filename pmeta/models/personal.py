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

"""The inner loop: a few gradient steps on a user's personal parameters, from a meta-learned init.

    θ_{s+1} = θ_s − α ⊙ ∇_θ L_support(fixed ⊕ θ_s),   s = 0 … steps−1

``θ`` is the part of the adapter that adapts (the stacked adapter at serving time), ``fixed`` the
part that does not (the fused anchors), ``⊕`` exact stacking, and ``α`` one learned step size per
tensor (Meta-SGD style, stored as log step sizes). Serving and meta-training call this same
function; meta-training asks for ``create_graph=True`` to differentiate through the steps (MAML).
Users are independent: the loss is a sum over users, so one batched call adapts every user exactly
as a loop over users would.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..models.personal import Adapter, stack


def adapt(
    init: Adapter,
    loss_fn: Callable[[Adapter], torch.Tensor],
    steps: int,
    log_step_sizes: dict[str, torch.Tensor],
    fixed: Adapter | None = None,
    create_graph: bool = False,
) -> Adapter:
    """Run ``steps`` inner steps and return the adapted parameters (same keys and shapes as ``init``).

    ``loss_fn`` takes the full adapter (``fixed ⊕ θ``) and returns a scalar. With
    ``create_graph=False`` the returned tensors still depend on ``init`` through the update's
    identity path (first-order), but not through the gradients.
    """
    params = dict(init)
    for _ in range(steps):
        full = stack(fixed, params) if fixed is not None else params
        loss = loss_fn(full)
        keys = [k for k, v in params.items() if v.requires_grad]
        grads = torch.autograd.grad(loss, [params[k] for k in keys], create_graph=create_graph, allow_unused=True)
        for key, grad in zip(keys, grads):
            if grad is None:
                continue
            if not create_graph:
                grad = grad.detach()
            params[key] = params[key] - log_step_sizes[key].exp() * grad
    return params


def with_grad(adapter: Adapter) -> Adapter:
    """A detached copy whose tensors require grad: the starting point of inner steps at serving time."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in adapter.items()}


def outside_inference_mode(method):
    """``method`` run with torch's inference mode off: a serving layer that wraps its calls in
    ``torch.inference_mode()`` forbade the inner steps' autograd ("element 0 of tensors does not
    require grad"). Everything the call creates is then an ordinary tensor."""
    import functools

    @functools.wraps(method)
    def call(*args, **kwargs):
        with torch.inference_mode(False):
            return method(*args, **kwargs)

    return call

"""Bank build on ``torch.distributed``: data-parallel meta-training across processes and machines.

    torchrun --nproc_per_node 2 -m pmeta bank build --preset small --out bank

Each process (rank) meta-trains on its own shard of the train users with its own episode stream
(seeded by rank); after every outer step the meta-gradients are averaged across ranks with one
all-reduce (gloo on CPU, NCCL on CUDA), so every rank applies the same Adam step and the
tensors stay identical. A meta-batch of B users becomes B / world users per rank. Rank 0 alone
takes the bank's build lock and writes the version; the other ranks only contribute gradients.

Without torchrun's environment (``WORLD_SIZE`` unset or 1) every function here is a no-op, so
single-process builds run exactly as before.
"""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


def requested() -> bool:
    """True when launched by torchrun (or any launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _check_device(device: str) -> None:
    if requested() and str(device).startswith("cuda:"):
        from ..errors import InvalidConfig

        raise InvalidConfig(f"--device {device} under torchrun: use --device cuda (each process takes the GPU of its LOCAL_RANK)")


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group described by torchrun's environment variables (idempotent).

    Returns True when running distributed. CUDA ranks use NCCL on ``cuda:LOCAL_RANK``.
    """
    _check_device(device)
    if not requested() or not dist.is_available():
        return False
    if not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def device_of(config_device: str) -> str:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun. A numbered
    ``cuda:N`` there is refused (InvalidConfig): every rank would train on that one GPU while NCCL
    and ``init_from_env`` bind rank r to GPU LOCAL_RANK."""
    _check_device(config_device)
    if active() and str(config_device) == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return str(config_device)


def rank_seed(seed: int) -> int:
    """A different episode stream per rank (rank 0 keeps the single-process seed)."""
    return seed + 1_000_003 * rank()


def shard(users: np.ndarray) -> np.ndarray:
    """This rank's share of the train users (every rank a disjoint, nearly equal part)."""
    if not active():
        return users
    part = users[rank() :: world_size()]
    return part if len(part) else users[:1]


def local_batch(users: int) -> int:
    """Users per outer step on this rank so that the world's meta-batch is ~``users``."""
    return max(1, int(round(users / world_size())))


def broadcast_(tensors: list[torch.Tensor]) -> None:
    """Copy rank 0's values into every rank's tensors (in place)."""
    if not active() or not tensors:
        return
    with torch.no_grad():
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.broadcast(flat, src=0)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def average_gradients(params: list[torch.Tensor], loss: torch.Tensor) -> float:
    """Average ``params``' gradients and the loss across ranks (one all-reduce); returns the mean loss.

    A parameter without a gradient on one rank contributes zeros, so every rank reduces the same
    buffer layout; one without a gradient on every rank keeps ``grad = None`` (as it would alone).
    """
    if not active():
        return float(loss.detach())
    with torch.no_grad():
        device = params[0].device if params else loss.device
        parts = [p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=device) for p in params]
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
        flat = torch.cat([*parts, present, loss.detach().reshape(1).float().to(device)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for i, p in enumerate(params):
            if flat[-1 - len(params) + i] > 0:
                p.grad = (flat[offset : offset + p.numel()] / world_size()).view_as(p).to(p.dtype).clone()
            offset += p.numel()
        return float(flat[-1]) / world_size()


def share_from_main(value: str | None) -> str | None:
    """Rank 0's string ``value`` (a version id) on every rank, sent as bytes (nothing is pickled)."""
    if not active():
        return value
    buffer = torch.zeros(1024, dtype=torch.uint8)
    if is_main() and value is not None:
        data = value.encode()[:1023]
        buffer[0] = 1
        buffer[1 : 1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    if dist.get_backend() == "nccl":
        buffer = buffer.cuda()
    dist.broadcast(buffer, src=0)
    buffer = buffer.cpu()
    if not int(buffer[0]):
        return None
    return bytes(buffer[1:].tolist()).rstrip(b"\0").decode()


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if active():
        dist.destroy_process_group()

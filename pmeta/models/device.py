"""Which torch device a name stands for, checked before anything is loaded onto it."""

from __future__ import annotations

import torch

from ..errors import InvalidConfig


def resolve_device(name: str | torch.device) -> torch.device:
    """``torch.device(name)`` if this machine has it, else :class:`~pmeta.errors.InvalidConfig` with
    one line saying why (an unknown name, a CUDA device on a CPU-only torch or on a machine without
    that GPU, MPS where it is absent)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidConfig(f"unknown torch device {str(name)!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidConfig(f"device {str(name)!r} is not available: this torch has no CUDA or sees no GPU (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidConfig(f"device {str(name)!r} is not available: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidConfig(f"device {str(name)!r} is not available on this machine (use --device cpu)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise InvalidConfig(f"device {str(name)!r} is not supported; use cpu, cuda or cuda:N")
    return device


def cpu_only(name: str | torch.device, what: str) -> torch.device:
    """The CPU, checked as :func:`resolve_device` does, or :class:`~pmeta.errors.InvalidConfig` for
    any other device (on every machine, whether it has that device or not), for the parts of pmeta
    whose GPU path is not supported: ``what`` says which."""
    try:
        kind = torch.device(name).type
    except (RuntimeError, TypeError, ValueError):
        kind = None  # resolve_device words it
    if kind not in (None, "cpu"):
        raise InvalidConfig(f"{what} run on the CPU only in this version (device {str(name)!r}; use cpu): their GPU path mixes devices and was never run on a GPU")
    return resolve_device(name)

"""A fingerprint of a frozen model's weights, recorded by a build and checked when a bank opens.

A bank's anchors and adapters fit exactly the base weights they were trained on. The model itself
is not part of the bank (it comes from a package, a local folder or a Hugging Face cache), so a
folder replaced by another checkpoint of the same shape would load and serve quietly wrong
predictions. The fingerprint is a sha256 over every tensor's name, shape and 4,096 of its values
(as float32): any other checkpoint, a fine-tuned one included, changes it. It is not a hash of every
byte; it costs about 0.03 s for MiniLM and 0.15 s for SmolLM2-135M once per loaded model (on a
busy 2-core machine, after torch's first operation has run).

Two schemes, named by the fingerprint's prefix:

* ``runs-sha256:`` (what builds record): 16 runs of 256 consecutive values, evenly spaced. A run
  lies in one or two memory pages, so the check reads about 32 pages of each tensor. The weights
  are memory-mapped, and pages a server never uses (the lower encoder layers, whose outputs the bank
  caches) stay on disk: `pmeta adapt` peaked at 439 MB instead of 480 MB (small-preset bank).
* ``sampled-sha256:`` (banks built before): 4,096 evenly spaced values, which touch nearly every
  page of the model. Still checked, with that scheme, for the banks that carry it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch

SAMPLES = 4096
RUNS = 16
PREFIX = "runs-sha256:"
SPACED_PREFIX = "sampled-sha256:"
SCHEMES = (PREFIX, SPACED_PREFIX)


def _positions(count: int, scheme: str, device: torch.device) -> torch.Tensor:
    """The flat (logical) positions a scheme reads from a tensor of ``count`` values."""
    if scheme == SPACED_PREFIX:
        return torch.arange(0, count, max(1, count // SAMPLES), device=device)[:SAMPLES]
    if count <= SAMPLES:
        return torch.arange(count, device=device)
    run = SAMPLES // RUNS
    starts = torch.linspace(0, count - run, RUNS, dtype=torch.float64).round().long()
    return (starts[:, None] + torch.arange(run)[None, :]).reshape(-1).unique().to(device)


def weights_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]], scheme: str = PREFIX) -> str:
    """``<scheme><hex>`` of the tensors (order-independent: sorted by name); ``scheme`` is one of SCHEMES."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown fingerprint scheme {scheme!r}")
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda pair: pair[0]):
        tensor = tensor.detach()
        count = tensor.numel()
        positions = _positions(count, scheme, tensor.device)
        # gather by logical position: no copy of a whole non-contiguous (e.g. transposed) tensor
        picked = tensor[torch.unravel_index(positions, tensor.shape)] if tensor.dim() else tensor.reshape(1)
        sample = picked.to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
        digest.update(sample.numpy().tobytes())
    return scheme + digest.hexdigest()


def check_fingerprint(recorded: object, fingerprint: Callable[[str], str], model: str, bank: object, version: str) -> None:
    """Raise BankIntegrityError when a bank's recorded fingerprint differs from the loaded model's.

    ``fingerprint(scheme)`` fingerprints the loaded model with the scheme the bank recorded. Banks
    built before fingerprints were recorded (``recorded`` None) are not checked.
    """
    from ..errors import BankIntegrityError

    if recorded is None:
        return
    scheme = next((prefix for prefix in SCHEMES if isinstance(recorded, str) and recorded.startswith(prefix)), None)
    if scheme is None:
        raise BankIntegrityError(f"bank {bank} version {version} records a model fingerprint this pmeta cannot check ({str(recorded)[:40]!r})")
    if recorded != fingerprint(scheme):
        raise BankIntegrityError(
            f"bank {bank} version {version} was trained on other weights than the model now at {model} "
            "(weights fingerprint differs); open it with the model it was built with, or rebuild it"
        )

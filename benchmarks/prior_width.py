"""What the zero-history prior costs in a batch, as the bank grows.

    python benchmarks/prior_width.py [--anchors 16,200,1000] [--rank 2] [--width 384] [--targets 4] [--users 8] [--threads 1]

A user with nothing to retrieve with gets every anchor fused (weighted by its train users). By
concatenation that is rank anchors × rank, and a batch that mixes such a user with others pads every
user to it. :func:`pmeta.fusion.fuse.fuse_prior` keeps ΔW at rank ≤ min(d_in, d_out) instead. For
random anchors on ``--targets`` square ``--width`` layers this times :func:`fuse_users` for a batch of
``--users`` with and without one keyless user, with the prior built per call or kept by a
:class:`~pmeta.fusion.fuse.PriorCache` (as an opened bank keeps it), beside the plain concatenation
of every anchor (the old prior), and prints the fused width, the fused tensors' size and the time,
with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from pmeta.fusion.fuse import PriorCache, fuse_cat, fuse_users, prior_weights


def random_bank(anchors: int, rank: int, width: int, targets: int, prompt: int = 20) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {"prompt": torch.randn(anchors, prompt, width, generator=g)}
    for t in range(targets):
        out[f"t{t}.A"] = torch.randn(anchors, rank, width, generator=g)
        out[f"t{t}.B"] = torch.randn(anchors, width, rank, generator=g)
    return out


def timed(call, repeats: int = 3):
    best, result = float("inf"), None
    for _ in range(repeats):
        clock = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - clock)
    return result, best * 1e3


def megabytes(adapter: dict[str, torch.Tensor]) -> float:
    return sum(v.numel() * v.element_size() for v in adapter.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--anchors", default="16,200,1000")
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads}))
    for count in (int(n) for n in args.anchors.split(",")):
        bank = random_bank(count, args.rank, args.width, args.targets)
        sizes = torch.rand(count, generator=torch.Generator().manual_seed(1)) * 10
        idx = torch.randint(0, count, (args.users, 3), generator=torch.Generator().manual_seed(2))
        weights = torch.full((args.users, 3), 1 / 3)
        keyed = torch.ones(args.users, dtype=torch.bool)
        mixed = keyed.clone()
        mixed[0] = False
        every = torch.arange(count).expand(args.users, count)
        cache = PriorCache()
        cache.get(bank, sizes)  # an opened bank has built it once
        rows = {
            "every user with a key": lambda: fuse_users(bank, idx, weights, keyed, sizes)[0],
            "one keyless user": lambda: fuse_users(bank, idx, weights, mixed, sizes)[0],
            "one keyless user, prior cached": lambda: fuse_users(bank, idx, weights, mixed, sizes, prior=cache)[0],
            "every anchor by concatenation (the prior before)": lambda: fuse_cat(bank, every, prior_weights(sizes).expand(args.users, count)),
        }
        for name, call in rows.items():
            fused, ms = timed(call)
            print(json.dumps({"anchors": count, "case": name, "fused_rank": fused["t0.A"].shape[1], "fused_mb": round(megabytes(fused), 3), "ms": round(ms, 3)}))


if __name__ == "__main__":
    main()

"""`personalize_many` throughput by users per pass, on one device (what chose its default batch).

    python benchmarks/batch_sizes.py --device cuda --sizes 16,32,64,128,256 --users 512 --threads 8
    python benchmarks/batch_sizes.py --bank bank --device cpu --sizes 16,64 --users 128 --threads 2

Without --bank it builds a short tiny-preset bank (fewer meta-training steps: the same per-user
work as a full one, since serving cost depends on the shapes, not on how long they were trained)
into a temporary folder on --device. Users: K liked items each (``pmeta.bench.sample_histories``).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", help="a ranking bank (default: a short tiny-preset build)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="16,32,64,128,256", help="users per pass, comma-separated")
    parser.add_argument("--users", type=int, default=512)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import pmeta
    from pmeta.bench import sample_histories

    with tempfile.TemporaryDirectory() as tmp:
        path = args.bank
        if path is None:
            from pmeta.data import load_sample

            path = Path(tmp) / "bank"
            started = time.perf_counter()
            short = {"device": args.device, "tower_steps": 10, "global_steps": 2, "anchor_steps": 2, "stack_steps": 2}
            pmeta.build_bank(load_sample(), path, pmeta.load_config("tiny", overrides=short))
            print(f"short tiny-preset build on {args.device}: {time.perf_counter() - started:.1f} s")
        bank = pmeta.Bank.open(path, device=args.device)
        histories = sample_histories(bank, args.k, args.users)
        for method in ("batched", "vmap"):  # warm-up
            bank.personalize_many(histories[:32], batch_size=16, method=method)
        device = bank.model.t.item_text.device
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
        print(f"{platform.processor() or platform.machine()}, GPU {gpu}, torch {torch.__version__}, {args.threads} threads; {args.users} users, K={args.k}")
        for size in (int(s) for s in args.sizes.split(",")):
            rates = {}
            for method in ("batched", "vmap"):
                started = time.perf_counter()
                bank.personalize_many(histories, batch_size=size, method=method)
                rates[method] = args.users / (time.perf_counter() - started)
            print(f"  {size:>4} per pass: batched {rates['batched']:8.1f} users/s, vmap {rates['vmap']:8.1f}")
        if gpu != "none":
            print(f"  GPU memory at most {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (the process's peak: the build's too, and every size's)")


if __name__ == "__main__":
    main()

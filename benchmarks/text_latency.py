"""Personalization latency of a text bank: K most recent profile items, the bank's inner steps.

    python benchmarks/text_latency.py --bank text-bank --data lamp-rating --task LaMP-3 --users 20 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", required=True)
    parser.add_argument("--data", required=True, help="LaMP-format directory with test_questions.json")
    parser.add_argument("--task", default="LaMP-3")
    parser.add_argument("--k", type=int, default=5, help="profile items kept (most recent)")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pmeta.data.lamp import load_split, truncate_profile
    from pmeta.text import TextBank

    bank = TextBank.open(args.bank)
    examples = load_split(args.data, args.task, "test")[: args.users]
    bank.personalize({"profile": truncate_profile(examples[0].profile, args.k)})  # warm-up
    ms = []
    for example in examples:
        start = time.perf_counter()
        bank.personalize({"profile": truncate_profile(example.profile, args.k)})
        ms.append((time.perf_counter() - start) * 1e3)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads; "
          f"{len(ms)} users, K={args.k}: p50 {np.percentile(ms, 50):.0f} ms, p95 {np.percentile(ms, 95):.0f} ms")


if __name__ == "__main__":
    main()

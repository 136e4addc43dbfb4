"""What a rating text bank's parts contribute, on dev users (never trained on): label scores of
pmeta+retrieval (label prior + personal adapter), of the label prior alone, and of the raw LM,
each decoded by argmax, expected value and median, against the constant majority label "5".

    python benchmarks/text_rating_decoders.py --bank text-bank-rating --data lamp-rating --users 143 --threads 1
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", required=True)
    parser.add_argument("--data", required=True, help="LaMP-format directory with dev_questions.json / dev_outputs.json")
    parser.add_argument("--k", type=int, default=5, help="profile items kept (most recent)")
    parser.add_argument("--users", type=int, default=143)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pmeta.data.lamp import load_split, truncate_profile
    from pmeta.text import TextBank

    bank = TextBank.open(args.bank)
    model = bank.model
    dev = [e for e in load_split(args.data, bank.task, "dev") if e.output][: args.users]
    values = torch.tensor([float(label) for label in model.labels])
    gold = np.array([float(e.output) for e in dev])
    rows: dict[str, list[torch.Tensor]] = {"pmeta+retrieval": [], "pmeta (no retrieval)": [], "label prior only + retrieval": [], "raw LM + retrieval": []}
    for start in range(0, len(dev), 8):
        part = dev[start : start + 8]
        profiles = [truncate_profile(e.profile, args.k) for e in part]
        personal, _ = model.personalize(profiles)
        retrieved = [model.query_prompt(e.input, p, model.config.retrieve) for e, p in zip(part, profiles)]
        plain = [model.query_prompt(e.input) for e in part]
        with torch.no_grad():
            rows["pmeta+retrieval"].append(model.option_scores(retrieved, personal))
            rows["pmeta (no retrieval)"].append(model.option_scores(plain, personal))
            rows["label prior only + retrieval"].append(model.option_scores(retrieved, None))
            rows["raw LM + retrieval"].append(model.option_scores(retrieved, None, prior=False))
    print(f"{len(dev)} dev users, K = {args.k}, {model.config.retrieve} retrieved items; MAE / RMSE")
    print("| scores | argmax | expected value | median |\n|---|---|---|---|")
    for name, parts in rows.items():
        p = torch.softmax(torch.cat(parts).float(), -1)
        decoded = {"argmax": values[p.argmax(-1)], "expected": p @ values, "median": values[(p.cumsum(-1) >= 0.5).float().argmax(-1)]}
        cells = [f"{np.abs(v.numpy() - gold).mean():.3f} / {np.sqrt(((v.numpy() - gold) ** 2).mean()):.3f}" for v in decoded.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"| always \"5\" | {np.abs(5 - gold).mean():.3f} / {np.sqrt(((5 - gold) ** 2).mean()):.3f} | | |")


if __name__ == "__main__":
    main()

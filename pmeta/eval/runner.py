"""``pmeta eval movielens``: the coldstart-v1 protocol for pmeta and the baselines, in one run.

pmeta is wrapped as a protocol scorer: the support items become a history.json-equivalent
(liked catalogue items in time order), the bank personalizes the user, and the scores over the
catalogue are handed to the protocol, which builds identical candidates for every method.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np

from ..bank.bank import Bank
from ..data.history import HistoryItem, UserHistory
from ..data.types import Dataset
from ..errors import InvalidConfig
from .baselines import BASELINES
from .protocol import PROTOCOL_NAME, evaluate, split_users


class PmetaScorer:
    """Scores the catalogue for a support set through ``Bank.personalize`` (the serving path)."""

    bytes_per_user = 0  # a Personalization lives in memory only; the bank is never written

    def __init__(self, bank: Bank, dataset: Dataset, name: str = "pmeta", steps: int | None = None) -> None:
        if bank.catalog.item_ids != dataset.catalog.item_ids:
            raise InvalidConfig("the bank's catalogue differs from the dataset's; build the bank on this dataset")
        self.bank, self.dataset, self.name, self.steps = bank, dataset, name, steps

    def score(self, support_items: np.ndarray, k: int) -> np.ndarray:
        ids = self.dataset.catalog.item_ids
        history = UserHistory(user_id="eval", items=[HistoryItem(item_id=ids[int(i)], rating=5.0, timestamp=n) for n, i in enumerate(support_items)])
        scores = self.bank.personalize(history, steps=self.steps).scores.astype(np.float64)
        # Support items are -inf in serving (never recommended); the protocol never ranks them.
        return np.where(np.isfinite(scores), scores, -1e30)


def run_movielens(
    dataset: Dataset,
    bank: Bank,
    methods: list[str],
    ks: tuple[int, ...],
    modes: tuple[str, ...],
    seed: int = 0,
    max_users: int | None = None,
    progress=None,
) -> dict:
    """Evaluate every method on the bank's held-out users; returns the report dict."""
    train_users, test_users = split_users(dataset, seed=seed, test_fraction=bank.config.test_fraction)
    held_out = set(bank.record.get("held_out_users", []))
    ids = dataset.ratings.user_ids
    if held_out and {ids[int(u)] for u in test_users} != held_out:
        raise InvalidConfig("the bank's held-out users differ from this dataset/seed's test users; evaluate with the bank's seed and dataset")
    if max_users is not None:
        test_users = np.asarray(test_users)[:max_users]
    results = []
    for method in methods:
        if method == "pmeta":
            scorer = PmetaScorer(bank, dataset, f"pmeta-{bank.config.meta}")
        elif method == "pmeta-no-steps":
            scorer = PmetaScorer(bank, dataset, "pmeta-fused-anchors-no-steps", steps=0)
        elif method in BASELINES:
            scorer = BASELINES[method]().fit(dataset, train_users)
        else:
            raise InvalidConfig(f"unknown method {method!r}; choose from pmeta, pmeta-no-steps, {', '.join(sorted(BASELINES))}")
        rows = evaluate(scorer, dataset, test_users, ks=ks, modes=modes, seed=seed, progress=progress)
        for row in rows:
            row["bytes_per_user"] = scorer.bytes_per_user
        results.extend(rows)
    return {
        "protocol": PROTOCOL_NAME,
        "dataset": {"name": dataset.name, "format": dataset.format, "fingerprint": dataset.fingerprint},
        "seed": seed,
        "bank_version": bank.version,
        "config": bank.config.model_dump(),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "results": results,
    }


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [f"# {report['protocol']} on {report['dataset']['name']} (seed {report['seed']})", ""]
    lines.append("| method | K | mode | HR@10 | nDCG@10 | MRR | users | adapt ms p50 | p95 | bytes/user |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(report["results"], key=lambda r: (r["mode"], r["k"], r["method"])):
        lines.append(
            f"| {r['method']} | {r['k']} | {r['mode']} | {r['hr@10']:.3f} | {r['ndcg@10']:.3f} | {r['mrr']:.3f} | {r['users']} | {r['adapt_ms_p50']:.1f} | {r['adapt_ms_p95']:.1f} | {r['bytes_per_user']} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")



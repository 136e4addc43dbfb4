"""Merge coldstart-v1 reports of the same dataset and seed (e.g. methods run in separate processes)
into one report.json + report.md + plots.

    python benchmarks/merge_reports.py --out eval-report part-a/report.json part-b/report.json

Results are in the order of the full report's methods (then input order); the config is the first report's, with the union of the
methods and each part's environment kept under ``config.parts``. The parts must share the protocol, seed, dataset, K, modes, number
of users, test fraction and bank versions, and hold different methods. Paired comparisons (``comparisons``) are not carried over: they pair each user's metrics across methods,
which a report does not store, so run the methods to compare in one process (or use benchmarks/seeds.py, which keeps them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pmeta.eval.runner import DEFAULT_METHODS, write_report


def merge(reports: list[dict]) -> dict:
    first = reports[0]
    for other in reports[1:]:
        for key in ("protocol", "seed"):
            if other[key] != first[key]:
                raise SystemExit(f"cannot merge: {key} differs ({other[key]!r} vs {first[key]!r})")
        if other["dataset"]["fingerprint"] != first["dataset"]["fingerprint"]:
            raise SystemExit("cannot merge: the reports are on different datasets")
        for key in ("ks", "modes", "max_users", "test_fraction"):
            if other["config"].get(key) != first["config"].get(key):
                raise SystemExit(f"cannot merge: config.{key} differs ({other['config'].get(key)!r} vs {first['config'].get(key)!r})")
        for key in ("bank", "reptile_bank"):  # a part without bank-based methods may have no bank
            versions = [(r["config"].get(key) or {}).get("version") for r in (first, other)]
            if None not in versions and versions[0] != versions[1]:
                raise SystemExit(f"cannot merge: the parts were scored with different {key.replace('_', ' ')} versions ({versions[1]} vs {versions[0]})")
    methods = [m for r in reports for m in r["config"]["methods"]]
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise SystemExit(f"cannot merge: method {repeated[0]} is in more than one part")
    config = dict(first["config"])
    config["methods"] = methods
    config["parts"] = [{"methods": r["config"]["methods"], "environment": r["config"].get("environment")} for r in reports]
    for r in reports[1:]:
        config["reptile_bank"] = config.get("reptile_bank") or r["config"].get("reptile_bank")
        config["method_options"] = {**r["config"].get("method_options", {}), **config.get("method_options", {})}
        config["tuned"] = {**r["config"].get("tuned", {}), **config.get("tuned", {})}
    order = {m: i for i, m in enumerate(DEFAULT_METHODS)}
    results = sorted((row for r in reports for row in r["results"]), key=lambda row: order.get(row["method"], len(order)))  # stable
    config["methods"] = sorted(config["methods"], key=lambda m: order.get(m, len(order)))
    return {"protocol": first["protocol"], "dataset": first["dataset"], "seed": first["seed"], "config": config, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    merged = merge([json.loads(p.read_text()) for p in args.reports])
    for path in write_report(merged, args.out):
        print(path)


if __name__ == "__main__":
    main()

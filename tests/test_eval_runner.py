"""A reduced coldstart-v1 evaluation through the CLI: report schema, metric ranges, determinism."""

from __future__ import annotations

import json
import subprocess
import sys


def run_eval(bank, out):
    cmd = [sys.executable, "-m", "pmeta", "eval", "movielens", "--bank", str(bank), "--k", "1,5", "--mode", "pop99,full", "--methods", "popularity,pmeta-no-steps,pmeta", "--users", "8", "--out", str(out), "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "report.json").read_text())


def test_reduced_eval_report(tiny_bank, tmp_path):
    report = run_eval(tiny_bank, tmp_path / "a")
    assert report["protocol"] == "coldstart-v1" and report["seed"] == 0
    assert report["dataset"]["name"] == "ml-latest-small"
    rows = report["results"]
    assert {(r["method"], r["k"], r["mode"]) for r in rows} == {(m, k, mode) for m in ("popularity", "pmeta-fused-anchors-no-steps", "pmeta-maml") for k in (1, 5) for mode in ("pop99", "full")}
    for r in rows:
        assert set(r) >= {"method", "k", "mode", "hr@10", "ndcg@10", "mrr", "users", "adapt_ms_p50", "adapt_ms_p95", "bytes_per_user"}
        assert 0 <= r["ndcg@10"] <= r["hr@10"] <= 1 and 0 < r["mrr"] <= 1
        assert r["users"] == 8 and r["bytes_per_user"] == 0
    assert (tmp_path / "a" / "report.md").read_text().startswith("# coldstart-v1")
    again = run_eval(tiny_bank, tmp_path / "b")
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("adapt_ms")} for r in rs]  # noqa: E731
    assert strip(again["results"]) == strip(rows)  # same seed and bank -> identical metrics

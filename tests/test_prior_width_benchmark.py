"""benchmarks/prior_width.py, behind the README's numbers on the zero-history prior's cost: it prints
the machine, then per bank size the fused rank, size and time of the four cases, and the prior's
rank stops at the layer width where every anchor by concatenation does not; the cached prior gives
the same fused width and size."""

from __future__ import annotations

import json
import sys


def test_rows_per_bank_size_and_the_prior_rank_is_bounded(benchmark_script, monkeypatch, capsys):
    script = benchmark_script("prior_width")
    monkeypatch.setattr(sys, "argv", ["prior_width.py", "--anchors", "3,40", "--rank", "2", "--width", "16", "--targets", "2", "--users", "3"])
    script.main()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["cpus"] >= 1 and lines[0]["threads"] == 1
    rows = {(row["anchors"], row["case"]): row for row in lines[1:]}
    assert len(rows) == 8 and all(row["ms"] > 0 for row in rows.values())
    concat = "every anchor by concatenation (the prior before)"
    assert [rows[(n, "every user with a key")]["fused_rank"] for n in (3, 40)] == [6, 6]  # top 3 of rank 2
    assert [rows[(n, "one keyless user")]["fused_rank"] for n in (3, 40)] == [6, 16]  # 3 × 2, then the width
    for n in (3, 40):
        cached, built = rows[(n, "one keyless user, prior cached")], rows[(n, "one keyless user")]
        assert (cached["fused_rank"], cached["fused_mb"]) == (built["fused_rank"], built["fused_mb"])
    assert [rows[(n, concat)]["fused_rank"] for n in (3, 40)] == [6, 80]
    assert rows[(40, concat)]["fused_mb"] > rows[(40, "one keyless user")]["fused_mb"] > rows[(40, "every user with a key")]["fused_mb"] > 0

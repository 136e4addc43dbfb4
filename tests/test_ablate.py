"""benchmarks/ablate.py, behind the README's ablation tables: it writes the table and its JSON for
the serving variants of a bank, and refuses a build-time ablation its preset cannot make."""

from __future__ import annotations

import json
import sys

import pytest


@pytest.fixture(scope="module")
def ablate(benchmark_script):
    return benchmark_script("ablate")


def test_main_writes_the_serving_variants_as_a_table_and_json(ablate, tiny_bank, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ablation.md"
    monkeypatch.setattr(sys, "argv", ["ablate.py", "--bank", str(tiny_bank), "--users", "6", "--k", "1,3", "--mode", "full", "--steps", "0,1", "--top-k", "1,2", "--skip", "stacking,meta", "--out", str(out)])
    ablate.main()
    table = out.read_text()
    assert "| ablation | variant | full K=1 | full K=3 | adapt ms p50 |" in table
    rows = json.loads(out.with_suffix(".json").read_text())
    groups = [row["group"] for row in rows]
    assert groups.count("inner steps") == 2 and groups.count("top-k fused anchors") == 2 and "fusion" in groups
    for row in rows:
        for cell in ("full K=1", "full K=3"):
            hr, ndcg = (float(x) for x in row[cell].split(" / "))
            assert 0.0 <= ndcg <= hr <= 1.0
    assert table.strip() in capsys.readouterr().out


def test_bandwidths_need_a_preset_that_chooses_beta(ablate, tiny_bank, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ablate.py", "--bank", str(tiny_bank), "--time-prior-bandwidths", "60", "--out", str(tmp_path / "a.md")])
    with pytest.raises(SystemExit) as exc:
        ablate.main()
    assert exc.value.code == 2 and "needs a preset that chooses β" in capsys.readouterr().err
    assert not (tmp_path / "a.md").exists()

"""benchmarks/prior_by_size.py: one time-prior weight against one per history size, each chosen on
one half of a build's validation users and scored on the other."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from pmeta.data import load_sample
from pmeta.eval.synthetic import write_ml100k_like
from test_time_prior_grid import eras


@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("prior_by_size")


def test_each_user_is_scored_by_choices_made_on_the_other_half(script):
    from pmeta import load_config
    result = script.two_fold(eras(), load_config("tiny", overrides={"cf_init": "onboarding"}))
    assert set(result["choices"]) == {"one", "per-size"} and all(len(c) == 2 for c in result["choices"].values())
    for choice in result["choices"]["per-size"]:
        weight = choice["weight"]
        assert isinstance(weight, list) and len(weight) == 5 and all(a >= b for a, b in zip(weight, weight[1:]))
    assert all(not isinstance(c["weight"], list) for c in result["choices"]["one"])
    cells = result["cells"]["one"]
    assert set(cells) == {f"K={k} {mode}" for k in range(1, 6) for mode in ("uni99", "pop99", "full")} or set(cells) == {f"K={k} full" for k in range(1, 6)}
    for way in ("one", "per-size"):
        assert result["criterion"][way] == pytest.approx(np.mean([v["ndcg@10"] for v in result["cells"][way].values()]))
        assert all(0.0 <= v["ndcg@10"] <= v["hr@10"] <= 1.0 for v in result["cells"][way].values())


def test_scored_applies_each_sizes_weight(script):
    """A β of 0 at every size scores the base model alone; a per-size β scores K = 1 with β_1."""
    from pmeta.eval.protocol import draw_candidates
    from pmeta.tasks import time_prior

    dataset = eras()
    users = np.arange(90)
    cases = time_prior.validation_cases(dataset, users[60:])
    events = time_prior.rating_events(dataset, users[:60])
    candidates = draw_candidates([c for c, _ in cases], ("full",), np.ones(120), 0)
    flat = np.zeros(120)
    off = script.scored(lambda s: flat + 1e-3 * np.arange(120), cases, events, 120, 60.0, 0.0, candidates, ("full",))
    sized = script.scored(lambda s: flat + 1e-3 * np.arange(120), cases, events, 120, 60.0, (5.0, 0.0, 0.0, 0.0, 0.0), candidates, ("full",))
    assert sized["K=2 full"] == off["K=2 full"] and sized["K=5 full"] == off["K=5 full"]
    assert np.mean(sized["K=1 full"]["ndcg@10"]) > np.mean(off["K=1 full"]["ndcg@10"]) + 0.1  # the eras prior knows the user's third


def test_main_prints_the_choices_and_the_tables(script, tmp_path, capsys, monkeypatch):
    data = tmp_path / "ml-100k"
    data.mkdir()
    write_ml100k_like(load_sample(), data, users=80)
    out = tmp_path / "result.json"
    monkeypatch.setattr(sys, "argv", ["prior_by_size.py", "--data", str(data), "--preset", "tiny", "--seeds", "0,1", "--out", str(out)])
    script.main()
    printed = capsys.readouterr().out
    assert printed.count("  per-size: h = ") == 2 and "mean over seeds 0, 1:" in printed and printed.count("| 5 | full |") == 3
    assert set(json.loads(out.read_text())) == {"0", "1"}


@pytest.mark.parametrize("argv", [["--seeds", "a"], ["--seeds", ","], ["--preset", "tyni"], ["--threads", "0"]])
def test_bad_arguments_end_in_one_line(script, argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prior_by_size.py", *argv])
    with pytest.raises(SystemExit) as exc:
        script.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("prior_by_size.py: error: ")

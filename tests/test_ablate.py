"""benchmarks/ablate.py, behind the README's ablation tables: it writes the table and its JSON for
the serving variants of a bank, and refuses a build-time ablation its preset cannot make."""

from __future__ import annotations

import json
import sys

import numpy as np
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


def _argv(bank, out, *extra):
    return ["ablate.py", "--bank", str(bank), "--users", "6", "--k", "1", "--mode", "full", "--steps", "0", "--top-k", "1", "--skip", "fusion,stacking,meta", *extra, "--out", str(out)]


def test_data_names_the_release_and_the_same_data_gives_the_same_cells(ablate, tiny_bank, tmp_path, monkeypatch):
    """``--data`` reads the release the bank was built on: the shipped sample's folder, named
    explicitly, gives the default run's cells (and the table names the data set and seed)."""
    from pmeta.data import SAMPLE_DIR

    tables = []
    for name, extra in (("default", ()), ("explicit", ("--data", str(SAMPLE_DIR), "--format", "ml-latest", "--seed", "0"))):
        out = tmp_path / f"{name}.md"
        monkeypatch.setattr(sys, "argv", _argv(tiny_bank, out, *extra))
        ablate.main()
        tables.append(json.loads(out.with_suffix(".json").read_text()))
        assert "seed 0, first 6 test users" in out.read_text()
    strip = lambda rows: [{k: v for k, v in row.items() if k not in ("_rows", "adapt ms p50")} for row in rows]  # noqa: E731
    assert strip(tables[0]) == strip(tables[1])


def test_a_bank_is_ablated_only_on_the_users_it_held_out(ablate, tiny_bank, tmp_path, monkeypatch, capsys):
    """The seed picks the test users: a bank built with seed 0 trained on some of seed 1's, so
    ``--seed 1`` is refused in one line and writes nothing."""
    out = tmp_path / "a.md"
    monkeypatch.setattr(sys, "argv", _argv(tiny_bank, out, "--seed", "1"))
    with pytest.raises(SystemExit) as exc:
        ablate.main()
    assert exc.value.code == 2 and "held-out users differ" in capsys.readouterr().err
    assert not out.exists()


def test_a_bank_of_another_catalogue_is_refused(ablate, tiny_bank, tmp_path, monkeypatch, capsys):
    from pmeta.data import load_sample
    from pmeta.eval.synthetic import write_ml100k_like

    target = tmp_path / "ml100k-like"
    write_ml100k_like(load_sample(), target, users=60, rename_every=7)
    out = tmp_path / "a.md"
    monkeypatch.setattr(sys, "argv", _argv(tiny_bank, out, "--data", str(target)))
    with pytest.raises(SystemExit) as exc:
        ablate.main()
    assert exc.value.code == 2 and "another catalogue" in capsys.readouterr().err
    assert not out.exists()


def test_no_stacking_serves_the_same_prior_as_the_default_scaled_by_history_size(ablate, with_size_scale, monkeypatch):
    """The "no stacking" row changes where the inner steps go and nothing else: for 1-, 2- and 5-item
    supports it adds the same time prior and anchors' item bias (scaled by history size, stop 60) as
    ``personalize``. Before stop 62 it added the whole bias at every size, so its K = 1 cells mixed two changes."""
    import torch

    model = with_size_scale
    priors = []
    final_scores = model.final_scores
    monkeypatch.setattr(model, "final_scores", lambda batch, personal: priors.append(batch.prior.clone()) or final_scores(batch, personal))
    for support in ([10], [10, 20], [10, 20, 30, 40, 50]):
        priors.clear()
        for stacking in (True, False):
            ablate.Scorer("s", model, steps=0, stacking=stacking).score(np.array(support), len(support))
        torch.testing.assert_close(priors[0], priors[1])
    assert not torch.allclose(model.anchor_offset(*_retrieved(model, [10]), [1]), model.anchor_offset(*_retrieved(model, [10]), [5]))


def _retrieved(model, support):
    from pmeta.eval.neural import support_input

    keys = model.user_keys([support_input(model, support, None)])
    return (keys, *model.retrieve(keys))

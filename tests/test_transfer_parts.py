"""benchmarks/transfer_parts.py, behind the README's measured parts of a transferred bank: the shrunk
prior is the bank's at m = 0 and the all-time share at m = inf, each variant changes its one part
only, the prior rows are refused unless the bank's prior is rebuilt exactly from the source data,
and the "as served" row is what the transfer path scores on the target's train users."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pmeta.bank.build import with_positives
from pmeta.bank.model import PmetaModel
from pmeta.data import load_sample
from pmeta.data.sample import SAMPLE_DIR
from pmeta.eval.synthetic import write_ml100k_like
from pmeta.tasks import time_prior


@pytest.fixture(scope="module")
def parts(benchmark_script):
    return benchmark_script("transfer_parts")


def test_shrunk_prior_is_the_table_at_zero_the_all_time_share_at_infinity_and_the_pseudo_count_mix_between(parts):
    rng = np.random.default_rng(0)
    n, h = 30, 100.0
    items = rng.integers(0, n, 400)
    times = np.concatenate([rng.uniform(0, 2e7, 350), rng.uniform(2e8, 2.1e8, 50)])  # a busy period, then a sparse one
    grid, table = time_prior.table(items, times, n, h)
    same_grid, same = parts.shrunk_prior(items, times, n, h, 0.0)
    assert np.array_equal(same_grid, grid) and np.array_equal(same, table)

    overall = np.bincount(items, minlength=n) / len(items)
    all_time = np.log((1 - time_prior.GLOBAL_MIX) * overall + time_prior.GLOBAL_MIX * overall + time_prior.EPSILON)
    _, flat = parts.shrunk_prior(items, times, n, h, math.inf)
    np.testing.assert_allclose(flat, np.broadcast_to(all_time, flat.shape), rtol=1e-6)

    m, row = 50.0, len(grid) // 2  # by hand at one grid point
    weights = np.exp(-0.5 * ((times - grid[row]) / (h * time_prior.DAY)) ** 2)
    local = (np.bincount(items, weights=weights, minlength=n) + m * overall) / (weights.sum() + m)
    _, shrunk = parts.shrunk_prior(items, times, n, h, m)
    np.testing.assert_allclose(shrunk[row], np.log((1 - time_prior.GLOBAL_MIX) * local + time_prior.GLOBAL_MIX * overall + time_prior.EPSILON), rtol=1e-5)
    # more pseudo-ratings, closer to the all-time share; the sparse period moves more than the busy one
    distance = [np.abs(parts.shrunk_prior(items, times, n, h, value)[1] - all_time).mean(1) for value in (0.0, 10.0, 100.0, 1000.0)]
    assert all((a >= b - 1e-6).all() for a, b in itertools.pairwise(distance)) and (distance[0] - distance[-1]).sum() > 0
    sparse, busy = grid > 1e8, grid < 2e7
    moved = distance[0] - distance[1]
    assert moved[sparse].mean() > moved[busy].mean()


def test_each_variant_changes_its_one_part_and_leaves_the_bank_untouched(parts, opened_bank, with_time_prior):
    with_prior = with_time_prior(opened_bank.model, 2.0, 300)
    anchor_bias = torch.randn(3, len(with_prior.item_texts), generator=torch.Generator().manual_seed(0))
    source = PmetaModel(with_prior.config, with_prior.encoder, with_prior.item_texts, replace(with_prior.t, anchor_bias=anchor_bias), index=with_prior.index)
    before = {key: value.clone() for key, value in source.t.head.items()}
    other_prior = torch.randn_like(source.t.head["time_log_prior"]).numpy()
    changed = {
        "time prior": {"time_weight"},
        "prior": {"time_log_prior"},
        "item bias": {"item_bias"},
        "collaborative": {"history_embedding", "item_embedding"},
        "anchor bias": set(),
    }
    for part, keys in changed.items():
        model = parts.without(source, part, other_prior)
        differing = {key for key in before if not torch.equal(model.t.head[key], before[key])}
        assert differing == keys, part
        assert torch.equal(model.t.anchor_bias, source.t.anchor_bias) == (part != "anchor bias")
    assert float(parts.without(source, "time prior").t.head["time_weight"]) == 0.0
    assert torch.equal(parts.without(source, "prior", other_prior).t.head["time_log_prior"], torch.as_tensor(other_prior))
    assert torch.all(parts.without(source, "anchor bias").t.anchor_bias == 0)
    item_bias = parts.without(source, "item bias").t.head["item_bias"]
    assert torch.all(item_bias == before["item_bias"].median())
    assert all(torch.equal(source.t.head[key], before[key]) for key in before)  # the source model untouched
    with pytest.raises(ValueError, match="unknown part"):
        parts.without(source, "encoder")


def test_prior_rows_need_the_banks_prior_rebuilt_exactly_from_the_source_data(parts, opened_bank):
    sample = load_sample()
    ids = {u: i for i, u in enumerate(sample.ratings.user_ids)}
    positives = sample.positives_by_user()
    few = [u for u in range(sample.ratings.n_users) if len(positives.get(u, ())) < opened_bank.model.config.min_positives]
    assert few  # users a build skips: their ratings must not reach the rebuilt prior
    record_users = [sample.ratings.user_ids[i] for i in [*range(0, 200, 2), *few]]
    train = with_positives(np.array(sorted(ids[u] for u in record_users)), sample.positives_by_user(), opened_bank.model.config.min_positives)
    items, stamps = time_prior.rating_events(sample, train)
    grid, table = time_prior.table(items, stamps, len(sample.catalog), 180.0)
    model = opened_bank.model
    head = {**model.t.head, **time_prior.head_entries(grid, table, 3.0)}
    with_prior = PmetaModel(model.config, model.encoder, model.item_texts, replace(model.t, head=head), index=model.index)
    record = {"train_users": record_users, "collaborative_init": {"time_prior": {"bandwidth_days": 180.0}}}
    rows = parts.variants(SimpleNamespace(model=with_prior, build_record=record), sample, [100.0])
    assert list(rows) == ["as served", "no time prior", "all-time popularity", "prior shrunk, m = 100", "item bias at its median", "no collaborative embeddings"]
    assert float(rows["no time prior"].t.head["time_weight"]) == 0.0 and torch.equal(rows["no time prior"].t.head["item_bias"], head["item_bias"])
    assert rows["as served"] is with_prior
    flat = rows["all-time popularity"].t.head["time_log_prior"]
    assert torch.equal(flat, flat[:1].expand_as(flat))
    np.testing.assert_array_equal(rows["prior shrunk, m = 100"].t.head["time_log_prior"].numpy(), parts.shrunk_prior(items, stamps, len(sample.catalog), 180.0, 100.0)[1])

    for wrong in ({**record, "train_users": record_users[1:]}, {**record, "train_users": [*record_users, "no-such-user"]}, {**record, "collaborative_init": {"time_prior": {"bandwidth_days": 365.0}}}):
        with pytest.raises(SystemExit):
            parts.variants(SimpleNamespace(model=with_prior, build_record=wrong), sample, [])


def test_main_scores_the_target_train_users_as_the_transfer_path_does(parts, tiny_bank, opened_bank, tmp_path, capsys):
    from pmeta.data import read_movielens
    from pmeta.eval import neural  # noqa: F401
    from pmeta.eval.baselines import BASELINES, EvalContext
    from pmeta.eval.protocol import evaluate, split_users
    from pmeta.eval.transfer import transfer_model

    write_ml100k_like(load_sample(), tmp_path / "target", users=60, rename_every=7)
    parts.main(["--bank", str(tiny_bank), "--data", str(tmp_path / "target"), "--users", "6", "--shrink", ""])
    out = capsys.readouterr().out
    table = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ") and not line.startswith("| bank")}
    # the tiny bank has no time prior nor anchor bias (nor an EASE λ: 500)
    assert list(table) == ["as served", "item bias at its median", "no collaborative embeddings", "no bank: EASE (λ = 500) fitted on the bank's train users of the source"]
    assert "train users of seed 0" in out

    target = read_movielens(tmp_path / "target")
    train, test = split_users(target, seed=0)
    model, _ = transfer_model(opened_bank.model, opened_bank.catalog, target.catalog)
    rows = evaluate(BASELINES["pmeta-no-steps"].create(EvalContext(target, train, model=model)), target, np.asarray(train)[:6], ks=(1, 3, 5), modes=("uni99", "pop99", "full"))
    cells = {(row["k"], row["mode"]): row for row in rows}
    expected = [f"{cells[(k, mode)]['hr@10']:.3f} / {cells[(k, mode)]['ndcg@10']:.3f}" for mode in ("uni99", "pop99", "full") for k in (1, 3, 5)]
    assert [cell.strip() for cell in table["as served"][:9]] == expected
    assert table["no collaborative embeddings"] != table["as served"]
    assert not set(np.asarray(train)[:6]) & set(test)

    with pytest.raises(SystemExit, match="bank's own catalogue"):
        parts.main(["--bank", str(tiny_bank), "--data", str(SAMPLE_DIR)])
    for bad in (["--users", "0"], ["--threads", "0"], ["--shrink", "-1"], ["--shrink", "nan"]):
        with pytest.raises(SystemExit):
            parts.main(["--bank", str(tiny_bank), "--data", str(tmp_path / "target"), *bad])


def test_source_ease_reads_the_target_through_the_title_match(parts, opened_bank, tmp_path):
    from pmeta.data import read_movielens
    from pmeta.eval.baselines import EASEBaseline
    from pmeta.eval.transfer import match_items

    write_ml100k_like(load_sample(), tmp_path / "target", users=60, rename_every=7)
    target, sample = read_movielens(tmp_path / "target"), load_sample()
    train = parts.bank_train_users(opened_bank, sample)
    assert {sample.ratings.user_ids[int(u)] for u in train} <= set(opened_bank.build_record["train_users"]) and len(train) > 100
    ease = EASEBaseline(lam=50.0).fit(sample, train)
    matched = match_items(opened_bank.catalog, target.catalog)
    scorer = parts.SourceEASE(ease, matched)
    known, unseen = np.flatnonzero(matched >= 0), np.flatnonzero(matched < 0)
    support = np.concatenate([known[[3, 40, 90]], unseen[:1]])  # an unmatched support item is dropped
    scores = scorer.score(support, 4)
    expected = ease.score(matched[known[[3, 40, 90]]], 3)
    np.testing.assert_array_equal(scores[known], expected[matched[known]])
    assert scores[unseen].max() < scores[known].min() and len(np.unique(scores[known])) > 50
    with pytest.raises(SystemExit, match="not the data this bank was built on"):
        parts.bank_train_users(SimpleNamespace(build_record={"train_users": ["no-such-user"]}, model=opened_bank.model), sample)

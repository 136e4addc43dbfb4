"""benchmarks/transfer_parts.py, behind the README's measured parts of a transferred bank: the shrunk
prior is the bank's at m = 0 and the all-time share at m = inf, each variant changes its one part
only, the source data must be the bank's (fingerprint, train users, prior rebuilt), the train users
are the build's own, and the "as served" row is what `pmeta eval movielens` scores on the target's
train users; bad arguments end in one line."""

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


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A synthetic ml-100k-layout target cut from the sample (every 7th title altered: unmatched)."""
    directory = tmp_path_factory.mktemp("ml100k-like")
    write_ml100k_like(load_sample(), directory, users=60, rename_every=7)
    return directory


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

    m, row = 50.0, len(grid) // 2  # by hand at one grid point (causal: the ratings at or before it)
    weights = np.where(times <= grid[row], np.exp(-0.5 * ((times - grid[row]) / (h * time_prior.DAY)) ** 2), 0.0)
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
    with_prior = with_time_prior(opened_bank.model, 2.0, 300, "gaussian")
    generator = torch.Generator().manual_seed(0)
    n, d = with_prior.t.item_text.shape
    anchor_bias = torch.randn(3, n, generator=generator)
    keys, projection = torch.randn(n, 5, generator=generator), torch.randn(d, 5, generator=generator)
    source = PmetaModel(with_prior.config, with_prior.encoder, with_prior.item_texts, replace(with_prior.t, anchor_bias=anchor_bias, item_keys=keys, key_projection=projection), index=with_prior.index)
    before = {key: value.clone() for key, value in source.t.head.items()}
    other_prior = {**{k: v for k, v in source.t.head.items() if k.startswith("time_") and k != "time_weight"}, "time_log_prior": torch.randn_like(source.t.head["time_log_prior"])}
    changed = {
        "time prior": {"time_weight"},
        "prior": {"time_log_prior"},
        "item bias": {"item_bias"},
        "collaborative": {"history_embedding", "item_embedding"},
        "anchor bias": set(),
        "keys": set(),
    }
    for part, names in changed.items():
        model = parts.without(source, part, other_prior)
        differing = {key for key in before if not torch.equal(model.t.head[key], before[key])}
        assert differing == names, part
        assert torch.equal(model.t.anchor_bias, source.t.anchor_bias) == (part != "anchor bias")
        assert torch.equal(model.t.item_keys, keys) == (part != "keys")
    torch.testing.assert_close(parts.without(source, "keys").t.item_keys, source.t.item_text.float() @ projection)
    assert float(parts.without(source, "time prior").t.head["time_weight"]) == 0.0
    assert torch.equal(parts.without(source, "prior", other_prior).t.head["time_log_prior"], other_prior["time_log_prior"])
    # a prior of another kind replaces every time tensor but β
    exponential = parts.without(source, "prior", time_prior.build(np.array([0, 1]), np.array([0.0, 1e6]), n, 30.0)).t.head
    assert time_prior.kind_of(exponential) == "exponential" and "time_log_prior" not in exponential and torch.equal(exponential["time_weight"], before["time_weight"])
    assert torch.all(parts.without(source, "anchor bias").t.anchor_bias == 0)
    item_bias = parts.without(source, "item bias").t.head["item_bias"]
    assert torch.all(item_bias == before["item_bias"].median())
    assert all(torch.equal(source.t.head[key], before[key]) for key in before)  # the source model untouched
    with pytest.raises(ValueError, match="unknown part"):
        parts.without(source, "encoder")


def test_prior_rows_need_the_banks_prior_rebuilt_from_the_source_data(parts, opened_bank):
    sample = load_sample()
    ids = {u: i for i, u in enumerate(sample.ratings.user_ids)}
    positives = sample.positives_by_user()
    few = [u for u in range(sample.ratings.n_users) if len(positives.get(u, ())) < opened_bank.model.config.min_positives]
    assert few  # users a build skips: their ratings must not reach the rebuilt prior
    record_users = [sample.ratings.user_ids[i] for i in [*range(0, 200, 2), *few]]
    train = with_positives(np.array(sorted(ids[u] for u in record_users)), sample.positives_by_user(), opened_bank.model.config.min_positives)
    items, stamps = time_prior.rating_events(sample, train)
    model = opened_bank.model
    head = {**model.t.head, **time_prior.head_entries(time_prior.build(items, stamps, len(sample.catalog), 180.0, "gaussian"), 3.0)}
    with_prior = PmetaModel(model.config, model.encoder, model.item_texts, replace(model.t, head=head), index=model.index)
    record = {"train_users": record_users, "collaborative_init": {"time_prior": {"bandwidth_days": 180.0}}}
    bank = SimpleNamespace(model=with_prior, build_record=record, record={"dataset_fingerprint": sample.fingerprint})
    rows = parts.variants(bank, sample, [100.0])
    assert list(rows) == ["as served", "no time prior", "all-time popularity", "prior shrunk, m = 100", "item bias at its median", "no collaborative embeddings", "anchors retrieved by text keys"]
    assert float(rows["no time prior"].t.head["time_weight"]) == 0.0 and torch.equal(rows["no time prior"].t.head["item_bias"], head["item_bias"])
    assert rows["as served"] is with_prior
    flat = rows["all-time popularity"].t.head["time_log_prior"]
    assert torch.equal(flat, flat[:1].expand_as(flat))
    np.testing.assert_array_equal(rows["prior shrunk, m = 100"].t.head["time_log_prior"].numpy(), parts.shrunk_prior(items, stamps, len(sample.catalog), 180.0, 100.0)[1])
    # an exponential prior (banks since stop 48): checked the same way; its shrunk rows read it exactly with m pseudo-ratings
    exponential = PmetaModel(model.config, model.encoder, model.item_texts, replace(model.t, head={**model.t.head, **time_prior.head_entries(time_prior.build(items, stamps, len(sample.catalog), 180.0), 3.0)}), index=model.index)
    rows = parts.variants(SimpleNamespace(model=exponential, build_record=record, record=bank.record), sample, [100.0])
    assert "prior shrunk, m = 100" in rows and "all-time popularity" in rows
    shrunk = rows["prior shrunk, m = 100"].t.head
    assert float(shrunk["time_pseudo_ratings"]) == 100.0 and time_prior.kind_of(shrunk) == "exponential"
    assert not torch.equal(time_prior.user_prior(shrunk, [1e8, 1.5e9]), time_prior.user_prior(exponential.t.head, [1e8, 1.5e9]))
    flat_rows = time_prior.user_prior(rows["all-time popularity"].t.head, [1e8, 1.5e9])
    assert torch.equal(flat_rows[0], flat_rows[1]) and not torch.equal(*time_prior.user_prior(exponential.t.head, [1e8, 1.5e9]))
    with pytest.raises(SystemExit):
        parts.variants(SimpleNamespace(model=exponential, build_record={**record, "collaborative_init": {"time_prior": {"bandwidth_days": 365.0}}}, record=bank.record), sample, [])

    # an init without the grid (puresvd, ease) records no bandwidth: the build's fixed one (365 days here)
    fixed = PmetaModel(model.config, model.encoder, model.item_texts, replace(model.t, head={**model.t.head, **time_prior.head_entries(time_prior.build(items, stamps, len(sample.catalog), 365.0, "gaussian"), 3.0)}), index=model.index)
    assert "no time prior" in parts.variants(SimpleNamespace(model=fixed, build_record={**record, "collaborative_init": {"kind": "puresvd"}}, record=bank.record), sample, [])

    for wrong in ({**record, "train_users": record_users[1:]}, {**record, "train_users": [*record_users, "no-such-user"]}, {**record, "collaborative_init": {"time_prior": {"bandwidth_days": 365.0}}}):
        with pytest.raises(SystemExit):
            parts.variants(SimpleNamespace(model=with_prior, build_record=wrong, record=bank.record), sample, [])
    with pytest.raises(SystemExit, match="fingerprint differs"):
        parts.variants(SimpleNamespace(model=with_prior, build_record=record, record={"dataset_fingerprint": "another"}), sample, [])


def test_main_scores_the_target_train_users_as_pmeta_eval_does(parts, tiny_bank, opened_bank, target, capsys, monkeypatch):
    from pmeta.data import read_movielens
    from pmeta.eval import runner
    from pmeta.eval.protocol import evaluate, split_users

    fitted = []

    class Recorded(parts.EASEBaseline):  # what the EASE row is fitted on, without a second fit
        def fit(self, dataset, train_users):
            fitted.append((self, dataset.fingerprint, np.array(train_users)))
            return super().fit(dataset, train_users)

    monkeypatch.setattr(parts, "EASEBaseline", Recorded)
    parts.main(["--bank", str(tiny_bank), "--data", str(target), "--users", "6", "--shrink", ""])
    out = capsys.readouterr().out
    table = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:11]] for line in out.splitlines() if line.startswith("| ") and not line.startswith("| bank")}
    ease_row = "no bank: EASE (λ = 500) fitted on the bank's train users of the source"
    # the tiny bank has no time prior, no anchor bias and no EASE λ (500)
    assert list(table) == ["as served", "item bias at its median", "no collaborative embeddings", "anchors retrieved by text keys", ease_row]
    assert "train users of seed 0" in out and table["no collaborative embeddings"] != table["as served"]

    def cells(rows):
        by = {(row["k"], row["mode"]): row for row in rows}
        return [f"{by[(k, mode)]['hr@10']:.3f} / {by[(k, mode)]['ndcg@10']:.3f}" for mode in ("uni99", "pop99", "full") for k in (1, 3, 5)]

    # "as served" is pmeta eval's pmeta-no-steps on these users: the runner, its test users swapped for the train users
    dataset = read_movielens(target)
    train, test = split_users(dataset, seed=0)
    monkeypatch.setattr(runner, "split_users", lambda *args, **kwargs: (train, train))
    # the target's train users are the bank's train users (pmeta.eval.synthetic), which an evaluation
    # refuses to score (test_eval_transfer); the parts table scores them on purpose
    monkeypatch.setitem(opened_bank.build_record, "train_history_keys", [])
    report = runner.run_movielens(dataset, opened_bank, ["pmeta-no-steps"], (1, 3, 5), ("uni99", "pop99", "full"), max_users=6, resamples=1)
    assert table["as served"] == cells(report["results"])
    assert not set(np.asarray(train)[:6]) & set(test)

    (ease, fingerprint, users), = fitted
    sample = load_sample()
    assert fingerprint == sample.fingerprint and ease.chosen_lam == 500.0 and np.array_equal(users, parts.bank_train_users(opened_bank, sample))
    from pmeta.eval.transfer import match_items

    expected = evaluate(parts.SourceEASE(ease, match_items(opened_bank.catalog, dataset.catalog)), dataset, np.asarray(train)[:6], ks=(1, 3, 5), modes=("uni99", "pop99", "full"))
    assert table[ease_row] == cells(expected)


def test_bad_arguments_end_in_one_line(parts, tiny_bank, target, tmp_path):
    data = str(target)
    with pytest.raises(SystemExit, match="bank's own catalogue"):
        parts.main(["--bank", str(tiny_bank), "--data", str(SAMPLE_DIR)])
    for bad, says in (
        (["--bank", str(tmp_path / "no-bank"), "--data", data], "error: "),
        (["--bank", str(tiny_bank), "--data", str(tmp_path / "no-data")], "error: "),
        (["--bank", str(tiny_bank), "--data", data, "--source-data", data], "fingerprint differs"),
    ):
        with pytest.raises(SystemExit, match=says):
            parts.main(bad)
    for bad in (["--users", "0"], ["--threads", "0"], ["--shrink", "-1"], ["--shrink", "nan"], ["--seed", "-1"], ["--source-ease-lambda", "0"], ["--source-ease-lambda", "inf"]):
        with pytest.raises(SystemExit) as exit_info:
            parts.main(["--bank", str(tiny_bank), "--data", data, *bad])
        assert exit_info.value.code == 2, bad  # argparse's usage error, before anything is read
    assert parts.number_list("300,300,1000") == [300.0, 1000.0]


def test_build_train_users_are_the_banks_train_users_with_positives(parts, opened_bank):
    from pmeta.bank.build import user_split

    sample = load_sample()
    expected = with_positives(user_split(sample, opened_bank.config)[0], sample.positives_by_user(), opened_bank.config.min_positives)
    assert np.array_equal(parts.bank_train_users(opened_bank, sample), np.sort(expected))


def test_source_ease_reads_the_target_through_the_title_match(parts, opened_bank, target):
    from pmeta.data import read_movielens
    from pmeta.eval.baselines import EASEBaseline
    from pmeta.eval.transfer import match_items

    dataset, sample = read_movielens(target), load_sample()
    ease = EASEBaseline(lam=50.0).fit(sample, parts.bank_train_users(opened_bank, sample)[:60])  # a few users: a quick fit
    matched = match_items(opened_bank.catalog, dataset.catalog)
    scorer = parts.SourceEASE(ease, matched)
    known, unseen = np.flatnonzero(matched >= 0), np.flatnonzero(matched < 0)
    support = np.concatenate([known[[3, 40, 90, 90]], unseen[:1]])  # an unmatched support item is dropped, a repeated one counts once
    scores = scorer.score(support, 5)
    expected = ease.score(matched[known[[3, 40, 90]]], 3)
    np.testing.assert_array_equal(scores[known], expected[matched[known]])
    assert scores[unseen].max() < scores[known].min() and len(np.unique(scores[known])) > 50
    with pytest.raises(SystemExit, match="not the data this bank was built on"):
        parts.bank_train_users(SimpleNamespace(build_record={"train_users": ["no-such-user"]}, model=opened_bank.model, record=opened_bank.record), sample)


def test_target_prior_rows_score_each_half_with_the_other_halfs_ratings(parts, opened_bank, target, with_time_prior, monkeypatch):
    """--target-prior: the train users are halved; each half's scored users get a prior counted on the
    other half's ratings only (never their own), and the rows pool both halves' users by count."""
    from pmeta.data import read_movielens
    from pmeta.eval.protocol import split_users

    dataset = read_movielens(target)
    train, _ = split_users(dataset, seed=0)
    bank = SimpleNamespace(model=with_time_prior(opened_bank.model, 1.5, 500), catalog=opened_bank.catalog)
    counted, scored = [], []
    real_events, real_evaluate = time_prior.rating_events, parts.evaluate
    monkeypatch.setattr(parts.time_prior, "rating_events", lambda data, users: counted.append(set(np.asarray(users).tolist())) or real_events(data, users))
    monkeypatch.setattr(parts, "evaluate", lambda scorer, data, users, **kw: scored.append(set(np.asarray(users).tolist())) or real_evaluate(scorer, data, users, **kw))
    users = np.asarray(train)[:10]
    rows = parts.target_prior_rows(bank, dataset, train, users, "pmeta-no-steps", 0)
    everyone = set(np.asarray(train).tolist())
    assert len(counted) == len(scored) == 2 and not (counted[0] & counted[1]) and counted[0] | counted[1] == everyone
    assert all(not (done & prior) for done, prior in zip(scored, counted)) and scored[0] | scored[1] == set(users.tolist())
    assert {(row["k"], row["mode"]) for row in rows} == {(k, m) for k in parts.KS for m in parts.MODES}
    cases = len(with_positives(users, dataset.positives_by_user(), 6))
    assert all(row["users"] == cases for row in rows) and all(0 <= row["ndcg@10"] <= row["hr@10"] <= 1 for row in rows)


def test_target_bias_rows_count_the_anchor_bias_on_the_other_half_as_well(parts, tiny_bank, opened_bank, with_anchor_bias, target, with_time_prior, monkeypatch):
    """--target-bias: each half's scored users are ranked by a bank whose anchors' item bias was
    counted (at the bank's γ) on the other half's positives, never their own, beside the prior
    counted there; a bank without a bias is refused before anything is scored."""
    from pmeta.data import read_movielens
    from pmeta.eval.protocol import split_users

    dataset = read_movielens(target)
    train, _ = split_users(dataset, seed=0)
    positives = dataset.positives_by_user()
    bank = SimpleNamespace(model=with_time_prior(with_anchor_bias, 1.5, 500), catalog=opened_bank.catalog, build_record={"collaborative_init": {"anchor_bias": {"weight": 1.5}}})
    assert parts.bank_gamma(bank) == 1.5
    assert parts.bank_gamma(SimpleNamespace(model=opened_bank.model, build_record=bank.build_record)) == 0.0  # no bias tensor: none
    counts, served, scored, halves = [], [], [], []
    real_count, real_evaluate, real_events = parts.recounted_anchor_bias, parts.evaluate, time_prior.rating_events

    def count(model, liked, gamma):
        counts.append(([np.asarray(items).tolist() for items in liked], gamma))
        served.append(real_count(model, liked, gamma))
        return served[-1]

    monkeypatch.setattr(parts, "recounted_anchor_bias", count)
    monkeypatch.setattr(parts.time_prior, "rating_events", lambda data, users: halves.append(np.asarray(users).tolist()) or real_events(data, users))
    monkeypatch.setattr(parts, "evaluate", lambda scorer, data, users, **kw: scored.append((scorer.model.t.anchor_bias, set(np.asarray(users).tolist()))) or real_evaluate(scorer, data, users, **kw))
    users = np.asarray(train)[:10]
    rows = parts.target_prior_rows(bank, dataset, train, users, "pmeta-no-steps", 0, bias=True)
    assert len(counts) == len(scored) == len(halves) == 2 and all(gamma == 1.5 for _, gamma in counts)
    for (liked, _), bias, (used, who), half in zip(counts, served, scored, halves):
        assert used is bias  # the scored bank serves the recount
        assert not who & set(half)  # counted on the half the prior was counted on, never on a scored user
        minimum = bank.model.config.min_positives  # as a build counts its own train users
        assert liked == [positives[int(u)].tolist() for u in half if int(u) in positives and len(positives[int(u)]) >= minimum]
    assert not torch.equal(served[0], served[1])
    plain = parts.target_prior_rows(bank, dataset, train, users, "pmeta-no-steps", 0)
    assert len(counts) == 2 and {(row["k"], row["mode"]) for row in rows} == {(row["k"], row["mode"]) for row in plain}
    with pytest.raises(SystemExit, match="--target-bias needs a bank with the exact"):
        parts.main(["--bank", str(tiny_bank), "--data", str(target), "--target-bias"])  # the tiny bank has neither
    # a bank with the exact prior but no anchors' bias: refused before anything is fitted or scored
    with_prior = SimpleNamespace(model=with_time_prior(opened_bank.model, 1.5, 500), catalog=opened_bank.catalog, build_record={}, config=opened_bank.config, record=opened_bank.record, version="v")
    monkeypatch.setattr(parts.Bank, "open", staticmethod(lambda path: with_prior))
    monkeypatch.setattr(parts, "variants", lambda *a, **k: pytest.fail("fitted before refusing"))
    with pytest.raises(SystemExit, match="--target-bias needs a bank with an anchors' item bias"):
        parts.main(["--bank", str(tiny_bank), "--data", str(target), "--target-bias"])

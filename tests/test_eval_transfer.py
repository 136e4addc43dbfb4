"""Transfer: a bank built on ml-latest-small evaluated on an ml-100k-layout catalogue it never saw.

ml-100k is not on these machines; the target is a synthetic ml-100k-layout directory cut from the
shipped sample (users and items renumbered, titles kept, every 7th title altered so that some items
are unseen by the bank), whose test users are users the bank held out.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmeta.data import load_sample, read_movielens
from pmeta.eval.protocol import split_users
from pmeta.eval.runner import run_movielens
from pmeta.eval.synthetic import write_ml100k_like
from pmeta.eval.transfer import match_items, normalise_title, transfer_model


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ml100k-like")
    summary = write_ml100k_like(load_sample(), directory, users=60, rename_every=7)
    return directory, summary


def test_synthetic_target_is_a_readable_ml100k_layout(target):
    directory, summary = target
    raw = (directory / "u.item").read_bytes()
    raw.decode("latin-1")
    assert raw.split(b"\n")[0].count(b"|") == 4 + 19
    dataset = read_movielens(directory)
    assert dataset.format == "ml-100k" and dataset.ratings.n_users == 60 and len(dataset.catalog) == summary["items"]
    assert set(np.unique(dataset.ratings.rating)) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_target_test_users_were_held_out_by_the_bank(target, opened_bank):
    directory, summary = target
    dataset = read_movielens(directory)
    _, test_users = split_users(dataset, seed=0)
    sources = {summary["user_map"][dataset.ratings.user_ids[int(u)]] for u in test_users}
    assert len(sources) == 12 and sources <= set(opened_bank.record["held_out_users"])


def test_items_match_by_title_and_unseen_items_are_text_only(target, opened_bank):
    directory, summary = target
    dataset = read_movielens(directory)
    matched = match_items(opened_bank.catalog, dataset.catalog)
    assert normalise_title("  Heat  (1995) ") == normalise_title("heat (1995)")
    unseen = np.flatnonzero(matched < 0)
    assert len(unseen) >= summary["renamed_titles"] > 0
    for i in np.flatnonzero(matched >= 0)[:50]:
        assert normalise_title(opened_bank.catalog.titles[matched[i]]) == normalise_title(dataset.catalog.titles[i])
    model, info = transfer_model(opened_bank.model, opened_bank.catalog, dataset.catalog)
    assert info["matched_items"] + info["unseen_items"] == len(dataset.catalog) and info["unseen_items"] == len(unseen)
    head = model.t.head
    assert torch.all(head["item_embedding"][torch.from_numpy(unseen)] == 0)
    known = int(np.flatnonzero(matched >= 0)[0])
    assert torch.equal(head["item_embedding"][known], opened_bank.model.t.head["item_embedding"][matched[known]])
    # the target's text embeddings come from the same frozen encoder
    expected = opened_bank.model.encoder.sentence_embeddings([dataset.catalog.text(known)])[0]
    assert torch.allclose(model.t.item_text[known], expected, atol=1e-5)


def test_transfer_carries_the_time_prior_columns(target, opened_bank, with_time_prior):
    """A bank with a time prior: a matched item keeps its column, an unseen one gets the median of
    the user's row (each kind of prior; the bank's own tensors are untouched)."""
    from pmeta.tasks import time_prior

    directory, _ = target
    dataset = read_movielens(directory)
    matched = match_items(opened_bank.catalog, dataset.catalog)
    known, unseen = np.flatnonzero(matched >= 0), np.flatnonzero(matched < 0)
    assert len(known) and len(unseen)
    for kind in time_prior.KINDS:
        with_prior = with_time_prior(opened_bank.model, 1.5, 500, kind)
        head = with_prior.t.head
        model, _ = transfer_model(with_prior, opened_bank.catalog, dataset.catalog)
        assert all(torch.equal(model.t.head[k], v) for k, v in head.items() if k.startswith("time_"))
        times = [3e7, 9e7, float("nan")]
        source_rows, moved = time_prior.user_prior(head, times), time_prior.user_prior(model.t.head, times)
        assert moved.shape == (3, len(dataset.catalog))
        assert torch.equal(moved[:, torch.from_numpy(known)], source_rows[:, torch.from_numpy(matched[known])])
        assert torch.equal(moved[:, torch.from_numpy(unseen)], source_rows.median(dim=1, keepdim=True).values.expand(-1, len(unseen)))
        # transferred again (onto the same catalogue): the maps compose
        again, _ = transfer_model(model, dataset.catalog, dataset.catalog)
        assert torch.equal(time_prior.user_prior(again.t.head, times)[:, torch.from_numpy(known)], moved[:, torch.from_numpy(known)])


def test_a_transfer_can_count_the_time_prior_on_the_targets_own_ratings(target, opened_bank, with_time_prior):
    """prior_events: the prior is counted again on the target's ratings with the bank's h, m and β
    (no column map, no source count kept), exactly as a prior built on them; the source model is
    untouched; a bank without a prior or with an older kind, events outside the catalogue and events
    without a timestamp are typed errors."""
    from pmeta.errors import InvalidConfig, InvalidData
    from pmeta.tasks import time_prior

    directory, _ = target
    dataset = read_movielens(directory)
    train, _ = split_users(dataset, seed=0)
    items, times = time_prior.rating_events(dataset, train)
    source = with_time_prior(opened_bank.model, 1.5, 500)
    source.t.head["time_pseudo_ratings"] = torch.tensor(30.0, dtype=torch.float64)
    before = {k: v.clone() for k, v in source.t.head.items()}
    model, info = transfer_model(source, opened_bank.catalog, dataset.catalog, prior_events=(items, times))
    assert info["time_prior"] == "target" and "time_columns" not in model.t.head
    assert all(torch.equal(source.t.head[k], v) for k, v in before.items())
    expected = {**time_prior.decayed(items, times, len(dataset.catalog), 365.0), "time_pseudo_ratings": before["time_pseudo_ratings"]}
    stamps = [float(np.median(times)), float(times.max()) + 1e6, float("nan")]
    torch.testing.assert_close(time_prior.user_prior(model.t.head, stamps), 1.5 * time_prior.log_prior_at(expected, stamps), rtol=0, atol=0)
    assert len(model.t.head["time_event_items"]) == len(items) < len(dataset.ratings.item)  # the train users' ratings only
    assert transfer_model(source, opened_bank.catalog, dataset.catalog)[1]["time_prior"] == "source"
    assert transfer_model(opened_bank.model, opened_bank.catalog, dataset.catalog)[1]["time_prior"] == ("none" if time_prior.kind_of(opened_bank.model.t.head) is None else "source")
    for kind in ("gaussian", "two-sided"):
        with pytest.raises(InvalidConfig, match=f"older '{kind}' kind"):
            transfer_model(with_time_prior(opened_bank.model, 1.5, 500, kind), opened_bank.catalog, dataset.catalog, prior_events=(items, times))
    bare = with_time_prior(opened_bank.model, 0.0, 500)  # β = 0 stores no prior at all
    with pytest.raises(InvalidConfig, match="no time prior"):
        transfer_model(bare, opened_bank.catalog, dataset.catalog, prior_events=(items, times))
    with pytest.raises(InvalidData, match="outside the target"):
        transfer_model(source, opened_bank.catalog, dataset.catalog, prior_events=(items + len(dataset.catalog), times))
    with pytest.raises(InvalidData, match="no timestamped rating"):
        transfer_model(source, opened_bank.catalog, dataset.catalog, prior_events=(items, np.full(len(times), np.nan)))


def test_an_evaluation_counts_the_target_prior_on_its_train_users_only(target, tiny_bank, with_time_prior, monkeypatch):
    """run_movielens(transfer_prior="target"): the transferred bank's prior holds the seed's train
    users' ratings and none of a test user's; the report says where the prior came from; in-domain it
    is refused, and so is an unknown value."""
    from pmeta.errors import InvalidConfig
    from pmeta.eval.runner import model_for, write_report
    from pmeta.progress import Progress
    from pmeta.tasks import time_prior

    from pmeta import Bank

    directory, _ = target
    dataset = read_movielens(directory)
    opened_bank = Bank.open(tiny_bank)  # its own: the session's opened bank is shared
    opened_bank.model = with_time_prior(opened_bank.model, 1.5, 500)
    train, test = split_users(dataset, seed=0)
    model, info = model_for(opened_bank, dataset, 0, Progress(False), transfer_prior="target")
    assert info["time_prior"] == "target"
    expected_items, expected_times = time_prior.rating_events(dataset, train)
    order = np.argsort(expected_times, kind="stable")
    assert np.array_equal(model.t.head["time_event_items"].numpy(), expected_items[order])
    test_items, _ = time_prior.rating_events(dataset, test)
    assert len(model.t.head["time_event_items"]) + len(test_items) == len(dataset.ratings.item)
    report = run_movielens(dataset, opened_bank, ["pmeta-no-steps"], (1,), ("full",), max_users=3, transfer_prior="target")
    assert report["config"]["transfer"]["time_prior"] == "target"
    out = directory.parent / "target-prior-report"
    write_report(report, out, plots=False)
    assert "counted again on this dataset's train users, with the bank's h and β" in (out / "report.md").read_text()
    report = run_movielens(dataset, opened_bank, ["pmeta-no-steps"], (1,), ("full",), max_users=3, transfer_prior="tuned")
    choice = report["config"]["transfer"]["time_prior_choice"]
    write_report(report, out, plots=False)
    assert f"chosen on {choice['validation_users']} of them held out as validation users ({choice['validation_cases']} with a case)" in (out / "report.md").read_text()
    # a bank without an exact prior is refused before the target's catalogue is encoded
    monkeypatch.setattr("pmeta.bank.build.catalog_embeddings", lambda *a, **k: pytest.fail("encoded the catalogue before refusing"))
    for prior in ("target", "tuned"):
        with pytest.raises(InvalidConfig, match="no time prior"):
            model_for(Bank.open(tiny_bank), dataset, 0, Progress(False), transfer_prior=prior)
    with pytest.raises(InvalidConfig, match="another catalogue"):
        model_for(opened_bank, load_sample(), 0, Progress(False), transfer_prior="target")
    with pytest.raises(InvalidConfig, match="must be one of source, target"):
        model_for(opened_bank, dataset, 0, Progress(False), transfer_prior="both")


def test_a_tuned_transfer_prior_is_chosen_on_validation_users_and_counted_on_all_train_users(target, opened_bank, with_time_prior, monkeypatch):
    """tuned_prior: h and β come from time_prior.choose on EASE's validation split of the train users,
    over the transferred model's scores without a prior, with the prior counted on the other train
    users; the served prior is then counted on every train user at the chosen h, with the chosen β
    (β = 0: no prior at all); the report names the choice; a bank without an exact prior is refused."""
    from dataclasses import replace as dc_replace

    from pmeta.bank.model import PmetaModel
    from pmeta.errors import InvalidConfig
    from pmeta.eval import transfer
    from pmeta.eval.baselines import validation_split
    from pmeta.eval.neural import PmetaNoSteps
    from pmeta.tasks import time_prior

    directory, _ = target
    dataset = read_movielens(directory)
    train, _ = split_users(dataset, seed=0)
    source = with_time_prior(opened_bank.model, 5.0, 500)
    moved, _ = transfer_model(source, opened_bank.catalog, dataset.catalog, prior_events=time_prior.rating_events(dataset, train))
    seen = {}
    real_choose = time_prior.choose

    def spy(base_scores, cases, events, n_items, **kwargs):
        seen.update(cases=cases, events=events, base=base_scores(cases[0][0].support[:1]), bandwidths=kwargs["bandwidths"], weights=kwargs["weights"])
        return real_choose(base_scores, cases, events, n_items, **kwargs)

    monkeypatch.setattr(time_prior, "choose", spy)
    model, choice = transfer.tuned_prior(moved, dataset, train)
    fit, validation = validation_split(train, 0.1, 0)
    assert [case.user for case, _ in seen["cases"]] == [case.user for case, _ in time_prior.validation_cases(dataset, validation)]
    assert np.array_equal(seen["events"][0], time_prior.rating_events(dataset, fit)[0])
    assert choice["validation_users"] == len(validation) and choice["validation_cases"] == len(seen["cases"]) > 0
    # chosen on the transfer's grids (the build's; stop 58's wider ones were read and not kept), recorded
    assert seen["bandwidths"] == tuple(transfer.TUNED_BANDWIDTHS) and seen["weights"] == tuple(transfer.TUNED_WEIGHTS)
    assert choice["weight"] in transfer.TUNED_WEIGHTS and (choice["bandwidth_days"] in transfer.TUNED_BANDWIDTHS or choice["weight"] == 0)
    assert (choice["bandwidths"], choice["weights"]) == (list(transfer.TUNED_BANDWIDTHS), list(transfer.TUNED_WEIGHTS))
    assert len(choice["scores"]) == 1 + len(transfer.TUNED_BANDWIDTHS) * (len(transfer.TUNED_WEIGHTS) - 1)
    items, times = time_prior.rating_events(dataset, train)
    if choice["weight"]:
        expected = time_prior.decayed(items, times, len(dataset.catalog), choice["bandwidth_days"])
        stamps = [float(np.median(times)), float("nan")]
        torch.testing.assert_close(time_prior.user_prior(model.t.head, stamps), choice["weight"] * time_prior.log_prior_at(expected, stamps), rtol=0, atol=0)
    else:
        assert time_prior.kind_of(model.t.head) is None
    # the base scores the choice saw carry no prior: the transferred model's scores with none
    without = {k: v for k, v in moved.t.head.items() if not k.startswith("time_")}
    bare = PmetaModel(moved.config, moved.encoder, moved.item_texts, dc_replace(moved.t, head=without), index=moved.index)
    support = seen["cases"][0][0].support[:1]
    np.testing.assert_allclose(seen["base"], PmetaNoSteps(bare).score(support, 1))
    assert not np.allclose(seen["base"], PmetaNoSteps(moved).score(support, 1, time=float(times.max())))
    # other grids, as stop 58's read of wider ones: passed through and recorded
    _, wide = transfer.tuned_prior(moved, dataset, train, bandwidths=(30.0, 60.0), weights=(0.0, 5.0, 50.0))
    assert (seen["bandwidths"], seen["weights"]) == ((30.0, 60.0), (0.0, 5.0, 50.0))
    assert (wide["bandwidths"], wide["weights"]) == ([30.0, 60.0], [0.0, 5.0, 50.0]) and len(wide["scores"]) == 5
    # β = 0 chosen: no prior at all
    monkeypatch.setattr(time_prior, "choose", lambda *a, **k: (180.0, 0.0, 0.0, {}))
    none, chosen = transfer.tuned_prior(moved, dataset, train)
    assert chosen["weight"] == 0 and time_prior.kind_of(none.t.head) is None
    with pytest.raises(InvalidConfig, match="older 'gaussian' kind"):
        transfer.tuned_prior(with_time_prior(opened_bank.model, 1.5, 500, "gaussian"), dataset, train)


def test_grid_edges_name_the_ends_of_the_grid_a_tuned_choice_sits_on():
    """report.md flags a tuned choice at an end of the grid it was chosen on; a choice recorded
    before the grids were (stop 57's reports) is read against the build's grids."""
    from pmeta.eval.runner import _transfer_prior_line
    from pmeta.eval.transfer import TUNED_BANDWIDTHS, TUNED_WEIGHTS, grid_edges

    def choice(h, beta, **grids):
        return {"bandwidth_days": h, "weight": beta, "validation_users": 75, "validation_cases": 70, **grids}

    wide = {"bandwidths": [30.0, 60.0, 180.0, 365.0], "weights": [0.0, 5.0, 10.0, 50.0]}
    assert grid_edges(choice(30.0, 50.0, **wide)) == ["the smallest h tried", "the largest β tried"]
    assert grid_edges(choice(60.0, 5.0, **wide)) == []  # inside the wide grids
    assert grid_edges(choice(365.0, 2.0, **wide)) == ["the largest h tried"]
    assert min(TUNED_BANDWIDTHS) == 60.0 and max(TUNED_WEIGHTS) == 5.0  # the build's grids
    assert grid_edges(choice(60.0, 5.0)) == ["the smallest h tried", "the largest β tried"]  # a stop-57 report: the build's grids
    assert grid_edges(choice(30.0, 0.0, **wide)) == []  # β = 0: no prior, no h
    line = _transfer_prior_line({"time_prior": "tuned", "time_prior_choice": choice(30.0, 50.0, **wide)})
    assert "h = 30 days, β = 50 (the smallest h tried and the largest β tried), chosen on 75 of them" in line
    assert "tried" not in _transfer_prior_line({"time_prior": "tuned", "time_prior_choice": choice(180.0, 3.0, **wide)})
    old = _transfer_prior_line({"time_prior": "tuned", "time_prior_choice": choice(60.0, 5.0)})  # a stop-57 report.json
    assert "h = 60 days, β = 5 (the smallest h tried and the largest β tried)" in old


def test_transfer_eval_runs_every_bank_method(target, opened_bank):
    directory, _ = target
    dataset = read_movielens(directory)
    methods = ["popularity", "itemknn", "backbone", "pmeta-no-steps", "pmeta"]
    report = run_movielens(dataset, opened_bank, methods, (3,), ("pop99", "full"), max_users=3)
    assert report["dataset"]["format"] == "ml-100k"
    transfer = report["config"]["transfer"]
    assert transfer["bank_dataset"] == "ml-latest-small" and transfer["target_items"] == len(dataset.catalog)
    for r in report["results"]:
        assert r["users"] == 3 and 0 <= r["ndcg@10"] <= r["hr@10"] <= 1


def test_transfer_carries_the_key_rows_and_the_anchor_item_bias(target, opened_bank):
    """A matched item keeps its key row and its anchor-bias column; an unseen one gets its text
    embedding projected into the key space and no anchor bias."""
    from dataclasses import replace

    from pmeta.bank.model import PmetaModel

    directory, _ = target
    dataset = read_movielens(directory)
    source = opened_bank.model
    bias = torch.randn(source.t.anchor_keys.shape[0], len(source.item_texts))
    with_bias = PmetaModel(source.config, source.encoder, source.item_texts, replace(source.t, anchor_bias=bias), index=source.index)
    model, _ = transfer_model(with_bias, opened_bank.catalog, dataset.catalog)
    matched = match_items(opened_bank.catalog, dataset.catalog)
    known, unseen = np.flatnonzero(matched >= 0), torch.from_numpy(np.flatnonzero(matched < 0))
    assert torch.equal(model.t.anchor_bias[:, known], bias[:, matched[known]])
    assert torch.all(model.t.anchor_bias[:, unseen] == 0)
    assert torch.equal(model.t.item_keys[known], source.t.item_keys[matched[known]])
    torch.testing.assert_close(model.t.item_keys[unseen], model.t.item_text[unseen] @ source.t.key_projection)


def test_the_anchor_item_bias_counted_on_target_users_follows_their_nearest_anchors(target, opened_bank):
    """recounted_anchor_bias: each counted user falls into the anchor nearest the key serving gives
    them; an anchor's row is γ times the log ratio of its users' positives to every counted user's
    (checked against a direct count); an anchor nobody falls into, and an item nobody liked, get 0;
    a user with nothing liked counts nowhere; items outside the catalogue are refused."""
    from pmeta.bank.model import UserInput
    from pmeta.errors import InvalidData
    from pmeta.eval.transfer import recounted_anchor_bias
    from pmeta.fusion.anchor_bias import EPSILON, MIX

    directory, _ = target
    dataset = read_movielens(directory)
    model, _ = transfer_model(opened_bank.model, opened_bank.catalog, dataset.catalog)
    train, _ = split_users(dataset, 0)
    positives = dataset.positives_by_user()
    liked = [positives[int(u)] for u in train if int(u) in positives] + [np.array([], dtype=np.int64)]
    gamma = 1.5
    bias = recounted_anchor_bias(model, liked, gamma)
    n_items, anchors = len(dataset.catalog), model.t.anchor_keys.shape[0]
    assert bias.shape == (anchors, n_items)

    keys = model.user_keys([UserInput(liked_items=np.unique(items).tolist()) for items in liked[:-1]])
    nearest = np.argmax(keys @ model.t.anchor_keys.numpy().T, axis=1)  # unit keys: the top-1 of the flat index
    counts = np.zeros((anchors, n_items))
    for items, anchor in zip(liked, nearest):
        counts[anchor, np.unique(items)] += 1
    overall = counts.sum(0) / counts.sum()
    for a in range(anchors):
        if counts[a].sum() == 0:
            assert torch.all(bias[a] == 0)
            continue
        share = counts[a] / counts[a].sum()
        expected = gamma * (np.log((1 - MIX) * share + MIX * overall + EPSILON) - np.log(overall + EPSILON))
        np.testing.assert_allclose(bias[a].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert len(set(nearest.tolist())) > 1  # the users spread over several anchors, so the rows differ
    assert torch.all(bias[:, counts.sum(0) == 0] == 0)
    torch.testing.assert_close(recounted_anchor_bias(model, liked, 0.5), bias / 3)
    # counted on two anchors' users alone, every other anchor has nobody and gets 0
    pair = sorted(set(nearest.tolist()))[:2]
    two = recounted_anchor_bias(model, [items for items, anchor in zip(liked, nearest) if anchor in pair], gamma)
    empty = torch.from_numpy(~np.isin(np.arange(anchors), pair))
    assert bool(empty.any())  # the users spread over more than two anchors
    torch.testing.assert_close(two[empty], torch.zeros_like(two[empty]), rtol=0, atol=1e-6)
    assert float(two[torch.tensor(pair)].abs().max()) > 0.1
    # a user whose liked items have no key row has no key and counts nowhere
    from dataclasses import replace as dc_replace

    from pmeta.bank.model import PmetaModel

    keyless = np.unique(liked[0])
    item_keys = model.t.item_keys.clone()
    item_keys[torch.from_numpy(keyless)] = 0.0
    blind = PmetaModel(model.config, model.encoder, model.item_texts, dc_replace(model.t, item_keys=item_keys), index=model.index)
    others = liked[1:-1]
    torch.testing.assert_close(recounted_anchor_bias(blind, [keyless, *others], gamma), recounted_anchor_bias(blind, others, gamma))
    assert not torch.equal(recounted_anchor_bias(model, [keyless, *others], gamma), recounted_anchor_bias(model, others, gamma))  # with its key it counts
    with pytest.raises(InvalidData, match="outside the target"):
        recounted_anchor_bias(model, [np.array([n_items])], gamma)
    with pytest.raises(InvalidData, match="no retrieval key|none of"):
        recounted_anchor_bias(model, [np.array([], dtype=np.int64)], gamma)


def _catalog(titles: list[str]):
    from pmeta.data.types import Catalog

    return Catalog([str(i) for i in range(len(titles))], titles, [[] for _ in titles])


def test_title_names_read_the_alternatives_a_movielens_title_carries():
    from pmeta.eval.transfer import title_names

    year, names, series = title_names("Star Wars: Episode IV - A New Hope (1977)")
    assert year == "1977" and names == {frozenset("star wars episode iv a new hope".split())}
    assert series == {frozenset({"star", "wars"}), frozenset({"a", "new", "hope"})}
    year, names, series = title_names("Léon: The Professional (a.k.a. The Professional) (Léon) (1994)")
    assert year == "1994" and frozenset({"the", "professional"}) in names and frozenset({"leon"}) in names
    assert series == {frozenset({"leon"})} - names == set()  # a series name that is also a name is a name
    assert title_names("Boot, Das (1981)") == ("1981", {frozenset({"boot", "das"})}, set())
    assert title_names("Heat (1995) [alt]")[0] is None  # no trailing year: never matched by name


def test_unmatched_titles_match_through_their_names_within_the_year_and_only_when_unique():
    source = _catalog([
        "Star Wars: Episode IV - A New Hope (1977)",
        "Seven (a.k.a. Se7en) (1995)",
        "Heat (1995)",
        "Postman, The (Postino, Il) (1994)",
        "Crash (1996)",
        "Crash: The Director's Cut (1996)",  # shares the name "crash" with the exact "Crash (1996)"
        "Twin Town (1997)",
        "Twin Town (Director's Cut) (1997)",  # two 1997 items named "twin town": ambiguous
        "Men in Black (a.k.a. MIB) (1997)",
    ])  # fmt: skip
    target = _catalog([
        "Star Wars (1977)",
        "Seven (Se7en) (1995)",
        "heat  (1995)",
        "Postino, Il (1994)",
        "Star Wars (1978)",  # another year: not the same item
        "Crash (1996)",
        "Crash (Director's Cut) (1996)",
        "Twin Town (Twin Town) (1997)",
        "Unknown Film (1995)",
        "MIB (1997)",
    ])  # fmt: skip
    assert match_items(source, target).tolist() == [0, 1, 2, 3, -1, 4, 5, -1, -1, 8]
    # a name beats a series name: "Red" and "White" share the series "Three Colors" but each has its own title
    colors = _catalog(["Three Colors: Red (Trois couleurs: Rouge) (1994)", "Three Colors: White (Trzy kolory: Bialy) (1994)"])
    assert match_items(colors, _catalog(["Three Colors: White (1994)", "Three Colors: Red (1994)", "Three Colors (1994)"])).tolist() == [1, 0, -1]
    # a source item claimed by two different titles goes to neither; the same title listed twice is one film
    hope = _catalog(["Star Wars: Episode IV - A New Hope (1977)"])
    assert match_items(hope, _catalog(["Star Wars (1977)", "A New Hope (1977)"])).tolist() == [-1, -1]
    assert match_items(hope, _catalog(["Star Wars (1977)", "Star Wars (1977)"])).tolist() == [0, 0]
    # an item an exact match has taken is not given to another target item by name
    assert match_items(_catalog(["Heat (1995)"]), _catalog(["Heat (1995)", "Heat (Heat) (1995)"])).tolist() == [0, -1]


def test_the_banks_own_data_under_another_catalogue_is_not_a_transfer(opened_bank, tmp_path):
    """The held-out check compared user ids only when the catalogue was the bank's: the shipped
    sample with one unrated film added, evaluated with another seed, passed as a "transfer" whose
    test users the bank had mostly trained on. Users are now matched by their histories
    (pmeta.bank.build.history_keys), whatever the catalogue."""
    import shutil

    from pmeta.data import SAMPLE_DIR
    from pmeta.errors import InvalidConfig

    copy = tmp_path / "ml-plus-one"
    shutil.copytree(SAMPLE_DIR, copy)
    with open(copy / "movies.csv", "a", encoding="utf-8") as movies:
        movies.write("999999,Unrated Placeholder (2019),Drama\n")
    dataset = read_movielens(copy)
    assert len(dataset.catalog) == len(opened_bank.catalog) + 1
    with pytest.raises(InvalidConfig, match="test users have the rating history of one of the bank's train users"):
        run_movielens(dataset, opened_bank, ["popularity", "pmeta-no-steps"], (1,), ("full",), seed=3, max_users=3)
    # the bank's own seed: its held-out users, none of them trained on, evaluated as a transfer
    report = run_movielens(dataset, opened_bank, ["popularity", "pmeta-no-steps"], (1,), ("full",), seed=0, max_users=3)
    assert report["config"]["transfer"]["test_users_checked"] is True and report["config"]["transfer"]["unseen_items"] == 1
    assert len(opened_bank.build_record["train_history_keys"]) == len(opened_bank.build_record["train_users"])


@pytest.mark.parametrize("keys, reason", [(None, "predates the check"), ([], "has no timestamps")])
def test_a_transfer_that_could_not_check_its_test_users_says_why(target, opened_bank, monkeypatch, keys, reason):
    from pmeta.eval.runner import markdown

    directory, _ = target
    if keys is None:
        monkeypatch.delitem(opened_bank.build_record, "train_history_keys")
    else:
        monkeypatch.setitem(opened_bank.build_record, "train_history_keys", keys)
    report = run_movielens(read_movielens(directory), opened_bank, ["popularity"], (1,), ("full",), max_users=2)
    transfer = report["config"]["transfer"]
    assert transfer["test_users_checked"] is False and reason in transfer["test_users_check"]
    assert f"Not checked: {transfer['test_users_check']}." in markdown(report)


def test_the_cli_passes_the_transfer_prior_to_the_evaluation(target, tiny_bank):
    """`pmeta eval movielens --transfer-prior tuned` reaches the evaluation: the tiny bank (no time
    prior) is refused there, in one line, and no report is written; without the flag it transfers."""
    import subprocess
    import sys

    directory, _ = target
    out = directory.parent / "cli-transfer-prior"
    base = [sys.executable, "-m", "pmeta", "--threads", "1", "eval", "movielens", "--data", str(directory), "--bank", str(tiny_bank), "--methods", "pmeta-no-steps", "--k", "1", "--mode", "full", "--users", "2", "--no-plots", "--quiet"]
    refused = subprocess.run([*base, "--transfer-prior", "tuned", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "no time prior to count on the target" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr and not (out / "report.json").exists()
    served = subprocess.run([*base, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert served.returncode == 0, served.stderr
    assert (out / "report.json").exists()

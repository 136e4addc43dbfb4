"""The anchors' item bias (pmeta.fusion.anchor_bias) and the collaborative retrieval keys."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pmeta.bank.model import Tensors
from pmeta.eval.protocol import ColdStartCase
from pmeta.fusion import anchor_bias


def test_log_ratio_favours_what_the_anchors_users_liked():
    positives = [np.array([0, 1]), np.array([0, 2]), np.array([3, 4]), np.array([3])]
    ratio = anchor_bias.log_ratio(positives, np.array([0, 0, 1, 1]), anchors=3, n_items=6)
    assert ratio.shape == (3, 6) and ratio.dtype == np.float32
    assert ratio[0, 0] > 0 > ratio[0, 3] and ratio[1, 3] > 0 > ratio[1, 0]
    assert np.all(ratio[:, 5] == 0)  # nobody liked item 5: no evidence either way
    assert np.all(ratio[2] == 0)  # an anchor without users is the global distribution
    duplicated = anchor_bias.log_ratio([np.array([0, 0, 1]), *positives[1:]], np.array([0, 0, 1, 1]), 3, 6)
    np.testing.assert_array_equal(duplicated, ratio)  # a user's repeated item counts once


def test_fused_is_the_weighted_sum_and_a_user_without_a_key_gets_every_anchor_by_its_users():
    bias = torch.randn(5, 7)
    idx = torch.tensor([[0, 3], [4, 4], [1, 2]])
    weights = torch.tensor([[0.25, 0.75], [0.5, 0.5], [0.9, 0.1]])
    sizes = torch.tensor([1.0, 3.0, 0.0, 0.0, 0.0])
    out = anchor_bias.fused(bias, idx, weights, torch.tensor([True, True, False]), sizes)
    torch.testing.assert_close(out[0], 0.25 * bias[0] + 0.75 * bias[3])
    torch.testing.assert_close(out[1], bias[4])
    torch.testing.assert_close(out[2], 0.25 * bias[0] + 0.75 * bias[1])  # no key: every anchor by its users, whatever was retrieved
    everyone = anchor_bias.fused(bias, idx, weights, torch.tensor([True, True, True]), sizes)
    torch.testing.assert_close(everyone[:2], out[:2])


def test_offsets_retrieve_the_nearest_anchors_and_fuse_them_with_the_softmax_weights():
    from pmeta.fusion.fuse import fusion_weights

    centroids = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
    ratio = np.arange(12, dtype=np.float64).reshape(3, 4)
    sizes = np.array([1.0, 1.0, 2.0])
    queries = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 0.0]], dtype=np.float32)
    out = anchor_bias.offsets(queries, centroids, ratio, sizes, top_k=2, temperature=0.1)
    first = fusion_weights(torch.tensor([[1.0, 0.0]]).double(), 0.1)[0].numpy()  # anchor 0 (sim 1), then anchor 1 (sim 0)
    np.testing.assert_allclose(out[0], first[0] * ratio[0] + first[1] * ratio[1], rtol=1e-6)
    w = fusion_weights(torch.tensor([[0.8, 0.6]]).double(), 0.1)[0].numpy()  # anchor 1 first, then anchor 0; anchor 2 not retrieved
    np.testing.assert_allclose(out[1], w[0] * ratio[1] + w[1] * ratio[0], rtol=1e-6)
    np.testing.assert_allclose(out[2], (ratio[0] + ratio[1] + 2 * ratio[2]) / 4)  # no key: every anchor by its users
    np.testing.assert_allclose(anchor_bias.offsets(queries[:1], centroids, ratio, sizes, top_k=1, temperature=0.1)[0], ratio[0])


def _groups(users: int, seed: int = 0):
    """Two groups of users: group g likes items 30g..30g+29 (random order). Key rows put an item
    at e_g, so a user's key says their group. Returns (positives, keys of the items (60, 2))."""
    rng = np.random.default_rng(seed)
    positives = [rng.permutation(np.arange(30) + 30 * (u % 2))[:16] for u in range(users)]
    rows = np.zeros((60, 2), dtype=np.float32)
    rows[:30, 0] = rows[30:, 1] = 1.0
    return positives, rows


def _cases(positives, first_user: int):
    return [(ColdStartCase(first_user + n, f"v{n}", items[:5], items[5:15], np.sort(items)), np.arange(16.0)) for n, items in enumerate(positives)]


def test_choose_takes_the_bias_when_anchors_predict_and_not_when_it_misleads():
    from pmeta.bank.build import choose_anchors

    positives, rows = _groups(200)
    fit, validation = positives[:160], positives[160:]
    keys = np.stack([rows[p].mean(0) for p in fit])
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    centroids, assignment = choose_anchors(keys, 2, seed=0)
    ratio = anchor_bias.log_ratio(fit, assignment, 2, 60)
    cases = _cases(validation, 160)

    def key(support):
        k = rows[support].mean(0)
        return k / np.linalg.norm(k)

    flat = 1e-3 * np.arange(60)  # base scores that know nothing (ties broken by index)
    # 60 items: too few for 99 sampled negatives, so full ranking only
    sizes = np.bincount(assignment, minlength=2).astype(float)
    gamma, grid = anchor_bias.choose(lambda s, t: flat, cases, key, centroids, ratio, sizes, 1, 0.05, np.ones(60), weights=(0.0, 1.0), modes=("full",))
    assert gamma == 1.0 and grid["gamma=1"]["full"] > grid["gamma=0"]["full"] + 0.1  # measured 0.279 vs 0.144

    def knows_the_group(support, t):
        late = support[0] >= 30
        return np.where((np.arange(60) >= 30) == late, 10.0, 0.0) + flat

    gamma, grid = anchor_bias.choose(knows_the_group, cases, key, centroids, -ratio * 100, sizes, 1, 0.05, np.ones(60), weights=(0.0, 1.0), modes=("full",))
    assert grid["gamma=1"]["full"] < grid["gamma=0"]["full"] and gamma == 0.0


def test_personalize_adds_the_fused_anchor_bias_and_vmap_agrees(opened_bank, with_anchor_bias):
    from pmeta.bank.bank import adapt_vmap
    from pmeta.eval.neural import support_input

    model, source = with_anchor_bias, opened_bank.model
    users = [support_input(model, [10, 20, 30], None), support_input(model, [5], None)]
    personal, batch, details = model.personalize(users, steps=0)
    plain_personal, plain_batch, _ = source.personalize(users, steps=0)
    for row in range(2):
        expected = sum(w * model.t.anchor_bias[a] for a, w in zip(details["anchors"][row], details["weights"][row]))
        torch.testing.assert_close(_minus(batch.prior, plain_batch.prior)[row], expected, atol=1e-5, rtol=1e-5)
    scores = model.final_scores(batch, personal) - source.final_scores(plain_batch, plain_personal)
    finite = torch.isfinite(scores)
    torch.testing.assert_close(scores[finite], _minus(batch.prior, plain_batch.prior)[finite], atol=1e-4, rtol=1e-4)
    looped, batch, _ = model.personalize(users)
    mapped, batch_vmap, _ = model.personalize(users, adapt_fn=adapt_vmap)
    a, b = model.final_scores(batch, looped), model.final_scores(batch_vmap, mapped)
    torch.testing.assert_close(a[torch.isfinite(a)], b[torch.isfinite(b)], atol=1e-4, rtol=1e-4)


def _minus(a, b):
    return a - (b if b is not None else 0.0)


def test_a_user_without_a_key_gets_the_anchors_weighted_by_their_users(opened_bank, with_anchor_bias):
    from pmeta.bank.model import UserInput

    model = with_anchor_bias
    _, batch, details = model.personalize([UserInput()])
    _, plain, _ = opened_bank.model.personalize([UserInput()])
    sizes = model.t.anchor_sizes / model.t.anchor_sizes.sum()
    assert details["has_key"] == [False]
    torch.testing.assert_close(_minus(batch.prior, plain.prior)[0], sizes @ model.t.anchor_bias)


def test_prompt_maml_and_per_user_lora_do_not_see_the_anchor_bias(opened_bank, with_anchor_bias):
    """The baselines that share the bank's head score the same with and without the anchors' item
    bias; pmeta's scores change."""
    from pmeta.eval.neural import PmetaMAML
    from pmeta.eval.oppu import PerUserLoRA
    from pmeta.eval.prompt_maml import PromptMAML

    support = np.array([10, 20, 30])
    for make in (lambda m: PromptMAML(m, inner_steps=1), lambda m: PerUserLoRA(m, steps=2, layers="bank")):
        np.testing.assert_array_equal(make(with_anchor_bias).score(support, 3), make(opened_bank.model).score(support, 3))
    assert not np.allclose(PmetaMAML(with_anchor_bias).score(support, 3), PmetaMAML(opened_bank.model).score(support, 3))


def test_collaborative_keys_come_from_item_rows_and_free_texts_are_projected(opened_bank):
    from pmeta.bank.model import UserInput

    model = opened_bank.model
    assert model.t.item_keys is not None and model.t.key_projection is not None  # the tiny preset has a collaborative part
    assert model.t.item_keys.shape[1] == model.t.anchor_keys.shape[1] == model.t.key_projection.shape[1]
    keys = model.user_keys([UserInput(liked_items=[3, 7]), UserInput(free_texts=["a heist film"])])
    expected = model.t.item_keys[[3, 7]].mean(0)
    np.testing.assert_allclose(keys[0], (expected / expected.norm()).numpy(), rtol=1e-5, atol=1e-6)
    projected = model.encoder.sentence_embeddings(["a heist film"]) @ model.t.key_projection
    np.testing.assert_allclose(keys[1], (projected[0] / projected[0].norm()).numpy(), rtol=1e-4, atol=1e-5)


def test_a_key_encodes_only_the_free_texts_the_user_tower_can_read(opened_bank, monkeypatch):
    """A history of thousands of free texts costs what its last ``max_history_items`` cost."""
    from pmeta.bank.model import UserInput

    model = opened_bank.model
    limit = model.config.max_history_items
    texts = [f"film number {n}" for n in range(limit + 25)]
    encoded = []
    real = model.encoder.sentence_embeddings
    monkeypatch.setattr(model.encoder, "sentence_embeddings", lambda batch: encoded.append(len(batch)) or real(batch))
    keys = model.user_keys([UserInput(liked_items=[3], free_texts=texts), UserInput(liked_items=[3], free_texts=texts[-limit:])])
    assert encoded == [limit, limit]
    np.testing.assert_array_equal(keys[0], keys[1])


def test_the_optional_tensors_round_trip_and_old_banks_lack_them(opened_bank):
    t = replace(opened_bank.model.t, anchor_bias=torch.ones(opened_bank.model.t.anchor_keys.shape[0], 3))
    flat = t.to_flat()
    back = Tensors.from_flat(flat)
    assert torch.equal(back.anchor_bias, t.anchor_bias) and torch.equal(back.item_keys, t.item_keys)
    old = {k: v for k, v in flat.items() if k not in ("item_keys", "key_projection", "anchor_bias")}
    legacy = Tensors.from_flat(old)
    assert legacy.item_keys is None and legacy.anchor_bias is None


def test_meta_training_stages_score_through_the_anchor_bias(with_anchor_bias, opened_bank):
    """The anchor stage adds each user's own anchor's bias, the stack stage the retrieved anchors'
    fused one (as serving does), so their outer losses differ from the bank's without it."""
    from pmeta.adapt.strategies import get_strategy
    from pmeta.bank.episodes import EpisodeSampler
    from pmeta.bank.meta_train import anchor_stage, outer_step, stack_stage
    from pmeta.data import load_sample
    from pmeta.eval.protocol import split_users

    dataset = load_sample()
    train, _ = split_users(dataset)
    model, config = with_anchor_bias, with_anchor_bias.config
    sampler = EpisodeSampler(dataset.positives_by_user(), dataset.rated_by_user(), train, model.item_texts, config, seed=3, times=dataset.positive_times_by_user())
    episode = sampler.sample(4)
    assignment = {u: n % int(model.t.anchor_keys.shape[0]) for n, u in enumerate(episode.users)}
    own = anchor_stage(model, config, assignment)
    rows = own.build(model, episode)[3]
    torch.testing.assert_close(rows, model.t.anchor_bias[[assignment[u] for u in episode.users]])
    stack = stack_stage(model, config)
    keys = model.user_keys(episode.support)
    torch.testing.assert_close(stack.build(model, episode)[3], model.anchor_offset(keys, *model.retrieve(keys)))
    strategy = get_strategy("fomaml")
    with_bias = float(outer_step(model, stack, strategy, episode, 0))
    plain = float(outer_step(opened_bank.model, stack_stage(opened_bank.model, config), strategy, episode, 0))
    assert with_bias != pytest.approx(plain)


def test_the_share_per_size_takes_the_history_sizes_entry_clamped_at_both_ends():
    from pmeta.tasks.time_prior import weight_of

    scale = torch.tensor([0.5, 0.75, 1.0])
    torch.testing.assert_close(weight_of(scale, [0, 1, 2, 3, 9]), torch.tensor([0.5, 0.5, 0.75, 1.0, 1.0]))


def test_serving_scales_the_fused_bias_by_history_size_and_training_does_not(opened_bank, with_anchor_bias, with_size_scale):
    """Histories of 1, 2 and 3+ liked items get 0.5, 0.75 and 1 times the fused offset that a bank
    without the scale adds (the same anchors and weights); meta-training's stack stage, which passes
    no sizes, adds the whole offset; the round trip through the bank's flat tensors keeps the scale."""
    from pmeta.eval.neural import support_input

    model, plain = with_size_scale, opened_bank.model
    supports = [[10], [10, 20], [10, 20, 30], [10, 20, 30, 40, 50]]
    users = [support_input(model, s, None) for s in supports]
    _, batch, details = model.personalize(users, steps=0)
    _, unscaled, unscaled_details = with_anchor_bias.personalize(users, steps=0)
    _, base, _ = plain.personalize(users, steps=0)
    assert details["anchors"] == unscaled_details["anchors"]
    for row, factor in enumerate([0.5, 0.75, 1.0, 1.0]):
        torch.testing.assert_close(_minus(batch.prior, base.prior)[row], factor * _minus(unscaled.prior, base.prior)[row], atol=1e-5, rtol=1e-5)
    keys = model.user_keys(users)
    sims, idx = model.retrieve(keys)
    torch.testing.assert_close(model.anchor_offset(keys, sims, idx), with_anchor_bias.anchor_offset(keys, sims, idx))
    back = Tensors.from_flat(model.t.to_flat())
    torch.testing.assert_close(back.head["anchor_bias_scale"], torch.tensor([0.5, 0.75, 1.0]))


def test_the_scale_is_stored_only_when_it_is_not_one_throughout():
    from pmeta import load_config
    from pmeta.bank.build import anchor_bias_scale_entry
    from pmeta.errors import InvalidConfig

    torch.testing.assert_close(anchor_bias_scale_entry(load_config("tiny"))["anchor_bias_scale"], torch.tensor([0.5, 0.75, 1.0]))
    assert anchor_bias_scale_entry(load_config("tiny", overrides={"anchor_bias_size_scale": [1.0, 1.0]})) == {}
    with pytest.raises(InvalidConfig, match="anchor_bias_size_scale"):
        load_config("tiny", overrides={"anchor_bias_size_scale": [-0.5]})

"""The variants of benchmarks/anchor_bias_variants.py behind docs/movielens.md's "tried on validation
users, not adopted" numbers: the closed-form collaborative step is the gradient step it claims to
be, the cross-fitted learned step never scores a user with a W fitted on that user, the anchors'
onboarding intercept counts exactly positives 6..15, the cluster-local co-occurrence ratio counts
what the cluster's users who share the support liked, the per-user γ's leave-one-out likelihood is the
brute-force sum, and benchmarks/onboarding_cv.py's nonlinear kernel ridge reduces to the shipped
linear regression at kernel weight 0 (and reads any release, its full-rank rows the exact ones), benchmarks/seeds.py pools seeds' runs with a bootstrap
stratified by seed and a Student-t interval over the seeds (and adjusts a --primary family of
comparisons named in advance on its own), and benchmarks/merge_reports.py merges
only parts of one run."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def variants(benchmark_script):
    return benchmark_script("anchor_bias_variants")


def support_loss(c: torch.Tensor, bias: torch.Tensor, factors: torch.Tensor, support: list[int]) -> torch.Tensor:
    """Softmax cross-entropy of the support items, the support excluded from the normaliser."""
    scores = bias + c @ factors.T
    excluded = torch.zeros(len(scores), dtype=torch.bool)
    excluded[support] = True
    return torch.logsumexp(scores.masked_fill(excluded, float("-inf")), 0) - scores[support].mean()


def test_variants_read_the_build_of_the_seed_and_layout_asked_for(variants):
    args, config = variants.parse(["--data", "ml-1m", "--format", "ml-1m", "--seed", "8"])
    assert (config.seed, args.format, args.data) == (8, "ml-1m", Path("ml-1m"))
    args, config = variants.parse([])
    assert (config.seed, args.format, args.data) == (0, "auto", None)
    with pytest.raises(SystemExit):
        variants.parse(["--preset", "no-such-preset"])


def test_anchor_count_rows_keep_each_counts_best_gamma_on_the_offsets_its_anchors_serve(variants):
    from pmeta.fusion import anchor_bias

    rng = np.random.default_rng(0)
    n_items, r = 30, 4
    queries = rng.normal(size=(6, r))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    made = {}

    def inputs_for(count):
        centroids = rng.normal(size=(count, r))
        made[count] = argparse.Namespace(centroids=centroids / np.linalg.norm(centroids, axis=1, keepdims=True), ratio=rng.normal(size=(count, n_items)), sizes=rng.integers(1, 9, count).astype(float))
        return made[count]

    wanted = {2: 1.0, 5: 0.5, 7: 99.0}  # the γ each count's scorer prefers (7: past the grid, so its largest γ)
    seen = []

    def score(offsets, weight):
        count = next(c for c, inputs in made.items() if np.array_equal(offsets, anchor_bias.offsets(queries, inputs.centroids, inputs.ratio, inputs.sizes, 2, 0.1)))
        seen.append(count)
        return {"mean": -abs(weight(1) - wanted[count]), "cells": {}}

    rows = variants.anchor_count_rows((2, 5, 7), inputs_for, queries, score, 2, 0.1)
    assert [name for name, _ in rows] == ["anchors=2 gamma=1", "anchors=5 gamma=0.5", f"anchors=7 gamma={max(anchor_bias.WEIGHTS):g}"]
    assert rows[0][1]["mean"] == 0.0 and seen == [2] * len(anchor_bias.WEIGHTS) + [5] * len(anchor_bias.WEIGHTS) + [7] * len(anchor_bias.WEIGHTS)
    flat = variants.anchor_count_rows((3,), inputs_for, queries, lambda offsets, weight: {"mean": 0.5, "cells": {}}, 2, 0.1)
    assert flat[0][0] == "anchors=3 gamma=0"  # a tie goes to the smaller γ, as the build's choice does
    assert variants.counts_list("4,8,16") == (4, 8, 16)
    args, _ = variants.parse(["--anchors", "8,32"])
    assert args.anchors == (8, 32)
    for bad in ("8,x", "0,16", ""):
        with pytest.raises(SystemExit):
            variants.parse(["--anchors", bad])


def test_collaborative_steps_are_gradient_steps_on_the_user_vector(variants):
    generator = torch.Generator().manual_seed(0)
    n, r, support, alpha = 40, 5, [3, 17, 21], 0.7
    factors = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))[0]
    bias = torch.randn(n, generator=generator, dtype=torch.float64)
    c = torch.randn(r, generator=generator, dtype=torch.float64)
    expected_c = c.clone()
    for _ in range(2):
        leaf = expected_c.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(support_loss(leaf, bias, factors, support), [leaf])
        expected_c = expected_c - alpha * grad
    scores = (bias + c @ factors.T).numpy()
    got = variants.collaborative_steps(scores, np.array(support), factors.numpy(), alpha, steps=2)
    np.testing.assert_allclose(got, (bias + expected_c @ factors.T).numpy(), atol=1e-10)
    assert not np.allclose(got, scores)


def test_learned_step_is_cross_fitted_by_user(variants):
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(6), 2)
    n, r = 30, 4
    scores = rng.normal(size=(len(users), n))
    factors = np.linalg.qr(rng.normal(size=(n, r)))[0]
    supports = [rng.choice(n, 2, replace=False) for _ in users]
    queries = [rng.choice(n, 3, replace=False) for _ in users]
    out = variants.learned_step(scores, supports, queries, users, factors, diagonal=True, ridge=1e-3)
    assert out.shape == scores.shape and np.isfinite(out).all()
    assert not np.allclose(out, scores)
    # a user's scores come from a W fitted on the other half only: changing user 0's queries leaves
    # user 0's own scores unchanged and changes those of the users scored by the W it was fitted into
    scrambled = list(queries)
    scrambled[0] = np.setdiff1d(np.arange(n), queries[0])[:3]
    scrambled[1] = np.setdiff1d(np.arange(n), queries[1])[:3]
    again = variants.learned_step(scores, supports, scrambled, users, factors, diagonal=True, ridge=1e-3)
    np.testing.assert_allclose(again[users == 0], out[users == 0], atol=1e-9)
    assert not np.allclose(again[users != 0], out[users != 0])


def test_intercepts_are_the_anchors_next_items_share_minus_everyones(variants):
    # users 0, 1 in anchor 0, user 2 in anchor 1, user 3 (5 positives: no window) in anchor 2;
    # user 0's positives 16 and 17 (items 4, 5) are past the window and count nowhere
    positives = [np.array([9, 9, 9, 9, 9, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 4, 5]), np.array([9, 8, 7, 6, 5, 0, 2]), np.array([0, 1, 2, 3, 4, 3]), np.array([0, 1, 2, 3, 4])]
    out = variants.intercepts(positives, np.array([0, 0, 1, 2]), anchors=4, n_items=10)
    assert out.shape == (4, 10)
    everyone = np.array([2, 1, 1, 1, 0, 0, 0, 0, 0, 0]) / 3  # a repeated item counts once per user
    np.testing.assert_allclose(out[0], np.array([2, 1, 1, 0, 0, 0, 0, 0, 0, 0]) / 2 - everyone, atol=1e-12)
    np.testing.assert_allclose(out[1], np.array([0, 0, 0, 1, 0, 0, 0, 0, 0, 0]) - everyone, atol=1e-12)
    assert not out[2].any() and not out[3].any()  # no user with a window: no evidence
    np.testing.assert_allclose(out[:2].T @ np.array([2, 1]) / 3, 0, atol=1e-12)  # the user-weighted mean is the global share


def test_time_local_ratio_is_the_shipped_ratio_at_infinite_bandwidth_and_follows_time_otherwise(variants):
    from pmeta.fusion import anchor_bias
    from pmeta.tasks.time_prior import DAY

    # anchor 0: users 0, 1; anchor 1: user 2; anchor 2 has no user
    positives = [np.array([0, 1, 2]), np.array([1, 3]), np.array([4, 0, 5])]
    times = [np.array([0.0, 1.0, 2.0]) * 1000 * DAY, np.array([1.0, 3.0]) * 1000 * DAY, np.array([0.0, 0.0, 3.0]) * 1000 * DAY]
    assignment = np.array([0, 0, 1])
    items, at, anchor_of = np.concatenate(positives), np.concatenate(times), np.repeat(assignment, [3, 2, 3])
    shipped = anchor_bias.log_ratio(positives, assignment, 3, 7)
    np.testing.assert_allclose(variants.time_local_ratio(items, at, anchor_of, 3, 7, 123.0, float("inf")), shipped, atol=1e-6)
    # a narrow kernel at t = 3000 days keeps the events of that day only: items 3 (anchor 0) and 5 (anchor 1)
    local = variants.time_local_ratio(items, at, anchor_of, 3, 7, 3000 * DAY, 10.0)
    overall = np.array([0, 0, 0, 0.5, 0, 0.5, 0])
    expected = np.log(0.9 * np.array([[0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1, 0], overall]) + 0.1 * overall + anchor_bias.EPSILON) - np.log(overall + anchor_bias.EPSILON)
    np.testing.assert_allclose(local, expected, atol=1e-6)
    assert not local[2].any()  # an anchor without users is the global distribution: offset 0


def test_smoothed_ratio_is_the_shipped_ratio_by_default_and_shrinks_small_anchors_more(variants):
    from pmeta.fusion import anchor_bias

    # anchor 0: users 0, 1 (5 ratings); anchor 1: user 2 (3 ratings); anchor 2 has no user
    positives = [np.array([0, 1, 2]), np.array([1, 3]), np.array([4, 0, 5])]
    assignment = np.array([0, 0, 1])
    shipped = anchor_bias.log_ratio(positives, assignment, 3, 7)
    np.testing.assert_allclose(variants.smoothed_ratio(positives, assignment, 3, 7), shipped, atol=1e-6)
    overall = np.array([2, 2, 1, 1, 1, 1, 0]) / 8.0
    counts = np.array([[1, 2, 1, 1, 0, 0, 0], [1, 0, 0, 0, 1, 1, 0], [0] * 7], dtype=float)
    # a Dirichlet prior of m = 3 pseudo-ratings, then the shipped mix
    q = np.vstack([(counts[:2] + 3 * overall) / (counts[:2].sum(1, keepdims=True) + 3), overall])
    expected = np.log(0.9 * q + 0.1 * overall + anchor_bias.EPSILON) - np.log(overall + anchor_bias.EPSILON)
    np.testing.assert_allclose(variants.smoothed_ratio(positives, assignment, 3, 7, pseudo=3.0), expected, atol=1e-9)
    # the same pseudo-counts pull the anchor with fewer ratings further towards the global distribution
    assert expected[1, 4] / shipped[1, 4] < expected[0, 3] / shipped[0, 3] < 1.0
    mixed = variants.smoothed_ratio(positives, assignment, 3, 7, mix=0.5)
    np.testing.assert_allclose(mixed[:2], np.log(0.5 * counts[:2] / counts[:2].sum(1, keepdims=True) + 0.5 * overall + anchor_bias.EPSILON) - np.log(overall + anchor_bias.EPSILON), atol=1e-9)
    clipped = variants.smoothed_ratio(positives, assignment, 3, 7, clip=0.5)
    np.testing.assert_allclose(clipped, np.clip(shipped, -0.5, 0.5), atol=1e-6)
    assert np.abs(shipped).max() > 0.5 and not mixed[2].any() and not clipped[2].any()  # an empty anchor: offset 0


def test_cooccurrence_ratio_counts_what_cluster_users_sharing_the_support_liked(variants):
    from scipy import sparse

    from pmeta.fusion import anchor_bias

    # anchor 0: users 0, 1; anchor 1: user 2; anchor 2: user 3, who shares no support item
    positives = [[0, 1, 2], [1, 3], [0, 1, 4, 5], [6]]
    liked = np.zeros((4, 7))
    for u, items in enumerate(positives):
        liked[u, items] = 1.0
    assignment = np.array([0, 0, 1, 2])
    support = np.array([0, 1])  # overlaps: user 0 shares 2, user 1 shares 1, user 2 shares 2, user 3 none
    counts = np.array([2 * liked[0] + liked[1], 2 * liked[2], np.zeros(7)])
    overall = counts.sum(0) / counts.sum()
    for m in (0.0, 4.0):
        q = np.vstack([(counts[:2] + m * overall) / (counts[:2].sum(1, keepdims=True) + m), overall])
        expected = np.log(0.9 * q + 0.1 * overall + anchor_bias.EPSILON) - np.log(overall + anchor_bias.EPSILON)
        for matrix in (liked, sparse.csr_matrix(liked)):
            np.testing.assert_allclose(variants.cooccurrence_ratio(support, matrix, assignment, 3, m), expected, atol=1e-9)
    ratio = variants.cooccurrence_ratio(support, liked, assignment, 3, 0.0)
    assert not ratio[2].any()  # no user of anchor 2 shares a support item: offset 0
    assert ratio[0, 3] > 0 > ratio[1, 3] and ratio[1, 4] > 0 > ratio[0, 4]  # each cluster's own co-liked items
    assert ratio[0, 6] == ratio[1, 6] == 0.0  # an item no co-rater liked stays at 0
    # every user in one anchor: local = global, offset 0; a support nobody liked: 0 everywhere
    np.testing.assert_allclose(variants.cooccurrence_ratio(support, liked, np.zeros(4, dtype=int), 1, 0.0), 0.0, atol=1e-12)
    assert not variants.cooccurrence_ratio(np.array([2]), liked[1:], assignment[1:], 3, 0.0).any()


def test_loo_log_likelihood_scores_each_support_item_from_the_others(variants):
    n = 5
    base = np.array([0.0, 0.5, -1.0, 2.0, 0.3])
    # The offset lifts item 2 only when item 0 is in the rest (it is "item 0's cluster").
    offsets = {(0, 1): np.array([0.0, 0.0, 2.0, 0.0, 0.0]), (0, 2): np.zeros(n), (1, 2): np.zeros(n)}

    def scores(rest, t):
        assert t == 7.0
        return base.copy()

    def offset_of(rest):
        return offsets[tuple(sorted(int(i) for i in rest))]

    support = np.array([0, 1, 2])
    got = variants.loo_log_likelihood(support, 7.0, scores, offset_of, [0.0, 1.0])

    def brute(gamma):  # item j by a softmax over the catalogue minus the other support items
        total = 0.0
        for j in range(3):
            rest = [i for i in range(3) if i != j]
            logits = base + gamma * offsets[tuple(rest)]
            kept = [i for i in range(n) if i not in rest]
            total += logits[j] - np.log(np.exp(logits[kept]).sum())
        return total

    np.testing.assert_allclose(got, [brute(0.0), brute(1.0)], rtol=1e-12)
    assert got[1] > got[0]  # the offset that predicts the held-out item raises its likelihood
    assert variants.loo_log_likelihood(np.array([3]), 7.0, scores, offset_of, [0.0, 1.0]).tolist() == [0.0, 0.0]  # K = 1: nothing to leave out


def test_kernel_ridge_is_the_onboarding_regression_at_weight_zero_and_adds_the_rbf_otherwise(benchmark_script):
    from pmeta.bank import onboarding

    cv = benchmark_script("onboarding_cv")
    rng = np.random.default_rng(0)
    episodes, n, lam = 12, 30, 3.0
    x = np.zeros((episodes, n), np.float32)
    for row in x:
        support = rng.choice(n, rng.integers(1, 4), replace=False)
        row[support] = 1.0 / len(support)
    y = (rng.random((episodes, n)) < 0.2).astype(np.float32)
    factors = rng.normal(size=(n, 6))
    new = x[:3] * 0.5 + x[3:6] * 0.5
    x_unit, new_unit = cv.unit_embedding(x, factors), cv.unit_embedding(new, factors)
    # weight 0: the dual kernel ridge predicts exactly what onboarding.ridge's W does
    alpha, mean = onboarding.dual_ridge(cv.episode_kernel(x, x_unit, x, x_unit, 0.1, 0.0), y, lam)
    w, ridge_mean = onboarding.ridge(x, y, lam)
    np.testing.assert_allclose(mean + cv.episode_kernel(new, new_unit, x, x_unit, 0.1, 0.0) @ alpha, ridge_mean + new @ w, atol=1e-4)
    # ... and onboarding.ridge's primal branch (more episodes than items) is the same regression
    tall = np.concatenate([x, x[::-1] * 0.5, x[:8]])
    tall_y = np.concatenate([y, y[::-1], y[:8]])
    tall_alpha, tall_mean = onboarding.dual_ridge(tall @ tall.T, tall_y, lam)
    tall_w, _ = onboarding.ridge(tall, tall_y, lam)
    np.testing.assert_allclose(new @ tall.T @ tall_alpha, new @ tall_w, atol=1e-4)
    # weight c: linear + c·exp((cos − 1)/bw); an episode against itself adds exactly c
    kernel = cv.episode_kernel(x, x_unit, x, x_unit, 0.1, 2.0)
    np.testing.assert_allclose(np.diag(kernel), np.diag(x @ x.T) + 2.0, atol=1e-6)
    embedded = x @ factors
    cosine = embedded @ embedded.T / np.outer(np.linalg.norm(embedded, axis=1), np.linalg.norm(embedded, axis=1))
    np.testing.assert_allclose(kernel, x @ x.T + 2.0 * np.exp((cosine - 1.0) / 0.1), atol=1e-5)


def _write_run(path: Path, seed: int, users: list[int], values: dict[str, list[float]]) -> Path:
    """A `seeds.py run` output holding one cell (K = 1, full) per method, with HR@10 = nDCG@10 = values."""
    path.mkdir()
    cells = [{"method": m, "k": 1, "mode": "full", "user": users, "hr@10": v, "ndcg@10": v, "mrr": v} for m, v in values.items()]
    (path / "per_user.json").write_text(__import__("json").dumps({"seed": seed, "fingerprint": "f", "bank": "b", "cells": cells}))
    return path


def test_seeds_pool_concatenates_runs_and_resamples_users_within_their_seed(benchmark_script, tmp_path):
    seeds = benchmark_script("seeds")
    # pmeta is 1 above prompt-maml on every user of seed 0 and level on seed 1; ease is the only classical.
    first = _write_run(tmp_path / "s0", 0, [3, 5], {"pmeta": [1.0, 1.0], "prompt-maml": [0.0, 0.0], "ease": [0.0, 1.0]})
    second = _write_run(tmp_path / "s1", 1, [5, 8, 9], {"pmeta": [0.0, 1.0, 0.0], "prompt-maml": [0.0, 1.0, 0.0], "ease": [1.0, 1.0, 1.0]})
    pooled = seeds.pooled_cells(seeds.load_runs([first, second]))
    assert pooled["pmeta"][(1, "full")]["user"].tolist() == [3, 5, 5, 8, 9] and pooled["pmeta"][(1, "full")]["seed"].tolist() == [0, 0, 1, 1, 1]
    rows = {(c["versus"], c["metric"]): c for c in seeds.compare(pooled, resamples=500)}
    maml = rows[("prompt-maml", "hr@10")]
    assert maml["difference"] == pytest.approx(2 / 5) and maml["per_seed"] == {0: 1.0, 1: 0.0}
    # Constant differences within each seed: a bootstrap stratified by seed cannot move the mean.
    assert maml["ci95"] == pytest.approx([0.4, 0.4])
    assert rows[("ease", "hr@10")]["difference"] == pytest.approx((1 + 0 - 1 + 0 - 1) / 5)
    text = seeds.pool([first, second], resamples=500)
    assert "5 test cases, 4 distinct users" in text and "| pmeta | 0.600 / 0.600 |" in text
    # The goals table: pmeta relative to the best classical (ease here) per seed, then pooled.
    assert "| full K = 1: pmeta over the best classical, HR@10 / nDCG@10 | +100.0% / +100.0% | -66.7% / -66.7% | -25.0% / -25.0% |" in text
    # Every resample is on the winning side: p = 2 / 501, Holm over the pair's 2 metrics 4 / 501: marked.
    assert maml["p_value"] == pytest.approx(2 / 501) and maml["p_holm"] == pytest.approx(4 / 501)
    assert "| prompt-maml | full | **+0.400 [+0.400, +0.400]** † |" in text and "†: the margin holds after Holm's adjustment" in text
    with pytest.raises(SystemExit, match="different seed"):
        seeds.load_runs([first, first])
    fewer = _write_run(tmp_path / "s2", 2, [1], {"pmeta": [1.0]})
    with pytest.raises(SystemExit, match="different methods"):
        seeds.load_runs([first, fewer])
    # --methods: a run that left a method out (for time) pools with the others over the methods they share.
    lacking = _write_run(tmp_path / "s3", 3, [6], {"pmeta": [1.0], "ease": [0.0]})
    with pytest.raises(SystemExit, match="different methods"):
        seeds.load_runs([first, lacking])
    text = seeds.pool([first, lacking], resamples=100, methods=["pmeta", "ease"])
    assert "Only pmeta, ease (`--methods`); left out: prompt-maml." in text and "| prompt-maml |" not in text
    assert "| pmeta | 1.000 / 1.000 |" in text and "| ease | 0.333 / 0.333 |" in text
    assert "| full K = 1: pmeta over the best classical, HR@10 / nDCG@10 | +100.0% / +100.0% | — / — | +200.0% / +200.0% |" in text
    with_pop = _write_run(tmp_path / "s4", 4, [6], {"pmeta": [1.0], "ease": [0.0], "popularity": [1.0]})
    partial = tmp_path / "s5"
    partial.mkdir()
    (partial / "per_user.json").write_text(json.dumps({"seed": 5, "fingerprint": "f", "bank": "b", "cells": [
        {"method": m, "k": k, "mode": "full", "user": [6], "hr@10": [1.0], "ndcg@10": [1.0], "mrr": [1.0]} for m, k in (("pmeta", 1), ("ease", 1), ("ease", 3))]}))  # fmt: skip
    for runs, methods, message in [
        ([first, lacking], ["pmeta", "prompt-maml"], "s3 holds no prompt-maml cells"),
        ([first, lacking], [], "names no method"),
        ([first, lacking], ["pmeta", "ease", "pmeta"], "names a method twice"),
        # leaving out a classical baseline every run holds would change the "best classical" reference
        ([first, lacking], ["pmeta"], "leaves out ease, which every run holds"),
        ([first, partial], ["pmeta", "ease"], "hold pmeta, ease in different K or modes"),
    ]:
        with pytest.raises(SystemExit, match=message):
            seeds.load_runs(runs, methods)
    # popularity is in one run only: it may be left out (the runs could not be pooled with it anyway)
    assert "left out: prompt-maml, popularity." in seeds.pool([first, with_pop], resamples=50, methods=["pmeta", "ease"])
    with pytest.raises(SystemExit, match="--methods must keep per-user-lora"):
        seeds.pool([first, lacking], resamples=50, primary=[("full", 1, "hr@10")], methods=["pmeta", "ease", "prompt-maml"])
    # runs without any classical baseline: the goals table shows "—" rather than failing
    only_rivals = [_write_run(tmp_path / f"r{s}", s, [1, 2], {"pmeta": [1.0, 0.0], "prompt-maml": [0.0, 0.0]}) for s in (7, 8)]
    assert "| full K = 1: pmeta over the best classical, HR@10 / nDCG@10 | — / — | — / — | — / — |" in seeds.pool(only_rivals, resamples=50)


def test_seeds_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`seeds.py pool … | head -1`: the reader closes first; no traceback, exit code 1."""
    import subprocess
    import sys

    runs = [_write_run(tmp_path / f"s{seed}", seed, [1, 2], {"pmeta": [1.0, 0.0], "ease": [0.0, 0.0]}) for seed in (0, 1)]
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "seeds.py"
    read, write = os.pipe()
    os.close(read)  # nobody will read: the first write fails with EPIPE
    done = subprocess.run([sys.executable, str(script), "pool", *map(str, runs), "--resamples", "20"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(write)
    assert done.returncode == 1 and "Traceback" not in done.stderr and done.stderr.strip() == ""


def test_seeds_pool_adds_a_t_interval_over_the_seeds_from_three_seeds_on(benchmark_script, tmp_path):
    seeds = benchmark_script("seeds")
    t_975_2 = 4.302652729911275  # Student-t quantile 0.975 on 2 degrees of freedom

    def p_two_sided(t: float) -> float:  # Student-t on 2 degrees of freedom, in closed form
        return 1.0 - t / (2.0 + t * t) ** 0.5

    # Four users per seed, two cells. pmeta minus prompt-maml per seed: K = 1: 1.0, 0.5, 0.0;
    # K = 3: 1.0, 1.0, 0.75. pmeta minus ease: K = 1: 1.0, 0.5, 0.5; K = 3: 1.0 on every seed.
    values = {
        0: {1: {"pmeta": [1, 1, 1, 1], "prompt-maml": [0, 0, 0, 0], "ease": [0, 0, 0, 0]}, 3: {"pmeta": [1, 1, 1, 1], "prompt-maml": [0, 0, 0, 0], "ease": [0, 0, 0, 0]}},
        1: {1: {"pmeta": [1, 1, 0, 0], "prompt-maml": [0, 0, 0, 0], "ease": [0, 0, 0, 0]}, 3: {"pmeta": [1, 1, 1, 1], "prompt-maml": [0, 0, 0, 0], "ease": [0, 0, 0, 0]}},
        2: {1: {"pmeta": [1, 1, 0, 0], "prompt-maml": [1, 1, 0, 0], "ease": [0, 0, 0, 0]}, 3: {"pmeta": [1, 1, 1, 1], "prompt-maml": [1, 0, 0, 0], "ease": [0, 0, 0, 0]}},
    }
    runs = []
    for seed, by_k in values.items():
        path = tmp_path / f"s{seed}"
        path.mkdir()
        cells = [{"method": m, "k": k, "mode": "full", "user": [1, 2, 3, 4], "hr@10": v, "ndcg@10": v, "mrr": v} for k, methods in by_k.items() for m, v in methods.items()]
        (path / "per_user.json").write_text(__import__("json").dumps({"seed": seed, "fingerprint": "f", "bank": "b", "cells": cells}))
        runs.append(path)
    rows = {(c["versus"], c["k"], c["metric"]): c for c in seeds.compare(seeds.pooled_cells(seeds.load_runs(runs)), resamples=200)}

    maml = rows[("prompt-maml", 1, "hr@10")]["across_seeds"]
    assert rows[("prompt-maml", 1, "hr@10")]["per_seed"] == {0: 1.0, 1: 0.5, 2: 0.0}
    half_width = t_975_2 * 0.5 / 3**0.5  # sample sd 0.5, over sqrt(n)
    assert maml["mean"] == pytest.approx(0.5) and maml["ci95"] == pytest.approx([0.5 - half_width, 0.5 + half_width])
    assert maml["p_value"] == pytest.approx(p_two_sided(3**0.5)) and maml["seeds"] == 3
    strong = rows[("prompt-maml", 3, "hr@10")]["across_seeds"]  # 1, 1, 0.75: t = 11
    assert strong["p_value"] == pytest.approx(p_two_sided(11.0))
    # Holm over the (pmeta, prompt-maml) family: 2 cells x 2 metrics = 4 p-values.
    assert strong["p_holm"] == pytest.approx(4 * p_two_sided(11.0)) and strong["p_holm"] < 0.05
    assert maml["p_holm"] == pytest.approx(2 * p_two_sided(3**0.5))
    # The (pmeta, best classical) family is separate, and a cell without spread has no interval
    # and no p-value, so that family counts 2 p-values: a family per method would count 6.
    ease, flat = rows[("ease", 1, "hr@10")]["across_seeds"], rows[("ease", 3, "hr@10")]["across_seeds"]
    assert ease["p_value"] == pytest.approx(p_two_sided(4.0)) and ease["p_holm"] == pytest.approx(2 * p_two_sided(4.0))
    assert flat["mean"] == 1.0 and np.isnan(flat["p_value"]) and np.isnan(flat["p_holm"]) and all(np.isnan(flat["ci95"]))
    assert seeds.across_seeds([1.0, 0.0]) is None  # two seeds: no interval
    assert seeds.across_cell(None) == "—" and seeds.across_cell({"across_seeds": None}) == "—"

    text = seeds.pool(runs, resamples=200)
    assert "Third table: the mean of those 3 differences with a Student-t 95% CI on 2 degrees of freedom" in text
    low, high = (11 / 12 + sign * t_975_2 * (1 / 48) ** 0.5 / 3**0.5 for sign in (-1, 1))  # mean 11/12, sample variance 1/48
    strong_cell = f"**+0.917 [{seeds.signed(low)}, {seeds.signed(high)}]** †"
    assert f"| prompt-maml | full | +0.500 [{seeds.signed(0.5 - half_width)}, +1.742] | {strong_cell} |" in text
    assert "| best classical | full | +0.667 [" in text and "| +1.000 (no spread over the seeds) |" in text
    assert "| full K = 1: pmeta over the best classical, HR@10 / nDCG@10 | — / — | — / — | — / — | — / — |" in text  # ease is 0 everywhere
    assert "Across the" not in seeds.pool(runs[:2], resamples=200)


def test_merge_reports_orders_methods_and_refuses_parts_of_different_runs(benchmark_script):
    merge_reports = benchmark_script("merge_reports")

    def part(methods, **config):
        base = {"ks": [1], "modes": ["full"], "max_users": None, "test_fraction": 0.2, "methods": methods, "bank": {"version": "v1"}, "reptile_bank": {"version": "r1"}}
        return {"protocol": "coldstart-v1", "seed": 0, "dataset": {"fingerprint": "f"}, "config": {**base, **config},
                "results": [{"method": m, "k": 1, "mode": "full"} for m in methods]}  # fmt: skip

    merged = merge_reports.merge([part(["pmeta"]), part(["popularity", "ease"])])
    assert [r["method"] for r in merged["results"]] == ["popularity", "ease", "pmeta"] and merged["config"]["methods"] == ["popularity", "ease", "pmeta"]
    assert merge_reports.merge([part(["pmeta"]), part(["ease"], bank=None)])["config"]["methods"] == ["ease", "pmeta"]  # a part without a bank
    assert merge_reports.merge([part(["pmeta"]), part(["ease"], tuned={"ease": {"lambda": 30000.0}})])["config"]["tuned"] == {"ease": {"lambda": 30000.0}}  # kept from any part
    others = (part(["ease"], ks=[1, 3]), part(["ease"], modes=["pop99"]), part(["ease"], max_users=5), part(["ease"], test_fraction=0.1),
              part(["ease"], bank={"version": "v2"}), part(["ease"], reptile_bank={"version": "r2"}), part(["pmeta"]))  # fmt: skip
    for other in others:
        with pytest.raises(SystemExit, match="cannot merge"):
            merge_reports.merge([part(["pmeta"]), other])


def test_seeds_pool_primary_family_is_adjusted_alone_and_refuses_bad_cells(benchmark_script, tmp_path):
    seeds = benchmark_script("seeds")
    # Three seeds, one cell (full K = 1): pmeta beats prompt-maml on every user; per-user-lora is level.
    runs = [
        _write_run(tmp_path / f"s{s}", s, [1, 2, 3, 4], {"pmeta": [1.0, 1.0, 1.0, 0.0], "prompt-maml": [0.0, 0.0, 0.0, 0.0], "per-user-lora": [1.0, 1.0, 1.0, 0.0], "ease": [0.0, 0.0, 0.0, 0.0]})
        for s in (5, 6, 7)
    ]
    comparisons = seeds.compare(seeds.pooled_cells(seeds.load_runs(runs)), resamples=300)
    family = seeds.primary_family(comparisons, [("full", 1, "hr@10")])
    assert [row["versus"] for row in family] == ["prompt-maml", "per-user-lora"]
    maml, lora = family
    # Holm over these 2 comparisons only.
    assert maml["p_primary"] == pytest.approx(seeds.holm([maml["p_value"], lora["p_value"]])[0])
    assert maml["p_primary"] == pytest.approx(2 * maml["p_value"]) and maml["p_primary"] < 0.05  # the smaller of 2 p-values, times 2
    # The family is the named cells x 2 rivals, not the tables' (2 metrics per rival): naming both
    # metrics makes it 4 comparisons, so the adjustment differs from the tables' p_holm (2 p).
    both = seeds.primary_family(comparisons, [("full", 1, "hr@10"), ("full", 1, "ndcg@10")])
    assert len(both) == 4 and both[0]["p_primary"] == pytest.approx(4 * maml["p_value"]) and both[0]["p_holm"] == pytest.approx(2 * maml["p_value"])
    assert lora["difference"] == 0.0 and lora["p_primary"] == pytest.approx(1.0)
    # The seeds' differences do not vary here: no t interval, NaN p-value, no t verdict.
    assert np.isnan(maml["t_primary"]) and np.isnan(lora["t_primary"])
    text = seeds.pool(runs, resamples=300, primary=[("full", 1, "hr@10")])
    assert "## Primary comparisons (named with --primary before the runs were read)" in text
    low, high = maml["ci95"]
    assert f"| prompt-maml | full K = 1 hr@10 | +0.750 [{seeds.signed(low)}, {seeds.signed(high)}] | {maml['p_value']:.3f} | {maml['p_primary']:.3f} | **confirmed** | — | — | — |" in text
    assert "| per-user-lora | full K = 1 hr@10 | +0.000 [+0.000, +0.000] | 1.000 | 1.000 | not confirmed |" in text
    assert "Primary comparisons" not in seeds.pool(runs, resamples=300)

    assert seeds.parse_primary("full:5:ndcg@10, pop99:3:hr@10") == [("full", 5, "ndcg@10"), ("pop99", 3, "hr@10")]
    for bad, message in [("full:5", "not MODE:K:METRIC"), ("all:5:hr@10", "not MODE:K:METRIC"), ("full:0:hr@10", "not MODE:K:METRIC"),
                         ("full:x:hr@10", "not MODE:K:METRIC"), ("full:5:mrr", "not MODE:K:METRIC"), (",", "names no cell"),
                         ("full:5:hr@10,full:5:hr@10", "a cell twice")]:
        with pytest.raises(SystemExit, match=message):
            seeds.parse_primary(bad)
    with pytest.raises(SystemExit, match="no pmeta minus prompt-maml comparison at full K = 5"):
        seeds.primary_family(comparisons, [("full", 5, "hr@10")])

    # Differences that vary over the seeds (1, 0.75, 0.5 against prompt-maml; t = 0.75 / (0.25 / sqrt 3)):
    # the t-test's p-value, Holm over the family's finite p-values only (per-user-lora has no spread).
    varied = [
        _write_run(tmp_path / f"v{s}", s, [1, 2, 3, 4], {"pmeta": ours, "prompt-maml": [0.0] * 4, "per-user-lora": ours, "ease": [0.0] * 4})
        for s, ours in ((5, [1.0, 1.0, 1.0, 1.0]), (6, [1.0, 1.0, 1.0, 0.0]), (7, [1.0, 1.0, 0.0, 0.0]))
    ]
    maml, lora = seeds.primary_family(seeds.compare(seeds.pooled_cells(seeds.load_runs(varied)), resamples=300), [("full", 1, "hr@10")])
    t = 0.75 / (0.25 / 3**0.5)
    assert maml["t_primary"] == pytest.approx(1.0 - t / (2.0 + t * t) ** 0.5) and maml["t_primary"] < 0.05
    assert np.isnan(lora["t_primary"])
    text = seeds.pool(varied, resamples=300, primary=[("full", 1, "hr@10")])
    low, high = maml["across_seeds"]["ci95"]
    assert f"| **confirmed** | [{seeds.signed(low)}, {seeds.signed(high)}] | {maml['t_primary']:.3f} | **confirmed** |" in text


def _tiny_ml100k(directory, items: int, users: int, per_user: int) -> None:
    """A random ml-100k-shaped dataset: ``users`` users with ``per_user`` ratings each (3 to 5 stars)."""
    from pmeta.data.movielens import ML100K_GENRES

    rng = np.random.default_rng(3)
    flags = "|".join("0" for _ in ML100K_GENRES)
    (directory / "u.item").write_text("".join(f"{i}|Movie {i} (1995)||||{flags}\n" for i in range(1, items + 1)), encoding="latin-1")
    rows = []
    for user in range(1, users + 1):
        for t, item in enumerate(rng.permutation(items)[:per_user]):
            rows.append(f"{user}\t{item + 1}\t{int(rng.choice([3, 4, 5], p=[0.1, 0.45, 0.45]))}\t{880000000 + 3600 * t + user}\n")
    (directory / "u.data").write_text("".join(rows))


def test_onboarding_cv_reads_any_release_and_its_full_rank_rows_are_the_exact_ones(benchmark_script, tmp_path, capsys):
    """`onboarding_cv.py --data DIR --rank r1,r2`: one pair of rows per rank, an ItemKNN row, and at a
    rank that keeps every item (here: above their count, which the output says) the factorised rows equal
    the exact matrix's rows; a rank that is not a whole number >= 1 is refused."""
    cv = benchmark_script("onboarding_cv")
    items = 130
    _tiny_ml100k(tmp_path, items, users=60, per_user=14)

    cv.main(["--data", str(tmp_path), "--folds", "2", "--ease-lambda", "5", "--lam", "1", "--rank", f"2,{items}"])
    out = capsys.readouterr().out
    assert f"train users of {tmp_path.name} (ml-100k; " in out
    table = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ") and not line.startswith("| model")}
    kept = items
    assert f"Rank {items} is above the number of items with train positives in a fold" in out
    assert set(table) == {"EASE (λ=5)", "ItemKNN", "onboarding, exact, γ=1", "onboarding, exact, γ=0.5", "onboarding, rank 2, γ=1", "onboarding, rank 2, γ=0.5", f"onboarding, rank {kept}, γ=1", f"onboarding, rank {kept}, γ=0.5"}
    numbers = {name: np.array([float(v) for cell in cells for v in cell.split("/")]) for name, cells in table.items()}
    for exponent in ("1", "0.5"):  # equal up to the printed rounding and the float noise of the SVD
        np.testing.assert_allclose(numbers[f"onboarding, rank {kept}, γ={exponent}"], numbers[f"onboarding, exact, γ={exponent}"], atol=2e-3)
        assert np.abs(numbers[f"onboarding, rank 2, γ={exponent}"] - numbers[f"onboarding, exact, γ={exponent}"]).max() > 0.01
    for bad in ("0", "32,x", "-1"):
        with pytest.raises(SystemExit):
            cv.main(["--data", str(tmp_path), "--rank", bad])
    assert "expected whole numbers >= 1" in capsys.readouterr().err
    values = np.concatenate(list(numbers.values()))
    assert values.min() >= 0.0 and values.max() <= 1.0 and values.max() > 0.0


def test_later_episodes_slide_the_protocol_window_and_weight_zero_is_the_onboarding_regression(benchmark_script):
    """`onboarding_cv.py --later`: episodes start at stride, 2·stride, … (support s..s+K−1, query
    s+5..s+14, only while a query is left, never past --later-last); ω = 0 is onboarding.ridge's W,
    and ω > 0 is the ridge over both groups stacked, each centred on its own mean, weighted √ω."""
    from pmeta.bank import onboarding

    cv = benchmark_script("onboarding_cv")
    position = np.arange(40)
    history = np.arange(20)  # item i is the user's i-th positive
    x, y = cv.later_episodes([history], position, stride=3, last=100, sizes=(1, 2))
    # starts 3, 6, 9, 12 leave a query (s + 5 < 20); 15 does not
    starts = [3, 3, 6, 6, 9, 9, 12, 12]
    assert x.shape == (8, 40)
    for row, (start, k) in enumerate(zip(starts, [1, 2] * 4)):
        np.testing.assert_allclose(x[row].toarray().ravel(), np.isin(position, history[start : start + k]) / k)
        np.testing.assert_array_equal(y[row].toarray().ravel(), np.isin(position, history[start + 5 : start + 15]))
    assert cv.later_episodes([history], position, stride=3, last=6, sizes=(1,))[0].shape[0] == 2  # starts 3 and 6
    masked = position.copy()
    masked[[8, 9]] = -1  # items outside the kept columns drop out; an empty support drops its episode
    assert cv.later_episodes([history], masked, stride=8, last=8, sizes=(1, 2))[0].shape[0] == 0

    rng = np.random.default_rng(4)
    users = [rng.permutation(40)[:30] for _ in range(12)]
    x0, y0 = onboarding.episodes(users, position)
    later_x, later_y = cv.later_episodes(users, position, 2, 200)
    w, mean = onboarding.ridge(x0, y0, 3.0)
    w_zero, mean_zero = cv.later_ridge(x0, y0, later_x, later_y, 0.0, 3.0)
    np.testing.assert_allclose(w_zero, w, atol=1e-4)
    np.testing.assert_allclose(mean_zero, mean)
    dense_x, dense_y = later_x.toarray(), later_y.toarray()
    stacked_x = np.concatenate([x0, 0.5**0.5 * dense_x])
    stacked_y = np.concatenate([y0 - mean, 0.5**0.5 * (dense_y - dense_y.mean(0))])
    expected = np.linalg.solve(stacked_x.T @ stacked_x + 3.0 * np.eye(40), stacked_x.T @ stacked_y)
    w_half, _ = cv.later_ridge(x0, y0, later_x, later_y, 0.5, 3.0)
    np.testing.assert_allclose(w_half, expected, atol=1e-4)
    assert np.abs(w_half - w).max() > 1e-3

    assert cv.number_pairs("0.3:10,1:30") == [(0.3, 10.0), (1.0, 30.0)]
    for bad in ("0:10", "1", "1:x", "1:-3", "nan:1", "1:inf", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            cv.number_pairs(bad)


def test_onboarding_cv_main_prints_later_rows_that_a_vanishing_weight_turns_into_the_exact_rows(benchmark_script, tmp_path, capsys):
    """`onboarding_cv.py --later ω:λ` end to end: two rows per pair; at ω → 0 and the same λ they are
    the exact onboarding rows; a real weight (on histories long enough for later episodes) or another λ
    moves them."""
    cv = benchmark_script("onboarding_cv")
    _tiny_ml100k(tmp_path, items=200, users=80, per_user=30)
    cv.main(["--data", str(tmp_path), "--folds", "2", "--ease-lambda", "5", "--lam", "1", "--later", "1e-9:1,1e-9:30,1:1", "--later-stride", "3"])
    out = capsys.readouterr().out
    table = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ") and not line.startswith("| model")}
    numbers = {name: np.array([float(v) for cell in cells for v in cell.split("/")]) for name, cells in table.items()}
    for exponent in ("1", "0.5"):
        exact = numbers[f"onboarding, exact, γ={exponent}"]
        np.testing.assert_allclose(numbers[f"onboarding + later episodes (ω=1e-09, λ=1), γ={exponent}"], exact, atol=1e-3)
        assert np.abs(numbers[f"onboarding + later episodes (ω=1, λ=1), γ={exponent}"] - exact).max() > 0.005
        assert np.abs(numbers[f"onboarding + later episodes (ω=1e-09, λ=30), γ={exponent}"] - exact).max() > 0.005  # its own λ
    values = np.concatenate(list(numbers.values()))
    assert values.min() >= 0.0 and values.max() <= 1.0


def test_rp3beta_is_the_two_step_walk_and_vanishing_blends_are_the_exact_rows(benchmark_script, tmp_path, capsys):
    """`onboarding_cv.py --rp3beta β:c --pop-penalty d`: RP3beta is Σ_u P(u|i) P(j|u) / deg(j)^β with a
    zero diagonal (checked against a loop); at c → 0 and d = 0 the blended rows are the exact γ = 0.5
    rows (a positive rescaling ranks the same), and c = 1 or d = 1 moves them."""
    cv = benchmark_script("onboarding_cv")
    rng = np.random.default_rng(5)
    matrix = (rng.random((9, 7)) < 0.4).astype(np.float64)
    matrix[:, 6] = 0.0  # an item nobody rated
    expected = np.zeros((7, 7))
    for i in range(7):
        for j in range(7):
            if i != j:
                for u in range(9):
                    if matrix[u, i] and matrix[u, j]:
                        expected[i, j] += (1 / matrix[:, i].sum()) * (1 / matrix[u].sum())
                expected[i, j] /= max(matrix[:, j].sum(), 1.0) ** 0.4
    np.testing.assert_allclose(cv.rp3beta(matrix, 0.4), expected, atol=1e-12)

    _tiny_ml100k(tmp_path, items=200, users=80, per_user=30)
    cv.main(["--data", str(tmp_path), "--folds", "2", "--ease-lambda", "5", "--lam", "1", "--rp3beta", "0.5:1e-9,0.5:1", "--pop-penalty", "0,1"])
    out = capsys.readouterr().out
    table = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ") and not line.startswith("| model")}
    numbers = {name: np.array([float(v) for cell in cells for v in cell.split("/")]) for name, cells in table.items()}
    exact = numbers["onboarding, exact, γ=0.5"]
    assert "RP3beta (β=0.5), γ=1" in numbers
    for same in ("onboarding + 1e-09·RP3beta (β=0.5), γ=0.5", "onboarding − 0·log(1 + ratings), γ=0.5"):
        np.testing.assert_allclose(numbers[same], exact, atol=1e-3)
    for moved in ("onboarding + 1·RP3beta (β=0.5), γ=0.5", "onboarding − 1·log(1 + ratings), γ=0.5", "RP3beta (β=0.5), γ=1"):
        assert np.abs(numbers[moved] - exact).max() > 0.005
    assert cv.number_list("0.1,0.3") == [0.1, 0.3]
    for bad in ("-1", "x", "", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            cv.number_list(bad)


def test_edlae_is_ease_with_a_dropout_emphasised_diagonal_and_p_zero_is_ease(benchmark_script, tmp_path, capsys):
    """`onboarding_cv.py --dlae p`: EDLAE's column j is the ridge of item j on the other items with
    per-item penalties λ + p/(1 − p)·G_ii (checked column by column against a direct solve); p = 0 is
    EASE, so its rows equal the EASE and exact γ = 0.5 rows, and p = 0.9 moves them; bad p refused."""
    cv = benchmark_script("onboarding_cv")
    rng = np.random.default_rng(6)
    matrix = (rng.random((40, 9)) < 0.35).astype(np.float32)
    gram = matrix.T @ matrix
    lam, p = 2.0, 0.6
    weights = cv.edlae(gram, lam, p)
    penalty = lam + p / (1 - p) * np.diag(gram).astype(np.float64)
    for j in range(9):
        others = np.flatnonzero(np.arange(9) != j)
        system = gram[np.ix_(others, others)].astype(np.float64) + np.diag(penalty[others])
        np.testing.assert_allclose(weights[others, j], np.linalg.solve(system, gram[others, j]), atol=1e-5)
        assert weights[j, j] == 0.0
    np.testing.assert_array_equal(cv.edlae(gram, lam, 0.0), cv.EASEBaseline.closed_form(gram, lam))

    _tiny_ml100k(tmp_path, items=200, users=80, per_user=30)
    cv.main(["--data", str(tmp_path), "--folds", "2", "--ease-lambda", "5", "--lam", "1", "--dlae", "0,0.9"])
    out = capsys.readouterr().out
    table = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ") and not line.startswith("| model")}
    numbers = {name: np.array([float(v) for cell in cells for v in cell.split("/")]) for name, cells in table.items()}
    np.testing.assert_array_equal(numbers["EDLAE (p=0), γ=1"], numbers["EASE (λ=5)"])
    np.testing.assert_allclose(numbers["onboarding with EDLAE (p=0), γ=0.5"], numbers["onboarding, exact, γ=0.5"], atol=1e-3)
    assert np.abs(numbers["EDLAE (p=0.9), γ=1"] - numbers["EASE (λ=5)"]).max() > 0.005
    assert np.abs(numbers["onboarding with EDLAE (p=0.9), γ=0.5"] - numbers["onboarding, exact, γ=0.5"]).max() > 0.005
    assert cv.dropout_list("0,0.5") == [0.0, 0.5]
    for bad in ("1", "-0.1", "x", "", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            cv.dropout_list(bad)


def test_ease_on_every_rating_counts_the_ratings_below_4_and_is_ease_when_every_rating_is_a_positive(benchmark_script, tmp_path, capsys):
    """`onboarding_cv.py --rated λ`: EASE fitted on every rating of the fit users (a 3-star rating
    counts), alone and in place of EASE in the combined matrix; where every rating is a positive its
    rows at λ = --ease-lambda are the EASE and exact γ = 0.5 rows, and where some are not they move;
    a λ that is not > 0 is refused."""
    cv = benchmark_script("onboarding_cv")
    from pmeta.data.movielens import read_movielens

    def table_of(directory):
        cv.main(["--data", str(directory), "--folds", "2", "--ease-lambda", "5", "--lam", "1", "--rated", "5"])
        out = capsys.readouterr().out
        rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ") and not line.startswith("| model")}
        return {name: np.array([float(v) for cell in cells for v in cell.split("/")]) for name, cells in rows.items()}

    mixed, liked = tmp_path / "mixed", tmp_path / "liked"
    for directory in (mixed, liked):
        directory.mkdir()
        _tiny_ml100k(directory, items=200, users=80, per_user=30)
    lines = [line.split("\t") for line in (liked / "u.data").read_text().splitlines()]
    (liked / "u.data").write_text("".join("\t".join([user, item, "4" if stars == "3" else stars, t]) + "\n" for user, item, stars, t in lines))

    dataset = read_movielens(mixed, "ml-100k")
    users = np.unique(dataset.ratings.user)
    rated, positive = cv.rated_matrix(dataset, users), cv.positive_matrix(dataset, users)
    assert rated.sum() == len(dataset.ratings.user) and positive.sum() < rated.sum() and np.all(rated >= positive)

    numbers = table_of(liked)
    np.testing.assert_array_equal(numbers["EASE on every rating (λ=5), γ=1"], numbers["EASE (λ=5)"])
    np.testing.assert_array_equal(numbers["onboarding with EASE on every rating (λ=5), γ=0.5"], numbers["onboarding, exact, γ=0.5"])
    numbers = table_of(mixed)
    assert np.abs(numbers["EASE on every rating (λ=5), γ=1"] - numbers["EASE (λ=5)"]).max() > 0.005
    for bad in ("x", "0", "500,-1"):
        with pytest.raises(SystemExit):
            cv.main(["--data", str(mixed), "--rated", bad])


def test_seeds_replace_swaps_a_methods_cells_only_between_runs_of_the_same_seed_bank_and_users(benchmark_script, tmp_path):
    seeds = benchmark_script("seeds")
    base = _write_run(tmp_path / "base", 3, [4, 7, 9], {"pmeta": [1.0, 1.0, 0.0], "ease": [0.0, 0.0, 0.0], "popularity": [0.0, 1.0, 0.0]})
    part = _write_run(tmp_path / "part", 3, [4, 7, 9], {"ease": [1.0, 1.0, 1.0]})
    print_line = seeds.replace(base, part, tmp_path / "new")
    assert "ease from" in print_line
    new = json.loads((tmp_path / "new" / "per_user.json").read_text())
    cells = {c["method"]: c for c in new["cells"]}
    assert cells["ease"]["hr@10"] == [1.0, 1.0, 1.0] and cells["pmeta"]["hr@10"] == [1.0, 1.0, 0.0] and len(new["cells"]) == 3
    assert [c["method"] for c in new["cells"]] == ["pmeta", "ease", "popularity"]  # the base's order
    assert new["replaced"] == [{"methods": ["ease"], "from": str(part)}] and new["seed"] == 3 and new["bank"] == "b"
    # The pooled table now takes the new EASE as the best classical: pmeta's margin turns negative.
    assert "| full K = 1: pmeta over the best classical, HR@10 / nDCG@10 | -33.3% / -33.3% |" in seeds.pool([tmp_path / "new"], resamples=100)

    other_users = _write_run(tmp_path / "users", 3, [4, 9, 7], {"ease": [1.0, 1.0, 1.0]})
    other_seed = _write_run(tmp_path / "seed", 4, [4, 7, 9], {"ease": [1.0, 1.0, 1.0]})
    absent = _write_run(tmp_path / "absent", 3, [4, 7, 9], {"itemknn": [1.0, 1.0, 1.0]})
    empty = _write_run(tmp_path / "empty", 3, [4, 7, 9], {})
    for bad, message in [(other_users, "other users"), (other_seed, "differ in seed"), (tmp_path / "missing", "no per_user.json"),
                         (absent, "no itemknn cells"), (empty, "holds no cells")]:  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            seeds.replace(base, bad, tmp_path / "never")
    other_bank = json.loads((part / "per_user.json").read_text()) | {"bank": "other"}
    (tmp_path / "bank").mkdir()
    (tmp_path / "bank" / "per_user.json").write_text(json.dumps(other_bank))
    with pytest.raises(SystemExit, match="differ in bank"):
        seeds.replace(base, tmp_path / "bank", tmp_path / "never")
    before = (base / "per_user.json").read_text()
    for out in (base, part):  # never written over an input
        with pytest.raises(SystemExit, match="is one of the inputs"):
            seeds.replace(base, part, out)
    assert (base / "per_user.json").read_text() == before
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    (fewer / "per_user.json").write_text(json.dumps({"seed": 3, "fingerprint": "f", "bank": "b", "cells": [{"method": "ease", "k": 3, "mode": "full", "user": [4, 7, 9], "hr@10": [1, 1, 1], "ndcg@10": [1, 1, 1], "mrr": [1, 1, 1]}]}))
    with pytest.raises(SystemExit, match="other \\(K, mode\\) cells"):
        seeds.replace(base, fewer, tmp_path / "never")
    assert not (tmp_path / "never").exists()

    # --add: a method the base lacks (left out of its run for time) joins after the base's cells, on the same users only.
    print_line = seeds.replace(base, absent, tmp_path / "added", add=True)
    assert "(added: itemknn)" in print_line
    added = json.loads((tmp_path / "added" / "per_user.json").read_text())
    assert [c["method"] for c in added["cells"]] == ["pmeta", "ease", "popularity", "itemknn"]
    assert added["cells"][-1]["hr@10"] == [1.0, 1.0, 1.0] and added["cells"][0]["hr@10"] == [1.0, 1.0, 0.0]
    assert added["replaced"] == [{"methods": ["itemknn"], "from": str(absent), "added": ["itemknn"]}]
    assert "| full K = 1: pmeta over the best classical, HR@10 / nDCG@10 | -33.3% / -33.3% |" in seeds.pool([tmp_path / "added"], resamples=100)
    mixed = _write_run(tmp_path / "mixed", 3, [4, 7, 9], {"ease": [1.0, 0.0, 0.0], "itemknn": [0.0, 0.0, 1.0]})
    seeds.replace(base, mixed, tmp_path / "both", add=True)  # one replaced, one added
    both = json.loads((tmp_path / "both" / "per_user.json").read_text())
    assert [c["method"] for c in both["cells"]] == ["pmeta", "ease", "popularity", "itemknn"] and both["cells"][1]["hr@10"] == [1.0, 0.0, 0.0]
    assert both["replaced"][0]["added"] == ["itemknn"]
    absent_other_users = _write_run(tmp_path / "absent-users", 3, [9, 7, 4], {"itemknn": [1.0, 1.0, 1.0]})
    with pytest.raises(SystemExit, match="other users"):
        seeds.replace(base, absent_other_users, tmp_path / "never", add=True)
    twice = tmp_path / "twice"
    twice.mkdir()
    cell = {"method": "itemknn", "k": 1, "mode": "full", "hr@10": [1, 1, 1], "ndcg@10": [1, 1, 1], "mrr": [1, 1, 1]}
    (twice / "per_user.json").write_text(json.dumps({"seed": 3, "fingerprint": "f", "bank": "b", "cells": [cell | {"user": [9, 7, 4]}, cell | {"user": [4, 7, 9]}]}))
    with pytest.raises(SystemExit, match="holds a \\(method, K, mode\\) cell twice"):
        seeds.replace(base, twice, tmp_path / "never", add=True)
    assert not (tmp_path / "never").exists()


def test_seeds_versus_pairs_two_banks_runs_by_seed_and_user(benchmark_script, tmp_path):
    seeds = benchmark_script("seeds")
    old = [_write_run(tmp_path / f"old{s}", s, [4, 7, 9], {"pmeta": [0.0, 0.0, 1.0], "ease": [1.0, 0.0, 0.0]}) for s in (0, 1)]
    new = [_write_run(tmp_path / f"new{s}", s, [4, 7, 9], {"pmeta": [1.0, 1.0, 1.0], "ease": [1.0, 0.0, 0.0]}) for s in (1, 0)]  # any order
    for path in new:
        run = json.loads((path / "per_user.json").read_text())
        (path / "per_user.json").write_text(json.dumps(run | {"bank": "b2"}))
    text = seeds.versus(old, new, ["pmeta", "ease"], resamples=200)
    assert "seed 0: before b, after b2" in text and "seed 1: before b, after b2" in text
    # pmeta gains 2 of 3 users on both seeds: +0.667, every resample above 0 (Holm too); ease is the same on both banks
    assert text.count("| full | 0.333 → 1.000: **+0.667 [+0.3") == 2 and text.count(", +1.000]** † |") == 2
    assert "| full | 0.333 → 0.333: +0.000 [+0.000, +0.000] |" in text
    assert text.count("## pmeta: ") == 2 and text.count("## ease: ") == 2
    shuffled = _write_run(tmp_path / "shuffled", 0, [9, 7, 4], {"pmeta": [1.0, 1.0, 1.0]})
    lacking = _write_run(tmp_path / "lacking", 0, [4, 7, 9], {"ease": [1.0, 0.0, 0.0]})
    other_data = _write_run(tmp_path / "data", 0, [4, 7, 9], {"pmeta": [1.0, 1.0, 1.0]})
    (other_data / "per_user.json").write_text(json.dumps(json.loads((other_data / "per_user.json").read_text()) | {"fingerprint": "g"}))
    for before, after, methods, message in [
        ([old[0]], [shuffled], ["pmeta"], "other users"), ([old[0]], [lacking], ["pmeta"], "not in both runs"),
        ([old[0]], [new[0]], ["pmeta"], "no --before run matches"), (old, [new[0]], ["pmeta"], "as many --after"),
        ([old[0]], [other_data], ["pmeta"], "different datasets"), (old, new, ["pmeta", "pmeta"], "each method once"),
        ([old[0], old[0]], new, ["pmeta"], "two --before runs"), ([old[0]], [tmp_path / "missing"], ["pmeta"], "no per_user.json"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            seeds.versus(before, after, methods, resamples=10)
    with pytest.raises(SystemExit, match="resamples"):
        seeds.versus(old, new, ["pmeta"], resamples=0)
    # --against: the after runs' pmeta against the before runs' ease (a transfer against the target's own baseline)
    domain = [_write_run(tmp_path / f"domain{s}", s, [4, 7, 9], {"pmeta": [0.0, 0.0, 0.0], "ease": [1.0, 0.0, 0.0]}) for s in (0, 1)]
    moved = [_write_run(tmp_path / f"moved{s}", s, [4, 7, 9], {"pmeta": [1.0, 1.0, 0.0]}) for s in (0, 1)]
    text = seeds.versus(domain, moved, ["pmeta"], resamples=200, against="ease")
    assert text.count("## pmeta (after) against ease (before): ") == 2
    assert text.count("| full | 0.333 → 0.667: +0.333 [") == 2  # ease 1, 0, 0 → pmeta 1, 1, 0 (not pmeta's 0, 0, 0)
    assert text.count("| full | 0.000 → 0.667: ") == 0
    same = seeds.versus(domain, moved, ["pmeta"], resamples=200, against="pmeta")
    assert same.replace(" (after) against pmeta (before)", "") == seeds.versus(domain, moved, ["pmeta"], resamples=200)
    assert same.count("| full | 0.000 → 0.667: **+0.667 [") == 2
    with pytest.raises(SystemExit, match=r"popularity \(before\) and pmeta \(after\) are not in both runs"):
        seeds.versus(domain, moved, ["pmeta"], resamples=10, against="popularity")


def test_seeds_run_passes_the_transfer_prior_to_the_evaluation(benchmark_script, tiny_bank, monkeypatch, tmp_path):
    """`seeds.py run --transfer-prior tuned` evaluates with that prior (the argument reaches run_movielens)."""
    import pmeta.eval.runner as runner

    seeds = benchmark_script("seeds")
    seen = {}

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(runner, "run_movielens", spy)
    with pytest.raises(Stop):
        seeds.run(tiny_bank, 0, tmp_path / "out", ["pmeta"], 1, 2, transfer_prior="tuned")
    assert seen["transfer_prior"] == "tuned"

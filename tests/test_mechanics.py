"""Mechanics on tiny deterministic tensors and a tiny random BERT: fusion, stacking, inner steps,
MAML / first-order / Reptile outer gradients, batching over users."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from pmeta.adapt.inner import adapt
from pmeta.adapt.strategies import get_strategy
from pmeta.errors import BankIntegrityError
from pmeta.fusion.fuse import PriorCache, fuse_cat, fuse_svd, fuse_users, fusion_weights, prior_row
from pmeta.models.personal import delta_weight, expand_users, init_adapter, select_rows, stack, user_row


def random_anchors(n=5, rank=2, d_in=7, d_out=6, length=3, hidden=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt": torch.randn(n, length, hidden, generator=g),
        "t1.A": torch.randn(n, rank, d_in, generator=g),
        "t1.B": torch.randn(n, d_out, rank, generator=g),
        "t2.A": torch.randn(n, rank, d_in, generator=g),
        "t2.B": torch.randn(n, d_out, rank, generator=g),
    }


def test_cat_fusion_is_exact_weighted_sum():
    anchors = random_anchors()
    idx = torch.tensor([[0, 3, 4], [2, 1, 0]])
    weights = fusion_weights(torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.2, 0.8]]), 0.3)
    fused = fuse_cat(anchors, idx, weights)
    for u in range(2):
        for target in ("t1", "t2"):
            dense = sum(weights[u, j] * anchors[f"{target}.B"][idx[u, j]] @ anchors[f"{target}.A"][idx[u, j]] for j in range(3))
            torch.testing.assert_close(fused[f"{target}.B"][u] @ fused[f"{target}.A"][u], dense, atol=1e-6, rtol=0)
        prompt = sum(weights[u, j] * anchors["prompt"][idx[u, j]] for j in range(3))
        torch.testing.assert_close(fused["prompt"][u], prompt, atol=1e-6, rtol=0)
    assert fused["t1.A"].shape == (2, 6, 7)  # rank k·r = 3·2


def test_peft_style_linear_merge_is_not_exact():
    # The merge PEFT's combination_type="linear" performs (√w on both factors, then concatenation of
    # summed factors) adds cross terms; this is why pmeta fuses by concatenation.
    anchors = random_anchors(n=2, rank=2)
    w = torch.tensor([0.7, 0.3])
    a = sum(w[j].sqrt() * anchors["t1.A"][j] for j in range(2))
    b = sum(w[j].sqrt() * anchors["t1.B"][j] for j in range(2))
    exact = sum(w[j] * anchors["t1.B"][j] @ anchors["t1.A"][j] for j in range(2))
    assert (b @ a - exact).abs().max() > 1e-2


def test_svd_fusion_is_best_low_rank_and_exact_at_full_rank():
    anchors = random_anchors(n=3, rank=1)
    idx = torch.tensor([[0, 1, 2]])
    weights = torch.tensor([[0.5, 0.3, 0.2]])
    exact = fuse_cat(anchors, idx, weights)
    full = fuse_svd(anchors, idx, weights, rank=3)
    torch.testing.assert_close(delta_weight(full, "t1"), delta_weight(exact, "t1"), atol=1e-5, rtol=0)
    low = fuse_svd(anchors, idx, weights, rank=1)
    s = torch.linalg.svdvals(delta_weight(exact, "t1")[0])
    err = torch.linalg.matrix_norm(delta_weight(low, "t1")[0] - delta_weight(exact, "t1")[0])
    torch.testing.assert_close(err, s[1:].square().sum().sqrt(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("zero_b", [False, True])
def test_svd_fusion_gives_finite_gradients_that_train_the_anchors(zero_b):
    """ΔW of rank k·r = 2 < d = 32 has repeated zero singular values, where SVD's derivative is
    undefined: meta-training through the old fusion (SVD of the dense ΔW) got NaN gradients, so a
    ``fusion = "svd"`` build diverged, or early stopping silently kept its init. Anchors whose B
    starts at zero (every singular value zero) must train too, and the kept subspace must turn:
    training reaches the best rank-1 fit of the target."""
    anchors = random_anchors(n=2, rank=1, d_in=32, d_out=32)
    if zero_b:
        anchors = {key: torch.zeros_like(value) if key.endswith(".B") else value for key, value in anchors.items()}
    anchors = {key: value.clone().requires_grad_(True) for key, value in anchors.items()}
    logits = torch.tensor([[0.4, -0.2]], requires_grad=True)
    idx = torch.tensor([[0, 1]])
    target = torch.randn(32, 32, generator=torch.Generator().manual_seed(3))

    def loss() -> torch.Tensor:
        fused = fuse_svd(anchors, idx, torch.softmax(logits, -1), rank=1)
        return (delta_weight(fused, "t1")[0] - target).square().sum()

    optimizer = torch.optim.Adam([*anchors.values(), logits], lr=0.05)
    for step in range(300):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        assert all(torch.isfinite(p.grad).all() for p in [anchors["t1.A"], anchors["t1.B"], logits]), step
        assert step > 0 or anchors["t1.B"].grad.abs().sum() > 0
        optimizer.step()
    best = torch.linalg.svdvals(target)[1:].square().sum().item()  # what the best rank-1 fit leaves
    assert best - 1e-2 < loss().item() < 1.005 * best


def test_stacking_prompt_and_lora_is_exact():
    g = torch.Generator().manual_seed(1)
    targets = [("t", 5, 4)]
    a = init_adapter(targets, 2, 3, 5, g, b_std=1.0)
    b = init_adapter(targets, 1, 3, 5, g, b_std=1.0)
    s = stack(a, b)
    torch.testing.assert_close(s["prompt"], a["prompt"] + b["prompt"])
    torch.testing.assert_close(delta_weight(s, "t"), delta_weight(a, "t") + delta_weight(b, "t"))


@pytest.mark.parametrize("fusion", ["cat", "svd"])
def test_mixed_rows_pad_exactly_and_each_user_gets_back_its_own_factors(fusion):
    """Users with a key fuse their top 2 anchors (rank 4 by ``cat``, 3 by ``svd``), the others the
    zero-history prior of all 5 (rank 10): the batch pads the narrower rows with zeros, and
    ``user_row`` takes each user's padding back out of the stack, so a user's factors do not depend
    on the batch."""
    anchors = random_anchors()
    weights = fusion_weights(torch.tensor([[0.9, 0.5], [0.3, 0.2], [0.1, 0.7]]), 0.3)
    indexes = torch.tensor([[0, 3], [2, 1], [4, 0]])
    top = fuse_cat(anchors, indexes, weights) if fusion == "cat" else fuse_svd(anchors, indexes, weights, 3)
    prior = fuse_cat(anchors, torch.arange(5).expand(3, 5), torch.full((3, 5), 0.2))
    keep = torch.tensor([True, False, True])
    mixed, ranks = select_rows(keep, top, prior)
    rank = 4 if fusion == "cat" else 3
    assert mixed["t1.A"].shape == (3, 10, 7) and ranks["t1.A"] == (10, [rank, 10, rank]) and ranks["t2.B"] == (10, [rank, 10, rank])
    own = expand_users(init_adapter([("t1", 7, 6), ("t2", 7, 6)], 1, 3, 4, torch.Generator().manual_seed(3), b_std=1.0), 3)
    stacked = stack(mixed, own)
    for u, chosen in enumerate([top, prior, top]):
        alone = stack({k: v[u] for k, v in chosen.items()}, {k: v[u] for k, v in own.items()})
        row = user_row(stacked, u, ranks)
        assert {k: v.shape for k, v in row.items()} == {k: v.shape for k, v in alone.items()}
        for key in alone:
            assert torch.equal(row[key], alone[key]), key
    assert user_row(stacked, 0)["t1.A"].shape == (11, 7)  # without the ranks: the padded batch row
    assert user_row(stacked, 0, ranks)["t1.A"].shape == (rank + 1, 7)


@pytest.mark.parametrize("fusion", ["cat", "svd"])
@pytest.mark.parametrize(("d_in", "d_out", "prior_rank"), [(12, 11, 10), (7, 6, 6), (5, 9, 5)])
def test_users_without_a_key_get_every_anchor_weighted_by_its_train_users(fusion, d_in, d_out, prior_rank):
    """``fuse_users``: a user with a key gets its retrieved anchors fused as ``fuse`` does (bit for
    bit, under either fusion), a user without one the zero-history prior, ΔW = Σ_j (n_j / Σ n) B_j A_j
    and P = Σ_j (n_j / Σ n) P_j over every anchor, at rank N·r = 10, or min(d_in, d_out) where that
    is smaller; a batch of users with keys pads nothing."""
    anchors = random_anchors(d_in=d_in, d_out=d_out)
    sizes = torch.tensor([10.0, 1.0, 4.0, 0.0, 5.0])
    weights = fusion_weights(torch.tensor([[0.9, 0.5], [0.3, 0.2], [0.1, 0.7]]), 0.3)
    indexes = torch.tensor([[0, 3], [2, 1], [4, 0]])
    top = fuse_cat(anchors, indexes, weights) if fusion == "cat" else fuse_svd(anchors, indexes, weights, 3)
    fused, ranks = fuse_users(anchors, indexes, weights, torch.tensor([True, False, True]), sizes, fusion, 3)
    rank = 4 if fusion == "cat" else 3
    assert ranks is not None and ranks["t1.A"] == (max(rank, prior_rank), [rank, prior_rank, rank])
    for u in (0, 2):
        row = user_row(fused, u, ranks)
        for key in top:
            assert torch.equal(row[key], top[key][u]), key
    share = sizes / sizes.sum()
    prior = user_row(fused, 1, ranks)
    torch.testing.assert_close(prior["prompt"], torch.einsum("n,nld->ld", share, anchors["prompt"]))
    for target in ("t1", "t2"):
        assert prior[f"{target}.A"].shape == (prior_rank, d_in) and prior[f"{target}.B"].shape == (d_out, prior_rank)
        want = sum(share[j] * anchors[f"{target}.B"][j] @ anchors[f"{target}.A"][j] for j in range(5))
        torch.testing.assert_close(prior[f"{target}.B"] @ prior[f"{target}.A"], want)
    alone, none = fuse_users(anchors, indexes, weights, torch.ones(3, dtype=torch.bool), sizes, fusion, 3)
    assert none is None and all(torch.equal(alone[key], top[key]) for key in top)


def test_the_prior_follows_the_anchors_dtype_and_refuses_sizes_without_train_users():
    anchors = {k: v.double() for k, v in random_anchors().items()}
    weights = torch.full((2, 2), 0.5, dtype=torch.float64)
    fused, _ = fuse_users(anchors, torch.tensor([[0, 1], [2, 3]]), weights, torch.tensor([False, True]), torch.tensor([3, 1, 1, 2, 3]))
    assert all(v.dtype == torch.float64 for v in fused.values())
    with pytest.raises(BankIntegrityError, match="sum to 0.0"):
        fuse_users(anchors, torch.tensor([[0, 1]]), weights[:1], torch.tensor([False]), torch.zeros(5))


def test_the_prior_cache_builds_once_and_rebuilds_when_the_anchors_change():
    """``PriorCache``: the same prior as without it; built once while the anchors are the same,
    unchanged tensors; rebuilt after an in-place write (an optimizer step), a replaced tensor or new
    sizes; never kept where autograd records through the anchors, or in inference mode."""
    anchors, sizes = random_anchors(), torch.tensor([3.0, 1.0, 1.0, 2.0, 3.0])
    idx, weights, keys = torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), 0.5), torch.tensor([False, True])
    cache = PriorCache()
    plain, _ = fuse_users(anchors, idx, weights, keys, sizes)
    for _ in range(3):
        cached, _ = fuse_users(anchors, idx, weights, keys, sizes, prior=cache)
        assert all(torch.equal(cached[k], plain[k]) for k in plain)
    assert cache.builds == 1

    def delta(prior):
        return prior["t1.B"][0] @ prior["t1.A"][0]

    anchors["t1.B"].mul_(2.0)  # in place, as an optimizer step writes
    torch.testing.assert_close(delta(cache.get(anchors, sizes)), delta(prior_row(anchors, sizes)))
    assert cache.builds == 2
    anchors["t1.A"] = anchors["t1.A"] + 1.0  # a new tensor
    torch.testing.assert_close(delta(cache.get(anchors, sizes)), delta(prior_row(anchors, sizes)))
    sizes = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(delta(cache.get(anchors, sizes)), anchors["t1.B"][4] @ anchors["t1.A"][4])
    assert cache.builds == 4
    cache.get(anchors, sizes)
    assert cache.builds == 4
    with torch.inference_mode():
        cache.get(anchors, sizes)
    trained = {k: v.clone().requires_grad_(True) for k, v in anchors.items()}
    prior = cache.get(trained, sizes)
    delta(prior).sum().backward()  # the prior's gradient reaches the anchors, as meta-training needs
    assert trained["t1.B"].grad is not None and cache.builds == 4
    with torch.no_grad():
        cache.get(trained, sizes)
    assert cache.builds == 5


def test_the_prior_cache_builds_once_under_concurrent_callers():
    import threading

    anchors, sizes = random_anchors(n=40, d_in=6, d_out=6), torch.rand(40) + 0.1
    cache, results, barrier = PriorCache(), [], threading.Barrier(6)

    def call():
        barrier.wait()
        results.append(cache.get(anchors, sizes))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.builds == 1 and len(results) == 6 and all(r is results[0] for r in results)


def quadratic_loss(target):
    """L(θ) = Σ_users ½‖W_θ x − y‖² with W_θ = B A + prompt-mean shift; small enough to differentiate by hand."""

    def loss(adapter):
        x, y = target
        w = adapter["t.B"] @ adapter["t.A"]  # (U, out, in)
        pred = (w @ x.unsqueeze(-1)).squeeze(-1) + adapter["prompt"].mean(-2)[..., : y.shape[-1]]
        return 0.5 * (pred - y).pow(2).sum()

    return loss


def test_one_inner_step_equals_hand_computed_step():
    g = torch.Generator().manual_seed(2)
    init = {"prompt": torch.randn(1, 2, 3, generator=g), "t.A": torch.randn(1, 1, 3, generator=g), "t.B": torch.randn(1, 3, 1, generator=g)}
    x, y = torch.randn(1, 3, generator=g), torch.randn(1, 3, generator=g)
    lr = {"prompt": torch.tensor(0.1).log(), "t.A": torch.tensor(0.05).log(), "t.B": torch.tensor(0.2).log()}
    init = {k: v.requires_grad_(True) for k, v in init.items()}
    adapted = adapt(init, quadratic_loss((x, y)), 1, lr)
    # By hand: r = B A x + mean(P) − y; ∂/∂B = r (A x)ᵀ; ∂/∂A = Bᵀ r xᵀ; ∂/∂P_row = r / rows.
    A, B, P = init["t.A"][0].detach(), init["t.B"][0].detach(), init["prompt"][0].detach()
    r = B @ A @ x[0] + P.mean(0) - y[0]
    torch.testing.assert_close(adapted["t.B"][0], B - 0.2 * torch.outer(r, A @ x[0]))
    torch.testing.assert_close(adapted["t.A"][0], A - 0.05 * torch.outer(B.T @ r, x[0]))
    torch.testing.assert_close(adapted["prompt"][0], P - 0.1 * (r / 2).expand(2, 3))


def test_maml_outer_gradient_matches_finite_differences_and_differs_from_first_order():
    torch.manual_seed(3)
    x, y = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    xq, yq = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    base = {"prompt": torch.randn(2, 3, dtype=torch.float64), "t.A": torch.randn(1, 3, dtype=torch.float64), "t.B": torch.randn(3, 1, dtype=torch.float64)}
    lr = {k: torch.tensor(0.1, dtype=torch.float64).log() for k in base}

    def outer(strategy, shared):
        init = expand_users(shared, 1)
        adapted = adapt(init, quadratic_loss((x, y)), 2, lr, create_graph=strategy.second_order)
        return strategy.outer_loss(init, adapted, quadratic_loss((xq, yq)))

    shared = {k: v.clone().requires_grad_(True) for k, v in base.items()}
    grad_maml = torch.autograd.grad(outer(get_strategy("maml"), shared), shared["t.A"])[0]
    eps = 1e-6
    numeric = torch.zeros_like(base["t.A"])
    for i in range(base["t.A"].numel()):
        plus = {k: v.clone() for k, v in base.items()}
        minus = {k: v.clone() for k, v in base.items()}
        plus["t.A"].view(-1)[i] += eps
        minus["t.A"].view(-1)[i] -= eps
        plus = {k: v.requires_grad_(True) for k, v in plus.items()}
        minus = {k: v.requires_grad_(True) for k, v in minus.items()}
        numeric.view(-1)[i] = (outer(get_strategy("maml"), plus) - outer(get_strategy("maml"), minus)).item() / (2 * eps)
    torch.testing.assert_close(grad_maml, numeric, atol=1e-6, rtol=1e-5)

    shared = {k: v.clone().requires_grad_(True) for k, v in base.items()}
    grad_fo = torch.autograd.grad(outer(get_strategy("fomaml"), shared), shared["t.A"])[0]
    assert not torch.allclose(grad_fo, grad_maml)
    # First order: the query gradient taken at the adapted parameters.
    init = expand_users({k: v.detach() for k, v in base.items()}, 1)
    init = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    adapted = {k: v.detach().requires_grad_(True) for k, v in adapt(init, quadratic_loss((x, y)), 2, lr).items()}
    expected = torch.autograd.grad(quadratic_loss((xq, yq))(adapted), adapted["t.A"])[0][0]
    torch.testing.assert_close(grad_fo, expected)


def test_the_softmax_loss_has_finite_second_derivatives_at_any_score_gap():
    """torch.logaddexp's double backward is NaN once its arguments differ by more than ~88 (float32),
    and torch.where differentiates the unused branch too: second-order MAML on a bank whose
    collaborative scale had grown large got NaN gradients from a finite loss. log_add_exp is
    logaddexp bit for bit (value and gradient) within the gap, and stable beyond it."""
    from pmeta.tasks.ranking import LOGADDEXP_GAP, log_add_exp, softmax_loss

    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(400, generator=generator) * 8).requires_grad_(True), torch.randn(400, generator=generator) * 8
    within = (a - b).abs() <= LOGADDEXP_GAP
    assert within.all()
    ours, theirs = log_add_exp(a, b), torch.logaddexp(a, b)
    assert torch.equal(ours, theirs)
    assert torch.equal(torch.autograd.grad(ours.sum(), a)[0], torch.autograd.grad(theirs.sum(), a)[0])
    for gap in (10.0, 100.0, 1e4):
        x = torch.tensor([0.0, gap / 2], requires_grad=True)
        value = log_add_exp(x[:1], x[:1] + gap) + log_add_exp(x[1:] + gap, x[1:])
        (first,) = torch.autograd.grad(value.sum(), x, create_graph=True)
        (second,) = torch.autograd.grad(first.sum(), x)
        assert torch.isfinite(value).all() and torch.isfinite(first).all() and torch.isfinite(second).all()
        torch.testing.assert_close(value, torch.logsumexp(torch.stack([x[:1], x[:1] + gap]), 0) + torch.logsumexp(torch.stack([x[1:] + gap, x[1:]]), 0))
    # -inf on either side (an excluded rest): the value and the gradients of torch.logaddexp (no NaN from the unused branch)
    for pair in ((float("-inf"), 1.0), (1.0, float("-inf"))):
        x, y = (torch.tensor([v], requires_grad=True) for v in pair)
        ours, theirs = log_add_exp(x, y), torch.logaddexp(x, y)
        assert torch.equal(ours, theirs)
        assert all(torch.equal(g, h) for g, h in zip(torch.autograd.grad(ours.sum(), (x, y)), torch.autograd.grad(theirs.sum(), (x, y))))
    assert log_add_exp(torch.zeros(2, 1), torch.ones(3)).shape == (2, 3)  # broadcasts as torch.logaddexp
    # the loss itself: scores spread by 1e3, targets excluded (the inner loop's case) and not
    scores = (torch.randn(3, 50, generator=generator) * 1e3).requires_grad_(True)
    targets = torch.tensor([[1, 2], [3, 0], [4, 5]])
    exclude = torch.zeros(3, 50, dtype=torch.bool)
    exclude[0, 1] = exclude[2, :10] = True
    loss = softmax_loss(scores, targets, torch.ones(3, 2), exclude)
    (grad,) = torch.autograd.grad(loss, scores, create_graph=True)
    (second,) = torch.autograd.grad((grad * torch.randn(3, 50, generator=generator)).sum(), scores)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and torch.isfinite(second).all()


def test_reptile_gradient_is_init_minus_adapted():
    torch.manual_seed(4)
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    shared = {"prompt": torch.randn(2, 3), "t.A": torch.randn(1, 3), "t.B": torch.randn(3, 1)}
    shared = {k: v.requires_grad_(True) for k, v in shared.items()}
    lr = {k: torch.tensor(0.1).log() for k in shared}
    init = expand_users(shared, 2)
    adapted = adapt(init, quadratic_loss((x, y)), 3, lr)
    reptile = get_strategy("reptile")
    loss = reptile.outer_loss(init, adapted, lambda p: sum(v.sum() * 0 for v in p.values()))
    grads = torch.autograd.grad(loss, list(shared.values()))
    for (key, value), grad in zip(shared.items(), grads):
        torch.testing.assert_close(grad, (init[key] - adapted[key]).detach().sum(0))


def test_batched_inner_loop_equals_loop_over_users():
    torch.manual_seed(5)
    users = 4
    x, y = torch.randn(users, 3), torch.randn(users, 3)
    shared = {"prompt": torch.randn(2, 3), "t.A": torch.randn(1, 3), "t.B": torch.randn(3, 1)}
    lr = {k: torch.tensor(0.1).log() for k in shared}
    batched = adapt({k: v.clone().requires_grad_(True) for k, v in expand_users(shared, users).items()}, quadratic_loss((x, y)), 3, lr)
    for u in range(users):
        one = adapt({k: v.clone().requires_grad_(True) for k, v in expand_users(shared, 1).items()}, quadratic_loss((x[u : u + 1], y[u : u + 1])), 3, lr)
        for key in shared:
            torch.testing.assert_close(batched[key][u], one[key][0])


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A tiny random BERT saved to disk, loaded through pmeta's offline loader."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from pmeta.models.encoder import bundled_encoder_path, FunctionalEncoder

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    BertTokenizerFast.from_pretrained(bundled_encoder_path()).save_pretrained(path)
    return FunctionalEncoder(str(path)), path


def test_functional_encoder_matches_transformers(tiny_encoder):
    from transformers import BertModel

    encoder, path = tiny_encoder
    reference = BertModel.from_pretrained(path, attn_implementation="eager").eval()
    ids, mask = encoder.tokenize(["a short text", "a somewhat longer text with more tokens"])
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    hidden = encoder.lower(ids, mask, prompt_layer=3)  # all layers, no personal parameters
    torch.testing.assert_close(hidden * mask[..., None], expected * mask[..., None], atol=1e-5, rtol=1e-4)


def test_encoder_vmap_over_users_equals_loop(tiny_encoder):
    encoder, _ = tiny_encoder
    layer = 1
    ids, mask = encoder.tokenize(["first user history", "second user, longer history text", "third"])
    hidden = encoder.lower(ids, mask, layer)
    g = torch.Generator().manual_seed(0)
    targets = encoder.lora_targets(layer, ("query", "value"))
    adapters = [init_adapter(targets, 2, 4, 32, g, b_std=0.1) for _ in range(3)]
    batched = {k: torch.stack([a[k] for a in adapters]) for k in adapters[0]}

    def one_user(h, m, adapter):
        return encoder.upper(h[None], m[None], {k: v[None] for k, v in adapter.items()}, layer)[0]

    via_vmap = vmap(one_user)(hidden, mask, batched)
    loop = torch.stack([one_user(hidden[u], mask[u], adapters[u]) for u in range(3)])
    batched_call = encoder.upper(hidden, mask, batched, layer)
    torch.testing.assert_close(via_vmap, loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched_call, loop, atol=1e-5, rtol=1e-5)


def test_lora_in_encoder_equals_merged_weight(tiny_encoder):
    encoder, _ = tiny_encoder
    ids, mask = encoder.tokenize(["check lora against a merged weight"])
    hidden = encoder.lower(ids, mask, 2)
    g = torch.Generator().manual_seed(1)
    adapter = init_adapter(encoder.lora_targets(2, ("query",)), 2, 3, 32, g, b_std=0.5)
    with_lora = encoder.upper(hidden, mask, expand_users(adapter, 1), 2)
    key = "encoder.layer.2.attention.self.query.weight"
    original = encoder.weights[key].clone()
    try:
        encoder.weights[key] = original + adapter["layer2.query.B"] @ adapter["layer2.query.A"]
        merged = encoder.upper(hidden, mask, {"prompt": adapter["prompt"][None]}, 2)
    finally:
        encoder.weights[key] = original
    torch.testing.assert_close(with_lora, merged, atol=1e-5, rtol=1e-5)


def test_ease_factors_reproduce_the_ease_matrix_at_full_rank():
    """The EASE init of the collaborative towers: P Qᵀ equals EASE's B on the kept items at full rank,
    items without train positives get zero rows, and history/item rows differ (an asymmetric B)."""
    import numpy as np

    from pmeta.eval.baselines import EASEBaseline
    from pmeta.tasks import ranking

    rng = np.random.default_rng(0)
    n_items = 24
    positives = [np.unique(rng.integers(0, 20, size=6)) for _ in range(40)]  # items 20..23 never positive
    x = np.zeros((40, n_items), dtype=np.float32)
    for row, items in enumerate(positives):
        x[row, items] = 1
    kept = np.flatnonzero(x.sum(0) > 0)
    weights = EASEBaseline.closed_form(x[:, kept].T @ x[:, kept], 10.0)
    (history, item), scale = ranking.ease_factors(positives, n_items, len(kept) + 5, weights, kept)  # rank capped
    assert history.shape == item.shape == (n_items, len(kept)) and scale > 0
    assert torch.all(history[20:] == 0) and torch.all(item[20:] == 0)
    np.testing.assert_allclose((history[kept] @ item[kept].T).numpy(), weights, atol=1e-4)
    assert not torch.allclose(history, item)
    (low, _), _ = ranking.ease_factors(positives, n_items, 4, weights, kept)
    assert low.shape == (n_items, 4)
    head = ranking.init_head(torch.randn(n_items, 8), torch.ones(n_items), (history, item), scale)
    assert torch.equal(head["history_embedding"], history) and torch.equal(head["item_embedding"], item)


# ------------------------------------------------------------------------------ early stopping
def _quadratic_stage(target: float):
    """One scalar parameter starting at 0, a training loss pulling it to ``target`` and a
    validation loss (x − 1)² whose every measurement is logged: a stage whose training helps
    (target 1) or only hurts (target −2)."""
    x = torch.tensor(0.0)
    measured: list[float] = []

    def validation() -> float:
        measured.append(float((x - 1.0) ** 2))
        return measured[-1]

    return x, measured, validation, (lambda: (x - target) ** 2)


@pytest.mark.parametrize("target", [1.0, -2.0])
def test_a_remembered_checkpoint_is_measured_once_per_state_and_ends_at_the_best(target):
    from pmeta.bank.meta_train import Checkpoint, _optimize

    x, measured, validation, loss = _quadratic_stage(target)
    checkpoint = Checkpoint(validation)
    assert checkpoint() == 1.0 and len(measured) == 1  # calling measures
    groups = [{"params": [x], "lr": 0.1}]
    _optimize(groups, loss, 10, None, checkpoint=checkpoint, every=5)
    assert len(measured) == 3  # the start is remembered: only the checkpoints at steps 5 and 10 measure
    assert checkpoint.value == min(measured) == float((x - 1.0) ** 2)  # the tensors end at the best, and it is remembered
    if target == -2.0:  # training only moved away from the validation optimum: back to the start
        assert float(x) == 0.0 and checkpoint.value == 1.0
    else:
        assert checkpoint.value < 1.0
    _optimize(groups, loss, 0, None, checkpoint=checkpoint, every=5)  # no steps: nothing trained or measured
    assert len(measured) == 3
    _optimize(groups, loss, 5, None, checkpoint=checkpoint, every=5)  # the next stage starts from the remembered value
    assert len(measured) == 4 and checkpoint.value == float((x - 1.0) ** 2)
    checkpoint.settle(None)  # unknown state: measured on the next use
    assert checkpoint.known() == float((x - 1.0) ** 2) and len(measured) == 5


def test_a_plain_callable_checkpoint_is_measured_at_the_start():
    from pmeta.bank.meta_train import _optimize

    x, measured, validation, loss = _quadratic_stage(-2.0)
    _optimize([{"params": [x], "lr": 0.1}], loss, 4, None, checkpoint=validation, every=2)
    assert len(measured) == 3 and float(x) == 0.0  # start, steps 2 and 4; worse at both, so restored


def test_stage_zero_pool_keeps_no_encoder_states():
    """Stage 0 caches every episode of its pool; the cached batch must not keep the (U, T, d)
    encoder states alive (a zero-length slice would: it is a view of the whole storage)."""
    from pmeta.bank.meta_train import without_states
    from pmeta.tasks.ranking import UserBatch

    hidden = torch.randn(4, 50, 384)
    batch = UserBatch(hidden=hidden, mask=torch.ones(4, 50), history_items=torch.zeros(4, 3, dtype=torch.long), history_mask=torch.ones(4, 3), exclude=torch.zeros(4, 10, dtype=torch.bool))
    stripped = without_states(batch)
    assert stripped.users == 4 and stripped.hidden.shape == (4, 0, 384)
    assert stripped.hidden.untyped_storage().nbytes() == 0
    assert hidden[:, :0].untyped_storage().nbytes() == hidden.untyped_storage().nbytes()  # what a slice would keep

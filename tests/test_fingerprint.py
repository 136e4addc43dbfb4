"""The weights fingerprint a bank records: equal for equal weights, different for any other checkpoint."""

from __future__ import annotations

import torch

from pmeta.models.fingerprint import PREFIX, weights_fingerprint


def weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"embed": torch.randn(1000, 16, generator=generator), "layer.0.q": torch.randn(16, 16, generator=generator), "bias": torch.zeros(3)}


def test_equal_weights_give_equal_fingerprints_in_any_order():
    a, b = weights(0), weights(0)
    assert weights_fingerprint(a.items()) == weights_fingerprint(reversed(list(b.items())))
    assert weights_fingerprint(a.items()).startswith(PREFIX)


def test_other_weights_names_or_shapes_change_it():
    base = weights_fingerprint(weights(0).items())
    assert weights_fingerprint(weights(1).items()) != base  # another checkpoint of the same shape
    tuned = weights(0)
    tuned["layer.0.q"] = tuned["layer.0.q"] + 1e-3  # a fine-tuned one: every value moves a little
    assert weights_fingerprint(tuned.items()) != base
    renamed = {("layer.1.q" if k == "layer.0.q" else k): v for k, v in weights(0).items()}
    assert weights_fingerprint(renamed.items()) != base
    reshaped = {k: (v.reshape(2000, 8) if k == "embed" else v) for k, v in weights(0).items()}
    assert weights_fingerprint(reshaped.items()) != base


def test_layout_does_not_matter_and_odd_shapes_work():
    w = torch.randn(300, 200)
    transposed_storage = w.t().contiguous().t()  # equal values, non-contiguous
    assert not transposed_storage.is_contiguous()
    assert weights_fingerprint({"w": w}.items()) == weights_fingerprint({"w": transposed_storage}.items())
    odd = {"scalar": torch.tensor(3.0), "empty": torch.zeros(0, 4), "ints": torch.arange(10)}
    assert weights_fingerprint(odd.items()) == weights_fingerprint(dict(odd).items())

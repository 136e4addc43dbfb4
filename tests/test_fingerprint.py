"""The weights fingerprint a bank records: equal for equal weights, different for any other checkpoint."""

from __future__ import annotations

import pytest
import torch

from pmeta.errors import BankIntegrityError
from pmeta.models.fingerprint import PREFIX, RUNS, SAMPLES, SPACED_PREFIX, _positions, check_fingerprint, weights_fingerprint


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


@pytest.mark.parametrize("scheme", [PREFIX, SPACED_PREFIX])
def test_both_schemes_tell_checkpoints_apart(scheme):
    base = weights_fingerprint(weights(0).items(), scheme)
    assert base.startswith(scheme) and base == weights_fingerprint(weights(0).items(), scheme)
    assert weights_fingerprint(weights(1).items(), scheme) != base
    assert weights_fingerprint(weights(0).items(), PREFIX) != weights_fingerprint(weights(0).items(), SPACED_PREFIX)


def test_the_runs_scheme_reads_few_contiguous_runs():
    """What keeps the check cheap in memory: 16 runs of 256 consecutive values, not values spread over every page."""
    positions = _positions(10_000_000, PREFIX, torch.device("cpu"))
    assert len(positions) == SAMPLES and int(positions[0]) == 0 and int(positions[-1]) == 10_000_000 - 1
    assert int((positions.diff() != 1).sum()) == RUNS - 1  # RUNS runs of consecutive positions
    spaced = _positions(10_000_000, SPACED_PREFIX, torch.device("cpu"))
    assert int((spaced.diff() != 1).sum()) == SAMPLES - 1
    assert _positions(5000, PREFIX, torch.device("cpu")).unique().numel() == SAMPLES  # overlapping runs are read once
    assert _positions(100, PREFIX, torch.device("cpu")).tolist() == list(range(100))


def test_a_bank_is_checked_with_the_scheme_it_recorded():
    w = weights(0)

    def fingerprint(scheme):
        return weights_fingerprint(w.items(), scheme)

    for scheme in (PREFIX, SPACED_PREFIX):  # banks built before the runs scheme still open
        check_fingerprint(weights_fingerprint(w.items(), scheme), fingerprint, "m", "b", "v1")
        with pytest.raises(BankIntegrityError, match="other weights than the model now at m"):
            check_fingerprint(weights_fingerprint(weights(1).items(), scheme), fingerprint, "m", "b", "v1")
    check_fingerprint(None, fingerprint, "m", "b", "v1")  # built before fingerprints: not checked
    for unknown in ("md5:abc", 42):
        with pytest.raises(BankIntegrityError, match="cannot check"):
            check_fingerprint(unknown, fingerprint, "m", "b", "v1")

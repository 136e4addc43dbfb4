"""Device names are checked before anything is loaded or any bank folder is created."""

from __future__ import annotations

import pytest
import torch

from pmeta.errors import InvalidConfig
from pmeta.models.device import resolve_device


def test_cpu_resolves():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")).type == "cpu"


@pytest.mark.parametrize("name, message", [("foo", "unknown torch device 'foo'"), ("meta", "not supported"), ("", "unknown torch device")])
def test_unknown_devices_are_config_errors(name, message):
    with pytest.raises(InvalidConfig, match=message):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:7"])
def test_cuda_without_a_gpu_is_a_config_error(name):
    with pytest.raises(InvalidConfig, match="not available"):
        resolve_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_index_beyond_the_machine_is_a_config_error():
    assert resolve_device("cuda").type == "cuda"
    with pytest.raises(InvalidConfig, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_the_encoder_checks_its_device_first(monkeypatch):
    """Before it looks for the weights (a GPU machine without the encoder package got that error,
    after a load of the weights where they were there)."""
    from pmeta.models import encoder

    def no_weights(name):
        raise AssertionError("the weights were looked for before the device was checked")

    monkeypatch.setattr(encoder, "resolve_model_path", no_weights)
    with pytest.raises(InvalidConfig, match="unknown torch device"):
        encoder.FunctionalEncoder(device="gpu0")


def test_seeds_and_inner_steps_are_bounded_alike_in_the_cli_and_the_configs():
    from pmeta.cli.app import MAX_INNER_STEPS as CLI_MAX_INNER_STEPS, MAX_SEED as CLI_MAX_SEED
    from pmeta.config import MAX_INNER_STEPS, MAX_SEED, BankConfig
    from pmeta.text.config import TextConfig

    assert CLI_MAX_SEED == MAX_SEED == 2**32 - 1
    assert CLI_MAX_INNER_STEPS == MAX_INNER_STEPS == 50
    for config in (BankConfig, TextConfig):
        assert config(inner_steps=MAX_INNER_STEPS).inner_steps == MAX_INNER_STEPS
        with pytest.raises(ValueError, match="inner_steps"):
            config(inner_steps=MAX_INNER_STEPS + 1)
    for config in (BankConfig, TextConfig):
        assert config(seed=MAX_SEED).seed == MAX_SEED
        for bad in (-1, MAX_SEED + 1):
            with pytest.raises(ValueError, match="seed"):
                config(seed=bad)

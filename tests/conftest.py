"""Shared fixtures: one tiny bank per test session, built on the shipped sample."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# One torch thread per test process: CI runs two pytest-xdist workers on two cores, and a plain
# one-process run of the whole suite has always run with one (test_mechanics.py used to set it on import).
torch.set_num_threads(1)
os.environ.setdefault("PMETA_PROGRESS", "0")

# Property tests draw the same cases on every run, on any machine (Hypothesis derandomizes by
# itself only where it detects a CI service), so a failure reproduces and a green run means the same.
settings.register_profile("pmeta", derandomize=True)
settings.load_profile("pmeta")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """A fresh module object of ``benchmarks/<name>.py`` (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def readme_prediction():
    """``run(readme_text, prompt_text, folder)`` -> (the README's python blocks, the scope they ran
    in): an export README's code, run as written from ``folder`` with ``text`` = the prompt, for the
    tests that check it reproduces pmeta's prediction (``scope["prediction"]``)."""
    import re

    def run(readme: str, text: str, folder: Path) -> tuple[list[str], dict]:
        blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
        scope = {"text": text}
        here = os.getcwd()
        os.chdir(folder)
        try:
            for block in blocks:
                exec(block, scope)  # noqa: S102 - the README's own code
        finally:
            os.chdir(here)
        return blocks, scope

    return run


@pytest.fixture(scope="session")
def run_threads():
    """``run(work, count)``: ``work(thread)`` for thread 0..count-1, all at once in their own threads;
    fails with the first exceptions any of them raised (a bare thread's exception is only printed)."""
    import threading

    def run(work, count: int) -> None:
        errors: list[BaseException] = []

        def guarded(thread: int) -> None:
            try:
                work(thread)
            except BaseException as error:  # noqa: BLE001 - reported in the calling thread below
                errors.append(error)

        threads = [threading.Thread(target=guarded, args=(t,)) for t in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[:3]

    return run


@pytest.fixture(scope="session")
def benchmark_script():
    """``load_benchmark`` as a fixture: ``benchmark_script("seeds")`` is benchmarks/seeds.py, freshly loaded."""
    return load_benchmark


@pytest.fixture(scope="session")
def tiny_bank(tmp_path_factory) -> Path:
    """Built once per test run: under pytest-xdist (``-n 2``, what CI runs) the first worker to ask
    builds it into the run's shared temporary folder while holding a lock, and the others open that
    same bank (the tests only read it; ``test_bank_e2e`` checks that opening writes nothing). A build
    that fails is reported to the other workers rather than tried again."""
    from filelock import FileLock

    from pmeta import build_bank, load_config
    from pmeta.data import load_sample

    def build(path: Path) -> Path:
        build_bank(load_sample(), path, load_config("tiny"))
        return path

    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return build(tmp_path_factory.mktemp("banks") / "tiny")
    # the run's temporary folder, common to its workers; named after the run as well, in case the
    # workers do not share one (remote workers)
    shared = tmp_path_factory.getbasetemp().parent
    name = f"tiny-bank-{os.environ.get('PYTEST_XDIST_TESTRUNUID', 'run')}"
    path, done, failed = shared / name, shared / f"{name}.done", shared / f"{name}.failed"
    with FileLock(str(shared / f"{name}.lock")):
        if failed.exists():
            pytest.fail(f"the session's tiny bank failed to build in another worker: {failed.read_text()}")
        if not done.exists():
            try:
                build(path)
            except BaseException as error:
                failed.write_text(f"{type(error).__name__}: {error}")
                raise
            done.touch()
    return path


@pytest.fixture(scope="session")
def opened_bank(tiny_bank):
    from pmeta import Bank

    return Bank.open(tiny_bank)


@pytest.fixture(scope="module")
def with_anchor_bias(opened_bank):
    """The tiny bank's model with an anchor item bias: anchor a favours items a, a + A, a + 2A, ..."""
    from dataclasses import replace

    from pmeta.bank.model import PmetaModel

    source = opened_bank.model
    n, count = len(source.item_texts), source.t.anchor_keys.shape[0]
    bias = torch.full((count, n), -1.0)
    for a in range(count):
        bias[a, a::count] = 2.0
    return PmetaModel(source.config, source.encoder, source.item_texts, replace(source.t, anchor_bias=bias), index=source.index)


@pytest.fixture(scope="module")
def with_size_scale(with_anchor_bias):
    """``with_anchor_bias`` whose head also carries the default served scale of the bias per history size."""
    from dataclasses import replace

    from pmeta.bank.model import PmetaModel
    from pmeta.config import ANCHOR_BIAS_SIZE_SCALE

    source = with_anchor_bias
    head = {**source.t.head, "anchor_bias_scale": torch.tensor(ANCHOR_BIAS_SIZE_SCALE)}
    return PmetaModel(source.config, source.encoder, source.item_texts, replace(source.t, head=head), index=source.index)


@pytest.fixture(scope="session")
def with_time_prior():
    """Factory: ``make(model, weight, events, kind="exponential")`` -> a copy of a PmetaModel whose head
    also carries a time prior of ``kind`` (h = 365 days) built from ``events`` random ratings; the
    source model is untouched."""
    from dataclasses import replace

    import numpy as np

    from pmeta.bank.model import PmetaModel
    from pmeta.tasks import time_prior

    def make(source, weight: float, events: int, kind: str = "exponential"):
        n = len(source.item_texts)
        rng = np.random.default_rng(0)
        prior = time_prior.build(rng.integers(0, n, events), rng.integers(0, 10**8, events), n, 365.0, kind)
        head = {**source.t.head, **time_prior.head_entries(prior, weight)}
        return PmetaModel(source.config, source.encoder, source.item_texts, replace(source.t, head=head), index=source.index)

    return make

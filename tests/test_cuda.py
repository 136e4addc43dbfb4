"""CUDA: serving and building on a GPU give what the CPU gives. Skipped on machines without one
(CI has none); run by hand where a GPU is lent (`pytest tests/test_cuda.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pmeta

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "history.json"
USERS = [["2571", "1196", "260"], ["1", "2355", "3114", "78499", "4886"], ["296"], [], ["318", "593", "50", "47", "527", "858", "2959"]]


def history(user_id: str, items: list[str]) -> dict:
    return {"user_id": user_id, "items": [{"item_id": i, "rating": 5, "timestamp": 1_000 + n} for n, i in enumerate(items)]}


@pytest.fixture(scope="module")
def cuda_bank(tiny_bank):
    return pmeta.Bank.open(tiny_bank, device="cuda")


def assert_same_ranking(cpu, gpu, tolerance: float = 1e-3) -> None:
    """CUDA's kernels sum in another order than the CPU's: the scores agree to float32 noise
    (``tolerance`` × max(their spread, 1)), the history items are excluded alike, and the top-10
    lists hold the same films."""
    finite = np.isfinite(cpu.scores)
    assert gpu.scores.dtype == np.float32 and np.array_equal(finite, np.isfinite(gpu.scores))
    spread = float(cpu.scores[finite].std())
    assert np.abs(gpu.scores[finite] - cpu.scores[finite]).max() < tolerance * max(spread, 1.0)
    top_cpu, top_gpu = ([r.item_id for r in p.rank(10)] for p in (cpu, gpu))
    assert len(set(top_cpu) & set(top_gpu)) >= 9, (top_cpu, top_gpu)


def test_every_tensor_moves_to_the_gpu(cuda_bank):
    assert {v.device.type for v in cuda_bank.model.t.to_flat_views().values()} == {"cuda"}
    assert next(iter(cuda_bank.model.encoder.weights.values())).device.type == "cuda"


def test_cuda_serving_ranks_like_the_cpu(opened_bank, cuda_bank):
    for n, items in enumerate(USERS):
        cpu, gpu = opened_bank.personalize(history(f"u{n}", items)), cuda_bank.personalize(history(f"u{n}", items))
        assert [a["anchor"] for a in gpu.anchors] == [a["anchor"] for a in cpu.anchors]
        assert all(v.device.type == "cuda" for v in gpu.adapter.values())
        assert_same_ranking(cpu, gpu)


def test_cuda_batches_vmap_and_threads_equal_one_by_one(cuda_bank, run_threads):
    users = [history(f"u{n}", items) for n, items in enumerate(USERS)]
    single = [cuda_bank.personalize(h) for h in users]
    for method in ("batched", "vmap"):
        for s, b in zip(single, cuda_bank.personalize_many(users, method=method)):
            finite = np.isfinite(s.scores)
            np.testing.assert_allclose(b.scores[finite], s.scores[finite], rtol=1e-3, atol=1e-3)
    results = {}

    def worker(thread: int) -> None:
        for rep in range(3):
            n = (thread + rep) % len(users)
            results[(thread, rep)] = (n, [r.item_id for r in cuda_bank.personalize(users[n]).rank(10)])

    run_threads(worker, 4)
    assert len(results) == 12
    for n, top in results.values():
        assert len(set(top) & {r.item_id for r in single[n].rank(10)}) >= 9


def test_bfloat16_on_cuda_ranks_like_float32(tiny_bank, cuda_bank):
    fast = pmeta.Bank.open(tiny_bank, device="cuda", precision="bfloat16")
    for n, items in enumerate(USERS[:3]):
        exact, approx = cuda_bank.personalize(history(f"u{n}", items)), fast.personalize(history(f"u{n}", items))
        finite = np.isfinite(exact.scores)
        assert np.abs(approx.scores[finite] - exact.scores[finite]).max() < 0.1 * exact.scores[finite].std()
        assert len({r.item_id for r in exact.rank(10)} & {r.item_id for r in approx.rank(10)}) >= 8


def test_cli_adapt_on_cuda_prints_the_cpu_ranking(tiny_bank):
    def adapt(device: str) -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "pmeta", "adapt", "--bank", str(tiny_bank), "--user", "u123", "--history", str(EXAMPLE), "--device", device, "--json"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "PMETA_PROGRESS": "0"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    cpu, gpu = adapt("cpu"), adapt("cuda")
    ids = [r["item_id"] for r in cpu["recommendations"]]
    assert len(set(ids) & {r["item_id"] for r in gpu["recommendations"]}) >= len(ids) - 1
    assert [a["anchor"] for a in gpu["anchors"]] == [a["anchor"] for a in cpu["anchors"]]


def test_a_bank_built_on_cuda_opens_on_the_cpu_and_validates_like_a_cpu_build(tmp_path):
    """The build moves its tensors and every episode to the GPU; the published bank holds CPU
    tensors (it opens and serves on a CPU) and its validation ranking is that of a CPU build within
    noise (kernels sum in another order, so meta-training drifts apart: not bitwise)."""
    from pmeta import build_bank, load_config
    from pmeta.data import load_sample

    results = {}
    for device in ("cpu", "cuda"):
        config = load_config("tiny", overrides={"device": device})
        results[device] = build_bank(load_sample(), tmp_path / device, config)
    bank = pmeta.Bank.open(tmp_path / "cuda")  # on the CPU
    assert {v.device.type for v in bank.model.t.to_flat_views().values()} == {"cpu"}
    assert all(torch.isfinite(v).all() for v in bank.model.t.to_flat().values() if v.is_floating_point())
    assert bank.personalize(history("x", USERS[0])).rank(10)
    cpu, gpu = (pmeta.Bank.open(tmp_path / d).build_record["validation"]["final"] for d in ("cpu", "cuda"))
    assert cpu["users"] == gpu["users"] > 0
    assert abs(cpu["ndcg@10"] - gpu["ndcg@10"]) < 0.05 and abs(cpu["hr@10"] - gpu["hr@10"]) < 0.08, (cpu, gpu)


def test_bench_runs_on_cuda_and_names_the_gpu(tiny_bank):
    from pmeta import bench

    report = bench.run([tiny_bank], smoke=True, retrieval_sizes=(1_000,), device="cuda")
    assert report["device"].startswith("cuda") and report["machine"]["gpu"] and report["personalize_ms"]["p50"] > 0
    assert all(t["batched_users_per_s"] > 0 for t in report["throughput_users_per_s"].values())
    assert report["bytes_stored_per_user"] == 0

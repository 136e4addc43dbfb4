"""Bank build on torch.distributed (gloo, 2 CPU processes): averaged meta-gradients equal the
single-process gradient of the whole batch, and a 2-process ``torchrun`` build verifies, is
written once (by rank 0) and matches a single-process build's validation quality within noise."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# smaller than --preset tiny: seconds per build
MICRO = """
[bank]
anchors = 2
prompt_length = 4
max_tokens = 64
max_history_items = 5
cf_rank = 16
cf_init = "puresvd"
tower_steps = 40
tower_rounds = 1
tower_batch_users = 32
meta_batch_users = 4
global_steps = 3
anchor_steps = 2
stack_steps = 2
inner_steps = 1
validate_stages = false
early_stopping = false
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**out, "PMETA_PROGRESS": "0", "OMP_NUM_THREADS": "1", **extra}


GRADIENT_CHECK = textwrap.dedent(
    """
    import sys, torch
    from pmeta.bank import distributed
    assert distributed.init_from_env("cpu") and distributed.world_size() == 2
    rank = distributed.rank()
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randn(8)
    w = torch.randn(5) if rank == 0 else torch.zeros(5)  # rank 1 starts elsewhere: broadcast fixes it
    unused = torch.zeros(3, requires_grad=True)
    distributed.broadcast_([w])
    w.requires_grad_(True)
    part = slice(0, 4) if rank == 0 else slice(4, 8)
    loss = ((x[part] @ w - y[part]) ** 2).mean()
    loss.backward()
    mean_loss = distributed.average_gradients([w, unused], loss)
    full_w = w.detach().clone().requires_grad_(True)
    full = ((x @ full_w - y) ** 2).mean()
    full.backward()
    torch.testing.assert_close(w.grad, full_w.grad)
    assert unused.grad is None
    assert abs(mean_loss - full.item()) < 1e-5
    print("OK", rank)
    """
)


def test_gradient_average_equals_full_batch_gradient(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(GRADIENT_CHECK)
    port = str(free_port())
    procs = [
        subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=env(WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.startswith("OK")


def final_validation(bank: Path) -> dict:
    from pmeta import Bank

    opened = Bank.open(bank)  # verifies every checksum
    reader = opened.store.open()
    return json.loads((Path(reader.dir) / "build.json").read_text())["validation"]["final"]


def test_torchrun_build_matches_single_process(tmp_path):
    config = tmp_path / "micro.toml"
    config.write_text(MICRO)
    single, multi = tmp_path / "single", tmp_path / "multi"
    common = ["--threads", "1", "bank", "build", "--config", str(config), "--quiet"]
    one = subprocess.run([sys.executable, "-m", "pmeta", *common, "--out", str(single)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "pmeta"]
    two = subprocess.run([*torchrun, *common, "--out", str(multi)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("built bank version") == 1  # rank 0 reports, the other rank is silent
    versions = [p for p in (multi / "versions").iterdir() if p.is_dir()]
    assert len(versions) == 1  # written once, by rank 0
    a, b = final_validation(single), final_validation(multi)
    assert a["users"] == b["users"] > 20
    p = (a["hr@10"] + b["hr@10"]) / 2
    noise = math.sqrt(2 * max(p * (1 - p), 0.01) / a["users"])  # std of a difference of two HR estimates
    assert abs(a["hr@10"] - b["hr@10"]) <= 3 * noise, (a, b)
    assert b["hr@10"] > 0.02  # far above random (10 / 9,742 items ≈ 0.001)


def test_a_numbered_gpu_under_torchrun_is_refused(monkeypatch):
    """`--device cuda:N` under torchrun would put every rank on GPU N while NCCL binds rank r to GPU
    LOCAL_RANK: refused before the process group is joined (no GPU needed to check it)."""
    from pmeta.bank import distributed
    from pmeta.errors import InvalidConfig

    assert distributed.device_of("cuda:1") == "cuda:1"  # one process: any GPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    for call in (distributed.init_from_env, distributed.device_of):
        with pytest.raises(InvalidConfig, match="use --device cuda"):
            call("cuda:1")

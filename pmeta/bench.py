"""``pmeta bench``: latency, throughput, memory and storage of a bank, with the machine they ran on.

Every number comes from this run; ratios are only compared inside one run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .bank.bank import BUILD_FILE, Bank
from .errors import PmetaError


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def _percentiles(values: list[float]) -> dict:
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)), "mean": float(np.mean(values)), "n": len(values)}


def sample_histories(bank: Bank, k: int, count: int, seed: int = 0) -> list[dict]:
    """Histories of K liked items: the first K positives of the bank's held-out users when the
    shipped sample is the bank's dataset, else K random catalogue items."""
    rng = np.random.default_rng(seed)
    histories = []
    try:
        from .data import load_sample

        dataset = load_sample()
        if dataset.catalog.item_ids == bank.catalog.item_ids:
            positives = dataset.positives_by_user()
            index = {uid: i for i, uid in enumerate(dataset.ratings.user_ids)}
            for uid in bank.record.get("held_out_users", []):
                items = positives.get(index.get(uid, -1), [])
                if len(items) >= k:
                    histories.append({"user_id": uid, "items": [{"item_id": dataset.catalog.item_ids[i], "rating": 5, "timestamp": n} for n, i in enumerate(items[:k])]})
                if len(histories) >= count:
                    return histories
    except PmetaError:  # the shipped sample is unreadable: fall back to random catalogue items
        histories = []
    while len(histories) < count:
        items = rng.choice(len(bank.catalog), size=k, replace=False)
        histories.append({"user_id": f"bench{len(histories)}", "items": [{"item_id": bank.catalog.item_ids[i], "rating": 5, "timestamp": n} for n, i in enumerate(items)]})
    return histories


def bench_personalize(bank: Bank, k: int, count: int, steps: int | None = None) -> dict:
    histories = sample_histories(bank, k, count)
    bank.personalize(histories[0], steps=steps).rank(10)  # warm-up
    totals, parts = [], {"embed_ms": [], "retrieve_fuse_ms": [], "adapt_ms": [], "score_ms": []}
    for h in histories:
        start = time.perf_counter()
        p = bank.personalize(h, steps=steps)
        p.rank(10)
        totals.append((time.perf_counter() - start) * 1e3)
        for key in parts:
            parts[key].append(p.timing_ms[key])
    return {"k": k, "total_ms": _percentiles(totals), **{key: _percentiles(v) for key, v in parts.items()}}


def bench_throughput(bank: Bank, batch: int, k: int = 5, repeats: int = 2) -> dict:
    histories = sample_histories(bank, k, batch, seed=1)
    bank.personalize_many(histories[:2])
    start = time.perf_counter()
    for _ in range(repeats):
        bank.personalize_many(histories, batch_size=batch)
    batched = batch * repeats / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(repeats):
        for h in histories:
            bank.personalize(h)
    loop = batch * repeats / (time.perf_counter() - start)
    return {"batch": batch, "batched_users_per_s": batched, "loop_users_per_s": loop}


_PEAK_RSS_WRAPPER = """
import sys
from pmeta.cli import app
try:
    app(args=sys.argv[1:], prog_name="pmeta")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print("PEAK_RSS_KB", peak.split()[1], file=sys.stderr)
sys.exit(code)
"""


def adapt_process_rss(bank_path: Path, history: dict) -> float:
    """Peak RSS (MB) of a fresh ``pmeta adapt`` process: the kernel's high-water mark (VmHWM) read
    by the process itself at exit. (``RUSAGE_CHILDREN`` would also count the forked copy of this
    benchmark process before ``exec``.)"""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.json"
        path.write_text(json.dumps(history))
        args = ["--threads", str(torch.get_num_threads()), "adapt", "--bank", str(bank_path), "--history", str(path), "--json"]
        result = subprocess.run([sys.executable, "-c", _PEAK_RSS_WRAPPER, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pmeta adapt failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
    kib = next(line.split()[1] for line in result.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    return int(kib) / 1024.0


def bank_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def tree_state(path: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in Path(path).rglob("*") if p.is_file())


def run(bank_path: str | Path, quick: bool = False, db_url: str | None = None) -> dict:
    bank_path = Path(bank_path)
    bank = Bank.open(bank_path, db_url)
    count = 20 if quick else 100
    before = tree_state(bank_path)
    personalize = [bench_personalize(bank, k, count) for k in (1, 3, 5)]
    throughput = [bench_throughput(bank, b) for b in ((1, 8) if quick else (1, 8, 64))]
    users_personalized = 3 * (count + 1) + sum(t["batch"] * 4 + 2 for t in throughput)
    after = tree_state(bank_path)
    try:
        build = json.loads((Path(bank.store.open().dir) / BUILD_FILE).read_text())
    except (OSError, ValueError):
        build = {}
    return {
        "machine": machine(),
        "bank": {"path": str(bank_path), "version": bank.version, "meta": bank.config.meta, "anchors": int(bank.model.t.anchor_keys.shape[0]), "items": len(bank.catalog), "build_seconds": build.get("seconds")},
        "personalize_ms": {f"k{r['k']}": r for r in personalize},
        "throughput_users_per_s": {f"batch{t['batch']}": t for t in throughput},
        "peak_rss_mb": adapt_process_rss(bank_path, sample_histories(bank, 5, 1)[0]),
        "bank_bytes": bank_bytes(bank_path),
        "bytes_stored_per_user": 0 if before == after else (bank_bytes(bank_path) - sum(s for _, s, _ in before)) / users_personalized,
        "users_personalized": users_personalized,
    }


def format_table(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads, GPU: {m['gpu'] or 'none'}",
        f"bank: {report['bank']['version']} ({report['bank']['meta']}, {report['bank']['anchors']} anchors, {report['bank']['items']} items), build {report['bank']['build_seconds'] or 0:.0f} s, {report['bank_bytes'] / 1e6:.1f} MB on disk",
        "",
        "personalize + rank (ms)      p50      p95   | embed  retrieve+fuse  adapt  score (p50)",
    ]
    for key, r in report["personalize_ms"].items():
        lines.append(
            f"  K={r['k']}                    {r['total_ms']['p50']:7.1f}  {r['total_ms']['p95']:7.1f}   | {r['embed_ms']['p50']:5.1f}  {r['retrieve_fuse_ms']['p50']:13.1f}  {r['adapt_ms']['p50']:5.1f}  {r['score_ms']['p50']:5.1f}"
        )
    lines.append("")
    lines.append("throughput (users/s)     batched     loop")
    for key, t in report["throughput_users_per_s"].items():
        lines.append(f"  batch {t['batch']:<3}            {t['batched_users_per_s']:8.1f} {t['loop_users_per_s']:8.1f}")
    lines.append("")
    lines.append(f"peak RSS of `pmeta adapt`: {report['peak_rss_mb']:.0f} MB")
    lines.append(f"bytes stored per user: {report['bytes_stored_per_user']} (bank unchanged after {report['users_personalized']} users)")
    return "\n".join(lines)

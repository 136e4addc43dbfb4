"""``pmeta bench``: latency, throughput, memory, retrieval at scale and the per-user-LoRA comparison,
with the machine they ran on.

Every number comes from this run; ratios are only compared inside one run. Sections:

* ``personalize_ms``: one user at a time, K = 1, 3, 5 liked items (the first K positives of the
  bank's held-out users), split into embed / retrieve / fuse / inner steps / rank, per bank
  (MAML- and Reptile-trained when both are given);
* ``throughput_users_per_s``: ``personalize_many`` at batch 1, 8, 16, 64 (and the device's default batch, 128 on CUDA) with the leading-user-axis
  batching, with ``torch.func.vmap`` over users, and a Python loop of ``personalize``;
* ``rank_ms``: scoring + top-10 against catalogues of 1k / 10k / 100k synthetic items of the bank's
  shapes through the bank's own ranking head;
* ``retrieval``: exact flat against HNSW / IVF over 1k, 100k, 1M clustered synthetic unit keys
  (d = 384), latency per query (one query per call) and recall@10 against exact;
* ``vs_per_user_lora``: the OPPU recipe (:class:`pmeta.eval.oppu.PerUserLoRA`) on the same users:
  training time per user, bytes per user, and loading a stored adapter from disk + scoring; LoRA on
  every layer as published, and restricted to pmeta's personalized layers;
* ``peak_rss_mb``: the kernel high-water mark of a fresh ``pmeta adapt`` process.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .bank.bank import BUILD_FILE, Bank, default_batch_size, top_indexes
from .bank.model import device_clock
from .errors import InvalidRequest, PmetaError


def machine(device: str | torch.device = "cpu") -> dict:
    """The machine, and the GPU: the one ``device`` names when it is a CUDA device, else GPU 0 if any."""
    import faiss

    cpu = platform.processor() or platform.machine()
    gpu = torch.device(device) if torch.device(device).type == "cuda" else 0  # the bench's GPU, else the first
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            if cpu and flags:
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(gpu) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_average_1min": load,
        "cpu_bf16": sorted(flags & {"avx512_bf16", "amx_bf16"}),  # bf16 matrix instructions (precision=bfloat16 pays off)
    }


def _percentiles(values: list[float]) -> dict:
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)), "mean": float(np.mean(values)), "n": len(values)}


def _clock(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


# ---------------------------------------------------------------------- users
def sample_histories(bank: Bank, k: int, count: int, seed: int = 0) -> list[dict]:
    """Histories of K liked items: the first K positives of the bank's held-out users when the
    shipped sample is the bank's dataset (cycled when more are asked for), else K random items."""
    rng = np.random.default_rng(seed)
    histories: list[dict] = []
    try:
        from .data import load_sample

        dataset = load_sample()
        if dataset.catalog.item_ids == bank.catalog.item_ids:
            positives = dataset.positives_by_user()
            index = {uid: i for i, uid in enumerate(dataset.ratings.user_ids)}
            pool = []
            for uid in bank.record.get("held_out_users", []):
                items = positives.get(index.get(uid, -1), [])
                if len(items) >= k:
                    pool.append({"user_id": uid, "items": [{"item_id": dataset.catalog.item_ids[i], "rating": 5, "timestamp": n} for n, i in enumerate(items[:k])]})
            if pool:
                offset = seed % len(pool)
                return [pool[(offset + n) % len(pool)] for n in range(count)]
    except PmetaError:  # the shipped sample is unreadable: fall back to random catalogue items
        histories = []
    while len(histories) < count:
        items = rng.choice(len(bank.catalog), size=k, replace=False)
        histories.append({"user_id": f"bench{len(histories)}", "items": [{"item_id": bank.catalog.item_ids[i], "rating": 5, "timestamp": n} for n, i in enumerate(items)]})
    return histories


# ---------------------------------------------------------------------- personalize latency
PARTS = ("embed_ms", "retrieve_ms", "fuse_ms", "adapt_ms", "rank_ms")


def bench_personalize(bank: Bank, k: int, count: int, steps: int | None = None) -> dict:
    histories = sample_histories(bank, k, count)
    for h in histories[:2]:  # warm-up
        bank.personalize(h, steps=steps).rank(10)
    totals, parts = [], {key: [] for key in PARTS}
    for h in histories:
        start = time.perf_counter()
        p = bank.personalize(h, steps=steps)
        t_rank = time.perf_counter()
        p.rank(10)
        end = time.perf_counter()
        totals.append((end - start) * 1e3)
        timing = dict(p.timing_ms)
        timing["rank_ms"] = timing.get("score_ms", 0.0) + (end - t_rank) * 1e3
        for key in parts:
            parts[key].append(timing.get(key, 0.0))
    return {"k": k, "steps": bank.config.inner_steps if steps is None else steps, "total_ms": _percentiles(totals), **{key: _percentiles(v) for key, v in parts.items()}}


@contextmanager
def precision(bank: Bank, value: str):
    """The bank's model runs at ``value`` precision inside the block (as ``Bank.open(precision=)``)."""
    saved, bank.model.precision = bank.model.precision, value
    try:
        yield
    finally:
        bank.model.precision = saved


def personalize_flops(bank: Bank, k: int = 5) -> float:
    """GFLOP of one personalize + rank (torch's FLOP counter: matrix products and attention),
    a machine-independent measure of the work that the latency is made of."""
    from torch.utils.flop_counter import FlopCounterMode

    history = sample_histories(bank, k, 1)[0]
    with FlopCounterMode(display=False) as counter:
        bank.personalize(history).rank(10)
    return counter.get_total_flops() / 1e9


# ---------------------------------------------------------------------- throughput
def bench_throughput(bank: Bank, batch: int, k: int = 5, users: int | None = None) -> dict:
    """Users/s of ``personalize_many`` (leading-axis batching and vmap) and of a loop, same users."""
    users = users or max(batch, 8)
    histories = sample_histories(bank, k, users, seed=1)
    for method in ("batched", "vmap"):  # warm-up of each (the first vmap call on a GPU pays a one-off cost)
        bank.personalize_many(histories[:2], method=method)
    out = {"batch": batch, "users": users}
    for method in ("batched", "vmap"):
        start = time.perf_counter()
        bank.personalize_many(histories, batch_size=batch, method=method)
        out[f"{method}_users_per_s"] = users / (time.perf_counter() - start)
    with precision(bank, "bfloat16"):
        bank.personalize_many(histories[:2])  # warm-up
        start = time.perf_counter()
        bank.personalize_many(histories, batch_size=batch)
        out["batched_bf16_users_per_s"] = users / (time.perf_counter() - start)
    start = time.perf_counter()
    for h in histories:
        bank.personalize(h)
    out["loop_users_per_s"] = users / (time.perf_counter() - start)
    return out


# ---------------------------------------------------------------------- rank vs catalogue size
def bench_rank(bank: Bank, sizes: tuple[int, ...], repeats: int = 20) -> list[dict]:
    """Score one real personalized user against ``n`` synthetic items of the bank's shapes (unit
    text embeddings, item bias and collaborative rows resampled from the bank's) through the
    bank's ranking head, then take the top 10 not in the history (the serving path's code)."""
    from .tasks import ranking

    model = bank.model
    history = sample_histories(bank, 5, 1)[0]
    user = bank.user_input(bank.as_history(history))
    personal, batch, _ = model.personalize([user])
    with torch.inference_mode():
        pooled = model.encoder.upper(batch.hidden, batch.mask, personal, model.config.prompt_layer)
        vectors = ranking.user_vectors(model.t.head, pooled, batch)
    out = []
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        rows = torch.randint(len(bank.catalog), (n,), generator=g).to(model.t.item_text.device)
        head = dict(model.t.head)
        head["item_bias"] = head["item_bias"][rows]
        if "item_embedding" in head:
            head["item_embedding"] = head["item_embedding"][rows].contiguous()
        item_text = F.normalize(torch.randn(n, model.t.item_text.shape[1], generator=g), dim=1).to(model.t.item_text.device)
        seen = np.array(user.seen_items, dtype=np.int64) % n

        def once() -> None:
            with torch.inference_mode():
                scores = ranking.logits(head, item_text, vectors, None if batch.prior is None else batch.prior[:, rows])[0].float().cpu().numpy()
            scores[seen] = -np.inf
            top_indexes(scores, 10)

        once()
        out.append({"items": n, "ms": _percentiles(_clock(once, repeats))})
    return out


# ---------------------------------------------------------------------- retrieval at scale
def clustered_keys(n: int, queries: int, dim: int = 384, seed: int = 0, per_cluster: int = 1000, noise: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Clustered synthetic unit vectors: (keys (n, dim), queries (queries, dim)), float32.

    max(10, n / per_cluster) random unit centres; every key and query is
    normalise(centre + noise · g / √dim) for a random centre and standard normal g (cosine to its
    centre ≈ 0.86). Real user keys (unit means of 32-dimensional collaborative key rows by
    default, or of 384-dimensional sentence embeddings with ``key_space = "text"``) are more
    concentrated still; uniformly random keys have no neighbourhood structure to index at all.
    """
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(max(10, n // per_cluster), dim, generator=g), dim=1)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), dtype=np.float32)
        for start in range(0, m, 65_536):
            stop = min(m, start + 65_536)
            which = torch.randint(len(centres), (stop - start,), generator=g)
            x = centres[which] + noise * torch.randn(stop - start, dim, generator=g) / dim**0.5
            out[start:stop] = F.normalize(x, dim=1).numpy()
        return out

    return draw(n), draw(queries)


def recall_at(exact: np.ndarray, approx: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(a) for a, b in zip(exact, approx)]))


def bench_retrieval(sizes: tuple[int, ...], queries: int = 100, k: int = 10, hnsw_up_to: int = 100_000) -> list[dict]:
    """Exact flat against approximate indexes on clustered synthetic keys (d = 384)."""
    from .fusion.index import AnchorIndex, choose_kind

    rows = []
    for n in sizes:
        keys, qs = clustered_keys(n, queries, seed=n)
        kinds = ["flat", "ivf"] + (["hnsw"] if n <= hnsw_up_to else [])
        exact = None
        for kind in kinds:
            start = time.perf_counter()
            index = AnchorIndex.build(keys, kind=kind)
            build_s = time.perf_counter() - start
            _, ids = index.search(qs, k)
            if kind == "flat":
                exact = ids
            timed = qs[: min(len(qs), 20 if (kind == "flat" and n >= 500_000) else len(qs))]
            lat = [t for q in timed for t in _clock(lambda q=q: index.search(q[None], k), 1)]
            rows.append({"keys": n, "dim": keys.shape[1], "data": "clustered synthetic", "index": kind, "auto_choice": choose_kind(n) == kind, "build_s": build_s, "ms_per_query": _percentiles(lat), "recall@10": recall_at(exact, ids)})
            del index
        skipped = [kind for kind in ("hnsw",) if kind not in kinds]
        for kind in skipped:
            rows.append({"keys": n, "index": kind, "skipped": f"building HNSW over {n:,} keys would take an estimated ~{n / 100_000 * 80 / 60:.0f} min on one core (80 s per 100k keys measured once); auto uses IVF above 200k"})
        del keys
    return rows


# ---------------------------------------------------------------------- OPPU comparison
def bench_per_user_lora(bank: Bank, users: int, k: int = 5) -> dict:
    """The OPPU recipe on the same users as pmeta: train a rank-8 LoRA from scratch per user
    (:class:`pmeta.eval.oppu.PerUserLoRA`) on every encoder layer as published, store it as
    safetensors, load it back and score; and the same LoRA restricted to the layers pmeta
    personalizes (whose frozen lower layers then run once), the cheapest variant of the recipe."""
    from safetensors.torch import load_file

    from .eval.oppu import PerUserLoRA

    histories = sample_histories(bank, k, users, seed=2)
    supports = [np.array(bank.user_input(bank.as_history(h)).liked_items, dtype=np.int64) for h in histories]
    device = bank.model.t.item_text.device
    pmeta_ms = []
    for h in histories[:1] + histories:  # first call: warm-up
        start = time.perf_counter()
        bank.personalize(h).rank(10)
        pmeta_ms.append((time.perf_counter() - start) * 1e3)
    ours = float(np.median(pmeta_ms[1:]))
    last = bank.model.encoder.shape.layers - 1
    recipes = {}
    for layers in ("all", "bank"):
        oppu = PerUserLoRA(bank.model, layers=layers)
        train_ms, load_ms, sizes = [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            oppu.fit(supports[0])  # warm-up
            for n, (h, support) in enumerate(zip(histories, supports)):
                start = device_clock(device)
                lora = oppu.fit(support)
                train_ms.append((device_clock(device) - start) * 1e3)  # the GPU's queued steps included
                path = Path(tmp) / f"user{n}.safetensors"
                path.write_bytes(oppu.adapter_bytes(lora))
                sizes.append(path.stat().st_size)
                user = bank.user_input(bank.as_history(h))
                start = time.perf_counter()
                top_indexes(oppu.final_scores(user, load_file(str(path), device=str(device))).cpu().numpy(), 10)
                load_ms.append((time.perf_counter() - start) * 1e3)
        train, load = float(np.median(train_ms)), float(np.median(load_ms))
        recipes[layers] = {
            "recipe": f"rank-{oppu.rank} LoRA on query/value of layers {oppu.first_layer}-{last}, Adam lr {oppu.lr}, {oppu.steps} steps on the support items",
            "oppu_train_ms_per_user": _percentiles(train_ms),
            "oppu_bytes_per_user": int(np.median(sizes)),
            "oppu_load_and_score_ms": _percentiles(load_ms),
            "speedup_vs_training": train / ours,
            "ratio_vs_loading_stored_adapter": ours / load,
        }
    return {
        "users": users,
        "k": k,
        **recipes["all"],
        "pmeta_personalize_and_rank_ms": _percentiles(pmeta_ms[1:]),
        "pmeta_first_layer": bank.config.prompt_layer,  # pmeta personalizes this layer and the ones above
        "restricted_to_pmeta_layers": recipes["bank"],
    }


# ---------------------------------------------------------------------- memory and storage
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


def adapt_process_rss(bank_path: Path, history: dict, db_url: str | None = None, device: str = "cpu") -> float:
    """Peak RSS (MB) of a fresh ``pmeta adapt`` process on ``device``: the kernel's high-water mark
    (VmHWM) read by the process itself at exit. (``RUSAGE_CHILDREN`` would also count the forked copy
    of this benchmark process before ``exec``.) On a GPU it counts host memory only, the CUDA
    libraries' among it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.json"
        path.write_text(json.dumps(history))
        args = ["--threads", str(torch.get_num_threads()), "adapt", "--bank", str(bank_path), "--history", str(path), "--json"]
        args += ["--db", db_url] if db_url is not None else []
        args += ["--device", str(device)]
        result = subprocess.run([sys.executable, "-c", _PEAK_RSS_WRAPPER, *args], capture_output=True, text=True)
    if result.returncode != 0:
        said = [line for line in result.stderr.strip().splitlines() if line.strip() and not line.startswith("PEAK_RSS_KB")]
        raise PmetaError(f"the `pmeta adapt` process measured for peak RSS failed: {said[-1].strip() if said else f'exit code {result.returncode}'}")
    kib = next(line.split()[1] for line in result.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    return int(kib) / 1024.0


def bank_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def tree_state(path: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in Path(path).rglob("*") if p.is_file())


def tiny_banks(folder: Path) -> list[Path]:
    """A MAML and a Reptile bank of the ``tiny`` preset on the shipped sample (for ``--quick``)."""
    from .bank.build import build_bank
    from .config import load_config
    from .data import load_sample

    dataset = load_sample()
    paths = []
    for meta in ("maml", "reptile"):
        path = folder / meta
        build_bank(dataset, path, load_config("tiny", overrides={"meta": meta}))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------- the whole run
def run(banks: list[str | Path] | str | Path | None = None, quick: bool = False, db_url: str | None = None, retrieval_sizes: tuple[int, ...] | None = None, smoke: bool = False, device: str = "cpu") -> dict:
    """Every section, in one process. ``banks``: one or more bank directories (e.g. a MAML- and a
    Reptile-trained one); none with ``quick`` builds two tiny banks in a temporary folder.
    ``smoke`` (tests only) runs every section at its smallest size."""
    if banks is None or isinstance(banks, (str, Path)):
        banks = [] if banks is None else [banks]
    tmp = None
    if not banks:
        if not quick:
            raise InvalidRequest("give --bank BANK (twice for a MAML and a Reptile bank), or --quick to build two tiny banks")
        tmp = tempfile.TemporaryDirectory()
        banks = tiny_banks(Path(tmp.name))
    try:
        return _run([Path(b) for b in banks], quick or smoke, db_url, retrieval_sizes, built_tiny=tmp is not None, smoke=smoke, device=device)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _count_users(bank: Bank, counted: dict[str, int]) -> None:
    """Count the users ``bank`` personalizes (``personalize`` goes through ``personalize_many``)."""
    original = bank.personalize_many

    def counting(histories, *args, **kwargs):
        histories = list(histories)
        counted["users"] += len(histories)
        return original(histories, *args, **kwargs)

    bank.personalize_many = counting  # type: ignore[method-assign]


def _run(paths: list[Path], quick: bool, db_url: str | None, retrieval_sizes, built_tiny: bool, smoke: bool = False, device: str = "cpu") -> dict:
    count = 3 if smoke else 15 if quick else 100
    seen: dict[Path, Path] = {}
    for p in paths:
        if p.resolve() in seen:
            raise InvalidRequest(f"--bank {p} is given twice (as {seen[p.resolve()]}): give each bank once")
        seen[p.resolve()] = p
    opened = [Bank.open(p, db_url, device=device) for p in paths]
    before = [tree_state(p) for p in paths]  # after opening: an open may upgrade an old bank's schema once, not per user
    counted = {"users": 0}  # every user personalized through the banks, counted as it happens
    for bank in opened:
        _count_users(bank, counted)
    # first the `pmeta adapt` process (one more user): a failure there costs no measurement
    peak_rss = adapt_process_rss(paths[0], sample_histories(opened[0], 5, 1)[0], db_url, device)
    by_bank, bank_info = {}, []
    metas = [bank.config.meta for bank in opened]
    for number, (path, bank) in enumerate(zip(paths, opened), 1):
        name = bank.config.meta if metas.count(bank.config.meta) == 1 else f"{bank.config.meta}:{number}"
        by_bank[name] = {f"k{k}": bench_personalize(bank, k, count) for k in (1, 3, 5)}
        try:
            build = json.loads((Path(bank.store.open().dir) / BUILD_FILE).read_text())
        except (OSError, ValueError):
            build = {}
        bank_info.append({"name": name, "path": str(path), "version": bank.version, "meta": bank.config.meta, "inner_steps": bank.config.inner_steps, "anchors": int(bank.model.t.anchor_keys.shape[0]), "items": len(bank.catalog), "build_seconds": build.get("seconds"), "bytes": bank_bytes(path), "tiny_for_quick": built_tiny})
    main = opened[0]
    headline = by_bank[bank_info[0]["name"]]["k5"]["total_ms"]
    with precision(main, "bfloat16"):
        bf16 = bench_personalize(main, 5, count)
    batches = (1, 4) if smoke else (1, 8, 16) if quick else (1, 8, 16, 64)
    default = default_batch_size(main.model.t.item_text.device)
    batches += () if smoke or default in batches else (default,)  # personalize_many's default on this device (128 on CUDA)
    throughput = [bench_throughput(main, b, users=4 if smoke else None) for b in batches]
    rank = bench_rank(main, (1_000,) if smoke else (1_000, 10_000) if quick else (1_000, 10_000, 100_000), repeats=3 if smoke else 5 if quick else 20)
    retrieval = bench_retrieval(retrieval_sizes or ((1_000, 10_000) if quick else (1_000, 100_000, 1_000_000)), queries=30 if quick else 100)
    versus = bench_per_user_lora(main, 1 if smoke else 3 if quick else 10)
    gflop = personalize_flops(main)
    # the banks' personalize calls (the per-user LoRA section's pmeta users among them), bench_rank's
    # user (model.personalize, under the bank) and the `pmeta adapt` process's
    users_personalized = counted["users"] + 1 + 1
    after = [tree_state(p) for p in paths]
    grown = sum(size for _, size, _ in sum(after, [])) - sum(size for _, size, _ in sum(before, []))
    stored = 0 if before == after else max(grown, 0) / users_personalized
    versus["pmeta_bytes_per_user"] = stored
    return {
        "machine": machine(opened[0].model.t.item_text.device),
        "device": str(opened[0].model.t.item_text.device),
        "banks": bank_info,
        "personalize_ms": {"k": 5, "steps": main.config.inner_steps, "bank": bank_info[0]["name"], "p50": headline["p50"], "p95": headline["p95"], "gflop": gflop, "by_bank": by_bank, "bfloat16_k5": bf16},
        "throughput_users_per_s": {f"batch{t['batch']}": t for t in throughput},
        "rank_ms": rank,
        "peak_rss_mb": peak_rss,
        "retrieval": retrieval,
        "vs_per_user_lora": versus,
        "bytes_stored_per_user": stored,  # measured: the banks' files compared before and after
        "banks_unchanged": before == after,
        "users_personalized": users_personalized,
    }


def format_table(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), torch {m['torch']} with {m['torch_threads']} threads, faiss {m['faiss_threads']} threads, GPU: {m['gpu'] or 'none'}, bf16 instructions: {', '.join(m.get('cpu_bf16') or []) or 'none'}, load {m['load_average_1min']}",
        f"banks served on: {report.get('device', 'cpu')}",
    ]
    for b in report["banks"]:
        lines.append(f"bank {b['name']}: {b['path']} {b['version']} ({b['anchors']} anchors, {b['items']} items, {b['inner_steps']} inner steps), {b['bytes'] / 1e6:.1f} MB" + (" [tiny, built for --quick]" if b["tiny_for_quick"] else ""))
    lines += ["", "personalize + rank (ms)     total p50  total p95 | embed  retrieve  fuse  inner steps  rank (p50)"]
    for name, per_k in report["personalize_ms"]["by_bank"].items():
        for r in per_k.values():
            lines.append(
                f"  {name:<8} K={r['k']}             {r['total_ms']['p50']:7.1f}    {r['total_ms']['p95']:7.1f} | {r['embed_ms']['p50']:5.1f}  {r['retrieve_ms']['p50']:8.2f}  {r['fuse_ms']['p50']:4.2f}  {r['adapt_ms']['p50']:11.1f}  {r['rank_ms']['p50']:5.1f}"
            )
    r = report["personalize_ms"]["bfloat16_k5"]
    lines.append(f"  {'bf16':<8} K=5             {r['total_ms']['p50']:7.1f}    {r['total_ms']['p95']:7.1f} | {r['embed_ms']['p50']:5.1f}  {r['retrieve_ms']['p50']:8.2f}  {r['fuse_ms']['p50']:4.2f}  {r['adapt_ms']['p50']:11.1f}  {r['rank_ms']['p50']:5.1f}   (first bank, precision=bfloat16)")
    lines.append(f"  work of one personalize + rank at K=5: {report['personalize_ms']['gflop']:.2f} GFLOP")
    lines += ["", "personalize_many (users/s)   batched     vmap     loop   batched bf16"]
    for t in report["throughput_users_per_s"].values():
        lines.append(f"  batch {t['batch']:<3} ({t['users']} users)   {t['batched_users_per_s']:8.1f} {t['vmap_users_per_s']:8.1f} {t['loop_users_per_s']:8.1f}   {t['batched_bf16_users_per_s']:8.1f}")
    lines += ["", "rank (score + top 10) vs catalogue size:"]
    for r in report["rank_ms"]:
        lines.append(f"  {r['items']:>9,} items   p50 {r['ms']['p50']:7.2f} ms   p95 {r['ms']['p95']:7.2f} ms")
    lines += ["", "retrieval (clustered synthetic unit keys, d=384, one query per call):"]
    for r in report["retrieval"]:
        if "skipped" in r:
            lines.append(f"  {r['keys']:>9,} keys  {r['index']:<5} skipped: {r['skipped']}")
            continue
        auto = " (auto)" if r["auto_choice"] else ""
        lines.append(f"  {r['keys']:>9,} keys  {r['index']:<5}{auto:<7} p50 {r['ms_per_query']['p50']:8.3f} ms  p95 {r['ms_per_query']['p95']:8.3f} ms  recall@10 {r['recall@10']:.3f}  build {r['build_s']:.1f} s")
    v = report["vs_per_user_lora"]
    lines += ["", f"vs per-user LoRA (OPPU recipe; {v['users']} users, K={v['k']}; pmeta personalize+rank p50 {v['pmeta_personalize_and_rank_ms']['p50']:.0f} ms, {v['pmeta_bytes_per_user']:g} bytes per user):"]
    for label, r in (("as published", v), ("restricted to pmeta's layers", v["restricted_to_pmeta_layers"])):
        lines += [
            f"  {label}: {r['recipe']}",
            f"    train per user p50 {r['oppu_train_ms_per_user']['p50']:.0f} ms -> pmeta {r['speedup_vs_training']:.1f}x faster; {r['oppu_bytes_per_user']:,} bytes per user (safetensors)",
            f"    load stored adapter + score p50 {r['oppu_load_and_score_ms']['p50']:.1f} ms -> pmeta/that = {r['ratio_vs_loading_stored_adapter']:.2f}",
        ]
    lines += [
        "",
        f"peak RSS of `pmeta adapt`: {report['peak_rss_mb']:.0f} MB",
        f"bytes stored per user: {report['bytes_stored_per_user']:g} (banks {'unchanged' if report['banks_unchanged'] else 'CHANGED'} after {report['users_personalized']} users)",
    ]
    return "\n".join(lines)

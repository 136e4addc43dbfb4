"""`pmeta bench` and the serving paths it measures: exact top-k, vmap-batched adaptation equal to
a loop, length bucketing, and the report's shape (a smoke run of every section on the tiny bank)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pmeta.bank.bank import top_indexes
from pmeta.errors import InvalidRequest


def history(uid, items):
    return {"user_id": uid, "items": [{"item_id": i, "rating": 5} for i in items]}


def test_top_indexes_equals_a_stable_full_sort():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 60))
        scores = rng.integers(0, 6, n).astype(np.float64)  # many ties
        scores[rng.random(n) < 0.2] = -np.inf
        pool = np.flatnonzero(np.isfinite(scores))
        top = int(rng.integers(1, 12))
        expected = pool[np.argsort(-scores[pool], kind="stable")[:top]]
        np.testing.assert_array_equal(top_indexes(scores, top), expected)
        sub = np.sort(rng.choice(n, size=min(n, 7), replace=False))
        sub = sub[np.isfinite(scores[sub])]
        np.testing.assert_array_equal(top_indexes(scores, top, sub), sub[np.argsort(-scores[sub], kind="stable")[:top]])


def test_vmap_and_bucketed_batches_equal_one_by_one(opened_bank, monkeypatch):
    ids = opened_bank.catalog.item_ids
    users = [history(f"u{n}", items) for n, items in enumerate([[ids[3], ids[9], ids[30]], ["2571"], [], ids[100:105], [ids[7]], ids[200:204]])]
    users.append({"user_id": "free", "items": [{"text": "a space adventure with robots", "rating": 5}]})
    singles = [opened_bank.personalize(h) for h in users]
    for method, batch in [("vmap", 64), ("vmap", 3), ("batched", 2)]:
        many = opened_bank.personalize_many(users, batch_size=batch, method=method)
        assert [p.user_id for p in many] == [h["user_id"] for h in users]  # input order survives bucketing
        for single, b in zip(singles, many):
            finite = np.isfinite(single.scores)
            assert np.array_equal(finite, np.isfinite(b.scores))
            np.testing.assert_allclose(b.scores[finite], single.scores[finite], rtol=1e-4, atol=1e-4)
            # the adapter itself: the same shapes whoever else is in the batch, the same prompt and ΔW = B A
            assert {k: v.shape for k, v in b.adapter.items()} == {k: v.shape for k, v in single.adapter.items()}
            np.testing.assert_allclose(b.adapter["prompt"].numpy(), single.adapter["prompt"].numpy(), rtol=1e-4, atol=1e-5)
            for key in (k for k in single.adapter if k.endswith(".A")):
                target = key[:-2]
                delta = lambda a: (a[target + ".B"] @ a[target + ".A"]).numpy()  # noqa: E731
                np.testing.assert_allclose(delta(b.adapter), delta(single.adapter), rtol=1e-4, atol=1e-5)
    with pytest.raises(InvalidRequest):
        opened_bank.personalize_many(users, method="threads")
    # the empty history (the zero-history prior, rank over every anchor) runs in a pass of its own
    passes = []
    original = opened_bank.model.personalize

    def recording(inputs, *args, **kwargs):
        passes.append([bool(u.liked_items or u.free_texts) for u in inputs])
        return original(inputs, *args, **kwargs)

    monkeypatch.setattr(opened_bank.model, "personalize", recording)
    opened_bank.personalize_many(users, batch_size=4)
    assert passes == [[False], [True] * 4, [True] * 2]


def test_the_default_batch_follows_the_device(opened_bank, monkeypatch):
    """16 users per pass on CPU, 128 on CUDA (an H200's throughput tripled from 16 to 128)."""
    import torch

    from pmeta.bank.bank import DEFAULT_BATCH_SIZE, default_batch_size

    assert default_batch_size(torch.device("cpu")) == 16 and default_batch_size("cuda:0") == 128 and default_batch_size("mps") == 16
    sizes = []
    original = opened_bank.model.personalize

    def recording(inputs, *args, **kwargs):
        sizes.append(len(inputs))
        return original(inputs, *args, **kwargs)

    monkeypatch.setattr(opened_bank.model, "personalize", recording)
    users = [history(f"u{n}", [opened_bank.catalog.item_ids[n]]) for n in range(20)]
    opened_bank.personalize_many(users)
    opened_bank.personalize_many(users, batch_size=None)
    assert sizes == [16, 4, 16, 4]
    monkeypatch.setitem(DEFAULT_BATCH_SIZE, "cpu", 7)  # read from the table, by the bank's device
    sizes.clear()
    opened_bank.personalize_many(users)
    assert sizes == [7, 7, 6]
    with pytest.raises(InvalidRequest, match="batch_size"):
        opened_bank.personalize_many(users, batch_size=0)


def test_bench_smoke_report(tiny_bank, monkeypatch):
    from pmeta import bench
    from pmeta.bank.bank import Bank

    seen = {"users": 0}  # counted here too, independently of the bench's own count
    original = Bank.personalize_many

    def counting(self, histories, *args, **kwargs):
        seen["users"] += len(histories)
        return original(self, histories, *args, **kwargs)

    monkeypatch.setattr(Bank, "personalize_many", counting)
    report = bench.run([tiny_bank], smoke=True, retrieval_sizes=(1_000,))
    json.dumps(report)  # serialisable as printed by --json
    assert {"machine", "personalize_ms", "throughput_users_per_s", "peak_rss_mb", "retrieval", "vs_per_user_lora"} <= set(report)
    assert report["machine"]["torch_threads"] >= 1 and report["machine"]["cpu"]
    p = report["personalize_ms"]
    assert 0 < p["p50"] <= p["p95"]
    k5 = next(iter(p["by_bank"].values()))["k5"]
    parts = sum(k5[key]["mean"] for key in ("embed_ms", "retrieve_ms", "fuse_ms", "adapt_ms", "rank_ms"))
    assert parts <= k5["total_ms"]["mean"] * 1.05  # the parts are inside the total
    assert all(t["batched_users_per_s"] > 0 and t["vmap_users_per_s"] > 0 and t["loop_users_per_s"] > 0 for t in report["throughput_users_per_s"].values())
    kinds = {r["index"]: r for r in report["retrieval"] if "skipped" not in r}
    assert kinds["flat"]["recall@10"] == 1.0
    assert kinds["ivf"]["recall@10"] >= 0.95 and kinds["hnsw"]["recall@10"] >= 0.95
    v = report["vs_per_user_lora"]
    assert v["oppu_bytes_per_user"] > 10_000 and v["pmeta_bytes_per_user"] == 0 and report["banks_unchanged"]
    assert v["speedup_vs_training"] > 0
    restricted = v["restricted_to_pmeta_layers"]
    assert restricted["oppu_bytes_per_user"] < v["oppu_bytes_per_user"]  # fewer layers carry the LoRA
    assert "layers 0-" in v["recipe"] and "layers 0-" not in restricted["recipe"]
    assert 50 < report["peak_rss_mb"] < 4000
    assert report["bytes_stored_per_user"] == 0
    # every user the banks personalized (the per-user LoRA section's pmeta users among them), the
    # rank section's one (personalized under the bank) and the `pmeta adapt` process's one
    assert report["users_personalized"] == seen["users"] + 2 > 45
    table = bench.format_table(report)
    assert "personalize + rank" in table and f"bytes stored per user: 0 (banks unchanged after {seen['users'] + 2} users)" in table
    with pytest.raises(InvalidRequest, match="given twice"):
        bench.run([tiny_bank, tiny_bank / "." ], smoke=True)


def test_the_peak_rss_process_reads_the_same_database_and_reports_its_own_error(monkeypatch, tmp_path):
    import subprocess

    from pmeta import bench
    from pmeta.errors import PmetaError

    calls = []

    def child(args, **kwargs):
        calls.append(args)
        return subprocess.CompletedProcess(args, 2, "", "pmeta: error: not a pmeta bank: b (no bank.db)\nPEAK_RSS_KB 1000\n")

    monkeypatch.setattr(bench.subprocess, "run", child)
    with pytest.raises(PmetaError, match=r"peak RSS failed: pmeta: error: not a pmeta bank: b \(no bank.db\)$"):
        bench.adapt_process_rss(tmp_path, history("u", ["1"]), "sqlite:///elsewhere.db", "cuda:1")
    assert calls[0][-4:] == ["--db", "sqlite:///elsewhere.db", "--device", "cuda:1"]  # the bench's database and device


def test_direct_encoder_load_matches_transformers_and_sentence_transformers():
    """The encoder reads config.json, model.safetensors and tokenizer.json directly (no
    transformers module at serving time): same tokens as the HF tokenizer, same embeddings as
    sentence-transformers."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from pmeta.data import load_sample
    from pmeta.models.encoder import FunctionalEncoder, bundled_encoder_path

    encoder = FunctionalEncoder()
    assert encoder._fast_tokenizer
    texts = load_sample().catalog.texts()[:40] + ["", "Ünïcödé – 東京 😀", " | ".join(load_sample().catalog.texts()[100:130])]
    reference = AutoTokenizer.from_pretrained(bundled_encoder_path())
    for length in (32, 192):
        ids, mask = encoder.tokenize(texts, length)
        expected = reference(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")
        assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    st = SentenceTransformer(str(bundled_encoder_path()), device="cpu")
    st.max_seq_length = 128
    expected = torch.from_numpy(st.encode(texts[:20], batch_size=8, normalize_embeddings=True))
    torch.testing.assert_close(encoder.sentence_embeddings(texts[:20]), expected, atol=1e-5, rtol=1e-4)


def test_serving_on_an_explicit_device_is_the_same(tiny_bank, opened_bank):
    """Bank.open(device=...) moves every tensor (here to the CPU, the only device on CI)."""
    from pmeta import Bank

    again = Bank.open(tiny_bank, device="cpu")
    assert {v.device.type for v in again.model.t.to_flat_views().values()} == {"cpu"}
    h = history("d", opened_bank.catalog.item_ids[10:13])
    np.testing.assert_allclose(again.personalize(h).scores, opened_bank.personalize(h).scores, rtol=1e-5, atol=1e-5)


def test_the_batch_size_benchmark_reports_every_size(tiny_bank, benchmark_script, monkeypatch, capsys):
    import sys

    import torch

    module = benchmark_script("batch_sizes")
    monkeypatch.setattr(sys, "argv", ["batch_sizes.py", "--bank", str(tiny_bank), "--sizes", "2,4", "--users", "4", "--threads", "1"])
    threads = torch.get_num_threads()
    try:
        module.main()
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "per pass" in line]
    assert [row.split()[0] for row in rows] == ["2", "4"] and "GPU none" in out
    assert all(float(row.split("batched")[1].split()[0]) > 0 for row in rows)

"""Ablations of pmeta under coldstart-v1 on a bank's own held-out test users, written as one markdown table.

    python benchmarks/ablate.py --bank BANK [--reptile-bank RBANK] [--users 40] [--k 3,5] \
        [--mode pop99,full] [--build-preset tiny] [--anchors 2,4,8] [--prompt-lengths 10,20,30] \
        [--data DIR --seed N] --out ablation.md

The banks must have been built on ``--data`` (default: the shipped ml-latest-small) with ``--seed``
(default 0): their held-out users are the test users evaluated, and a bank built on other data or
with another seed is refused (it trained on some of those users). Rebuilds use the same data and seed.

Serving-time ablations reuse one bank (no rebuild):

* ``steps=s``: inner steps 0..5 (the bank was meta-trained with its config's ``inner_steps``);
* ``top_k=k``: anchors retrieved and fused per user;
* ``fusion``: exact concatenation (``cat``, the default), SVD truncated to the anchor rank
  (``svd``), or no fusion (``nearest``: the single nearest anchor, weight 1); for a bank with an
  anchor item bias (pmeta.fusion.anchor_bias), also that bank served without it (it was trained
  with it; a bank built with ``anchor_bias_weight = 0`` is the clean comparison, a rebuild);
* ``no stacking``: the inner steps update the fused anchors' own parameters (with the stacked
  adapter's learned step sizes) instead of a separate stacked rank-1 adapter on top of them.

``--reptile-bank`` adds MAML vs Reptile: quality at the bank's inner steps, adaptation latency,
and, for meta-training itself, seconds per outer step and peak RSS of 6 outer steps of the stack
stage with each strategy on the same bank (each in a fresh subprocess).

Build-time ablations rebuild a bank per value with ``--build-preset`` (on the train users only)
and evaluate pmeta on it: ``--anchors``, ``--prompt-lengths``, ``--anchor-bias-weights``
(γ fixed instead of chosen; 0 = a bank without the anchors' item bias) and
``--time-prior-weights`` (β fixed instead of chosen with h; 0 = a bank without the time prior)
and ``--time-prior-bandwidths`` (h fixed, in days, with β chosen; only a preset whose
``cf_init`` is ``onboarding`` chooses β, so the others are refused: ``--build-preset small``).

Every row: HR@10 / nDCG@10 for each (mode, K) and adaptation p50 ms at the largest K. Choose
settings on validation users, never on these test numbers; the table is for the README.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pmeta.adapt.inner import adapt
from pmeta.bank.bank import Bank
from pmeta.bank.model import PmetaModel
from pmeta.data import load_sample
from pmeta.data.movielens import LAYOUTS as FORMATS, read_movielens
from pmeta.errors import PmetaError
from pmeta.eval.neural import floor_excluded, support_input
from pmeta.eval.protocol import evaluate, split_users
from pmeta.eval.runner import model_for
from pmeta.progress import Progress


class Scorer:
    uses_time = True  # the support's timestamp reaches the bank's time prior, as in `pmeta eval`

    def __init__(self, name: str, model: PmetaModel, steps: int | None = None, stacking: bool = True) -> None:
        self.name, self.model, self.steps, self.stacking = name, model, steps, stacking

    def score(self, support_items: np.ndarray, k: int, time: float | None = None) -> np.ndarray:
        model = self.model
        user = support_input(model, support_items, time)
        if self.stacking:
            personal, batch, _ = model.personalize([user], steps=self.steps)
        else:  # inner steps on the fused anchors themselves
            batch = model.user_batch([user])
            keys = model.user_keys([user])
            sims, idx = model.retrieve(keys)
            fused, _ = model.fuse([user], batch, keys, sims, idx, model.has_key(keys))  # personalize's own step
            init = {k: v.detach().clone().requires_grad_(True) for k, v in fused.items()}
            targets, mask = model.targets_of([user], model.config.max_history_items)
            steps = model.config.inner_steps if self.steps is None else self.steps
            with torch.enable_grad():
                adapted = adapt(init, model.loss_fn(batch, targets, mask), steps, model.t.stack_step_sizes)
            personal = {k: v.detach() for k, v in adapted.items()}
        scores = model.final_scores(batch, personal)[0].numpy().astype(np.float64)
        return floor_excluded(scores)


def variant(model: PmetaModel, **config) -> PmetaModel:
    return PmetaModel(model.config.model_copy(update=config), model.encoder, model.item_texts, model.t, index=model.index)


def row(name: str, scorer, dataset, users, ks, modes, seed: int = 0) -> dict:
    results = evaluate(scorer, dataset, users, ks=ks, modes=modes, seed=seed)
    cells = {f"{r['mode']} K={r['k']}": f"{r['hr@10']:.3f} / {r['ndcg@10']:.3f}" for r in results}
    latency = next(r["adapt_ms_p50"] for r in results if r["k"] == max(ks))
    print(name, cells, f"{latency:.0f} ms", file=sys.stderr, flush=True)
    return {"variant": name, **cells, "adapt ms p50": f"{latency:.0f}", "_rows": results}


def meta_step_probe(bank: Path, meta: str, steps: int = 6, data: Path | None = None, layout: str = "auto", seed: int = 0) -> dict:
    """Seconds per outer step and peak RSS (MB) of ``steps`` stack-stage outer steps with ``meta``, in a fresh process
    (on ``data``'s train users of ``seed``; the shipped sample's by default)."""
    code = f"""
import json, resource, time, torch
torch.set_num_threads(1)
from pmeta.bank.bank import Bank
from pmeta.bank.episodes import EpisodeSampler
from pmeta.bank.meta_train import stack_stage, meta_train
from pmeta.adapt.strategies import get_strategy
from pmeta.data import load_sample
from pmeta.data.movielens import read_movielens
from pmeta.eval.protocol import split_users
bank = Bank.open({str(bank)!r}); data = {None if data is None else str(data)!r}
ds = load_sample() if data is None else read_movielens(data, {layout!r})
train, _ = split_users(ds, seed={seed}, test_fraction=bank.config.test_fraction)
model = bank.model
sampler = EpisodeSampler(ds.positives_by_user(), ds.rated_by_user(), train, model.item_texts, bank.config, seed=5, times=ds.positive_times_by_user())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stage = stack_stage(model, bank.config.model_copy(update={{"meta": {meta!r}}}))
meta_train(model, sampler, stage, get_strategy({meta!r}), 1, bank.config.meta_batch_users)  # warm-up
start = time.perf_counter()
meta_train(model, sampler, stage, get_strategy({meta!r}), {steps}, bank.config.meta_batch_users)
seconds = (time.perf_counter() - start) / {steps}
print(json.dumps({{"s_per_outer_step": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": before / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", type=Path, required=True)
    parser.add_argument("--reptile-bank", type=Path)
    parser.add_argument("--data", type=Path, help="the MovieLens directory the banks were built on (default: the shipped sample)")
    parser.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="its layout (default: detected)")
    parser.add_argument("--seed", type=int, default=0, help="the seed the banks were built with: its test users are evaluated")
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--k", default="3,5")
    parser.add_argument("--mode", default="pop99,full")
    parser.add_argument("--steps", default="0,1,2,3,4,5")
    parser.add_argument("--top-k", default="1,2,3,5")
    parser.add_argument("--build-preset", default="tiny")
    parser.add_argument("--anchors", default="", help="comma-separated anchor counts to rebuild with (empty: skip)")
    parser.add_argument("--prompt-lengths", default="", help="comma-separated prompt lengths to rebuild with (empty: skip)")
    parser.add_argument("--anchor-bias-weights", default="", help="comma-separated γ of the anchors' item bias to rebuild with, 0 = none (empty: skip)")
    parser.add_argument("--time-prior-weights", default="", help="comma-separated β of the time prior to rebuild with, 0 = no prior (empty: skip)")
    parser.add_argument("--time-prior-bandwidths", default="", help="comma-separated bandwidths h (days) of the time prior to rebuild with, β chosen (empty: skip)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: steps,top_k,fusion,stacking,meta")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ks = tuple(int(k) for k in args.k.split(","))
    if args.time_prior_bandwidths:
        from pmeta.config import load_config

        preset_init = load_config(args.build_preset).cf_init
        if preset_init != "onboarding":  # β would be 0: every row a bank without the prior
            parser.error(f"--time-prior-bandwidths needs a preset that chooses β (cf_init = 'onboarding'), not {args.build_preset!r} ({preset_init}); try --build-preset small")
    modes = tuple(args.mode.split(","))
    skip = set(filter(None, args.skip.split(",")))
    try:
        dataset = load_sample() if args.data is None else read_movielens(args.data, args.format)
        bank = Bank.open(args.bank)
        banks = [bank] + ([Bank.open(args.reptile_bank)] if args.reptile_bank is not None else [])
        for b in banks:  # in-domain only, and only on the users each bank held out (model_for checks them)
            if b.catalog.item_ids != dataset.catalog.item_ids:
                parser.error(f"bank {b.version} was built on another catalogue than {dataset.name}: ablations run on the bank's own dataset (pass --data)")
            model_for(b, dataset, args.seed, Progress(False))
    except PmetaError as exc:
        parser.error(str(exc))
    train, test = split_users(dataset, seed=args.seed, test_fraction=bank.config.test_fraction)
    users = np.asarray(test)[: args.users]
    model = bank.model
    rows: list[tuple[str, dict]] = []
    started = time.perf_counter()
    default_steps, default_k = model.config.inner_steps, model.config.top_k
    base: dict = {}

    def default(name: str) -> dict:
        """The bank's own settings are one variant of every group: evaluated once, listed in each."""
        if not base:
            base.update(row(name, Scorer("default", model), dataset, users, ks, modes, args.seed))
        return {**base, "variant": name}

    if "steps" not in skip:
        for s in (int(x) for x in args.steps.split(",")):
            r = default(f"steps={s}") if s == default_steps else row(f"steps={s}", Scorer("s", model, steps=s), dataset, users, ks, modes, args.seed)
            rows.append(("inner steps", r))
    if "top_k" not in skip:
        count = int(model.t.anchor_keys.shape[0])
        for k in sorted({min(int(x), count) for x in args.top_k.split(",")}):
            r = default(f"top_k={k}") if k == default_k else row(f"top_k={k}", Scorer("k", variant(model, top_k=k)), dataset, users, ks, modes, args.seed)
            rows.append(("top-k fused anchors", r))
    if "fusion" not in skip:
        rows.append(("fusion", default(f"fusion=cat (exact, top {default_k})")))
        rows.append(("fusion", row(f"fusion=svd (rank {model.config.anchor_rank})", Scorer("v", variant(model, fusion="svd")), dataset, users, ks, modes, args.seed)))
        rows.append(("fusion", row("no fusion (nearest anchor)", Scorer("n", variant(model, top_k=1)), dataset, users, ks, modes, args.seed)))
        if model.t.anchor_bias is not None:
            plain = PmetaModel(model.config, model.encoder, model.item_texts, replace(model.t, anchor_bias=None), index=model.index)
            rows.append(("fusion", row("no anchor item bias at serving (bank trained with it)", Scorer("nb", plain), dataset, users, ks, modes, args.seed)))
    if "stacking" not in skip:
        rows.append(("stacking", default("stacked rank-1 adapter (default)")))
        rows.append(("stacking", row("no stacking (steps on fused anchors)", Scorer("ns", model, stacking=False), dataset, users, ks, modes, args.seed)))
    if args.reptile_bank is not None and "meta" not in skip:
        reptile = banks[1]
        for name, b, path in (("maml", bank, args.bank), ("reptile", reptile, args.reptile_bank)):
            r = default("meta=maml") if name == "maml" else row(f"meta={name}", Scorer(name, b.model), dataset, users, ks, modes, args.seed)
            probe = meta_step_probe(path, name, data=args.data, layout=args.format, seed=args.seed)
            r["outer step s"] = f"{probe['s_per_outer_step']:.2f}"
            r["meta-train peak RSS MB"] = f"{probe['peak_rss_mb']:.0f}"
            rows.append(("MAML vs Reptile", r))
    for field, values, kind in (("anchors", args.anchors, int), ("prompt_length", args.prompt_lengths, int), ("anchor_bias_weight", args.anchor_bias_weights, float), ("time_prior_weight", args.time_prior_weights, float), ("time_prior_bandwidth", args.time_prior_bandwidths, float)):
        for value in (kind(x) for x in values.split(",") if x):
            from pmeta.bank.build import build_bank
            from pmeta.config import load_config

            with tempfile.TemporaryDirectory() as tmp:
                config = load_config(args.build_preset, overrides={field: value, "seed": args.seed})
                build_bank(dataset, Path(tmp) / "bank", config)
                rebuilt = Bank.open(Path(tmp) / "bank")
                rows.append((f"{field} (rebuilt, preset {args.build_preset})", row(f"{field}={value}", Scorer(field, rebuilt.model), dataset, users, ks, modes, args.seed)))
    columns = [f"{m} K={k}" for m in modes for k in ks]
    extra = [c for c in ("outer step s", "meta-train peak RSS MB") if any(c in r for _, r in rows)]
    lines = [
        f"Ablations on {dataset.name}, coldstart-v1, seed {args.seed}, first {len(users)} test users, bank {args.bank} ({bank.config.meta}, {int(model.t.anchor_keys.shape[0])} anchors), "
        f"{args.threads} thread(s); cells HR@10 / nDCG@10; {time.perf_counter() - started:.0f} s.",
        "",
        "| ablation | variant | " + " | ".join(columns) + " | adapt ms p50 | " + " | ".join(extra) + (" |" if extra else ""),
        "|---|---|" + "---|" * (len(columns) + 1 + len(extra)),
    ]
    for group, r in rows:
        lines.append(f"| {group} | {r['variant']} | " + " | ".join(r.get(c, "—") for c in columns) + f" | {r['adapt ms p50']} | " + " | ".join(r.get(c, "") for c in extra) + (" |" if extra else ""))
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps([{"group": g, **{k: v for k, v in r.items()}} for g, r in rows], indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

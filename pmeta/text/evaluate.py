"""``pmeta eval lamp``: every method on the same test users of a LaMP-format split, for each K.

Methods (the same examples for each; profiles cut to the K most recent items):

Baselines score labels under the LM alone; pmeta's variants add the bank's learned label prior
(classification and rating tasks), which is part of what the bank meta-learns from its train users.

* ``backbone``: the frozen LM, no profile;
* ``retrieval-k1`` .. ``retrieval-k4``: the k best BM25 profile items in the prompt, no adaptation;
* ``per-user-lora``: a LoRA trained from scratch on the user's K profile items (OPPU recipe: Adam,
  a few steps, the same support pairs and LoRA targets as pmeta); it is what a per-user adapter
  would store, so its bytes per user are reported;
* ``pmeta``: retrieve anchors, fuse, inner steps (nothing stored per user);
* ``pmeta+retrieval``: the same adapter with the bank's ``retrieve`` BM25 items in the prompt.

``adapt_ms`` is the per-user preparation time before the prediction (BM25 for retrieval, training for
per-user LoRA, retrieve + fuse + inner steps for pmeta), measured per user. Each row also gives the
mean number of profile items its users kept (``profile_items``: fewer than K where profiles are
shorter) and of retrieved items in their prompts (``prompt_items``: fewer than asked where the
profile is shorter or the prompt's token budget drops the least relevant; 0 without retrieval).
``comparisons`` (:func:`compare`): each pmeta method against the best baseline of each (K, metric)
cell by a paired bootstrap over the users, with Holm-adjusted p-values.
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.lamp import TASKS, LampExample, task_spec, truncate_profile, write_predictions
from ..eval.output import remove_stale, replaced, write_text
from ..errors import InvalidConfig
from ..eval.lamp_metrics import aggregate, per_user, score
from ..models.personal import num_bytes
from .model import TextModel, lora_targets

METHODS = ("backbone", "retrieval-k1", "retrieval-k2", "retrieval-k3", "retrieval-k4", "per-user-lora", "pmeta", "pmeta+retrieval")
#: The methods compared with the best baseline of each (K, metric) cell, and the baselines.
PMETA_METHODS = ("pmeta", "pmeta+retrieval")
BASELINES = tuple(m for m in METHODS if m not in PMETA_METHODS)
#: Lower is better for these metrics; higher for the others.
LOWER_IS_BETTER = ("mae", "rmse")
#: Resamples of users per comparison.
BOOTSTRAP_RESAMPLES = 2000
DEFAULT_METHODS = ",".join(METHODS)


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InvalidConfig(f"unknown method {unknown[0] if unknown else text!r}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def choose_users(examples: list[LampExample], count: int | None, seed: int) -> list[LampExample]:
    """The first ``count`` examples of a seeded permutation (all when count is None), in id order."""
    usable = [e for e in examples if e.output is not None]
    if count is None or count >= len(usable):
        return sorted(usable, key=lambda e: e.id)
    order = np.random.default_rng(seed).permutation(len(usable))[:count]
    return sorted((usable[i] for i in order), key=lambda e: e.id)


def user_seed(seed: int, example_id: str) -> int:
    """The per-user LoRA's init seed: from the run's seed and the question's id, so a user's adapter
    (and prediction) is the same whichever subset of users a run evaluates."""
    return seed * 1_000_003 + zlib.crc32(example_id.encode("utf-8"))


def per_user_lora(model: TextModel, profile: list[dict], seed: int):
    """OPPU-style per-user LoRA from scratch: (personal params with user axis 1, bytes per user)."""
    c = model.config
    pairs = model.support_pairs(profile)
    generator = torch.Generator().manual_seed(seed)
    wanted = {key for key, _, _ in lora_targets(model.lm, c.lora_layers)}
    fresh = model.lm.init_adapter(c.lora_baseline_rank, 0, generator)
    lora = {k: v for k, v in fresh.items() if k != "prompt" and k[:-2] in wanted}
    params = {k: v.clone().requires_grad_(True) for k, v in lora.items()}
    if pairs:
        prompts: dict = {}
        optimizer = torch.optim.Adam(list(params.values()), lr=c.lora_baseline_lr)
        for _ in range(c.lora_baseline_steps):
            optimizer.zero_grad(set_to_none=True)
            personal = {"prompt": torch.zeros(1, 0, model.lm.hidden_size), **{k: v.unsqueeze(0) for k, v in params.items()}}
            model.pairs_loss([pairs], personal, prior=False, cache=prompts).backward()
            optimizer.step()
    personal = {"prompt": torch.zeros(1, 0, model.lm.hidden_size), **{k: v.detach().unsqueeze(0) for k, v in params.items()}}
    # nothing to train on (K = 0): the adapter is its seeded init, B = 0, the backbone: nothing to store
    return personal, num_bytes({k: v.detach() for k, v in params.items()}) if pairs else 0


def run_lamp(model: TextModel, examples: list[LampExample], methods: list[str], ks: list[int], seed: int = 0,
             on_user: Callable[[], None] | None = None, out: Path | None = None) -> dict:  # fmt: skip
    """Predict with every method for every K; returns the report dict (see the module docstring)."""
    spec = task_spec(model.config.task)
    torch.manual_seed(seed)
    golds = {e.id: e.output for e in examples}
    score(spec.name, dict(golds), golds)  # a gold the metrics refuse fails now, not after every prediction
    preds: dict[tuple[str, int], dict[str, str]] = {}
    times: dict[tuple[str, int], list[float]] = {}
    sizes: dict[tuple[str, int], list[int]] = {}
    items: dict[tuple[str, int], list[tuple[int, int]]] = {}  # (profile items, retrieved items in the prompt)

    def record(method: str, k: int, example: LampExample, profile: list[dict], prediction: str, ms: float, nbytes: int = 0, in_prompt: int = 0) -> None:
        preds.setdefault((method, k), {})[example.id] = prediction
        times.setdefault((method, k), []).append(ms)
        sizes.setdefault((method, k), []).append(nbytes)
        items.setdefault((method, k), []).append((len(profile), in_prompt))

    backbone: dict[str, str] = {}
    if "backbone" in methods:
        prompts = [model.query_prompt(e.input) for e in examples]
        for start in range(0, len(prompts), 8):
            for e, p in zip(examples[start : start + 8], model.predict(prompts[start : start + 8], None, prior=False)):
                backbone[e.id] = p
    for example in examples:
        for k in ks:
            profile = truncate_profile(example.profile, k)
            if "backbone" in methods:
                record("backbone", k, example, profile, backbone[example.id], 0.0)
            for method in methods:
                if method.startswith("retrieval-k"):
                    clock = time.perf_counter()
                    prompt, kept = model.query_prompt_and_items(example.input, profile, int(method.rsplit("k", 1)[1]))
                    ms = (time.perf_counter() - clock) * 1e3
                    record(method, k, example, profile, model.predict([prompt], None, prior=False)[0], ms, in_prompt=kept)
            if "per-user-lora" in methods:
                clock = time.perf_counter()
                personal, nbytes = per_user_lora(model, profile, user_seed(seed, example.id))
                ms = (time.perf_counter() - clock) * 1e3
                record("per-user-lora", k, example, profile, model.predict([model.query_prompt(example.input)], personal, prior=False)[0], ms, nbytes)
            if "pmeta" in methods or "pmeta+retrieval" in methods:
                timings: dict[str, float] = {}
                personal, _ = model.personalize([profile], timings=timings)
                if "pmeta" in methods:
                    record("pmeta", k, example, profile, model.predict([model.query_prompt(example.input)], personal)[0], timings["total_ms"])
                if "pmeta+retrieval" in methods:
                    clock = time.perf_counter()
                    prompt, kept = model.query_prompt_and_items(example.input, profile, model.config.retrieve)
                    ms = timings["total_ms"] + (time.perf_counter() - clock) * 1e3
                    record("pmeta+retrieval", k, example, profile, model.predict([prompt], personal)[0], ms, in_prompt=kept)
        if on_user is not None:
            on_user()
    results = []
    for method in methods:
        for k in ks:
            if (method, k) not in preds:
                continue
            metrics = score(spec.name, preds[(method, k)], golds)
            t = np.asarray(times[(method, k)])
            used = np.asarray(items[(method, k)], dtype=float)
            results.append({"method": method, "k_profile": k, **{m: round(v, 4) for m, v in metrics.items()}, "users": len(examples),
                            "profile_items": round(float(used[:, 0].mean()), 2), "prompt_items": round(float(used[:, 1].mean()), 2),
                            "adapt_ms_p50": round(float(np.percentile(t, 50)), 1), "adapt_ms_p95": round(float(np.percentile(t, 95)), 1),
                            "bytes_per_user": int(np.mean(sizes[(method, k)]))})  # fmt: skip
            if out is not None:
                write_predictions(out / "predictions" / f"{method}-k{k}.json", spec.name, preds[(method, k)])
    comparisons = compare(spec.name, preds, golds, results, seed)
    return {"task": spec.name, "metrics": list(spec.metrics), "users": len(examples), "k_profile": ks, "methods": methods, "seed": seed,
            "comparisons": comparisons,
            "lm": model.config.lm, "rating_decode": model.config.rating_decode if spec.kind == "rating" else None,
            "inner_steps": model.config.inner_steps, "torch_threads": torch.get_num_threads(), "results": results}  # fmt: skip


def compare(task: str, preds: dict[tuple[str, int], dict[str, str]], golds: dict[str, str], results: list[dict], seed: int = 0,
            resamples: int = BOOTSTRAP_RESAMPLES) -> list[dict]:  # fmt: skip
    """Each pmeta method against the best baseline of each (K, metric) cell (by the point estimate),
    by a paired bootstrap over the users: ``difference`` = method − baseline (for MAE and RMSE a
    negative difference is better), its 95% percentile interval, a two-sided bootstrap p-value and
    its Holm adjustment over every cell and metric of that pmeta method. Macro-F1 has no per-user
    terms and is not compared."""
    from ..eval.significance import holm

    cells = {(r["method"], r["k_profile"]): r for r in results}
    ks = sorted({k for _, k in cells})
    out: list[dict] = []
    for method in PMETA_METHODS:
        family: list[dict] = []
        for k in ks:
            if (method, k) not in cells:
                continue
            _, mine = per_user(task, preds[(method, k)], golds)
            for metric in mine:
                rivals = [b for b in BASELINES if (b, k) in cells]
                if not rivals:
                    continue
                sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
                best = max(rivals, key=lambda b: sign * cells[(b, k)][metric])
                _, theirs = per_user(task, preds[(best, k)], golds)
                a, b = mine[metric], theirs[metric]
                rows = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
                sampled = np.array([aggregate(metric, a[r]) - aggregate(metric, b[r]) for r in rows])
                p = min(1.0, 2 * min(float(np.mean(sampled <= 0)), float(np.mean(sampled >= 0))))
                low, high = np.percentile(sampled, [2.5, 97.5])
                family.append({"method": method, "versus": best, "k_profile": k, "metric": metric, "users": len(a),
                               "difference": round(aggregate(metric, a) - aggregate(metric, b), 4),
                               "ci_low": round(float(low), 4), "ci_high": round(float(high), 4), "p": round(p, 4)})  # fmt: skip
        for row, adjusted in zip(family, holm([row["p"] for row in family])):
            row["p_holm"] = round(adjusted, 4)
        out += family
    return out


def write_lamp_report(report: dict, out: Path) -> list[Path]:
    """report.json, report.md (one table per metric: methods × K) and one PNG per metric, each replaced
    atomically; plots and predictions of an earlier run that this one does not rewrite are removed."""
    out.mkdir(parents=True, exist_ok=True)
    report_json = write_text(out / "report.json", json.dumps(report, indent=2))
    ks = report["k_profile"]
    cell = {(r["method"], r["k_profile"]): r for r in report["results"]}
    data = report.get("data") or {}
    lines = [f"# {report['task']}: {report['users']} {data.get('split', 'test')} users, LM {report['lm']}", ""]
    for metric in report["metrics"]:
        better = "lower is better" if metric in ("mae", "rmse") else "higher is better"
        lines += [f"## {metric} ({better})", "", "| method | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for method in report["methods"]:
            lines.append(f"| {method} | " + " | ".join(f"{cell[(method, k)][metric]:.4f}" if (method, k) in cell else "" for k in ks) + " |")
        lines.append("")
    if report.get("comparisons"):
        lines += ["## pmeta against the best baseline of each cell", "",
                  f"Paired bootstrap over the users ({BOOTSTRAP_RESAMPLES:,} resamples): difference = pmeta method − baseline "
                  "(lower is better for mae and rmse), its 95% interval, and the two-sided p-value, Holm-adjusted over "
                  "every cell and metric of the method.", "",
                  "| method | K | metric | versus | difference [95% CI] | p (Holm) |", "|---|---|---|---|---|---|"]  # fmt: skip
        for c in report["comparisons"]:
            lines.append(f"| {c['method']} | {c['k_profile']} | {c['metric']} | {c['versus']} | {c['difference']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | {c['p']:.3f} ({c['p_holm']:.3f}) |")
        lines.append("")
    lines += ["## per-user cost and inputs", "", "profile items: the mean number each user kept (fewer than K where profiles are shorter); "
              "items in prompt: the mean number of retrieved items the prompt held (the token budget drops the least relevant).", "",
              "| method | K | adapt ms p50 | adapt ms p95 | bytes per user | profile items | items in prompt |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["results"]:
        lines.append(f"| {r['method']} | {r['k_profile']} | {r['adapt_ms_p50']:.0f} | {r['adapt_ms_p95']:.0f} | {r['bytes_per_user']} | {r['profile_items']:.2f} | {r['prompt_items']:.2f} |")
    written = [report_json, write_text(out / "report.md", "\n".join(lines) + "\n")]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for metric in report["metrics"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in report["methods"]:
            xs = [k for k in ks if (method, k) in cell]
            ax.plot(xs, [cell[(method, k)][metric] for k in xs], marker="o", label=method)
        ax.set_xlabel("profile items K")
        ax.set_ylabel(metric)
        ax.set_title(f"{report['task']}: {metric} ({report['users']} users)")
        ax.set_xticks(ks)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{metric}.png"
        with replaced(path) as temporary:
            fig.savefig(temporary, dpi=100, format="png")
        plt.close(fig)
        written.append(path)
    # files of an earlier run into the same folder that this run does not rewrite
    remove_stale(out, [f"{m}.png" for spec in TASKS.values() for m in spec.metrics], written)
    expected = [out / "predictions" / f"{r['method']}-k{r['k_profile']}.json" for r in report["results"]]
    remove_stale(out / "predictions", ["*-k*.json"], expected)
    return written

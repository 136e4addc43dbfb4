"""coldstart-v1 on several seeds' test users at once: are the margins between pmeta and its rivals the
same on other held-out users?

One seed's test split has ~120 users, too few to tell differences of a few thousandths apart. Each
seed draws a different 20% of the users as test users (PROTOCOL.md), so a bank built with
``--seed S`` and evaluated on seed S's test users is one more independent-ish replicate of the whole
experiment (bank included). ``run`` evaluates one (seed, bank) pair and keeps every user's metrics;
``pool`` puts the runs together: each cell's mean over all the runs' users, and paired differences
of each pmeta method against prompt-MAML, per-user LoRA and the best classical baseline with a
bootstrap stratified by seed (users are resampled within their own run), and, from 3 seeds on, a
Student-t interval over the seeds' own differences, which also carries the variation between banks.

    pmeta --threads 1 bank build --preset small --seed 1 --out bank-s1
    python benchmarks/seeds.py run --bank bank-s1 --seed 1 --out seeds/s1
    python benchmarks/seeds.py pool seeds/s0 seeds/s1 seeds/s2
    python benchmarks/seeds.py pool seeds/s5 seeds/s6 seeds/s7 --primary full:5:ndcg@10
    python benchmarks/seeds.py pool seeds/s0 seeds/s1 seeds/s2 --methods popularity,popularity-time,itemknn,ease,prompt-maml,pmeta-no-steps,pmeta
    python benchmarks/seeds.py run --bank bank-s1 --seed 1 --methods ease --out seeds/s1-ease
    python benchmarks/seeds.py replace seeds/s1 seeds/s1-ease --out seeds/s1-new-ease
    python benchmarks/seeds.py replace seeds/s1 seeds/s1-lora --add --out seeds/s1-with-lora
    python benchmarks/seeds.py versus --before seeds/s0 seeds/s1 --after seeds-new/s0 seeds-new/s1
    python benchmarks/seeds.py versus --before in-domain/s3 --after transfer/s3 --methods pmeta --against popularity-time

``replace`` pools a method run again alone (after a change of its defaults, say) with a stored run's
other methods: same seed, data and bank, the same users in every cell, so the pairs stay paired;
``--add`` also takes a method the stored run left out. ``versus`` reads the same seeds' users
measured with two banks (one built after a change of the build's defaults): each method's after −
before per cell, paired by user.

``--primary`` names comparisons fixed *before* the runs were read (a confirmatory test of what
earlier seeds suggested): pmeta minus prompt-MAML and minus per-user LoRA in the named cells, with
Holm's adjustment over that small family alone. Pool only seeds that did not suggest the hypothesis.

On another MovieLens release, pass the same ``--data DIR`` to the builds and to every ``run``. A bank
built on another release is transferred (:mod:`pmeta.eval.transfer`; ``--transfer-prior target`` counts
its time prior on ``--data``'s train users), and ``versus`` pairs it with an in-domain bank's run.

A user can be a test user of more than one seed (each seed draws 20% of them independently); the
pooled rows count such a user once per run, as the runs are separate experiments with separate
banks, and ``pool`` prints how many distinct users the runs hold.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from pmeta.eval.significance import CLASSICAL, FAMILY_ALPHA, best_classical, compare_methods, comparison_cell, holm, paired_bootstrap, rival_label, signed

RUN_METHODS = ("popularity", "popularity-time", "itemknn", "ease", "prompt-maml", "per-user-lora", "pmeta-no-steps", "pmeta")
METRICS = ("hr@10", "ndcg@10")
PRIMARY_RIVALS = ("prompt-maml", "per-user-lora")  # the personalization rivals, named by --primary
MODES = ("uni99", "pop99", "full")


def run(bank_path: Path, seed: int, out: Path, methods: list[str], threads: int, users: int | None, data: Path | None = None, data_format: str = "auto", transfer_prior: str = "source") -> None:
    import torch

    from pmeta.bank.bank import Bank
    from pmeta.data import load_sample, read_movielens
    from pmeta.eval.runner import run_movielens, write_report
    from pmeta.progress import Progress

    torch.set_num_threads(threads)
    per_user: dict = {}
    dataset = load_sample() if data is None else read_movielens(data, data_format)
    report = run_movielens(dataset, Bank.open(bank_path), methods, (1, 3, 5), MODES, seed=seed, max_users=users, progress=Progress(), per_user=per_user, transfer_prior=transfer_prior)
    write_report(report, out, plots=False)
    cells = [
        {"method": method, "k": k, "mode": mode, **{key: np.asarray(values).tolist() for key, values in cell.items()}}
        for method, by_cell in per_user.items()
        for (k, mode), cell in by_cell.items()
    ]
    (out / "per_user.json").write_text(json.dumps({"seed": seed, "fingerprint": report["dataset"]["fingerprint"], "bank": report["config"]["bank"]["version"], "cells": cells}))
    print(f"wrote {out / 'report.md'} and {out / 'per_user.json'}")


def replace(base_path: Path, part_path: Path, out: Path, add: bool = False) -> str:
    """A copy of run ``base_path`` whose cells of the methods in run ``part_path`` are ``part_path``'s:
    a method run again alone (a changed default, say) pooled with the other methods' stored cells. Both
    runs must be the same seed, data and bank, and every replaced cell must hold the same users in
    the same order as ``base_path``'s cells, so the paired comparisons stay paired; ``part_path``'s
    methods must cover every (K, mode) cell of ``base_path`` and be methods of it, unless ``add``: then a
    method ``base_path`` lacks (one left out of its run for time, say) is added after its cells. Writes
    ``out/per_user.json`` atomically (the replacement recorded under ``replaced``; the cells in
    ``base_path``'s order), never into either input, and returns a one-line summary."""
    from pmeta.eval.output import write_text

    base, part = read_runs([base_path, part_path])
    for key in ("seed", "fingerprint", "bank"):
        if base[key] != part[key]:
            raise SystemExit(f"cannot replace: the runs differ in {key} ({base[key]!r} vs {part[key]!r})")
    if out.resolve() in (base_path.resolve(), part_path.resolve()):
        raise SystemExit(f"cannot replace: --out {out} is one of the inputs; give a new folder")
    users = {(c["k"], c["mode"]): c["user"] for c in base["cells"]}
    methods = list(dict.fromkeys(c["method"] for c in part["cells"]))
    if not methods:
        raise SystemExit(f"cannot replace: {part_path} holds no cells")
    keys = [(c["method"], c["k"], c["mode"]) for c in part["cells"]]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"cannot replace: {part_path} holds a (method, K, mode) cell twice")
    unknown = [m for m in methods if m not in {c["method"] for c in base["cells"]}]
    if unknown and not add:
        raise SystemExit(f"cannot replace: {base_path} has no {unknown[0]} cells to replace (--add adds a method it lacks)")
    for method in methods:
        cells = {(c["k"], c["mode"]): c for c in part["cells"] if c["method"] == method}
        if set(cells) != set(users):
            raise SystemExit(f"cannot replace: {part_path} holds {method} in other (K, mode) cells than {base_path}")
        for key, cell in cells.items():
            if cell["user"] != users[key]:
                raise SystemExit(f"cannot replace: {method} at K = {key[0]} {key[1]} was measured on other users than {base_path}'s")
    new = {(c["method"], c["k"], c["mode"]): c for c in part["cells"]}
    cells = [new.get((c["method"], c["k"], c["mode"]), c) for c in base["cells"]]
    cells += [c for c in part["cells"] if c["method"] in unknown]
    entry = {"methods": methods, "from": str(part_path), **({"added": unknown} if unknown else {})}
    replaced = {**base, "cells": cells, "replaced": [*base.get("replaced", []), entry]}
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "per_user.json", json.dumps(replaced))
    added = f" (added: {', '.join(unknown)})" if unknown else ""
    return f"wrote {out / 'per_user.json'}: {', '.join(methods)} from {part_path}{added}, the other methods from {base_path}"


def read_runs(paths: list[Path]) -> list[dict]:
    """Each path's ``per_user.json`` (an output directory of ``run``), in order; SystemExit naming
    every path without one."""
    missing = [str(path) for path in paths if not (path / "per_user.json").is_file()]
    if missing:
        raise SystemExit(f"no per_user.json in {', '.join(missing)}: give output directories of `seeds.py run`")
    return [json.loads((path / "per_user.json").read_text()) for path in paths]


def load_runs(paths: list[Path], methods: list[str] | None = None) -> list[dict]:
    """The runs' ``per_user.json``, checked to be different seeds of one dataset holding the same cells;
    with ``methods``, only those methods' cells are kept (each run must hold every one of them), so
    runs that differ in a method left out of one of them for time can still be pooled over the rest."""
    runs = read_runs(paths)
    if methods is not None:
        if not methods:
            raise SystemExit("--methods names no method")
        if len(set(methods)) != len(methods):
            raise SystemExit("--methods names a method twice")
        held = [list(dict.fromkeys(c["method"] for c in r["cells"])) for r in runs]
        for path, names in zip(paths, held):
            lacking = [m for m in methods if m not in names]
            if lacking:
                raise SystemExit(f"{path} holds no {lacking[0]} cells")
        # The goals and the "best classical" rows pick the best of the classical baselines present:
        # leaving out one that every run holds would quietly change that reference.
        dropped = [m for m in CLASSICAL if m not in methods and all(m in names for names in held)]
        if dropped:
            raise SystemExit(f"--methods leaves out {dropped[0]}, which every run holds: the best classical baseline would be chosen without it")
        runs = [
            {**r, "cells": [c for c in r["cells"] if c["method"] in methods], "left_out": [m for m in names if m not in methods]}
            for r, names in zip(runs, held)
        ]
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"each run must be a different seed, got {seeds}")
    if len({r["fingerprint"] for r in runs}) != 1:
        raise SystemExit("the runs are on different datasets")
    if len({frozenset((c["method"], c["k"], c["mode"]) for c in r["cells"]) for r in runs}) != 1:
        if methods is not None:
            raise SystemExit(f"the runs hold {', '.join(methods)} in different K or modes")
        raise SystemExit("the runs evaluated different methods, K or modes: run them with the same --methods, or pool the methods they share with pool --methods")
    return runs


def pooled_cells(runs: list[dict]) -> dict[str, dict[tuple[int, str], dict[str, np.ndarray]]]:
    """Per method, the cells of :func:`pmeta.eval.protocol.evaluate` (``(k, mode)`` -> ``user`` and metrics)
    concatenated over the runs (which :func:`load_runs` checked hold the same cells), with a ``seed``
    array beside ``user``."""
    parts: dict = {}
    for r in runs:
        for cell in r["cells"]:
            part = {"seed": np.full(len(cell["user"]), r["seed"]), **{name: np.asarray(cell[name]) for name in ("user", *METRICS)}}
            parts.setdefault(cell["method"], {}).setdefault((cell["k"], cell["mode"]), []).append(part)
    return {
        method: {key: {name: np.concatenate([p[name] for p in found]) for name in found[0]} for key, found in cells.items()}
        for method, cells in parts.items()
    }


def compare(pooled: dict, resamples: int) -> list[dict]:
    """:func:`pmeta.eval.significance.compare_methods` on the pooled users, stratified by seed, plus
    each row's ``per_seed`` differences and their :func:`across_seeds` summary (with ``p_holm`` over
    the same family as the bootstrap's: every cell and metric of one method and rival)."""
    try:
        rows = compare_methods(pooled, resamples=resamples, seed=0, strata="seed")
    except ValueError as error:
        raise SystemExit(str(error)) from None
    for row in rows:
        mine, theirs = (pooled[name][(row["k"], row["mode"])] for name in (row["method"], row["versus"]))
        row["per_seed"] = {int(s): float(np.mean((mine[row["metric"]] - theirs[row["metric"]])[mine["seed"] == s])) for s in np.unique(mine["seed"])}
        row["across_seeds"] = across_seeds(list(row["per_seed"].values()))
    families: dict = {}
    for row in rows:
        if row["across_seeds"] is not None:
            families.setdefault((row["method"], rival_label(row["versus"])), []).append(row)
    for family in families.values():
        for row, adjusted in zip(family, holm([r["across_seeds"]["p_value"] for r in family])):
            row["across_seeds"]["p_holm"] = adjusted
    return rows


def across_seeds(differences: list[float]) -> dict | None:
    """The seeds' own mean differences taken as n replicates of the whole experiment, bank included:
    their mean, a Student-t 95% CI on n − 1 degrees of freedom and a one-sample t-test's two-sided
    p-value. Unlike the pooled bootstrap, this interval carries the variation between the runs' banks
    and splits, at the price of few degrees of freedom (the seeds' test users and training data
    overlap, so they are not fully independent replicates either). None below 3 seeds; no interval
    and a NaN p-value when the differences do not vary."""
    from scipy import stats

    values = np.asarray(differences, dtype=np.float64)
    if len(values) < 3:
        return None
    mean = float(values.mean())
    if not np.isfinite(values).all() or np.ptp(values) == 0.0:
        # No spread (or no number): the t statistic is undefined, and no interval is claimed; a NaN
        # p-value takes no mark and no place in Holm's family.
        return {"mean": mean, "ci95": [float("nan"), float("nan")], "p_value": float("nan"), "seeds": len(values)}
    test = stats.ttest_1samp(values, 0.0)
    low, high = test.confidence_interval(0.95)
    return {"mean": mean, "ci95": [float(low), float(high)], "p_value": float(test.pvalue), "seeds": len(values)}


def across_cell(row: dict | None) -> str:
    """A row's :func:`across_seeds` written as :func:`~pmeta.eval.significance.comparison_cell` writes
    the bootstrap's (bold when the CI excludes 0, ``†`` when the Holm-adjusted p-value is below
    :data:`FAMILY_ALPHA`); "—" without one, and no interval when the seeds' differences do not vary."""
    if row is None or row.get("across_seeds") is None or not np.isfinite(row["across_seeds"]["mean"]):
        return "—"
    found = row["across_seeds"]
    if not np.isfinite(found["ci95"]).all():
        return f"{signed(found['mean'])} (no spread over the seeds)"
    return comparison_cell({"difference": found["mean"], "ci95": found["ci95"], "p_holm": found.get("p_holm", 1.0), "versus": row["versus"]})


def _subset(pooled: dict, seed: int | None) -> dict:
    """The pooled cells restricted to one seed's users (``None``: all of them)."""
    if seed is None:
        return pooled
    return {method: {key: {name: values[cell["seed"] == seed] for name, values in cell.items()} for key, cell in cells.items()} for method, cells in pooled.items()}


def _goal_cells(pooled: dict, seed: int | None) -> list[str]:
    """One column of the goals table: pmeta's uni99 K = 5 HR@10, then per (mode, K) of pop99 and full
    pmeta's relative margin over the best classical baseline (chosen on these users) in HR@10 / nDCG@10."""
    part = _subset(pooled, seed)
    mine = part.get("pmeta", {})
    column = [f"{np.mean(mine[(5, 'uni99')]['hr@10']):.3f}" if (5, "uni99") in mine else "—"]
    for mode in ("pop99", "full"):
        for k in (1, 3, 5):
            cell = (k, mode)
            if cell not in mine:
                column.append("—")
                continue
            margins = []
            for metric in METRICS:
                best = best_classical(part, cell, metric)
                reference = float(np.mean(part[best][cell][metric])) if best is not None else 0.0  # None: no classical baseline in the runs
                margins.append("—" if reference == 0.0 else f"{(np.mean(mine[cell][metric]) / reference - 1) * 100:+.1f}%")  # no relative margin over 0
            column.append(" / ".join(margins))
    return column


def parse_primary(spec: str) -> list[tuple[str, int, str]]:
    """``--primary`` as ``(mode, K, metric)`` cells: ``"full:5:ndcg@10,pop99:3:hr@10"``."""
    cells = []
    for part in filter(None, (piece.strip() for piece in spec.split(","))):
        fields = part.split(":")
        if len(fields) != 3 or fields[0] not in MODES or not fields[1].isdigit() or int(fields[1]) < 1 or fields[2] not in METRICS:
            raise SystemExit(f"--primary: {part!r} is not MODE:K:METRIC (MODE one of {', '.join(MODES)}, K a positive integer, METRIC one of {', '.join(METRICS)})")
        cells.append((fields[0], int(fields[1]), fields[2]))
    if not cells:
        raise SystemExit("--primary names no cell")
    if len(set(cells)) != len(cells):
        raise SystemExit("--primary names a cell twice")
    return cells


def primary_family(comparisons: list[dict], cells: list[tuple[str, int, str]], method: str = "pmeta") -> list[dict]:
    """The comparisons named before the runs were read (a confirmatory test): ``method`` minus each of
    :data:`PRIMARY_RIVALS` in each cell, with Holm's adjustment over this family alone, on the
    bootstrap's p-values (``p_primary``) and on the t-test's over the seeds (``t_primary``, NaN below 3
    seeds). The family is small because it was fixed in advance; the full tables' Holm families cover
    every cell, as an exploratory read must."""
    found = {(c["mode"], c["k"], c["metric"], c["versus"]): c for c in comparisons if c["method"] == method}
    family = []
    for mode, k, metric in cells:
        for rival in PRIMARY_RIVALS:
            if (mode, k, metric, rival) not in found:
                raise SystemExit(f"--primary: the runs hold no {method} minus {rival} comparison at {mode} K = {k}")
            family.append(found[(mode, k, metric, rival)])
    boot = holm([row["p_value"] for row in family])
    t = holm([np.nan if row["across_seeds"] is None else row["across_seeds"]["p_value"] for row in family])
    return [{**row, "p_primary": b, "t_primary": tp} for row, b, tp in zip(family, boot, t)]


def primary_lines(family: list[dict]) -> list[str]:
    """The ``--primary`` section of :func:`pool`."""
    lines = [
        "## Primary comparisons (named with --primary before the runs were read)",
        "",
        f"Holm's adjustment over these {len(family)} comparisons only; **confirmed** where the adjusted p-value is below "
        f"{FAMILY_ALPHA:.0%}. The bootstrap is stratified by seed and leaves out the variation between banks; the t-test over "
        "the seeds' own differences carries it.",
        "",
        "| pmeta minus | cell | difference [95% CI] | p | p, Holm | verdict | t interval over the seeds | t p, Holm | verdict (t) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in family:
        t_row = row["across_seeds"]
        t_cell = "—" if t_row is None or not np.isfinite(t_row["ci95"]).all() else f"[{signed(t_row['ci95'][0])}, {signed(t_row['ci95'][1])}]"
        t_verdict = "—" if not np.isfinite(row["t_primary"]) else ("**confirmed**" if row["t_primary"] < FAMILY_ALPHA and t_row["mean"] > 0 else "not confirmed")
        verdict = "**confirmed**" if row["p_primary"] < FAMILY_ALPHA and row["difference"] > 0 else "not confirmed"
        lines.append(
            f"| {row['versus']} | {row['mode']} K = {row['k']} {row['metric']} | {signed(row['difference'])} [{signed(row['ci95'][0])}, {signed(row['ci95'][1])}] "
            f"| {row['p_value']:.3f} | {row['p_primary']:.3f} | {verdict} | {t_cell} | {'—' if not np.isfinite(row['t_primary']) else format(row['t_primary'], '.3f')} | {t_verdict} |"
        )
    lines.append("")
    return lines


def pool(paths: list[Path], resamples: int, primary: list[tuple[str, int, str]] | None = None, methods: list[str] | None = None) -> str:
    """report.md-like text: pooled means, the issue's goals per seed, the ``primary`` comparisons when
    named, and pmeta's paired differences; over ``methods`` only when given (see :func:`load_runs`)."""
    if primary is not None and methods is not None:
        absent = [m for m in ("pmeta", *PRIMARY_RIVALS) if m not in methods]
        if absent:
            raise SystemExit(f"--primary compares pmeta with {', '.join(PRIMARY_RIVALS)}: --methods must keep {absent[0]}")
    runs = load_runs(paths, methods)
    left_out = list(dict.fromkeys(m for r in runs for m in r.get("left_out", [])))
    pooled = pooled_cells(runs)
    seeds = [r["seed"] for r in runs]
    any_cell = next(cell for cells in pooled.values() for cell in cells.values())
    counts = {s: int(np.sum(any_cell["seed"] == s)) for s in seeds}
    lines = [
        f"# coldstart-v1 pooled over seeds {', '.join(map(str, seeds))} ({len(any_cell['user'])} test cases, {len(np.unique(any_cell['user']))} distinct users)",
        "",
        *([f"Only {', '.join(methods)} (`--methods`); left out: {', '.join(left_out) or 'none'}.", ""] if methods is not None else []),
        "## HR@10 / nDCG@10, mean over the pooled test users",
        "",
    ]
    for mode in MODES:
        ks = sorted({k for cells in pooled.values() for k, m in cells if m == mode})
        if not ks:
            continue
        lines += [f"### {mode}", "", "| method | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for method, by_cell in pooled.items():
            cells = [by_cell.get((k, mode)) for k in ks]
            lines.append(f"| {method} | " + " | ".join("—" if c is None else f"{np.mean(c['hr@10']):.3f} / {np.mean(c['ndcg@10']):.3f}" for c in cells) + " |")
        lines.append("")
    if "pmeta" in pooled:
        labels = ["uni99 K = 5: pmeta HR@10"] + [f"{mode} K = {k}: pmeta over the best classical, HR@10 / nDCG@10" for mode in ("pop99", "full") for k in (1, 3, 5)]
        columns = [_goal_cells(pooled, s) for s in seeds] + [_goal_cells(pooled, None)]
        lines += [
            "## The issue's goals per seed",
            "",
            "| | " + " | ".join(f"seed {s} ({counts[s]} users)" for s in seeds) + f" | pooled ({len(any_cell['user'])}) |",
            "|---|" + "---|" * (len(seeds) + 1),
        ]
        lines += [f"| {label} | " + " | ".join(column[i] for column in columns) + " |" for i, label in enumerate(labels)]
        lines.append("")
    comparisons = compare(pooled, resamples)
    if primary:
        lines += primary_lines(primary_family(comparisons, primary))
    lines += [
        "## Paired differences, pooled",
        "",
        f"Method minus rival over all the runs' users; 95% CI from {resamples} resamples of a bootstrap stratified by seed "
        "(users drawn within their own run; the variation between the runs' banks is not in it). **Bold**: the CI excludes 0. "
        f"†: the margin holds after Holm's adjustment over every cell and metric of that method and rival (family-wise error rate {FAMILY_ALPHA:.0%}). "
        f"Second table: each seed's own difference (seeds {' / '.join(map(str, seeds))})."
        + (
            f" Third table: the mean of those {len(seeds)} differences with a Student-t 95% CI on {len(seeds) - 1} degrees of freedom, "
            "which treats each seed's run as one replicate of the whole experiment and so carries the variation between the banks "
            "that the bootstrap leaves out (bold and † as above, Holm over the same family)."
            if len(seeds) >= 3
            else ""
        ),
        "",
    ]
    table = {(c["method"], c["metric"], rival_label(c["versus"]), c["mode"], c["k"]): c for c in comparisons}
    ks = sorted({c["k"] for c in comparisons})
    for method in dict.fromkeys(c["method"] for c in comparisons):
        for metric in METRICS:
            rivals = list(dict.fromkeys(rival_label(c["versus"]) for c in comparisons if (c["method"], c["metric"]) == (method, metric)))
            header = ["| versus | mode | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
            pooled_rows, seed_rows, across_rows = [], [], []
            for rival in rivals:
                for mode in MODES:
                    found = [table.get((method, metric, rival, mode, k)) for k in ks]
                    if not any(found):
                        continue
                    pooled_rows.append(f"| {rival} | {mode} | " + " | ".join(comparison_cell(c) for c in found) + " |")
                    seed_rows.append(f"| {rival} | {mode} | " + " | ".join("—" if c is None else " / ".join(signed(v) for v in c["per_seed"].values()) for c in found) + " |")
                    across_rows.append(f"| {rival} | {mode} | " + " | ".join(across_cell(c) for c in found) + " |")
            lines += [f"### {method} minus rival: {metric}", "", *header, *pooled_rows, "", f"Per seed ({' / '.join(map(str, seeds))}):", "", *header, *seed_rows, ""]
            if len(seeds) >= 3:
                lines += [f"Across the {len(seeds)} seeds (mean of the per-seed differences, t interval):", "", *header, *across_rows, ""]
    return "\n".join(lines)


def versus(before: list[Path], after: list[Path], methods: list[str], resamples: int, against: str | None = None) -> str:
    """The same seeds' test users measured twice, with two banks (a changed default, say): each of
    ``methods``' paired difference *after − before* per (K, mode) cell and metric, over the users of
    every seed pooled, with a bootstrap stratified by seed and Holm's adjustment over each method's
    cells and metrics. ``before`` and ``after`` are output directories of ``run`` matched by seed:
    each pair must be the same seed and data and hold the same users in the same order per cell;
    their banks may differ (that is the point), and are named in the text. ``against``: the
    *before* runs' method each of ``methods`` of the *after* runs is compared with (default: the
    same method), e.g. a transferred bank's pmeta against the target's own ``popularity-time``."""
    if len(before) != len(after):
        raise SystemExit(f"versus needs as many --after runs as --before runs, got {len(before)} and {len(after)}")
    if not methods or len(set(methods)) != len(methods):
        raise SystemExit("--methods must name each method once")
    if resamples < 1:
        raise SystemExit(f"--resamples must be at least 1, got {resamples}")
    runs = [read_runs(before), read_runs(after)]
    pairs: dict[int, tuple[dict, dict]] = {}
    for old in runs[0]:
        if old["seed"] in pairs:
            raise SystemExit(f"two --before runs are seed {old['seed']}")
        pairs[old["seed"]] = (old, None)
    for new in runs[1]:
        if new["seed"] not in pairs or pairs[new["seed"]][1] is not None:
            raise SystemExit(f"--after holds seed {new['seed']}, which no --before run matches once")
        pairs[new["seed"]] = (pairs[new["seed"]][0], new)
    if len({r["fingerprint"] for side in runs for r in side}) != 1:
        raise SystemExit("the runs are on different datasets")
    pooled: dict[str, dict[tuple[int, str], dict[str, list]]] = {"before": {}, "after": {}}
    for seed, (old, new) in sorted(pairs.items()):
        cells = [{(c["method"], c["k"], c["mode"]): c for c in run["cells"]} for run in (old, new)]
        for method in methods:
            named = (against or method, method)  # the before run's method, the after run's
            keys = [sorted(k[1:] for k in found if k[0] == name) for found, name in zip(cells, named)]
            if not keys[0] or keys[0] != keys[1]:
                said = method if against is None else f"{against} (before) and {method} (after)"
                raise SystemExit(f"seed {seed}: {said} {'is' if against is None else 'are'} not in both runs in the same (K, mode) cells")
            for key in keys[0]:
                if cells[0][(named[0], *key)]["user"] != cells[1][(named[1], *key)]["user"]:
                    raise SystemExit(f"seed {seed}: {method} at K = {key[0]} {key[1]} was measured on other users in the two runs")
                for label, found, name in (("before", cells[0], named[0]), ("after", cells[1], named[1])):
                    cell = pooled[label].setdefault(method, {}).setdefault(key, {"seed": [], **{m: [] for m in METRICS}})
                    cell["seed"].extend([seed] * len(found[(name, *key)]["user"]))
                    for metric in METRICS:
                        cell[metric].extend(found[(name, *key)][metric])
    seeds = sorted(pairs)
    lines = [
        f"# coldstart-v1: two banks on the same test users (seeds {', '.join(map(str, seeds))})",
        "",
        "Banks: " + "; ".join(f"seed {s}: before {pairs[s][0]['bank']}, after {pairs[s][1]['bank']}" for s in seeds) + ".",
        "",
        f"After minus before over the same users; 95% CI from {resamples} resamples of a bootstrap stratified by seed. **Bold**: the CI excludes 0. †: after Holm's adjustment over every cell and metric of that method (family-wise error rate {FAMILY_ALPHA:.0%}).",
    ]
    for method in methods:
        rows = []
        for metric in METRICS:
            for key in sorted(pooled["after"][method], key=lambda key: (MODES.index(key[1]) if key[1] in MODES else len(MODES), key[0])):
                old, new = pooled["before"][method][key], pooled["after"][method][key]
                result = paired_bootstrap(new[metric], old[metric], resamples=resamples, seed=0, strata=new["seed"])
                rows.append({"metric": metric, "k": key[0], "mode": key[1], "before": float(np.mean(old[metric])), "after": float(np.mean(new[metric])), **result})
        for row, adjusted in zip(rows, holm([r["p_value"] for r in rows])):
            row["p_holm"] = adjusted
        for metric in METRICS:
            mine = [r for r in rows if r["metric"] == metric]
            ks = sorted({r["k"] for r in mine})
            title = method if against is None else f"{method} (after) against {against} (before)"
            lines += ["", f"## {title}: {metric}, before → after, difference [95% CI]", "", "| mode | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
            for mode in dict.fromkeys(r["mode"] for r in mine):
                cells = {r["k"]: r for r in mine if r["mode"] == mode}
                lines.append(f"| {mode} | " + " | ".join(f"{cells[k]['before']:.3f} → {cells[k]['after']:.3f}: {comparison_cell({**cells[k], 'versus': ''})}" if k in cells else "—" for k in ks) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="evaluate one (seed, bank) pair and keep per-user metrics")
    one.add_argument("--bank", type=Path, required=True, help="a bank built with --seed SEED on the same data")
    one.add_argument("--data", type=Path, default=None, help="MovieLens directory (default: the shipped ml-latest-small)")
    one.add_argument("--format", default="auto", help="auto, ml-100k, ml-1m or ml-latest")
    one.add_argument("--seed", type=int, required=True)
    one.add_argument("--out", type=Path, required=True)
    one.add_argument("--methods", default=",".join(RUN_METHODS))
    one.add_argument("--threads", type=int, default=1)
    one.add_argument("--users", type=int, default=None, help="only the first N test users (quick runs)")
    one.add_argument("--transfer-prior", default="source", choices=["source", "target", "tuned"], help="a bank on another release: its time prior read through the title match (source), counted on --data's train users (target), or also with h and β chosen on them (tuned)")
    swap = sub.add_parser("replace", help="a run with some methods' cells taken from another run of the same seed and bank")
    swap.add_argument("base", type=Path, help="output directory of `run` (every method)")
    swap.add_argument("part", type=Path, help="output directory of `run` of the methods to replace (e.g. --methods ease)")
    swap.add_argument("--out", type=Path, required=True)
    swap.add_argument("--add", action="store_true", help="also take methods the base run lacks (e.g. one left out of it for time)")
    pair = sub.add_parser("versus", help="the same seeds' users measured with two banks: each method's after − before")
    pair.add_argument("--before", type=Path, nargs="+", required=True, help="output directories of `run` with the first banks")
    pair.add_argument("--after", type=Path, nargs="+", required=True, help="output directories of `run` of the same seeds with the second banks")
    pair.add_argument("--methods", default="pmeta,pmeta-no-steps", help="the methods to compare (default: pmeta, pmeta-no-steps)")
    pair.add_argument("--resamples", type=int, default=2000)
    pair.add_argument("--against", default=None, help="compare each --methods of the --after runs with this method of the --before runs (default: the same method)")
    many = sub.add_parser("pool", help="pool the runs' users and compare pmeta with its rivals")
    many.add_argument("runs", type=Path, nargs="+", help="output directories of `run`")
    many.add_argument("--resamples", type=int, default=2000)
    many.add_argument("--methods", default=None, help="pool only these methods (e.g. to leave out one that a run lacks)")
    many.add_argument(
        "--primary",
        default=None,
        help="MODE:K:METRIC[,...]: comparisons of pmeta with prompt-maml and per-user-lora fixed before the runs were read, "
        "reported with Holm's adjustment over that family alone (e.g. full:5:ndcg@10)",
    )
    args = parser.parse_args()
    from pmeta.errors import PmetaError

    try:
        if args.command == "run":
            run(args.bank, args.seed, args.out, [m.strip() for m in args.methods.split(",") if m.strip()], args.threads, args.users, args.data, args.format, args.transfer_prior)
        elif args.command == "replace":
            print(replace(args.base, args.part, args.out, args.add))
        elif args.command == "versus":
            print(versus(args.before, args.after, [m.strip() for m in args.methods.split(",") if m.strip()], args.resamples, args.against))
        else:
            methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
            print(pool(args.runs, args.resamples, None if args.primary is None else parse_primary(args.primary), methods))
    except PmetaError as error:
        raise SystemExit(f"error: {error}") from None
    except BrokenPipeError:  # output piped into a reader that closed early (`| head`): stop quietly, as Python's docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush does not raise again
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
